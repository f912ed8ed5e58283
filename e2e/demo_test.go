package e2e_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/dbtest"
	"github.com/outbox-relay/outbox-relay/internal/logbuf"
)

var summaryRE = regexp.MustCompile(`summary: (\d+) users written \((\d+) failed\), (\d+) events received, (\d+) missing, (\d+) duplicates`)

// TestDemoLikeANewUser runs `outbox-relay demo` as `make demo` does, on embedded defaults (the
// local PostgreSQL, an embedded broker), waits until the consumer prints events, presses Ctrl-C
// (SIGINT) and reads the summary: users were written, none failed, none is missing, none repeated,
// and the process exits 0.
func TestDemoLikeANewUser(t *testing.T) {
	t.Parallel()
	bin := relayBinary(t)
	pool := dbtest.Pool(t)
	schema := fmt.Sprintf("t_demo_%d_%d", os.Getpid(), time.Now().UnixNano()%1e9)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_, _ = pool.Exec(ctx, `DROP SCHEMA IF EXISTS `+schema+` CASCADE`)
	})

	cmd := exec.Command(bin, "demo", "--rate", "50", "--writers", "4")
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "OUTBOX_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	// Only what a new user might set: the database, and a schema of this test's own.
	cmd.Env = append(cmd.Env, "OUTBOX_DATABASE_URL="+dbtest.URL(), "OUTBOX_DATABASE_SCHEMA="+schema)
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

	deadline := time.Now().Add(time.Minute)
	for strings.Count(out.String(), "received UserCreated") < 3 {
		select {
		case err := <-exited:
			finished = true
			t.Fatalf("demo exited before printing events: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("demo printed %d received events in a minute", strings.Count(out.String(), "received UserCreated"))
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
	m := summaryRE.FindStringSubmatch(out.String())
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
