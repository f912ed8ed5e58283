package postgres_test

import (
	"context"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/internal/dbtest"
	"github.com/outbox-relay/outbox-relay/internal/pgcluster"
)

// replSession opens a session on table at url with the replication wait mode and a short query
// timeout; hook, when set, is the store's OnReplicationWait.
func replSession(t *testing.T, table postgres.Table, url, mode string, hook func(time.Duration)) relay.Session {
	t.Helper()
	conn, err := postgres.ParseURL(url)
	if err != nil {
		t.Fatal(err)
	}
	store, err := postgres.NewStore(conn, postgres.StoreConfig{Table: table, QueryTimeout: 3 * time.Second,
		WaitForReplication: mode, OnReplicationWait: hook})
	if err != nil {
		t.Fatal(err)
	}
	sess, err := store.Open(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sess.Close(context.Background()) })
	return sess
}

func insertRows(t *testing.T, pool *pgxpool.Pool, table postgres.Table, n int) {
	t.Helper()
	_, err := pool.Exec(context.Background(), `INSERT INTO `+pgx.Identifier{table.Schema, table.Name}.Sanitize()+
		` (aggregate_type, aggregate_id, event_type, payload) SELECT 'order', 'k' || i, 'Placed', 'x'
		FROM generate_series(1, $1) AS i`, n)
	if err != nil {
		t.Fatal(err)
	}
}

// TestWaitForReplicationWithoutStandby: the test server has no standby, so a claim that found
// rows returns none and says why once the query timeout passed; a claim that found nothing does
// not wait; with the wait off the rows come at once.
func TestWaitForReplicationWithoutStandby(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	ctx := context.Background()
	for _, tc := range []struct{ mode, want string }{
		{postgres.ReplicationAll, "no connected standby in pg_stat_replication"},
		{postgres.ReplicationSync, "no connected synchronous standby in pg_stat_replication"},
	} {
		sess := replSession(t, table, dbtest.URL(), tc.mode, nil)
		if rows, err := sess.Claim(ctx, 0, nil, 10, 1<<20, nil); err != nil || len(rows) != 0 {
			t.Fatalf("%s: empty outbox: %d rows, %v; want none and no error", tc.mode, len(rows), err)
		}
	}
	insertRows(t, pool, table, 3)
	for _, tc := range []struct{ mode, want string }{
		{postgres.ReplicationAll, "no connected standby in pg_stat_replication"},
		{postgres.ReplicationSync, "no connected synchronous standby in pg_stat_replication"},
	} {
		sess := replSession(t, table, dbtest.URL(), tc.mode, nil)
		rows, err := sess.Claim(ctx, 0, nil, 10, 1<<20, nil)
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "database.wait_for_replication="+tc.mode) {
			t.Errorf("%s: claim returned %d rows, error %v; want an error saying %q", tc.mode, len(rows), err, tc.want)
		}
	}
	sess := replSession(t, table, dbtest.URL(), postgres.ReplicationOff, nil)
	if rows, err := sess.Claim(ctx, 0, nil, 10, 1<<20, nil); err != nil || len(rows) != 3 {
		t.Errorf("off: %d rows, %v; want 3", len(rows), err)
	}
}

// TestWaitForReplicationPrivilege: a role that may not read the standbys' positions gets an
// error naming the grant it needs, not a wait that can never end.
func TestWaitForReplicationPrivilege(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	ctx := context.Background()
	insertRows(t, pool, table, 1)
	role := table.Schema + "_role"
	ident := pgx.Identifier{role}.Sanitize()
	for _, q := range []string{
		`CREATE ROLE ` + ident + ` LOGIN`,
		`GRANT USAGE ON SCHEMA ` + pgx.Identifier{table.Schema}.Sanitize() + ` TO ` + ident,
		`GRANT SELECT ON ` + pgx.Identifier{table.Schema, table.Name}.Sanitize() + ` TO ` + ident,
	} {
		if _, err := pool.Exec(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	t.Cleanup(func() {
		_, _ = pool.Exec(context.Background(), `DROP OWNED BY `+ident)
		_, _ = pool.Exec(context.Background(), `DROP ROLE `+ident)
	})
	conn, err := pgx.ParseConfig(dbtest.URL())
	if err != nil {
		t.Fatal(err)
	}
	url := fmt.Sprintf("postgres://%s@%s:%d/%s?sslmode=disable", role, conn.Host, conn.Port, conn.Database)
	sess := replSession(t, table, url, postgres.ReplicationAll, nil)
	_, err = sess.Claim(ctx, 0, nil, 10, 1<<20, nil)
	if err == nil || !strings.Contains(err.Error(), "GRANT pg_read_all_stats") {
		t.Errorf("claim as a role without pg_read_all_stats: %v; want an error naming the grant", err)
	}
	if _, err := pool.Exec(ctx, `GRANT pg_read_all_stats TO `+ident); err != nil {
		t.Fatal(err)
	}
	sess = replSession(t, table, url, postgres.ReplicationAll, nil)
	if _, err = sess.Claim(ctx, 0, nil, 10, 1<<20, nil); err == nil || !strings.Contains(err.Error(), "no connected standby") {
		t.Errorf("claim with pg_read_all_stats: %v; want the wait for a standby", err)
	}
}

// TestWaitForReplicationStandby: with a streaming standby, a claim returns its rows once the
// standby has them, and the wait is reported to the hook.
func TestWaitForReplicationStandby(t *testing.T) {
	t.Parallel()
	primary := pgcluster.Start(t, "synchronous_standby_names = 'standby1'", "synchronous_commit = local")
	primary.StartStandby(t, primary.Addr(), "standby1")
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, primary.URL())
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	table := postgres.Table{Schema: "repl", Name: "outbox"}
	if _, err := postgres.Migrate(ctx, pool, table, nil); err != nil {
		t.Fatal(err)
	}
	insertRows(t, pool, table, 5)
	for _, mode := range []string{postgres.ReplicationAll, postgres.ReplicationSync} {
		var waits atomic.Int64
		sess := replSession(t, table, primary.URL(), mode, func(time.Duration) { waits.Add(1) })
		// The standby may still be catching up when the test starts: its first claims may time out.
		deadline := time.Now().Add(60 * time.Second)
		for {
			rows, err := sess.Claim(ctx, 0, nil, 10, 1<<20, nil)
			if err == nil {
				if len(rows) != 5 {
					t.Errorf("%s: %d rows, want 5", mode, len(rows))
				}
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: claim: %v", mode, err)
			}
			sess = replSession(t, table, primary.URL(), mode, func(time.Duration) { waits.Add(1) })
		}
		if waits.Load() != 1 {
			t.Errorf("%s: %d waits reported, want 1", mode, waits.Load())
		}
	}
}

// BenchmarkClaimReplicationWait measures what the wait adds to a claim: each iteration commits
// one row on a primary with a local streaming standby, then claims it, with the wait off, all
// and sync. ns/op is commit plus claim; the difference between the modes is the wait.
//
//	go test -run '^$' -bench ClaimReplicationWait -benchtime 2000x ./adapters/postgres/
func BenchmarkClaimReplicationWait(b *testing.B) {
	primary := pgcluster.Start(b, "synchronous_standby_names = 'standby1'", "synchronous_commit = local")
	primary.StartStandby(b, primary.Addr(), "standby1")
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, primary.URL())
	if err != nil {
		b.Fatal(err)
	}
	defer pool.Close()
	table := postgres.Table{Schema: "repl", Name: "outbox"}
	if _, err := postgres.Migrate(ctx, pool, table, nil); err != nil {
		b.Fatal(err)
	}
	insert := `INSERT INTO ` + pgx.Identifier{table.Schema, table.Name}.Sanitize() +
		` (aggregate_type, aggregate_id, event_type, payload) VALUES ('order', 'k', 'Placed', 'x') RETURNING id`
	for _, mode := range []string{postgres.ReplicationOff, postgres.ReplicationAll, postgres.ReplicationSync} {
		b.Run(mode, func(b *testing.B) {
			conn, err := postgres.ParseURL(primary.URL())
			if err != nil {
				b.Fatal(err)
			}
			store, err := postgres.NewStore(conn, postgres.StoreConfig{Table: table, WaitForReplication: mode})
			if err != nil {
				b.Fatal(err)
			}
			sess, err := store.Open(ctx)
			if err != nil {
				b.Fatal(err)
			}
			defer sess.Close(ctx)
			for b.Loop() {
				var id int64
				if err := pool.QueryRow(ctx, insert).Scan(&id); err != nil {
					b.Fatal(err)
				}
				rows, err := sess.Claim(ctx, id, nil, 10, 1<<20, nil)
				if err != nil || len(rows) != 1 {
					b.Fatalf("claim: %d rows, %v", len(rows), err)
				}
			}
		})
	}
}
