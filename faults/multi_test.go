package faults_test

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/internal/dbtest"
	"github.com/outbox-relay/outbox-relay/internal/kafkatest"
	"github.com/outbox-relay/outbox-relay/internal/oracle"
	"github.com/outbox-relay/outbox-relay/internal/tcpproxy"
)

// multiOutbox is one outbox of the multi-outbox tests: its table, its database and its loader.
type multiOutbox struct {
	name   string
	pool   *pgxpool.Pool
	table  postgres.Table
	loader *oracle.Loader
}

// secondDatabase creates a database of its own on the test server, dropped when t ends, and
// returns its connection string.
func secondDatabase(t *testing.T) string {
	t.Helper()
	admin := dbtest.Pool(t)
	name := fmt.Sprintf("faults_multi_%d", os.Getpid())
	ctx := context.Background()
	_, _ = admin.Exec(ctx, `DROP DATABASE IF EXISTS `+name+` WITH (FORCE)`)
	if _, err := admin.Exec(ctx, `CREATE DATABASE `+name); err != nil {
		t.Fatalf("create database %s: %v", name, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_, _ = admin.Exec(ctx, `DROP DATABASE IF EXISTS `+name+` WITH (FORCE)`)
	})
	u := dbtest.URL()
	i := strings.LastIndex(u, "/")
	rest := ""
	if q := strings.Index(u[i:], "?"); q >= 0 {
		rest = u[i+q:]
	}
	return u[:i+1] + name + rest
}

// replicaRE finds the replica id a relay process logs at start.
var replicaRE = regexp.MustCompile(`replica=([0-9a-f]{8})`)

// TestFaultMultiOutboxReplicas: 3 relay processes serve the same 7 outboxes over 2 databases.
// Every outbox gets one leader and the leaderships spread 2 or 3 per replica; one replica is
// killed (SIGKILL) while writers write, and the other two take its outboxes; a new replica
// joins and the leaderships spread again. Every outbox's events all arrive, in order per key
// (the oracle, per outbox).
func TestFaultMultiOutboxReplicas(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	broker := kafkatest.Start(t)
	url2 := secondDatabase(t)
	pool2, err := pgxpool.New(ctx, url2)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool2.Close)

	var outboxes []*multiOutbox
	var yaml strings.Builder
	yaml.WriteString("kafka:\n  brokers: " + strings.Join(broker.Addrs, ",") + "\n")
	yaml.WriteString("http:\n  addr: 127.0.0.1:0\nlog:\n  format: text\n")
	yaml.WriteString("relay:\n  poll_interval: 100ms\n  leader_retry_interval: 200ms\n  retry_backoff_min: 50ms\n" +
		"  retry_backoff_max: 1s\n  batch_size: 200\n  max_in_flight: 500\n  shutdown_timeout: 5s\n  leader_lease: 2s\n")
	yaml.WriteString("outboxes:\n")
	for i := range 7 {
		o := &multiOutbox{name: fmt.Sprintf("o%d", i)}
		if i < 4 {
			o.pool, o.table = dbtest.Schema(t)
			fmt.Fprintf(&yaml, "  - name: %s\n    database:\n      schema: %s\n", o.name, o.table.Schema)
		} else {
			o.pool, o.table = pool2, postgres.Table{Schema: "m" + o.name, Name: "outbox"}
			if _, err := postgres.Migrate(ctx, pool2, o.table, nil); err != nil {
				t.Fatal(err)
			}
			fmt.Fprintf(&yaml, "  - name: %s\n    database:\n      url_env: FAULTS_MULTI_DB2\n      schema: %s\n", o.name, o.table.Schema)
		}
		topic := broker.Topic(t, "faults-multi", 3)
		l, err := oracle.New(ctx, o.pool, o.table, oracle.Config{Topics: []string{topic}, Keys: 8, Workers: 2})
		if err != nil {
			t.Fatal(err)
		}
		o.loader = l
		outboxes = append(outboxes, o)
	}
	file := filepath.Join(t.TempDir(), "relay.yaml")
	if err := os.WriteFile(file, []byte(yaml.String()), 0o600); err != nil {
		t.Fatal(err)
	}

	start := func(name string) (*proc, string) {
		cmd := exec.Command(relayBin, "run")
		cmd.Env = append(os.Environ(), "OUTBOX_CONFIG="+file, "OUTBOX_DATABASE_URL="+dbtest.URL(), "FAULTS_MULTI_DB2="+url2)
		p := runProc(t, name, cmd)
		var id string
		waitFor(t, 30*time.Second, name+" logs its replica id", func() (bool, string) {
			m := replicaRE.FindStringSubmatch(p.logs.tail(200))
			if m == nil {
				return false, p.logs.tail(5)
			}
			id = m[1]
			return true, ""
		})
		return p, id
	}
	// leaders returns the replica leading each outbox ("" for none).
	leaders := func() map[string]string {
		out := map[string]string{}
		for _, o := range outboxes {
			h, err := postgres.LeaderOf(ctx, o.pool, o.table)
			if err != nil {
				t.Fatal(err)
			}
			if h != nil {
				if f := strings.Fields(h.ApplicationName); len(f) >= 3 {
					out[o.name] = f[1]
				} else {
					out[o.name] = "?" + h.ApplicationName
				}
			}
		}
		return out
	}
	// spread waits until every outbox is led by one of ids, each leading between lo and hi.
	spread := func(what string, ids []string, lo, hi int) time.Duration {
		began := time.Now()
		waitFor(t, 60*time.Second, what, func() (bool, string) {
			ls := leaders()
			counts := map[string]int{}
			for _, id := range ids {
				counts[id] = 0
			}
			ok := len(ls) == len(outboxes)
			for _, r := range ls {
				if _, live := counts[r]; !live {
					ok = false
				}
				counts[r]++
			}
			for _, n := range counts {
				ok = ok && n >= lo && n <= hi
			}
			return ok, fmt.Sprintf("leaders %v, counts %v", ls, counts)
		})
		return time.Since(began)
	}

	stops := make([]func(), 0, len(outboxes))
	for _, o := range outboxes {
		stops = append(stops, o.loader.Go(ctx))
	}
	procs := map[string]*proc{}
	var ids []string
	for i := range 3 {
		p, id := start(fmt.Sprintf("replica-%d", i))
		procs[id] = p
		ids = append(ids, id)
	}
	took := spread("7 outboxes led, 2 or 3 per replica", ids, 2, 3)
	t.Logf("spread over 3 replicas after %s: %v", took.Round(time.Millisecond), leaders())

	// Kill a replica that leads the most, while the writers write.
	counts := map[string]int{}
	for _, r := range leaders() {
		counts[r]++
	}
	sort.Slice(ids, func(i, j int) bool { return counts[ids[i]] > counts[ids[j]] })
	victim := ids[0]
	procs[victim].signal(t, syscall.SIGKILL)
	procs[victim].wait(t, 30*time.Second)
	killedAt := time.Now()
	ids = ids[1:]
	spread("the killed replica's outboxes taken over, 3 or 4 per replica", ids, 3, 4)
	t.Logf("every outbox led again %s after the SIGKILL of replica %s: %v", time.Since(killedAt).Round(time.Millisecond), victim, leaders())

	// A new replica joins: the leaderships spread over three again.
	_, id := start("replica-3")
	ids = append(ids, id)
	took = spread("leaderships rebalanced onto the new replica, 2 or 3 per replica", ids, 2, 3)
	t.Logf("rebalanced %s after replica %s started: %v", took.Round(time.Millisecond), id, leaders())

	for _, stop := range stops {
		stop()
	}
	for _, o := range outboxes {
		waitFor(t, 90*time.Second, o.name+" drained", func() (bool, string) {
			var n int
			err := o.pool.QueryRow(ctx, `SELECT count(*) FROM `+pgx.Identifier{o.table.Schema, o.table.Name}.Sanitize()+
				` WHERE dispatched_at IS NULL`).Scan(&n)
			return err == nil && n == 0, fmt.Sprintf("%d pending (%v)", n, err)
		})
		rep, err := oracle.Check(ctx, broker.Addrs, o.loader, 90*time.Second)
		if err != nil {
			t.Fatalf("oracle %s: %v", o.name, err)
		}
		t.Logf("outbox %s: %s", o.name, rep)
		rep.Assert(t, 500) // duplicates: at most relay.max_in_flight per leadership change
	}
}

// waitFor polls cond until it holds, failing t after timeout.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, state := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s: %s", timeout, what, state)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestFaultMultiOutboxOneDatabaseDown: one process serves two outboxes, and the database of one
// of them cannot be reached when the process starts. The other outbox serves at once; /readyz
// says which outbox is not started and why; once the database answers, the late outbox starts
// on its own and drains. Neither outbox loses or reorders an event (the oracle).
func TestFaultMultiOutboxOneDatabaseDown(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	broker := kafkatest.Start(t)
	host := strings.TrimPrefix(strings.SplitN(strings.TrimPrefix(dbtest.URL(), "postgres://"), "/", 2)[0], "postgres@")
	proxy, err := tcpproxy.New(host)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = proxy.Close() })
	proxy.Down() // the late outbox's database refuses every connection
	lateURL := strings.Replace(dbtest.URL(), host, proxy.Addr(), 1)

	var yaml strings.Builder
	yaml.WriteString("kafka:\n  brokers: " + strings.Join(broker.Addrs, ",") + "\n")
	yaml.WriteString("http:\n  addr: 127.0.0.1:0\nlog:\n  format: text\n")
	yaml.WriteString("relay:\n  poll_interval: 100ms\n  leader_retry_interval: 200ms\n  startup_timeout: 2s\n")
	yaml.WriteString("database:\n  connect_timeout: 1s\n")
	yaml.WriteString("outboxes:\n")
	var outboxes []*multiOutbox
	for _, name := range []string{"early", "late"} {
		o := &multiOutbox{name: name}
		o.pool, o.table = dbtest.Schema(t)
		fmt.Fprintf(&yaml, "  - name: %s\n    database:\n      schema: %s\n", name, o.table.Schema)
		if name == "late" {
			yaml.WriteString("      url_env: FAULTS_LATE_DB\n")
		}
		l, err := oracle.New(ctx, o.pool, o.table, oracle.Config{Topics: []string{broker.Topic(t, "faults-late", 3)}, Keys: 8, Workers: 2})
		if err != nil {
			t.Fatal(err)
		}
		o.loader = l
		outboxes = append(outboxes, o)
	}
	early, late := outboxes[0], outboxes[1]
	file := filepath.Join(t.TempDir(), "relay.yaml")
	if err := os.WriteFile(file, []byte(yaml.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(relayBin, "run")
	cmd.Env = append(os.Environ(), "OUTBOX_CONFIG="+file, "OUTBOX_DATABASE_URL="+dbtest.URL(), "FAULTS_LATE_DB="+lateURL)
	p := runProc(t, "relay", cmd)
	var addr string
	waitFor(t, 60*time.Second, "the relay listens", func() (bool, string) {
		select {
		case <-p.exited:
			t.Fatalf("the relay exited with one database down (%v):\n%s", p.err, p.logs.tail(20))
		default:
		}
		m := listenRE.FindStringSubmatch(p.logs.tail(200))
		if m == nil {
			return false, p.logs.tail(5)
		}
		addr = m[1]
		return true, ""
	})
	ready := func(q string) (int, string) {
		resp, err := http.Get("http://" + addr + "/readyz" + q)
		if err != nil {
			return 0, err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	pending := func(o *multiOutbox) (int, error) {
		var n int
		err := o.pool.QueryRow(ctx, `SELECT count(*) FROM `+pgx.Identifier{o.table.Schema, o.table.Name}.Sanitize()+
			` WHERE dispatched_at IS NULL`).Scan(&n)
		return n, err
	}

	early.loader.Run(ctx, 300)
	late.loader.Run(ctx, 300)
	waitFor(t, 90*time.Second, "the early outbox drained while the late one's database is down", func() (bool, string) {
		n, err := pending(early)
		return err == nil && n == 0, fmt.Sprintf("%d pending (%v)", n, err)
	})
	if code, body := ready("?outbox=late"); code != http.StatusServiceUnavailable || !strings.Contains(body, "not started") {
		t.Fatalf("/readyz?outbox=late with its database down: %d %q, want 503 naming it not started", code, body)
	}
	if code, body := ready("?outbox=early"); code != http.StatusOK {
		t.Fatalf("/readyz?outbox=early: %d %q, want 200", code, body)
	}
	if n, err := pending(late); err != nil || n == 0 {
		t.Fatalf("the late outbox has %d pending rows (%v), want every row it was given while its relay cannot reach it", n, err)
	}

	proxy.Up()
	waitFor(t, 120*time.Second, "the late outbox started and drained once its database answered", func() (bool, string) {
		n, err := pending(late)
		return err == nil && n == 0, fmt.Sprintf("%d pending (%v)", n, err)
	})
	waitFor(t, 30*time.Second, "/readyz ready for every outbox", func() (bool, string) {
		code, body := ready("")
		return code == http.StatusOK, fmt.Sprintf("%d %s", code, body)
	})
	for _, o := range outboxes {
		rep, err := oracle.Check(ctx, broker.Addrs, o.loader, 90*time.Second)
		if err != nil {
			t.Fatalf("oracle %s: %v", o.name, err)
		}
		t.Logf("outbox %s: %s", o.name, rep)
		rep.Assert(t, 0)
	}
}

// listenRE finds the address the relay's HTTP listener logs at start.
var listenRE = regexp.MustCompile(`msg="http listening" addr=(\S+)`)
