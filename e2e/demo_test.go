package e2e_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/dbtest"
	"github.com/outbox-relay/outbox-relay/internal/logbuf"
)

var (
	summaryRE = regexp.MustCompile(`summary: (\d+) users written \((\d+) failed\), (\d+) events received, (\d+) missing, (\d+) duplicates`)
	liveRE    = regexp.MustCompile(`\[\s*\d+s\] written (\d+)  published (\d+)  received (\d+)  lag (\d+) rows`)
)

// demoSchema returns a schema name of the test's own for the demo's tables, dropped at the end.
func demoSchema(t *testing.T) string {
	t.Helper()
	pool := dbtest.Pool(t)
	schema := fmt.Sprintf("t_demo_%d_%d", os.Getpid(), time.Now().UnixNano()%1e9)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_, _ = pool.Exec(ctx, `DROP SCHEMA IF EXISTS `+schema+` CASCADE`)
	})
	return schema
}

// demoEnv is the environment of a new user's shell: nothing of the test's OUTBOX_* or make's
// variables, plus the database and a schema of the test's own.
func demoEnv(schema string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "OUTBOX_") && !strings.HasPrefix(kv, "MAKE") && !strings.HasPrefix(kv, "MFLAGS=") {
			env = append(env, kv)
		}
	}
	return append(env, "OUTBOX_DATABASE_URL="+dbtest.URL(), "OUTBOX_DATABASE_SCHEMA="+schema)
}

// checkSummary checks the demo's summary line: users written, none failed, missing or repeated.
func checkSummary(t *testing.T, out string) {
	t.Helper()
	m := summaryRE.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no summary line after Ctrl-C")
	}
	n := make([]int, len(m))
	for i := 1; i < len(m); i++ {
		n[i], _ = strconv.Atoi(m[i])
	}
	written, failed, received, missing, dups := n[1], n[2], n[3], n[4], n[5]
	t.Logf("demo summary: %s", m[0])
	if written == 0 || failed != 0 || missing != 0 || dups != 0 || received < written {
		t.Errorf("demo summary %q: want users written, none failed, missing or repeated", m[0])
	}
}

// TestDemoLikeANewUser runs `outbox-relay demo` on embedded defaults (the local PostgreSQL, an
// embedded broker) at the README's higher rate, lets it print a dozen live lines, presses Ctrl-C
// (SIGINT) and reads the summary: users were written, none failed, none is missing, none
// repeated, and the process exits 0. On every live line received <= published <= written and
// the lag is at most what was written: a consumer never shows more than the topic holds.
func TestDemoLikeANewUser(t *testing.T) {
	t.Parallel()
	demoLikeANewUser(t)
}

// TestDemoExactlyOnce is TestDemoLikeANewUser in exactly-once delivery
// (make demo DEMO_ARGS="--kafka-delivery exactly_once"): the demo says so, its consumer reads at
// read_committed, and the summary has no missing and no repeated event.
func TestDemoExactlyOnce(t *testing.T) {
	t.Parallel()
	out := demoLikeANewUser(t, "--kafka-delivery", "exactly_once")
	if !strings.Contains(out, "exactly-once delivery: Kafka transactions") {
		t.Errorf("the demo does not say it runs in exactly-once delivery")
	}
}

// demoLikeANewUser runs the demo with args added, as TestDemoLikeANewUser says, and returns its
// output.
func demoLikeANewUser(t *testing.T, args ...string) string {
	eo := slices.Contains(args, "exactly_once")
	bin := relayBinary(t)
	cmd := exec.Command(bin, append([]string{"demo", "--rate", "200", "--writers", "8"}, args...)...)
	cmd.Env = demoEnv(demoSchema(t))
	out := &logbuf.Buffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	finished := false
	defer func() {
		if !finished {
			_ = cmd.Process.Kill()
			<-exited
		}
		if t.Failed() {
			t.Logf("demo output:\n%s", lastBytes(out.String(), 6000))
		}
	}()

	const lines = 12
	deadline := time.Now().Add(2 * time.Minute)
	for strings.Count(out.String(), "received UserCreated") < 3 || len(liveRE.FindAllString(out.String(), -1)) < lines {
		select {
		case err := <-exited:
			finished = true
			t.Fatalf("demo exited before printing events and %d live lines: %v", lines, err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("demo printed %d received events and %d live lines in two minutes",
				strings.Count(out.String(), "received UserCreated"), len(liveRE.FindAllString(out.String(), -1)))
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		finished = true
		if err != nil {
			t.Fatalf("demo after Ctrl-C: %v, want exit 0", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("demo still running a minute after Ctrl-C")
	}
	checkSummary(t, out.String())
	live := liveRE.FindAllStringSubmatch(out.String(), -1)
	for _, m := range live {
		var n [5]int64
		for i := 1; i < 5; i++ {
			n[i], _ = strconv.ParseInt(m[i], 10, 64)
		}
		written, published, received, lag := n[1], n[2], n[3], n[4]
		// In exactly-once delivery published counts the rows of committed Kafka transactions,
		// as the relay learns of each commit: the consumer may see one a moment earlier.
		if received > published && !eo || received > written || published > written || lag > written {
			t.Errorf("live line %q: want received <= published <= written and lag <= written", m[0])
		}
	}
	t.Logf("%d live lines checked; last: %s", len(live), live[len(live)-1][0])
	return out.String()
}

// TestDemoTwoOutboxes runs `outbox-relay demo --outboxes 2 --duration 4s`: one relay process
// serves both outbox tables, the writers take turns, and the summary has every user's event,
// none missing nor repeated; both tables end drained and both were written to.
func TestDemoTwoOutboxes(t *testing.T) {
	t.Parallel()
	bin := relayBinary(t)
	schema := demoSchema(t)
	cmd := exec.Command(bin, "demo", "--outboxes", "2", "--duration", "4s", "--rate", "100")
	cmd.Env = demoEnv(schema)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("demo --outboxes 2: %v\n%s", err, out)
	}
	checkSummary(t, string(out))
	for _, table := range []string{"outbox", "outbox2"} {
		if !strings.Contains(string(out), "outbox "+schema+"."+table+"\n") {
			t.Errorf("demo does not announce outbox %s.%s:\n%s", schema, table, out)
		}
		var pending int
		ctx := context.Background()
		pool := dbtest.Pool(t)
		if err := pool.QueryRow(ctx, `SELECT count(*) FROM `+schema+`.`+table+` WHERE dispatched_at IS NULL`).Scan(&pending); err != nil {
			t.Fatal(err)
		}
		if pending != 0 {
			t.Errorf("%s: %d rows pending after the demo", table, pending)
		}
		// Published rows are deleted: the statistics tell that rows were inserted (they are
		// reported within about a second of the writers' commits).
		var inserted int64
		deadline := time.Now().Add(30 * time.Second)
		for inserted == 0 && time.Now().Before(deadline) {
			if err := pool.QueryRow(ctx, `SELECT coalesce((SELECT n_tup_ins FROM pg_stat_user_tables WHERE schemaname = $1 AND relname = $2), 0)`,
				schema, table).Scan(&inserted); err != nil {
				t.Fatal(err)
			}
			if inserted == 0 {
				time.Sleep(100 * time.Millisecond)
			}
		}
		if inserted == 0 {
			t.Errorf("%s: no row was ever inserted: the writers did not take turns", table)
		}
	}
}
