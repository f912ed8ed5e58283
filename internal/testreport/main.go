// Command testreport reads `go test -json` on its standard input and prints what `go test`
// prints without -v (each package's ok or FAIL line, compile errors, the output of the tests
// that failed), then every skipped test with the reason it gave, then the failed tests again by
// name. It exits 1 when a test or a package failed, so a skip is never silent and a failure
// never scrolls away. `make test` pipes into it:
//
//	go test -json ./... | go run ./internal/testreport
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
)

func main() {
	if failed, err := report(os.Stdin, os.Stdout); err != nil || failed {
		if err != nil {
			fmt.Fprintln(os.Stderr, "testreport:", err)
		}
		os.Exit(1)
	}
}

// event is one line of `go test -json` (see `go doc test2json`).
type event struct {
	Action     string
	Package    string
	Test       string
	Output     string
	ImportPath string // build-output and build-fail events
}

// skipped is a test that was skipped, with what it printed (its t.Skip message).
type skipped struct {
	pkg, test, reason string
}

// report copies the test run read from r to w, condensed, and says whether anything failed.
func report(r io.Reader, w io.Writer) (failed bool, err error) {
	var (
		out      = map[string]*strings.Builder{} // output of each running test, by package and test
		children = map[string][]string{}         // failed subtests' output, by their top-level test
		skips    []skipped
		failures []string
	)
	key := func(pkg, test string) string { return pkg + "\x00" + test }
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64*1024), 16*1024*1024)
	for sc.Scan() {
		line := sc.Bytes()
		var e event
		if len(line) == 0 || line[0] != '{' || json.Unmarshal(line, &e) != nil {
			fmt.Fprintf(w, "%s\n", line) // not an event: go test's own stderr, a build error
			continue
		}
		k := key(e.Package, e.Test)
		switch e.Action {
		case "build-output":
			fmt.Fprint(w, e.Output)
		case "build-fail":
			failed = true
			failures = append(failures, e.ImportPath+" (build)")
		case "output":
			if strings.HasPrefix(e.Output, "=== ") {
				continue // === RUN, PAUSE, CONT, NAME: -v's bookkeeping
			}
			if e.Test == "" {
				if e.Output != "PASS\n" {
					fmt.Fprint(w, e.Output) // ok, FAIL, [no test files], a panic outside tests
				}
				continue
			}
			b := out[k]
			if b == nil {
				b = &strings.Builder{}
				out[k] = b
			}
			b.WriteString(e.Output)
		case "pass":
			delete(out, k)
		case "skip":
			if e.Test != "" {
				skips = append(skips, skipped{e.Package, e.Test, skipReason(out[k])})
				delete(out, k)
			}
		case "fail":
			failed = true
			if e.Test == "" {
				// The package failed: print what its unfinished tests said (a panic, a timeout).
				for kk, b := range out {
					if strings.HasPrefix(kk, e.Package+"\x00") {
						fmt.Fprint(w, b.String())
						delete(out, kk)
					}
				}
				for kk, texts := range children {
					if strings.HasPrefix(kk, e.Package+"\x00") {
						fmt.Fprint(w, strings.Join(texts, ""))
						delete(children, kk)
					}
				}
				continue
			}
			text := ""
			if b := out[k]; b != nil {
				text = resultFirst(b.String())
			}
			delete(out, k)
			failures = append(failures, e.Package+" "+e.Test)
			top, _, sub := strings.Cut(e.Test, "/")
			if sub {
				// Printed after its parent's "--- FAIL" line, as go test does.
				children[key(e.Package, top)] = append(children[key(e.Package, top)], text)
				continue
			}
			fmt.Fprint(w, text)
			fmt.Fprint(w, strings.Join(children[k], ""))
			delete(children, k)
		}
	}
	if err := sc.Err(); err != nil {
		return true, fmt.Errorf("read go test -json: %w", err)
	}
	if len(skips) > 0 {
		fmt.Fprintf(w, "\nskipped: %d test(s)\n", len(skips))
		for _, s := range skips {
			fmt.Fprintf(w, "  %s %s: %s\n", s.pkg, s.test, s.reason)
		}
	}
	if len(failures) > 0 {
		fmt.Fprintf(w, "\nfailed: %d\n", len(failures))
		for _, f := range failures {
			fmt.Fprintf(w, "  %s\n", f)
		}
	}
	return failed, nil
}

// skipReason is what a skipped test printed, on one line, without its "--- SKIP" line.
func skipReason(b *strings.Builder) string {
	if b == nil {
		return "(no reason given)"
	}
	var parts []string
	for _, l := range strings.Split(b.String(), "\n") {
		l = strings.TrimSpace(l)
		if l == "" || strings.HasPrefix(l, "--- SKIP") {
			continue
		}
		parts = append(parts, l)
	}
	if len(parts) == 0 {
		return "(no reason given)"
	}
	return strings.Join(parts, " / ")
}

// resultFirst moves a test's "--- FAIL" line before the lines it logged, where go test without
// -v prints it (in -json mode it comes last).
func resultFirst(text string) string {
	lines := strings.SplitAfter(text, "\n")
	for i, l := range lines {
		if strings.HasPrefix(strings.TrimSpace(l), "--- ") && i > 0 {
			return l + strings.Join(lines[:i], "") + strings.Join(lines[i+1:], "")
		}
	}
	return text
}
