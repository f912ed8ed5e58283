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

// TestParkedCommandUnderRelayRole runs `parked` with the least-privilege role of
// sql/roles/relay_role.sql, as an operator using the relay's own configuration would: list
// works; drop and retry are refused with a message saying to run them as the tables' owner, and
// change nothing; as the owner, drop deletes the row.
func TestParkedCommandUnderRelayRole(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	ctx := context.Background()
	role := fmt.Sprintf("parked_%d_%d", os.Getpid(), time.Now().UnixNano()%1000000)
	password := "Parked-Pw-" + fmt.Sprint(os.Getpid())
	applyRole(t, dbtest.URL(), role, password, table.Schema)
	t.Cleanup(func() {
		_, _ = pool.Exec(context.Background(), `DROP OWNED BY `+role)
		_, _ = pool.Exec(context.Background(), `DROP ROLE `+role)
	})
	outbox := pgx.Identifier{table.Schema, table.Name}.Sanitize()
	var id int64
	if err := pool.QueryRow(ctx, `INSERT INTO `+outbox+` (aggregate_type, aggregate_id, event_type, payload)
		VALUES ('order', 'k', 'OrderPlaced', 'x') RETURNING id`).Scan(&id); err != nil {
		t.Fatal(err)
	}
	if err := dbtest.Session(t, table, dbtest.URL()).Park(ctx, id, "MESSAGE_TOO_LARGE"); err != nil {
		t.Fatal(err)
	}
	parkedRows := func() int {
		var n int
		if err := pool.QueryRow(ctx, `SELECT count(*) FROM `+
			pgx.Identifier{table.Schema, table.Name + "_parked"}.Sanitize()).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}

	asRole := []string{"OUTBOX_DATABASE_URL=" + roleURL(dbtest.URL(), role, password), "OUTBOX_DATABASE_SCHEMA=" + table.Schema}
	out, errOut, code := runBin(t, 60*time.Second, asRole, "parked", "list")
	if code != 0 || !strings.Contains(out, "MESSAGE_TOO_LARGE") {
		t.Errorf("parked list as the relay role: exit %d\nstdout: %s\nstderr: %s", code, out, errOut)
	}
	for _, sub := range []string{"drop", "retry"} {
		out, errOut, code := runBin(t, 60*time.Second, asRole, "parked", sub, "--id", fmt.Sprint(id))
		if code == 0 || !strings.Contains(errOut, "permission denied") ||
			!strings.Contains(errOut, "run parked "+sub+" as the tables' owner") {
			t.Errorf("parked %s as the relay role: exit %d, want a refusal naming the owner\nstdout: %s\nstderr: %s",
				sub, code, out, errOut)
		}
		if strings.Contains(errOut, password) {
			t.Errorf("parked %s printed the password: %s", sub, errOut)
		}
		if n := parkedRows(); n != 1 {
			t.Fatalf("after parked %s as the relay role: %d parked rows, want 1", sub, n)
		}
	}

	asOwner := []string{"OUTBOX_DATABASE_URL=" + dbtest.URL(), "OUTBOX_DATABASE_SCHEMA=" + table.Schema}
	if out, errOut, code := runBin(t, 60*time.Second, asOwner, "parked", "drop", "--id", fmt.Sprint(id)); code != 0 ||
		!strings.Contains(out, "dropped 1 parked row(s)") {
		t.Errorf("parked drop as the owner: exit %d\nstdout: %s\nstderr: %s", code, out, errOut)
	}
	if n := parkedRows(); n != 0 {
		t.Errorf("after parked drop as the owner: %d parked rows, want 0", n)
	}
}
