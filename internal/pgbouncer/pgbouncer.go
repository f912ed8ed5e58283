// Package pgbouncer gives a test a PgBouncer of its own in front of a PostgreSQL server: the
// Debian package's binary, on a free port, with a configuration in a temporary directory, stopped
// when the test ends.
//
// PgBouncer refuses to run as root, so when the test runs as root it runs as the postgres OS user.
// A test that needs one is skipped, saying so, when the binary is missing (`.ci/run` installs
// it); with OUTBOX_REQUIRE_TOOLS=1 it fails instead (internal/testenv).
package pgbouncer

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

// Mode is a PgBouncer pool_mode.
type Mode string

// The pool modes.
const (
	Session     Mode = "session"
	Transaction Mode = "transaction"
	Statement   Mode = "statement"
)

// Bouncer is one running PgBouncer.
type Bouncer struct {
	// Port is PgBouncer's TCP port on 127.0.0.1.
	Port int
	// Mode is its pool_mode.
	Mode    Mode
	db      string
	cmd     *exec.Cmd
	logPath string
}

// Start runs a PgBouncer in mode for t in front of the server at upstream, a postgres:// URL
// whose user, host, port and database it serves under the same database name, with trust
// authentication (auth_type any: the upstream URL's user logs in).
func Start(t testing.TB, upstream string, mode Mode) *Bouncer {
	t.Helper()
	bin, err := exec.LookPath("pgbouncer")
	if err != nil {
		for _, p := range []string{"/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"} {
			if _, serr := os.Stat(p); serr == nil {
				bin, err = p, nil
				break
			}
		}
	}
	if err != nil {
		testenv.Missing(t, "pgbouncer is not installed (Debian package pgbouncer; .ci/run installs it)")
	}
	u, err := url.Parse(upstream)
	if err != nil {
		t.Fatalf("pgbouncer upstream: %v", err)
	}
	db := strings.TrimPrefix(u.Path, "/")
	host, port := u.Hostname(), u.Port()
	if port == "" {
		port = "5432"
	}
	dir, err := os.MkdirTemp("", "pgbouncer-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	run := testenv.ServerUser(t, "pgbouncer")
	if run != nil {
		uid, _ := strconv.Atoi(run.Uid)
		gid, _ := strconv.Atoi(run.Gid)
		if err := os.Chown(dir, uid, gid); err != nil {
			t.Fatal(err)
		}
	}
	b := &Bouncer{Port: testenv.FreePort(t), Mode: mode, db: db}
	ini := fmt.Sprintf(`[databases]
%s = host=%s port=%s dbname=%s user=%s
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = %d
unix_socket_dir =
auth_type = any
pool_mode = %s
max_client_conn = 200
default_pool_size = 20
ignore_startup_parameters = extra_float_digits,options
logfile = %s
pidfile = %s
`, db, host, port, db, u.User.Username(), b.Port, mode, filepath.Join(dir, "pgbouncer.log"), filepath.Join(dir, "pgbouncer.pid"))
	b.logPath = filepath.Join(dir, "pgbouncer.log")
	conf := filepath.Join(dir, "pgbouncer.ini")
	if err := os.WriteFile(conf, []byte(ini), 0o644); err != nil {
		t.Fatal(err)
	}
	// PgBouncer is the test's own child (not under runuser), in a process group of its own, and
	// writes its log to a file: a kill reaches it, and no pipe outlives it.
	b.cmd = exec.Command(bin, conf)
	b.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if run != nil {
		uid, _ := strconv.Atoi(run.Uid)
		gid, _ := strconv.Atoi(run.Gid)
		b.cmd.SysProcAttr.Credential = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
	}
	if err := b.cmd.Start(); err != nil {
		t.Fatalf("start pgbouncer: %v", err)
	}
	exited := make(chan struct{})
	go func() { _ = b.cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = b.cmd.Process.Signal(os.Interrupt)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			_ = syscall.Kill(-b.cmd.Process.Pid, syscall.SIGKILL)
			<-exited
		}
		if t.Failed() {
			t.Logf("pgbouncer (%s) log:\n%s", mode, b.Log())
		}
	})
	deadline := time.Now().Add(60 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		conn, err := pgx.Connect(ctx, b.URL()+"&default_query_exec_mode=simple_protocol")
		if err == nil {
			_, err = conn.Exec(ctx, "SELECT 1")
			_ = conn.Close(context.Background())
		}
		cancel()
		if err == nil {
			return b
		}
		select {
		case <-exited:
			t.Fatalf("pgbouncer exited: %s", b.Log())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("pgbouncer on port %d not answering: %v\n%s", b.Port, err, b.Log())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// URL returns the connection string of the database through PgBouncer.
func (b *Bouncer) URL() string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/%s?sslmode=disable", b.Port, b.db)
}

// Log returns what PgBouncer logged.
func (b *Bouncer) Log() string {
	out, err := os.ReadFile(b.logPath)
	if err != nil {
		return err.Error()
	}
	return string(out)
}
