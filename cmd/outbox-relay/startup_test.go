package main_test

import (
	"net"
	"strings"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/dbtest"
)

// blackhole accepts connections and never answers, like a host behind a dropping firewall.
func blackhole(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var conns []net.Conn
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns = append(conns, c)
		}
	}()
	t.Cleanup(func() {
		_ = ln.Close()
		<-done
		for _, c := range conns {
			_ = c.Close()
		}
	})
	return ln.Addr().String()
}

// closedPort returns an address nothing listens on: connections are refused.
func closedPort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	_ = ln.Close()
	return addr
}

// TestStartupUnreachable: with the database or the broker unreachable, `run` fails within
// relay.startup_timeout (the process ends; the test only bounds it generously), exits non-zero,
// and names the endpoint it could not reach.
func TestStartupUnreachable(t *testing.T) {
	t.Parallel()
	_, table := dbtest.Schema(t)
	for _, c := range []struct {
		name   string
		dbAddr string // "" for the test database
		broker string
		want   []string
	}{
		{"database silent", blackhole(t), closedPort(t), []string{"relay.startup_timeout 2s"}},
		{"database refuses", closedPort(t), closedPort(t), []string{"relay.startup_timeout 2s"}},
		{"broker silent", "", blackhole(t), []string{"kafka brokers", "unreachable", "relay.startup_timeout 2s"}},
		{"broker refuses", "", closedPort(t), []string{"kafka brokers", "unreachable"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			url := dbtest.URL()
			want := append([]string{}, c.want...)
			if c.dbAddr != "" {
				url = "postgres://relay:Startup-pw-1@" + c.dbAddr + "/app?sslmode=disable"
				want = append(want, "database "+c.dbAddr+"/app")
			} else {
				want = append(want, c.broker)
			}
			env := []string{
				"OUTBOX_DATABASE_URL=" + url,
				"OUTBOX_DATABASE_SCHEMA=" + table.Schema,
				"OUTBOX_KAFKA_BROKERS=" + c.broker,
				"OUTBOX_RELAY_STARTUP_TIMEOUT=2s",
				"OUTBOX_DATABASE_CONNECT_TIMEOUT=1m", // the startup timeout must bound the whole start
				"OUTBOX_KAFKA_DIAL_TIMEOUT=1m",
			}
			_, stderr, code := runBin(t, 90*time.Second, env, "run", "--http-addr=")
			if code == 0 {
				t.Fatalf("run started with %s; stderr:\n%s", c.name, stderr)
			}
			for _, w := range want {
				if !strings.Contains(stderr, w) {
					t.Errorf("stderr does not contain %q:\n%s", w, stderr)
				}
			}
			if strings.Contains(stderr, "Startup-pw-1") {
				t.Errorf("stderr shows the password:\n%s", stderr)
			}
		})
	}
}
