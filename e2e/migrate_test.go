package e2e_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/dbtest"
)

var doneRE = regexp.MustCompile(`(?m)^done: (\d+) applied$`)

// TestMigrateCommand runs `outbox-relay migrate` as an operator would, configured by the
// environment alone: the first run applies every migration and says so, a second run applies
// nothing, two runs started at once on a fresh schema both succeed with each migration applied
// once, and the result takes the contract's minimal insert.
func TestMigrateCommand(t *testing.T) {
	t.Parallel()
	bin := relayBinary(t)
	pool := dbtest.Pool(t)
	entries, err := os.ReadDir("../sql/migrations")
	if err != nil {
		t.Fatal(err)
	}
	var files []string
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), ".sql") {
			files = append(files, e.Name())
		}
	}
	if len(files) == 0 {
		t.Fatal("no migration in sql/migrations")
	}

	migrate := func(schema string) (string, error) {
		cmd := exec.Command(bin, "migrate")
		for _, kv := range os.Environ() {
			if !strings.HasPrefix(kv, "OUTBOX_") {
				cmd.Env = append(cmd.Env, kv)
			}
		}
		cmd.Env = append(cmd.Env, "OUTBOX_DATABASE_URL="+dbtest.URL(), "OUTBOX_DATABASE_SCHEMA="+schema)
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		err := cmd.Run()
		return out.String(), err
	}
	applied := func(out string) int {
		m := doneRE.FindStringSubmatch(out)
		if m == nil {
			t.Fatalf("migrate output has no \"done: N applied\" line:\n%s", out)
		}
		n, _ := strconv.Atoi(m[1])
		return n
	}
	fresh := func(name string) string {
		schema := fmt.Sprintf("t_migrate_cmd_%s_%d_%d", name, os.Getpid(), time.Now().UnixNano()%1e9)
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			_, _ = pool.Exec(ctx, `DROP SCHEMA IF EXISTS `+schema+` CASCADE`)
		})
		return schema
	}

	schema := fresh("twice")
	out, err := migrate(schema)
	if err != nil {
		t.Fatalf("first migrate: %v\n%s", err, out)
	}
	if n := applied(out); n != len(files) {
		t.Errorf("first migrate applied %d, want %d:\n%s", n, len(files), out)
	}
	for _, f := range files {
		if !regexp.MustCompile(`(?m)^\s+applied\s+` + regexp.QuoteMeta(f) + `$`).MatchString(out) {
			t.Errorf("first migrate does not say it applied %s:\n%s", f, out)
		}
	}
	out, err = migrate(schema)
	if err != nil {
		t.Fatalf("second migrate: %v\n%s", err, out)
	}
	if n := applied(out); n != 0 {
		t.Errorf("second migrate applied %d, want 0:\n%s", n, out)
	}
	for _, f := range files {
		if !regexp.MustCompile(`(?m)^\s+already applied\s+` + regexp.QuoteMeta(f) + `$`).MatchString(out) {
			t.Errorf("second migrate does not say %s was already applied:\n%s", f, out)
		}
	}

	schema = fresh("together")
	var wg sync.WaitGroup
	outs, errs := make([]string, 2), make([]error, 2)
	for i := range 2 {
		wg.Go(func() { outs[i], errs[i] = migrate(schema) })
	}
	wg.Wait()
	total := 0
	for i := range 2 {
		if errs[i] != nil {
			t.Fatalf("concurrent migrate %d: %v\n%s", i, errs[i], outs[i])
		}
		total += applied(outs[i])
	}
	if total != len(files) {
		t.Errorf("two concurrent migrates applied %d in all, want each of the %d migrations once:\n%s\n%s",
			total, len(files), outs[0], outs[1])
	}
	if _, err := pool.Exec(context.Background(), `INSERT INTO `+schema+`.outbox (aggregate_type, aggregate_id, event_type, payload)
		VALUES ('order', 'o-1', 'OrderPlaced', '\x7b7d')`); err != nil {
		t.Errorf("minimal insert into the migrated outbox: %v", err)
	}
}
