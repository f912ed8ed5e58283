package postgres_test

import (
	"context"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/internal/dbtest"
)

// TestChannelOfLongNames: a schema and table whose channel would pass PostgreSQL's 63 bytes get
// a shortened, distinct channel, and the wake-up trigger notifies it: a writer's INSERT works
// and the relay's session is woken. (Before, pg_notify refused the name and every INSERT failed.)
func TestChannelOfLongNames(t *testing.T) {
	t.Parallel()
	short := postgres.Table{Schema: "app", Name: "outbox"}
	if got := short.Channel(); got != "outbox_relay_app_outbox" {
		t.Errorf("short channel changed: %q", got)
	}
	a := postgres.Table{Schema: strings.Repeat("s", 40), Name: "outbox_with_a_long_name"}
	b := postgres.Table{Schema: strings.Repeat("s", 40), Name: "outbox_with_a_long_name2"}
	u := postgres.Table{Schema: strings.Repeat("é", 20), Name: "outbox_with_a_long_name"}
	for _, tb := range []postgres.Table{a, b, u} {
		if c := tb.Channel(); len(c) > 63 || !utf8.ValidString(c) || c != tb.Channel() {
			t.Errorf("%s: channel %q (%d bytes)", tb, c, len(c))
		}
	}
	if a.Channel() == b.Channel() {
		t.Errorf("two tables share the channel %q", a.Channel())
	}

	pool := dbtest.Pool(t)
	ctx := context.Background()
	table := postgres.Table{Schema: "t_" + strings.Repeat("long", 12), Name: "outbox"}
	_, _ = pool.Exec(ctx, `DROP SCHEMA IF EXISTS `+table.Schema+` CASCADE`)
	t.Cleanup(func() { _, _ = pool.Exec(context.Background(), `DROP SCHEMA IF EXISTS `+table.Schema+` CASCADE`) })
	if _, err := postgres.Migrate(ctx, pool, table, nil); err != nil {
		t.Fatal(err)
	}
	sess := dbtest.Session(t, table, dbtest.URL())
	if ok, err := sess.TryLead(ctx); err != nil || !ok {
		t.Fatalf("lead: %v %v", ok, err)
	}
	if _, err := pool.Exec(ctx, `INSERT INTO `+pgx.Identifier{table.Schema, table.Name}.Sanitize()+
		` (aggregate_type, aggregate_id, event_type, payload) VALUES ('a', 'k', 'e', '\x00')`); err != nil {
		t.Fatalf("writer's INSERT: %v", err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for !sess.Notified() {
		if time.Now().After(deadline) {
			t.Fatal("no wake-up on the shortened channel")
		}
		if err := sess.Wait(ctx, 100*time.Millisecond); err != nil {
			t.Fatal(err)
		}
	}
}
