package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/spf13/pflag"
)

// TestDemoHelpShowsItsDefaults checks that `demo --help` shows the defaults the demo applies
// (not those of `run`), and that README.md's "Two commands" section states the same rate,
// writers and schema.
func TestDemoHelpShowsItsDefaults(t *testing.T) {
	t.Parallel()
	var stdout, stderr bytes.Buffer
	if err := demoCmd(context.Background(), []string{"--help"}, &stdout, &stderr); !errors.Is(err, pflag.ErrHelp) {
		t.Fatalf("demo --help: %v", err)
	}
	help := stderr.String()
	flagDefault := func(name string) string {
		m := regexp.MustCompile(`(?m)^\s+--` + name + ` \S+ .*\(default "?([^")]*)"?\)$`).FindStringSubmatch(help)
		if m == nil {
			return ""
		}
		return m[1]
	}
	for name, want := range map[string]string{
		"database-schema": "outbox_demo", "http-addr": "127.0.0.1:0", "log-level": "warn", "rate": "20", "writers": "4",
	} {
		if got := flagDefault(name); got != want {
			t.Errorf("demo --help: --%s default %q, want %q", name, got, want)
		}
	}
	if strings.Contains(help, "--log-format") {
		t.Errorf("demo --help lists --log-format, which the demo ignores (it always logs text)")
	}

	readme, err := os.ReadFile(readmeFile)
	if err != nil {
		t.Fatal(err)
	}
	_, section, _ := strings.Cut(string(readme), "\n## Two commands\n")
	section, _, _ = strings.Cut(section, "\n## ")
	m := regexp.MustCompile(`by default (\d+) users a second from (\d+) writers`).FindStringSubmatch(section)
	if m == nil || m[1] != flagDefault("rate") || m[2] != flagDefault("writers") {
		t.Errorf("README.md Two commands: %q, want the defaults of demo --help (rate %s, writers %s)",
			m, flagDefault("rate"), flagDefault("writers"))
	}
	if !strings.Contains(section, "`"+demoSchema+"`") {
		t.Errorf("README.md Two commands does not name the demo's schema %s", demoSchema)
	}
}

// TestDemoDefaultsYieldToTheUser: the demo's defaults apply only where the user set nothing;
// an explicit --database-schema public (run's default) is kept.
func TestDemoDefaultsYieldToTheUser(t *testing.T) {
	for _, tc := range []struct {
		name, env  string
		args       []string
		wantSchema string
		wantAddr   string
	}{
		{name: "nothing set", wantSchema: demoSchema, wantAddr: demoHTTPAddr},
		{name: "flags", args: []string{"--database-schema", "public", "--http-addr", ":9999"}, wantSchema: "public", wantAddr: ":9999"},
		{name: "environment", env: "app", wantSchema: "app", wantAddr: demoHTTPAddr},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("OUTBOX_DATABASE_SCHEMA", tc.env)
			if tc.env == "" {
				_ = os.Unsetenv("OUTBOX_DATABASE_SCHEMA")
			}
			t.Setenv("OUTBOX_HTTP_ADDR", "")
			_ = os.Unsetenv("OUTBOX_HTTP_ADDR")
			fs := newFlagSet("demo", "", os.Stderr)
			addFlags(fs)
			if err := fs.Parse(tc.args); err != nil {
				t.Fatal(err)
			}
			cfg, v, err := loadConfig(fs)
			if err != nil {
				t.Fatal(err)
			}
			demoDefaults(fs, v, cfg)
			if cfg.Store.Table.Schema != tc.wantSchema || cfg.HTTPAddr != tc.wantAddr {
				t.Errorf("schema %q, http.addr %q; want %q, %q", cfg.Store.Table.Schema, cfg.HTTPAddr, tc.wantSchema, tc.wantAddr)
			}
		})
	}
}
