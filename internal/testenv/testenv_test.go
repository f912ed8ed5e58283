package testenv_test

import (
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

// TestNeedsAMissingTool is run by TestMissingToolSkipsOrFails in a child process, where
// OUTBOX_TESTENV_CHILD is set; on its own it does nothing.
func TestNeedsAMissingTool(t *testing.T) {
	if os.Getenv("OUTBOX_TESTENV_CHILD") == "" {
		return
	}
	testenv.LookPath(t, "outbox-no-such-tool", "nowhere to be found")
	t.Log("found a tool that does not exist")
}

// TestMissingToolSkipsOrFails runs a test needing a command that does not exist: it is skipped
// with the command's name and how to get it, and fails instead with OUTBOX_REQUIRE_TOOLS=1.
func TestMissingToolSkipsOrFails(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		require string
		want    string
		ok      bool
	}{
		{"", "--- SKIP: TestNeedsAMissingTool", true},
		{"0", "--- SKIP: TestNeedsAMissingTool", true},
		{"1", "--- FAIL: TestNeedsAMissingTool", false},
	} {
		cmd := exec.Command(os.Args[0], "-test.run=^TestNeedsAMissingTool$", "-test.v")
		cmd.Env = append(os.Environ(), "OUTBOX_TESTENV_CHILD=1", testenv.RequireToolsEnv+"="+tc.require)
		out, err := cmd.CombinedOutput()
		if (err == nil) != tc.ok || !strings.Contains(string(out), tc.want) ||
			!strings.Contains(string(out), "outbox-no-such-tool is not installed (nowhere to be found)") {
			t.Errorf("%s=%q: exit %v, want %s with the reason; output:\n%s", testenv.RequireToolsEnv, tc.require, err, tc.want, out)
		}
	}
}
