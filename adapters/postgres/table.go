package postgres

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"unicode/utf8"

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
	// Columns maps the relay's columns to the table's: see Columns. The zero value is the
	// relay's own layout (sql/migrations).
	Columns Columns
}

// Absent is the value of an optional Columns field whose column the table does not have.
const Absent = "none"

// Columns names the columns the relay reads in an existing outbox table that 'outbox-relay
// migrate --adopt' adopted. An empty field is the relay's own column name (the field's doc
// names it). Topic, Headers and OccurredAt may be Absent: rows then have no topic override, no
// headers, and occurred_at is the relay's created_at (when the row was inserted). The relay's
// bookkeeping columns (created_at, attempts, next_attempt_at, last_error, dispatched_at) keep
// their names; --adopt adds them.
type Columns struct {
	// ID is the ordering column, a bigint filled by an identity or a sequence. Default "id".
	ID string
	// EventID is the event's unique id, uuid or text. Default "event_id".
	EventID string
	// Key is the record key, text or varchar. Default "aggregate_id".
	Key string
	// EventType is the event's type, text or varchar. Default "event_type".
	EventType string
	// AggregateType is the aggregate's type, text or varchar. Default "aggregate_type".
	AggregateType string
	// Payload is the record's value: bytea, jsonb, json or text. Default "payload".
	Payload string
	// Topic overrides the topic template when set, text or varchar, or Absent. Default "topic".
	Topic string
	// Headers is a jsonb object of string values copied to record headers, or Absent.
	// Default "headers".
	Headers string
	// OccurredAt is when the event occurred, timestamptz, or Absent. Default "occurred_at".
	OccurredAt string
}

// DebeziumColumns is the mapping of Debezium's outbox table: id uuid, aggregatetype,
// aggregateid, type and payload, with the relay's ordering column named outbox_relay_id.
var DebeziumColumns = Columns{
	ID: "outbox_relay_id", EventID: "id", Key: "aggregateid", EventType: "type", AggregateType: "aggregatetype",
	Payload: "payload", Topic: Absent, Headers: Absent, OccurredAt: Absent,
}

// RelayColumns is the relay's own layout, which Columns' defaults name.
var RelayColumns = Columns{
	ID: "id", EventID: "event_id", Key: "aggregate_id", EventType: "event_type", AggregateType: "aggregate_type",
	Payload: "payload", Topic: "topic", Headers: "headers", OccurredAt: "occurred_at",
}

// withDefaults returns c with empty fields set to the relay's own names.
func (c Columns) withDefaults() Columns {
	d := RelayColumns
	for _, f := range []struct{ v, def *string }{{&c.ID, &d.ID}, {&c.EventID, &d.EventID}, {&c.Key, &d.Key},
		{&c.EventType, &d.EventType}, {&c.AggregateType, &d.AggregateType}, {&c.Payload, &d.Payload},
		{&c.Topic, &d.Topic}, {&c.Headers, &d.Headers}, {&c.OccurredAt, &d.OccurredAt}} {
		if *f.v == "" {
			*f.v = *f.def
		}
	}
	return c
}

// Mapped reports whether t's columns differ from the relay's own layout.
func (t Table) Mapped() bool { return t.Columns.withDefaults() != RelayColumns }

// fields returns the fields of c with their keys, in the order of the configuration.
func (c *Columns) fields() []struct {
	key      string
	v        *string
	optional bool
} {
	return []struct {
		key      string
		v        *string
		optional bool
	}{{"id", &c.ID, false}, {"event_id", &c.EventID, false}, {"key", &c.Key, false},
		{"event_type", &c.EventType, false}, {"aggregate_type", &c.AggregateType, false},
		{"payload", &c.Payload, false}, {"topic", &c.Topic, true}, {"headers", &c.Headers, true},
		{"occurred_at", &c.OccurredAt, true}}
}

// bookkeeping are the relay's own columns, which a mapped column may not be.
var bookkeeping = []string{"created_at", "attempts", "next_attempt_at", "last_error", "dispatched_at"}

// WithDefaults returns t with empty fields set to their defaults.
func (t Table) WithDefaults() Table {
	if t.Schema == "" {
		t.Schema = SchemaDefault
	}
	if t.Name == "" {
		t.Name = TableDefault
	}
	t.Columns = t.Columns.withDefaults()
	return t
}

// Validate checks that the names are plain lower-case SQL identifiers, and that no two mapped
// columns are the same.
func (t Table) Validate() error {
	var errs []error
	if !identRE.MatchString(t.Schema) || len(t.Schema) > 63 {
		errs = append(errs, fmt.Errorf("database.schema: must match %s and be at most 63 bytes, got %q", identRE, t.Schema))
	}
	if !identRE.MatchString(t.Name) || len(t.Name) > 40 {
		errs = append(errs, fmt.Errorf("database.table: must match %s and be at most 40 bytes, got %q", identRE, t.Name))
	}
	c := t.Columns.withDefaults()
	seen := map[string]string{}
	for _, f := range c.fields() {
		key := "database.columns." + f.key
		switch {
		case *f.v == Absent && f.optional:
			continue
		case *f.v == Absent:
			errs = append(errs, fmt.Errorf("%s: the relay needs this column; only topic, headers and occurred_at may be %q", key, Absent))
			continue
		case !identRE.MatchString(*f.v) || len(*f.v) > 63:
			errs = append(errs, fmt.Errorf("%s: must match %s and be at most 63 bytes, got %q", key, identRE, *f.v))
			continue
		case slices.Contains(bookkeeping, *f.v):
			errs = append(errs, fmt.Errorf("%s: %q is one of the relay's own columns (%s)", key, *f.v, strings.Join(bookkeeping, ", ")))
		}
		if other, ok := seen[*f.v]; ok {
			errs = append(errs, fmt.Errorf("%s: column %q is also database.columns.%s", key, *f.v, other))
		}
		seen[*f.v] = f.key
	}
	return errors.Join(errs...)
}

// col returns the quoted column name, qualified with alias when not empty.
func (t Table) col(alias, name string) string {
	if alias == "" {
		return pgx.Identifier{name}.Sanitize()
	}
	return alias + "." + pgx.Identifier{name}.Sanitize()
}

// The SQL of each column of t (which has its defaults), qualified with alias when not empty.
// The text columns are cast to text: a mapped one may be varchar.
func (t Table) id(alias string) string      { return t.col(alias, t.Columns.ID) }
func (t Table) eventID(alias string) string { return t.col(alias, t.Columns.EventID) }
func (t Table) key(alias string) string     { return t.col(alias, t.Columns.Key) + "::text" }
func (t Table) evType(alias string) string  { return t.col(alias, t.Columns.EventType) + "::text" }
func (t Table) aggType(alias string) string { return t.col(alias, t.Columns.AggregateType) + "::text" }
func (t Table) payload(alias string) string { return t.col(alias, t.Columns.Payload) }
func (t Table) topicCol(alias string) string {
	if t.Columns.Topic == Absent {
		return "NULL::text"
	}
	return t.col(alias, t.Columns.Topic) + "::text"
}
func (t Table) headers(alias string) string {
	return t.optional(alias, t.Columns.Headers, "NULL::jsonb")
}
func (t Table) occurred(alias string) string {
	if t.Columns.OccurredAt == Absent {
		return t.col(alias, "created_at")
	}
	return t.col(alias, t.Columns.OccurredAt)
}

// optional returns the column v, or null when it is Absent.
func (t Table) optional(alias, v, null string) string {
	if v == Absent {
		return null
	}
	return t.col(alias, v)
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

// Channel returns the LISTEN/NOTIFY channel of the outbox: outbox_relay_<schema>_<table>. A
// channel name is at most 63 bytes (pg_notify refuses a longer one, failing the writers'
// INSERTs through the wake-up trigger): a longer one keeps its first 46 bytes (whole
// characters) and ends with a hash of the schema and table, so it stays distinct.
func (t Table) Channel() string {
	c := "outbox_relay_" + t.Schema + "_" + t.Name
	if len(c) <= maxIdentifier {
		return c
	}
	cut := 46
	for cut > 0 && !utf8.RuneStart(c[cut]) {
		cut--
	}
	sum := sha256.Sum256([]byte(t.Schema + "." + t.Name))
	return c[:cut] + "_" + hex.EncodeToString(sum[:8])
}

// maxIdentifier is PostgreSQL's longest identifier, and channel name, in bytes.
const maxIdentifier = 63

// lockKey returns the text hashed into the leadership advisory lock.
func (t Table) lockKey() string { return "outbox-relay:" + t.String() }
