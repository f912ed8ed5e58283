// Package testenv lets a test say what it needs from the machine beyond Go: a command such as
// promtool or kcat, PostgreSQL's server binaries, a user to run them as.
//
// When something is missing the test is skipped with the reason, so `make test` works on a bare
// machine and lists every such skip at the end. With OUTBOX_REQUIRE_TOOLS=1 (CI sets it, after
// installing everything) a missing need fails the test instead: CI never passes by skipping.
package testenv

import (
	"os"
	"os/exec"
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
