package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
)

// TestOutboxesEachOverTheTopLevel: each entry of outboxes: is the top-level configuration with
// the entry's keys on top; an entry's database URL comes from the top level, its own file, or
// the environment variable it names.
func TestOutboxesEachOverTheTopLevel(t *testing.T) {
	configEnv(t, map[string]string{
		"OUTBOX_DATABASE_URL": "postgres://relay:s3cret@db1:5432/app",
		"BILLING_DB":          "postgres://billing:b1llingPw9@db2:5432/billing",
	})
	cfg, err := loadFor(t, `
kafka:
  brokers: 127.0.0.1:9092
relay:
  batch_size: 300
outboxes:
  - name: orders
    database: {table: orders_outbox}
  - name: billing
    database:
      url_env: BILLING_DB
      layout: debezium
      table: outbox
    kafka: {topic_template: "billing.{event_type}"}
    relay: {batch_size: 50, poll_interval: 250ms}
`)
	if err != nil {
		t.Fatalf("refused: %v", err)
	}
	if !cfg.Multi || len(cfg.Outboxes) != 2 {
		t.Fatalf("outboxes: multi %v, %d, want 2", cfg.Multi, len(cfg.Outboxes))
	}
	orders, billing := cfg.Outboxes[0], cfg.Outboxes[1]
	if orders.Name != "orders" || orders.Store.Table.Name != "orders_outbox" || orders.Relay.BatchSize != 300 ||
		!strings.Contains(orders.DatabaseURL, "db1") || orders.Kafka.TopicTemplate != cfg.Kafka.TopicTemplate {
		t.Errorf("orders: %s %s batch %d url %q template %q", orders.Name, orders.Store.Table, orders.Relay.BatchSize,
			orders.DatabaseURL, orders.Kafka.TopicTemplate)
	}
	if billing.Name != "billing" || billing.Relay.BatchSize != 50 || billing.Relay.PollInterval != 250*time.Millisecond ||
		!strings.Contains(billing.DatabaseURL, "db2") || billing.Kafka.TopicTemplate != "billing.{event_type}" ||
		billing.Kafka.IDHeader != "id" || billing.Store.Table.Columns.Key != "aggregateid" {
		t.Errorf("billing: %s batch %d poll %s url %q template %q id header %q key column %q", billing.Name,
			billing.Relay.BatchSize, billing.Relay.PollInterval, billing.DatabaseURL, billing.Kafka.TopicTemplate,
			billing.Kafka.IDHeader, billing.Store.Table.Columns.Key)
	}
	if _, err := cfg.outbox(""); err == nil || !strings.Contains(err.Error(), "orders, billing") {
		t.Errorf("no --outbox among two: %v, want an error listing them", err)
	}
	if o, err := cfg.outbox("billing"); err != nil || o != billing {
		t.Errorf("--outbox billing: %v", err)
	}
	if _, err := cfg.outbox("nope"); err == nil || !strings.Contains(err.Error(), `"nope"`) {
		t.Errorf("--outbox nope: %v", err)
	}
}

// TestOutboxesMistakes: every mistake in outboxes: is reported at once, naming the entry.
func TestOutboxesMistakes(t *testing.T) {
	configEnv(t, map[string]string{"OUTBOX_DATABASE_URL": "postgres://relay:s3cret@db1:5432/app", "OUTBOX_KAFKA_BROKERS": "k:9092"})
	_, err := loadFor(t, `
outboxes:
  - name: orders
    database: {table: outbox}
  - name: orders
    database: {table: other}
  - name: again
    database: {table: outbox}
  - name: Bad Name
  - database: {table: x}
  - name: typo
    database: {tabel: y}
  - name: global
    log: {level: debug}
  - name: secret
    database: {url: "postgres://u:p@h/d"}
  - name: unset
    database: {url_env: NO_SUCH_VARIABLE_HERE}
  - name: value
    relay: {batch_size: 0}
`)
	if err == nil {
		t.Fatal("accepted")
	}
	msg := err.Error()
	for _, want := range []string{
		"outboxes[orders]: name: also the name of outboxes[0]",
		"outboxes[again]: database.table: public.outbox is also the table of outboxes[orders]",
		`outboxes[3]: name: must be`,
		"outboxes[4]: name: required",
		`outboxes[typo]: unknown key "database.tabel" (did you mean database.table?)`,
		`outboxes[global]: unknown key "log.level" (it concerns the whole process`,
		"outboxes[secret]: database.url: a secret is not read from the config file",
		`outboxes[unset]: database.url_env: the environment variable "NO_SUCH_VARIABLE_HERE" is unset or empty`,
		"outboxes[value]: relay.batch_size: must be an integer between 1 and 10000",
	} {
		if !strings.Contains(msg, want) {
			t.Errorf("error lacks %q:\n%s", want, msg)
		}
	}
	if strings.Contains(msg, "s3cret") || strings.Contains(msg, "u:p@") {
		t.Errorf("a secret in the error:\n%s", msg)
	}
}

// TestOutboxesWithoutFileServeOne: the environment-only form serves one outbox, named by its
// table, as before.
func TestOutboxesWithoutFileServeOne(t *testing.T) {
	configEnv(t, validEnv)
	cfg, err := loadFor(t, "")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Multi || len(cfg.Outboxes) != 1 || cfg.Outboxes[0] != cfg || cfg.Name != "public.outbox" {
		t.Errorf("multi %v, outboxes %d, name %q", cfg.Multi, len(cfg.Outboxes), cfg.Name)
	}
	if o, err := cfg.outbox(""); err != nil || o != cfg {
		t.Errorf("outbox(\"\"): %v", err)
	}
}

// TestOutboxesExampleLoads: configs/outboxes.yaml, the README's example, loads as it is written.
func TestOutboxesExampleLoads(t *testing.T) {
	secret := filepath.Join(t.TempDir(), "shipping-url")
	if err := os.WriteFile(secret, []byte("postgres://shipping:sh1pPw7x@db3:5432/shipping\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	configEnv(t, map[string]string{
		"OUTBOX_DATABASE_URL":  "postgres://relay:s3cret@db1:5432/app",
		"BILLING_DATABASE_URL": "postgres://billing:b1llingPw9@db2:5432/billing",
	})
	b, err := os.ReadFile("../../configs/outboxes.yaml")
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := loadFor(t, strings.ReplaceAll(string(b), "/run/secrets/shipping-database-url", secret))
	if err != nil {
		t.Fatalf("configs/outboxes.yaml: %v", err)
	}
	if got := strings.Join(cfg.names(), ","); got != "orders,billing,shipping" {
		t.Fatalf("outboxes %s", got)
	}
	ship := cfg.Outboxes[2]
	if ship.Store.Table.Columns.ID != "seq" || ship.Store.Mark != "retain" || !strings.Contains(ship.DatabaseURL, "db3") {
		t.Errorf("shipping: %+v mark %s", ship.Store.Table.Columns, ship.Store.Mark)
	}
}

// TestLingerReachesTheStore: relay.linger is the store's linger, its default when unset, and an
// outbox of its own may set another.
func TestLingerReachesTheStore(t *testing.T) {
	configEnv(t, validEnv)
	cfg, err := loadFor(t, "")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Store.Linger != postgres.LingerDefault {
		t.Errorf("default linger %v, want %v", cfg.Store.Linger, postgres.LingerDefault)
	}
	cfg, err = loadFor(t, `
relay: {linger: 5ms}
outboxes:
  - name: orders
    database: {table: orders_outbox}
  - name: billing
    database: {table: billing_outbox}
    relay: {linger: 1ms}
`)
	if err != nil {
		t.Fatal(err)
	}
	if got := []time.Duration{cfg.Outboxes[0].Store.Linger, cfg.Outboxes[1].Store.Linger}; got[0] != 5*time.Millisecond || got[1] != time.Millisecond {
		t.Errorf("outboxes' lingers %v, want [5ms 1ms]", got)
	}
}
