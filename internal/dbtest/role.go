package dbtest

import (
	"net/url"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
)

// RelayRole runs sql/roles/relay_role.sql with psql against dbURL, as the tables' owner, for role
// (with password, when not empty) on schema.
func RelayRole(t testing.TB, dbURL, role, password, schema string) {
	t.Helper()
	psql, err := exec.LookPath("psql")
	if err != nil {
		psql = "/usr/lib/postgresql/15/bin/psql"
	}
	_, self, _, _ := runtime.Caller(0)
	script := filepath.Join(filepath.Dir(self), "..", "..", "sql", "roles", "relay_role.sql")
	args := []string{"-X", "-q", "-d", dbURL, "-v", "role=" + role, "-v", "schema=" + schema, "-f", script}
	if password != "" {
		args = append(args, "-v", "password="+password)
	}
	if out, err := exec.Command(psql, args...).CombinedOutput(); err != nil {
		t.Fatalf("psql relay_role.sql: %v\n%s", err, out)
	}
}

// RoleURL returns base with its user and password replaced by role and password.
func RoleURL(base, role, password string) string {
	u, err := url.Parse(base)
	if err != nil {
		panic(err)
	}
	u.User = url.UserPassword(role, password)
	return u.String()
}
