package postgres

import (
	"errors"
	"fmt"
	"regexp"

	"github.com/jackc/pgx/v5"
)

// Defaults of Table.
const (
	SchemaDefault = "public"
	TableDefault  = "outbox"
)

var identRE = regexp.MustCompile(`^[a-z_][a-z0-9_]*$`)

// Table names one outbox: its schema and table. The parked table is the table's name with
// "_parked" appended, the table of pinned partition counts the name with "_topics".
type Table struct {
	// Schema holds the outbox tables. Default "public".
	Schema string
	// Name is the outbox table's name. Default "outbox".
	Name string
}

// WithDefaults returns t with empty fields set to their defaults.
func (t Table) WithDefaults() Table {
	if t.Schema == "" {
		t.Schema = SchemaDefault
	}
	if t.Name == "" {
		t.Name = TableDefault
	}
	return t
}

// Validate checks that the names are plain lower-case SQL identifiers.
func (t Table) Validate() error {
	var errs []error
	if !identRE.MatchString(t.Schema) || len(t.Schema) > 63 {
		errs = append(errs, fmt.Errorf("database.schema: must match %s and be at most 63 bytes, got %q", identRE, t.Schema))
	}
	if !identRE.MatchString(t.Name) || len(t.Name) > 40 {
		errs = append(errs, fmt.Errorf("database.table: must match %s and be at most 40 bytes, got %q", identRE, t.Name))
	}
	return errors.Join(errs...)
}

// String returns schema.name.
func (t Table) String() string { return t.Schema + "." + t.Name }

func (t Table) outbox() string { return pgx.Identifier{t.Schema, t.Name}.Sanitize() }
func (t Table) parked() string { return pgx.Identifier{t.Schema, t.Name + "_parked"}.Sanitize() }
func (t Table) topics() string { return pgx.Identifier{t.Schema, t.Name + "_topics"}.Sanitize() }
func (t Table) migrations() string {
	return pgx.Identifier{t.Schema, "outbox_relay_migrations"}.Sanitize()
}
func (t Table) notifyFunc() string        { return pgx.Identifier{t.Schema, t.Name + "_notify"}.Sanitize() }
func (t Table) name(suffix string) string { return pgx.Identifier{t.Name + "_" + suffix}.Sanitize() }

// Channel returns the LISTEN/NOTIFY channel of the outbox.
func (t Table) Channel() string { return "outbox_relay_" + t.Schema + "_" + t.Name }

// lockKey returns the text hashed into the leadership advisory lock.
func (t Table) lockKey() string { return "outbox-relay:" + t.String() }
