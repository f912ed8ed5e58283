package postgres

import (
	"bytes"
	"context"
	"fmt"
	"io/fs"
	"sort"
	"strings"
	"text/template"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	outboxsql "github.com/outbox-relay/outbox-relay/sql"
)

// MigrationStep reports one migration: applied now, or already there.
type MigrationStep struct {
	Name    string
	Applied bool
}

// templateData fills the migrations' placeholders.
type templateData struct{ t Table }

func (d templateData) Outbox() string         { return d.t.outbox() }
func (d templateData) Parked() string         { return d.t.parked() }
func (d templateData) Topics() string         { return d.t.topics() }
func (d templateData) NotifyFunc() string     { return d.t.notifyFunc() }
func (d templateData) ChannelLiteral() string { return "'" + d.t.Channel() + "'" }
func (d templateData) Name(s string) string   { return d.t.name(s) }
func (d templateData) AwakeKey() string       { return "'" + d.t.awakeKey() + "'" }
func (d templateData) SleepKey() string       { return "'" + d.t.sleepKey() + "'" }
func (d templateData) Users() string          { return pgx.Identifier{d.t.Schema, "users"}.Sanitize() }

// Index returns the quoted, schema-qualified name of the outbox's index name (as Name names it),
// for DROP INDEX.
func (d templateData) Index(name string) string {
	return pgx.Identifier{d.t.Schema, d.t.Name + "_" + name}.Sanitize()
}

// Table returns the quoted name of the example's table name in the outbox's schema.
func (d templateData) Table(name string) string { return pgx.Identifier{d.t.Schema, name}.Sanitize() }

// Migrate applies the outbox migrations of t that are not applied yet, in order, each in its own
// transaction. It is idempotent and safe to run from several processes at once: an advisory
// lock serializes them. progress, when not nil, is called after each step.
func Migrate(ctx context.Context, pool *pgxpool.Pool, t Table, progress func(MigrationStep)) ([]MigrationStep, error) {
	if t.Mapped() {
		return nil, fmt.Errorf("database.columns: %s is an existing table with its own columns: run 'outbox-relay migrate --adopt' instead", t.WithDefaults())
	}
	return migrate(ctx, pool, t, outboxsql.Migrations, "migrations", "outbox", progress)
}

// MigrateExample creates the example service's tables (users) in t's schema.
func MigrateExample(ctx context.Context, pool *pgxpool.Pool, t Table) error {
	_, err := migrate(ctx, pool, t, outboxsql.Example, "example", "example", nil)
	return err
}

func migrate(ctx context.Context, pool *pgxpool.Pool, t Table, fsys fs.FS, dir, kind string, progress func(MigrationStep)) ([]MigrationStep, error) {
	t = t.WithDefaults()
	if err := t.Validate(); err != nil {
		return nil, err
	}
	entries, err := fs.ReadDir(fsys, dir)
	if err != nil {
		return nil, fmt.Errorf("read migrations: %w", err)
	}
	var names []string
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), ".sql") {
			names = append(names, e.Name())
		}
	}
	sort.Strings(names)
	target := kind + ":" + t.String()
	var steps []MigrationStep
	for _, name := range names {
		raw, err := fs.ReadFile(fsys, dir+"/"+name)
		if err != nil {
			return steps, fmt.Errorf("read migration %s: %w", name, err)
		}
		sqlText, err := renderText(name, string(raw), t)
		if err != nil {
			return steps, err
		}
		applied, err := applyOne(ctx, pool, t, target, name, sqlText)
		if err != nil {
			return steps, fmt.Errorf("apply migration %s to %s: %w", name, t, err)
		}
		step := MigrationStep{Name: name, Applied: applied}
		steps = append(steps, step)
		if progress != nil {
			progress(step)
		}
	}
	return steps, nil
}

// render returns the migration file name of fsys with t's names filled in.
func render(fsys fs.FS, name string, t Table) (string, error) {
	raw, err := fs.ReadFile(fsys, name)
	if err != nil {
		return "", fmt.Errorf("read migration %s: %w", name, err)
	}
	return renderText(name, string(raw), t)
}

// renderText returns the migration raw, named name, with t's names filled in.
func renderText(name, raw string, t Table) (string, error) {
	tmpl, err := template.New(name).Option("missingkey=error").Parse(raw)
	if err != nil {
		return "", fmt.Errorf("parse migration %s: %w", name, err)
	}
	var sqlText bytes.Buffer
	if err := tmpl.Execute(&sqlText, templateData{t}); err != nil {
		return "", fmt.Errorf("render migration %s: %w", name, err)
	}
	return sqlText.String(), nil
}

func applyOne(ctx context.Context, pool *pgxpool.Pool, t Table, target, name, sqlText string) (bool, error) {
	tx, err := pool.Begin(ctx)
	if err != nil {
		return false, err
	}
	defer func() { _ = tx.Rollback(ctx) }()
	// Serialize concurrent migrators (two replicas starting together) on one advisory lock.
	if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtextextended('outbox-relay:migrate', 0))`); err != nil {
		return false, err
	}
	if _, err := tx.Exec(ctx, `CREATE SCHEMA IF NOT EXISTS `+pgx.Identifier{t.Schema}.Sanitize()); err != nil {
		return false, err
	}
	if _, err := tx.Exec(ctx, `CREATE TABLE IF NOT EXISTS `+t.migrations()+` (
		target     text        NOT NULL,
		name       text        NOT NULL,
		applied_at timestamptz NOT NULL DEFAULT now(),
		PRIMARY KEY (target, name))`); err != nil {
		return false, err
	}
	var done bool
	if err := tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM `+t.migrations()+` WHERE target = $1 AND name = $2)`,
		target, name).Scan(&done); err != nil {
		return false, err
	}
	if done {
		return false, tx.Commit(ctx)
	}
	if _, err := tx.Exec(ctx, sqlText); err != nil {
		return false, err
	}
	if _, err := tx.Exec(ctx, `INSERT INTO `+t.migrations()+` (target, name) VALUES ($1, $2)`, target, name); err != nil {
		return false, err
	}
	return true, tx.Commit(ctx)
}
