package main

import (
	"bytes"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// TestReportOfARealRun runs `go test -json` on testdata/sample (a passing, a skipped and, with
// SAMPLE_FAIL, a failing test) and checks the report: the package line, no -v noise, the skipped
// test listed at the end with its reason, and a failure printed with its message and counted in
// the exit status.
func TestReportOfARealRun(t *testing.T) {
	t.Parallel()
	for _, fail := range []bool{false, true} {
		cmd := exec.Command("go", "test", "-json", "-count=1", "./testdata/sample")
		cmd.Env = os.Environ()
		if fail {
			cmd.Env = append(cmd.Env, "SAMPLE_FAIL=1")
		}
		run, _ := cmd.Output() // exits 1 when a test fails; the events say so
		if !bytes.Contains(run, []byte(`"Action":"skip"`)) {
			t.Fatalf("go test -json printed no skip event:\n%s", run)
		}
		var out bytes.Buffer
		failed, err := report(bytes.NewReader(run), &out)
		if err != nil {
			t.Fatal(err)
		}
		got := out.String()
		if failed != fail {
			t.Errorf("SAMPLE_FAIL=%t: report says failed=%t", fail, failed)
		}
		skip := "\nskipped: 1 test(s)\n  github.com/outbox-relay/outbox-relay/internal/testreport/testdata/sample TestSkips: " +
			"sample_test.go:12: frobnicator is not installed (Debian package frobnicator)\n"
		if !strings.Contains(got, skip) {
			t.Errorf("SAMPLE_FAIL=%t: no skip list with the reason; report:\n%s", fail, got)
		}
		for _, noise := range []string{"=== RUN", "noise a passing test prints", "--- PASS", "\nPASS\n"} {
			if strings.Contains(got, noise) {
				t.Errorf("SAMPLE_FAIL=%t: report shows %q, which go test without -v does not; report:\n%s", fail, noise, got)
			}
		}
		if !fail {
			if !strings.HasPrefix(got, "ok  \tgithub.com/outbox-relay/outbox-relay/internal/testreport/testdata/sample\t") ||
				strings.Contains(got, "failed:") {
				t.Errorf("passing run: report:\n%s", got)
			}
			continue
		}
		want := [2]string{"--- FAIL: TestFails (", "--- FAIL: TestFails/sub ("}
		i, j, k := strings.Index(got, want[0]), strings.Index(got, want[1]), strings.Index(got, "the sub-assertion that broke")
		if i < 0 || j < i || k < j || !strings.Contains(got, "\nFAIL\tgithub.com/outbox-relay/outbox-relay/internal/testreport/testdata/sample\t") ||
			!strings.Contains(got, "\nfailed: 2\n") {
			t.Errorf("failing run: want the test, its subtest, then its message, the package FAIL line and the count; report:\n%s", got)
		}
	}
}
