package postgres

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	outboxsql "github.com/outbox-relay/outbox-relay/sql"
)

// AdoptPlan is what 'outbox-relay migrate --adopt' adds to an existing outbox table so that the
// relay can read it: its ordering column, its bookkeeping columns, its indexes, the parked
// table, the wake-up trigger and the table of pinned partition counts. It never alters, drops or
// renames a column the writers use, so their INSERTs keep working unchanged.
type AdoptPlan struct {
	// Table is the adopted table, with its defaults.
	Table Table
	// Statements are the statements to run, in order, in one transaction. Empty when the table is
	// adopted already.
	Statements []string
	// Locks says, one line per statement that locks the outbox table, which lock it takes and for
	// how long.
	Locks []string
	// Rows is the planner's estimate of the table's rows, -1 when the table was never analyzed;
	// Bytes is its size on disk.
	Rows, Bytes int64
}

// column is one column of the adopted table, as pg_attribute has it.
type column struct {
	typ      string // format_type, e.g. "character varying(255)"
	notNull  bool
	sequence bool // filled by an identity or a sequence (serial)
}

// The types each mapped column may have.
var (
	textTypes    = []string{"text", "character varying", "character"}
	eventIDTypes = []string{"uuid", "text", "character varying"}
	payloadTypes = []string{"bytea", "jsonb", "json", "text"}
)

// baseType returns typ without its modifier: "character varying(255)" is "character varying".
func baseType(typ string) string {
	if i := strings.IndexByte(typ, '('); i >= 0 {
		return typ[:i]
	}
	return typ
}

// PlanAdopt reads the existing table of t and returns what Adopt would run on it. It refuses,
// with an error naming the key, a mapped column that is missing or of a type the relay cannot
// read, and a relay column that exists with another type.
func PlanAdopt(ctx context.Context, pool *pgxpool.Pool, t Table) (AdoptPlan, error) {
	t = t.WithDefaults()
	if err := t.Validate(); err != nil {
		return AdoptPlan{}, err
	}
	p := AdoptPlan{Table: t}
	var reg *string
	if err := pool.QueryRow(ctx, `SELECT to_regclass($1)::text`, t.outbox()).Scan(&reg); err != nil {
		return p, fmt.Errorf("adopt %s: %w", t, err)
	}
	if reg == nil {
		return p, fmt.Errorf("adopt %s: the table does not exist (database.schema, database.table)", t)
	}
	if err := pool.QueryRow(ctx, `SELECT reltuples::bigint, pg_table_size(oid) FROM pg_class WHERE oid = $1::regclass`,
		t.outbox()).Scan(&p.Rows, &p.Bytes); err != nil {
		return p, fmt.Errorf("adopt %s: %w", t, err)
	}
	cols := map[string]column{}
	rows, err := pool.Query(ctx, `SELECT attname, format_type(atttypid, atttypmod), attnotnull,
			attidentity <> '' OR pg_get_serial_sequence($1::text, attname) IS NOT NULL
		FROM pg_attribute WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped`, t.outbox())
	if err != nil {
		return p, fmt.Errorf("adopt %s: read its columns: %w", t, err)
	}
	var name string
	var c column
	if _, err := pgx.ForEachRow(rows, []any{&name, &c.typ, &c.notNull, &c.sequence}, func() error {
		cols[name] = c
		return nil
	}); err != nil {
		return p, fmt.Errorf("adopt %s: read its columns: %w", t, err)
	}

	var errs []error
	check := func(key, col string, types []string) {
		if col == Absent {
			return
		}
		c, ok := cols[col]
		switch {
		case !ok:
			errs = append(errs, fmt.Errorf("database.columns.%s: %s has no column %q", key, t, col))
		case !slices.Contains(types, baseType(c.typ)):
			errs = append(errs, fmt.Errorf("database.columns.%s: column %q is %s; the relay reads %s", key, col, c.typ, strings.Join(types, ", ")))
		}
	}
	m := t.Columns
	check("event_id", m.EventID, eventIDTypes)
	check("key", m.Key, textTypes)
	check("event_type", m.EventType, textTypes)
	check("aggregate_type", m.AggregateType, textTypes)
	check("payload", m.Payload, payloadTypes)
	check("topic", m.Topic, textTypes)
	check("headers", m.Headers, []string{"jsonb"})
	check("occurred_at", m.OccurredAt, []string{"timestamp with time zone"})

	outbox := t.outbox()
	rewrite := false
	if c, ok := cols[m.ID]; ok {
		if c.typ != "bigint" || !c.sequence {
			errs = append(errs, fmt.Errorf("database.columns.id: column %q is %s; the relay's ordering column must be a bigint "+
				"filled by an identity or a sequence (name another column, which --adopt adds)", m.ID, c.typ))
		}
	} else {
		// Filling the new column numbers the existing rows, in their order on disk: a rewrite.
		rewrite = true
		p.Statements = append(p.Statements, `ALTER TABLE `+outbox+` ADD COLUMN `+t.id("")+` bigint GENERATED ALWAYS AS IDENTITY`)
	}
	// The bookkeeping columns: none needs a rewrite. created_at's default is now() for the rows
	// already there, then clock_timestamp() for new ones, as in the relay's own table.
	for _, b := range []struct{ name, typ, add string }{
		{"created_at", "timestamp with time zone", "timestamptz NOT NULL DEFAULT now()"},
		{"attempts", "integer", "integer NOT NULL DEFAULT 0"},
		{"next_attempt_at", "timestamp with time zone", "timestamptz"},
		{"last_error", "text", "text"},
		{"dispatched_at", "timestamp with time zone", "timestamptz"},
		// The writing transaction, for kafka.delivery=exactly_once (sql/migrations/003_tx.sql):
		// NULL for the rows already there, so no rewrite.
		{"tx", "xid8", "xid8"},
	} {
		c, ok := cols[b.name]
		switch {
		case !ok:
			p.Statements = append(p.Statements, `ALTER TABLE `+outbox+` ADD COLUMN `+pgx.Identifier{b.name}.Sanitize()+` `+b.add)
			if b.name == "tx" {
				p.Statements = append(p.Statements, `ALTER TABLE `+outbox+` ALTER COLUMN tx SET DEFAULT pg_current_xact_id()`)
			}
			if b.name == "created_at" {
				p.Statements = append(p.Statements, `ALTER TABLE `+outbox+` ALTER COLUMN created_at SET DEFAULT clock_timestamp()`)
			}
		case c.typ != b.typ || (strings.Contains(b.add, "NOT NULL") && !c.notNull):
			errs = append(errs, fmt.Errorf("database.table: %s has a column %q of type %s (not null: %t); the relay needs its own %s %s there: rename the table's",
				t, b.name, c.typ, c.notNull, b.name, b.add))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return p, err
	}
	idxCount := len(p.Statements)
	// The trigger's function is the relay's own (sql/migrations/004_wake.sql): writers notify
	// only while the relay sleeps.
	wake, err := render(outboxsql.Migrations, "migrations/004_wake.sql", t)
	if err != nil {
		return p, err
	}
	p.Statements = append(p.Statements,
		`CREATE INDEX IF NOT EXISTS `+t.name("pending_idx")+` ON `+outbox+` (`+t.id("")+`) WHERE dispatched_at IS NULL`,
		`CREATE INDEX IF NOT EXISTS `+t.name("failing_idx")+` ON `+outbox+` (`+t.col("", m.AggregateType)+`, `+t.col("", m.Key)+`, `+t.id("")+`)
    WHERE attempts > 0 AND dispatched_at IS NULL`,
		`CREATE INDEX IF NOT EXISTS `+t.name("dispatched_idx")+` ON `+outbox+` (dispatched_at) WHERE dispatched_at IS NOT NULL`,
		// The claims of exactly-once delivery read the rest of a transaction by range of ids
		// (sql/migrations/005_tx_id.sql).
		`CREATE INDEX IF NOT EXISTS `+t.name("tx_id_idx")+` ON `+outbox+` (tx, `+t.id("")+`) WHERE dispatched_at IS NULL`,
		`DROP INDEX IF EXISTS `+pgx.Identifier{t.Schema, t.Name + "_tx_idx"}.Sanitize(),
		// The parked table has the relay's layout, but keeps the outbox's types of the event id
		// and the payload, so parking and retrying a row copy them unchanged.
		`CREATE TABLE IF NOT EXISTS `+t.parked()+` (
    id              bigint      PRIMARY KEY,
    event_id        `+cols[m.EventID].typ+` NOT NULL,
    aggregate_type  text        NOT NULL,
    aggregate_id    text,
    event_type      text        NOT NULL,
    payload         `+cols[m.Payload].typ+`,
    topic           text,
    headers         jsonb,
    occurred_at     timestamptz NOT NULL,
    created_at      timestamptz NOT NULL,
    attempts        integer     NOT NULL,
    reason          text        NOT NULL,
    parked_at       timestamptz NOT NULL DEFAULT now()
)`,
		`CREATE INDEX IF NOT EXISTS `+t.name("parked_key_idx")+` ON `+t.parked()+` (aggregate_type, aggregate_id)`,
		`CREATE TABLE IF NOT EXISTS `+t.topics()+` (
    topic      text        PRIMARY KEY,
    partitions integer     NOT NULL CHECK (partitions > 0),
    pinned_at  timestamptz NOT NULL DEFAULT now()
)`,
		wake,
		`DROP TRIGGER IF EXISTS `+t.name("notify")+` ON `+outbox,
		`CREATE TRIGGER `+t.name("notify")+` AFTER INSERT ON `+outbox+`
    FOR EACH STATEMENT EXECUTE FUNCTION `+t.notifyFunc()+`()`,
	)
	done, err := adopted(ctx, pool, t, idxCount == 0)
	if err != nil {
		return p, err
	}
	if done {
		p.Statements = nil
		return p, nil
	}
	size := fmt.Sprintf("about %d rows, %d MiB", p.Rows, p.Bytes>>20)
	if p.Rows < 0 {
		size = fmt.Sprintf("%d MiB, rows not estimated: never analyzed", p.Bytes>>20)
	}
	switch {
	case rewrite:
		p.Locks = append(p.Locks, fmt.Sprintf("ACCESS EXCLUSIVE on %s from the first ALTER TABLE to the commit: every writer and "+
			"reader of the table waits while the new %s column rewrites it (%s) and the indexes are built by reading it again", t, m.ID, size))
	case idxCount > 0:
		p.Locks = append(p.Locks, fmt.Sprintf("ACCESS EXCLUSIVE on %s from the first ALTER TABLE to the commit: every writer and "+
			"reader of the table waits while the indexes are built by reading it (%s); the new columns have constant defaults and rewrite nothing", t, size))
	default:
		p.Locks = append(p.Locks, fmt.Sprintf("SHARE on %s while the indexes are built by reading it (%s): writers wait, readers do not", t, size),
			"SHARE ROW EXCLUSIVE for CREATE TRIGGER: writers wait until the commit")
	}
	return p, nil
}

// adopted reports whether t is adopted already: its columns are all there (columns) and so are
// its parked table, its pending index, its index of transactions (tx, id) and its trigger.
func adopted(ctx context.Context, pool *pgxpool.Pool, t Table, columns bool) (bool, error) {
	if !columns {
		return false, nil
	}
	var ok bool
	// A trigger function that notifies on every insert is the one adopted before the wake-up
	// protocol: it is replaced.
	err := pool.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL AND to_regclass($3) IS NOT NULL
		AND to_regclass($7) IS NOT NULL AND EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = $4::regclass AND tgname = $5)
		AND EXISTS (SELECT 1 FROM pg_proc WHERE oid = to_regprocedure($6) AND prosrc LIKE '%pg_try_advisory_xact_lock_shared%')`,
		t.parked(), t.topics(), pgx.Identifier{t.Schema, t.Name + "_pending_idx"}.Sanitize(), t.outbox(), t.Name+"_notify",
		t.notifyFunc()+"()", pgx.Identifier{t.Schema, t.Name + "_tx_id_idx"}.Sanitize()).Scan(&ok)
	if err != nil {
		return false, fmt.Errorf("adopt %s: %w", t, err)
	}
	return ok, nil
}

// Adopt runs the statements of p in one transaction, which waits at most lockTimeout for each
// lock (zero: no bound), so a long transaction on the table cannot queue the writers behind it
// for long.
func Adopt(ctx context.Context, pool *pgxpool.Pool, p AdoptPlan, lockTimeout string) error {
	if len(p.Statements) == 0 {
		return nil
	}
	tx, err := pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("adopt %s: %w", p.Table, err)
	}
	defer func() { _ = tx.Rollback(ctx) }()
	if lockTimeout != "" {
		if _, err := tx.Exec(ctx, `SELECT set_config('lock_timeout', $1, true)`, lockTimeout); err != nil {
			return fmt.Errorf("adopt %s: %w", p.Table, err)
		}
	}
	for _, s := range p.Statements {
		if _, err := tx.Exec(ctx, s); err != nil {
			return fmt.Errorf("adopt %s: %s: %w", p.Table, firstLine(s), err)
		}
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("adopt %s: %w", p.Table, err)
	}
	return nil
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}
