// Package pgcluster gives a test a PostgreSQL cluster of its own, which it may stop hard, restart
// or make read-only without disturbing other tests: initdb and pg_ctl from the server binaries,
// on a free port, in a temporary directory, removed when the test ends.
//
// The server refuses to run as root, so when the test runs as root the commands run as the
// postgres OS user.
package pgcluster

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

// BinDirDefault holds the server binaries when PGBIN is not set.
const BinDirDefault = "/usr/lib/postgresql/15/bin"

// Cluster is one throwaway PostgreSQL server.
type Cluster struct {
	t   testing.TB
	bin string
	dir string
	run *user.User // nil: run as the current user
	// Port is the server's TCP port on 127.0.0.1.
	Port int
}

// Start initializes and starts a cluster for t, stopped and removed when t ends. settings are
// extra postgresql.conf lines. It skips t when the server binaries are missing.
func Start(t testing.TB, settings ...string) *Cluster {
	t.Helper()
	c := newCluster(t)
	if out, err := c.cmd("initdb", "-D", c.data(), "-U", "postgres", "--auth=trust", "--no-sync",
		"-E", "UTF8", "--locale=C").CombinedOutput(); err != nil {
		t.Fatalf("initdb: %v\n%s", err, out)
	}
	c.configure(settings)
	c.Start()
	return c
}

// StartStandby makes a streaming standby of c (pg_basebackup, then standby.signal) and starts
// it, for t, stopped and removed when t ends. It replicates from primaryAddr, c's address or a
// proxy in front of it, under the application_name name (what pg_stat_replication and
// synchronous_standby_names call it). settings are extra postgresql.conf lines. The cluster's
// default pg_hba.conf (initdb --auth=trust) lets replication connections from 127.0.0.1 in, and
// its defaults (wal_level replica, max_wal_senders 10) allow a standby.
func (c *Cluster) StartStandby(t testing.TB, primaryAddr, name string, settings ...string) *Cluster {
	t.Helper()
	host, port, err := net.SplitHostPort(primaryAddr)
	if err != nil {
		t.Fatal(err)
	}
	s := newCluster(t)
	if out, err := s.cmd("pg_basebackup", "-D", s.data(), "-h", host, "-p", port, "-U", "postgres",
		"-X", "stream", "-c", "fast", "--no-sync").CombinedOutput(); err != nil {
		t.Fatalf("pg_basebackup: %v\n%s", err, out)
	}
	if err := os.WriteFile(filepath.Join(s.data(), "standby.signal"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	s.chown(filepath.Join(s.data(), "standby.signal"))
	conninfo := fmt.Sprintf("host=%s port=%s user=postgres application_name=%s", host, port, name)
	s.configure(append([]string{
		"primary_conninfo = '" + conninfo + "'",
		"hot_standby = on",
		"wal_receiver_status_interval = 1s",
	}, settings...))
	s.Start()
	return s
}

// newCluster returns a cluster with its temporary directory, removed (and the server stopped)
// when t ends.
func newCluster(t testing.TB) *Cluster {
	t.Helper()
	bin := os.Getenv("PGBIN")
	if bin == "" {
		bin = BinDirDefault
	}
	if _, err := os.Stat(filepath.Join(bin, "initdb")); err != nil {
		testenv.Missing(t, "PostgreSQL server binaries not found in %s (set PGBIN): %v", bin, err)
	}
	c := &Cluster{t: t, bin: bin}
	c.run = testenv.ServerUser(t, "the server")
	dir, err := os.MkdirTemp("", "pgcluster-")
	if err != nil {
		t.Fatal(err)
	}
	c.dir = dir
	t.Cleanup(func() {
		if out, err := c.ctl("stop", "-m", "immediate"); err != nil { // often already stopped by the test
			t.Logf("pg_ctl stop at cleanup: %v\n%s", err, out)
		}
		_ = os.RemoveAll(dir)
	})
	c.chown(dir)
	return c
}

// chown gives path to the user the server runs as.
func (c *Cluster) chown(path string) {
	if c.run == nil {
		return
	}
	uid, _ := strconv.Atoi(c.run.Uid)
	gid, _ := strconv.Atoi(c.run.Gid)
	if err := os.Chown(path, uid, gid); err != nil {
		c.t.Fatal(err)
	}
}

// configure appends the test settings and settings to postgresql.conf, and picks the port.
func (c *Cluster) configure(settings []string) {
	c.t.Helper()
	c.Port = testenv.FreePort(c.t)
	conf := []string{
		"listen_addresses = '127.0.0.1'",
		fmt.Sprintf("port = %d", c.Port),
		"unix_socket_directories = '" + c.dir + "'",
		"fsync = off",
		"synchronous_commit = on",
		"full_page_writes = off",
		"shared_buffers = 16MB",
		"max_connections = 50",
		"logging_collector = off",
	}
	conf = append(conf, settings...)
	f, err := os.OpenFile(filepath.Join(c.data(), "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		c.t.Fatal(err)
	}
	_, err = f.WriteString("\n" + strings.Join(conf, "\n") + "\n")
	_ = f.Close()
	if err != nil {
		c.t.Fatal(err)
	}
}

func (c *Cluster) data() string { return filepath.Join(c.dir, "data") }

func (c *Cluster) cmd(name string, args ...string) *exec.Cmd {
	path := filepath.Join(c.bin, name)
	if c.run == nil {
		return exec.Command(path, args...)
	}
	// runuser keeps the environment small and needs no password.
	return exec.Command("runuser", append([]string{"-u", c.run.Username, "--", path}, args...)...)
}

func (c *Cluster) ctl(args ...string) ([]byte, error) {
	args = append([]string{args[0], "-D", c.data(), "-w", "-t", "120"}, args[1:]...)
	return c.cmd("pg_ctl", args...).CombinedOutput()
}

// URL returns the connection string of the cluster's postgres database.
func (c *Cluster) URL() string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", c.Port)
}

// Addr returns the cluster's host:port.
func (c *Cluster) Addr() string { return fmt.Sprintf("127.0.0.1:%d", c.Port) }

// Start starts the server and waits until it accepts connections.
func (c *Cluster) Start() {
	c.t.Helper()
	if out, err := c.ctl("start", "-l", filepath.Join(c.dir, "server.log")); err != nil {
		log, _ := os.ReadFile(filepath.Join(c.dir, "server.log"))
		c.t.Fatalf("pg_ctl start: %v\n%s\n%s", err, out, log)
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		conn, err := pgx.Connect(ctx, c.URL())
		cancel()
		if err == nil {
			_ = conn.Close(context.Background())
			return
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("cluster on port %d not accepting connections: %v", c.Port, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// StopImmediate stops the server the hard way (pg_ctl stop -m immediate): no checkpoint, every
// connection dropped, crash recovery at the next start.
func (c *Cluster) StopImmediate() {
	c.t.Helper()
	if out, err := c.ctl("stop", "-m", "immediate"); err != nil {
		c.t.Fatalf("pg_ctl stop: %v\n%s", err, out)
	}
}

// Kill kills the server the hardest way, as a machine crash would: SIGKILL to the postmaster
// and to every process it started, so that no orphaned backend answers one more query or a
// walsender sends one more byte. The data directory stays, for Start.
func (c *Cluster) Kill() {
	c.t.Helper()
	b, err := os.ReadFile(filepath.Join(c.data(), "postmaster.pid"))
	if err != nil {
		c.t.Fatalf("kill: %v", err)
	}
	pid, err := strconv.Atoi(strings.SplitN(string(b), "\n", 2)[0])
	if err != nil {
		c.t.Fatalf("kill: postmaster.pid: %v", err)
	}
	// Stopped, the postmaster starts no more children while they are listed.
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		c.t.Fatalf("kill: %v", err)
	}
	children := childrenOf(pid)
	_ = syscall.Kill(pid, syscall.SIGKILL)
	for _, p := range children {
		_ = syscall.Kill(p, syscall.SIGKILL)
	}
	for deadline := time.Now().Add(60 * time.Second); syscall.Kill(pid, 0) == nil; {
		if time.Now().After(deadline) {
			c.t.Fatalf("kill: postmaster %d still there after 60s", pid)
		}
		time.Sleep(10 * time.Millisecond)
	}
	_ = os.Remove(filepath.Join(c.data(), "postmaster.pid"))
}

// childrenOf lists the processes whose parent is pid, from /proc.
func childrenOf(pid int) []int {
	entries, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range entries {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...: comm may hold spaces, so read after its closing paren.
		rest := string(stat[strings.LastIndexByte(string(stat), ')')+1:])
		f := strings.Fields(rest)
		if len(f) > 1 && f[1] == strconv.Itoa(pid) {
			out = append(out, p)
		}
	}
	return out
}

// Promote promotes a standby to a primary (pg_ctl promote) and waits until it accepts writes.
func (c *Cluster) Promote() {
	c.t.Helper()
	if out, err := c.ctl("promote"); err != nil {
		c.t.Fatalf("pg_ctl promote: %v\n%s", err, out)
	}
}

// SetReadOnly makes every new transaction of the cluster read-only (or writable again) and
// terminates every other connection, so that clients reconnect to a node that refuses writes: the
// effect of a failover onto a standby, without one.
func (c *Cluster) SetReadOnly(ctx context.Context, on bool) error {
	conn, err := pgx.Connect(ctx, c.URL())
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	for _, q := range []string{
		fmt.Sprintf(`ALTER SYSTEM SET default_transaction_read_only = %t`, on),
		`SELECT pg_reload_conf()`,
	} {
		if _, err := conn.Exec(ctx, q); err != nil {
			return fmt.Errorf("%s: %w", q, err)
		}
	}
	if !on {
		return nil
	}
	// Wait until the setting is in force for new sessions, then end the old ones.
	for {
		probe, err := pgx.Connect(ctx, c.URL())
		if err != nil {
			return err
		}
		var ro string
		err = probe.QueryRow(ctx, `SHOW default_transaction_read_only`).Scan(&ro)
		_ = probe.Close(context.Background())
		if err != nil {
			return err
		}
		if ro == "on" {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	_, err = conn.Exec(ctx, `SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity
		WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'`)
	return err
}
