package main_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/internal/dbtest"
)

var (
	binOnce sync.Once
	binPath string
	binErr  error
)

// relayBin returns the outbox-relay binary: OUTBOX_RELAY_BIN (set by make test), else one built
// once for this test run.
func relayBin(t *testing.T) string {
	t.Helper()
	binOnce.Do(func() {
		if p := os.Getenv("OUTBOX_RELAY_BIN"); p != "" {
			binPath = p
			return
		}
		dir, err := os.MkdirTemp("", "outbox-relay-bin")
		if err != nil {
			binErr = err
			return
		}
		binPath = filepath.Join(dir, "outbox-relay")
		out, err := exec.Command("go", "build", "-o", binPath, ".").CombinedOutput()
		if err != nil {
			binErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return binPath
}

// runBin runs the binary with args and extra environment (nothing of the test's OUTBOX_*
// environment leaks in), and returns stdout, stderr and the exit code.
func runBin(t *testing.T, timeout time.Duration, env []string, args ...string) (string, string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, relayBin(t), args...)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "OUTBOX_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if ctx.Err() != nil {
		t.Fatalf("outbox-relay %v did not finish within %s\nstderr: %s", args, timeout, stderr.String())
	}
	code := 0
	var exit *exec.ExitError
	if errors.As(err, &exit) {
		code = exit.ExitCode()
	} else if err != nil {
		t.Fatalf("run outbox-relay %v: %v", args, err)
	}
	return stdout.String(), stderr.String(), code
}

// TestParkedCommand: list, retry and drop parked rows with the binary, against real Postgres.
func TestParkedCommand(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	ctx := context.Background()
	outbox := pgx.Identifier{table.Schema, table.Name}.Sanitize()
	insert := func(key, payload string) int64 {
		var id int64
		if err := pool.QueryRow(ctx, `INSERT INTO `+outbox+` (aggregate_type, aggregate_id, event_type, payload)
			VALUES ('order', $1, 'OrderPlaced', $2) RETURNING id`, key, []byte(payload)).Scan(&id); err != nil {
			t.Fatal(err)
		}
		return id
	}
	bad, later := insert("k", "bad"), insert("k", "later")
	j, m := insert("j", "x"), insert("m", "y")

	// Park the rows the way the relay does.
	sess := dbtest.Session(t, table, dbtest.URL())
	for _, id := range []int64{bad, j, m} {
		if err := sess.Park(ctx, id, fmt.Sprintf("MESSAGE_TOO_LARGE: row %d refused", id)); err != nil {
			t.Fatal(err)
		}
	}

	env := []string{"OUTBOX_DATABASE_URL=" + dbtest.URL(), "OUTBOX_DATABASE_SCHEMA=" + table.Schema}
	parked := func(args ...string) (string, string, int) {
		t.Helper()
		return runBin(t, 60*time.Second, env, append([]string{"parked"}, args...)...)
	}

	out, errOut, code := parked("list", "--json")
	if code != 0 {
		t.Fatalf("parked list --json: exit %d: %s", code, errOut)
	}
	var list []map[string]any
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		t.Fatalf("parked list --json printed invalid JSON: %v\n%s", err, out)
	}
	if len(list) != 3 {
		t.Fatalf("listed %d rows, want 3: %s", len(list), out)
	}
	first := list[0]
	for _, k := range []string{"id", "event_id", "key", "type", "topic", "attempts", "reason", "parked_at"} {
		if _, ok := first[k]; !ok {
			t.Errorf("parked list --json: field %q missing in %v", k, first)
		}
	}
	if first["id"] != float64(bad) || first["key"] != "k" || first["type"] != "OrderPlaced" ||
		first["topic"] != "outbox.event.order" || first["attempts"] != float64(1) ||
		first["reason"] != fmt.Sprintf("MESSAGE_TOO_LARGE: row %d refused", bad) {
		t.Errorf("parked list --json: first row %v", first)
	}

	out, _, _ = parked("list", "--key", "j")
	if !strings.Contains(out, fmt.Sprintf("MESSAGE_TOO_LARGE: row %d refused", j)) || strings.Contains(out, "row "+fmt.Sprint(m)) {
		t.Errorf("parked list --key j:\n%s", out)
	}

	if _, errOut, code := parked("retry"); code == 0 || !strings.Contains(errOut, "needs a selection") {
		t.Errorf("parked retry without a selection: exit %d, stderr %q; want a refusal", code, errOut)
	}

	out, errOut, code = parked("retry", "--id", fmt.Sprint(bad))
	if code != 0 || !strings.Contains(out, "retried 1 parked row(s)") || !strings.Contains(out, fmt.Sprintf("id=%d", bad)) {
		t.Fatalf("parked retry --id: exit %d\nstdout: %s\nstderr: %s", code, out, errOut)
	}
	// The retried row is back with its id and no attempts, ahead of its key's later row.
	rows, err := sess.Claim(ctx, 0, nil, 10, 1<<20, nil)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, r := range rows {
		got = append(got, fmt.Sprintf("%d:%s:%s:%d", r.ID, r.AggregateID, r.Payload, r.Attempts))
	}
	if want := fmt.Sprintf("[%d:k:bad:0 %d:k:later:0]", bad, later); fmt.Sprint(got) != want {
		t.Errorf("outbox after retry %v, want %s", got, want)
	}

	out, _, code = parked("drop", "--key", "m")
	if code != 0 || !strings.Contains(out, "dropped 1 parked row(s)") || !strings.Contains(out, fmt.Sprintf("id=%d", m)) {
		t.Errorf("parked drop --key m: exit %d: %s", code, out)
	}
	out, _, code = parked("list", "--json")
	if code != 0 || !strings.Contains(out, fmt.Sprintf(`"id": %d`, j)) || strings.Contains(out, fmt.Sprintf(`"id": %d,`, m)) {
		t.Errorf("parked list after drop: %s", out)
	}
	out, _, code = parked("drop", "--all")
	if code != 0 || !strings.Contains(out, "dropped 1 parked row(s)") {
		t.Errorf("parked drop --all: exit %d: %s", code, out)
	}
	out, _, _ = parked("list")
	if !strings.Contains(out, "no parked rows") {
		t.Errorf("parked list after drop --all: %s", out)
	}
}
