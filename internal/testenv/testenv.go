// Package testenv lets a test say what it needs from the machine beyond Go: a command such as
// promtool or kcat, PostgreSQL's server binaries, a user to run them as.
//
// When something is missing the test is skipped with the reason, so `make test` works on a bare
// machine and lists every such skip at the end. With OUTBOX_REQUIRE_TOOLS=1 (CI sets it, after
// installing everything) a missing need fails the test instead: CI never passes by skipping.
package testenv

import (
	"net"
	"os"
	"os/exec"
	"os/user"
	"testing"
)

// RequireToolsEnv is the environment variable that turns a missing need into a failure.
const RequireToolsEnv = "OUTBOX_REQUIRE_TOOLS"

// Required reports whether OUTBOX_REQUIRE_TOOLS asks for every need to be met.
func Required() bool {
	v := os.Getenv(RequireToolsEnv)
	return v != "" && v != "0" && v != "false"
}

// LookPath returns the path of the command name. When it is not on PATH, t is skipped (or, with
// OUTBOX_REQUIRE_TOOLS=1, fails) with a message naming the command and how to get it (install,
// for example "Debian package prometheus").
func LookPath(t testing.TB, name, install string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		Missing(t, "%s is not installed (%s)", name, install)
	}
	return p
}

// Missing ends t because something it needs from the machine is absent: skipped, or failed with
// OUTBOX_REQUIRE_TOOLS=1. format and args say what is missing.
func Missing(t testing.TB, format string, args ...any) {
	t.Helper()
	if Required() {
		t.Fatalf("%s=1: "+format, append([]any{RequireToolsEnv}, args...)...)
	}
	t.Skipf(format, args...)
}

// ServerUser returns the user a test runs a database server or pooler as: nil when the test does
// not run as root (the server runs as the test's own user), else the postgres user, which
// PostgreSQL and PgBouncer require instead of root. Without that user t is skipped (or, with
// OUTBOX_REQUIRE_TOOLS=1, fails). what names the program, for the message.
func ServerUser(t testing.TB, what string) *user.User {
	t.Helper()
	if os.Geteuid() != 0 {
		return nil
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		Missing(t, "running as root and no postgres user to run %s: %v", what, err)
	}
	return u
}

// FreePort returns a TCP port on 127.0.0.1 that nothing listened on a moment ago.
func FreePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}
