// Package dbtest gives each test its own schema in a real PostgreSQL, with the outbox migrated.
//
// The database comes from OUTBOX_TEST_DATABASE_URL, else the local server
// (postgres://postgres@127.0.0.1:5432/postgres). Schemas are dropped when the test ends.
package dbtest

import (
	"context"
	"fmt"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/app/relay"
)

// URLDefault is the database used when OUTBOX_TEST_DATABASE_URL is not set.
const URLDefault = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"

var seq atomic.Int64

// URL returns the test database's connection string.
func URL() string {
	if u := os.Getenv("OUTBOX_TEST_DATABASE_URL"); u != "" {
		return u
	}
	return URLDefault
}

// Pool returns a pool on the test database, closed when t ends.
func Pool(t testing.TB) *pgxpool.Pool {
	t.Helper()
	pool, err := pgxpool.New(context.Background(), URL())
	if err != nil {
		t.Fatalf("connect to test database: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := pool.Ping(ctx); err != nil {
		t.Fatalf("test database unreachable (start PostgreSQL or set OUTBOX_TEST_DATABASE_URL): %v", err)
	}
	t.Cleanup(pool.Close)
	return pool
}

// Schema creates a fresh schema, applies the outbox migrations and the example's, and returns a
// pool with the outbox table. The schema is dropped when t ends (kept when
// OUTBOX_TEST_KEEP_SCHEMA is set, for debugging).
func Schema(t testing.TB) (*pgxpool.Pool, postgres.Table) {
	t.Helper()
	pool := Pool(t)
	name := fmt.Sprintf("t_%s_%d_%d", sanitize(t.Name()), os.Getpid(), seq.Add(1))
	if len(name) > 63 {
		name = name[len(name)-63:]
		name = "t" + name[1:]
	}
	table := postgres.Table{Schema: name, Name: "outbox"}
	ctx := context.Background()
	if _, err := postgres.Migrate(ctx, pool, table, nil); err != nil {
		t.Fatalf("migrate %s: %v", name, err)
	}
	if err := postgres.MigrateExample(ctx, pool, table); err != nil {
		t.Fatalf("migrate example %s: %v", name, err)
	}
	t.Cleanup(func() {
		if os.Getenv("OUTBOX_TEST_KEEP_SCHEMA") != "" {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_, _ = pool.Exec(ctx, `DROP SCHEMA `+name+` CASCADE`)
	})
	return pool, table
}

func sanitize(s string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(s) {
		if (r >= 'a' && r <= 'z') || (r >= '0' && r <= '9') {
			b.WriteRune(r)
		} else {
			b.WriteByte('_')
		}
	}
	out := b.String()
	if len(out) > 30 {
		out = out[len(out)-30:]
	}
	return out
}

// Store returns the relay's store on table in the test database.
func Store(t testing.TB, table postgres.Table) *postgres.Store {
	t.Helper()
	return storeAt(t, table, URL())
}

// Session opens a relay session on table, closed when t ends. url is the connection string
// (URL() unless a test needs other connection settings).
func Session(t testing.TB, table postgres.Table, url string) relay.Session {
	t.Helper()
	sess, err := storeAt(t, table, url).Open(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sess.Close(context.Background()) })
	return sess
}

func storeAt(t testing.TB, table postgres.Table, url string) *postgres.Store {
	t.Helper()
	conn, err := postgres.ParseURL(url)
	if err != nil {
		t.Fatal(err)
	}
	store, err := postgres.NewStore(conn, postgres.StoreConfig{Table: table})
	if err != nil {
		t.Fatal(err)
	}
	return store
}
