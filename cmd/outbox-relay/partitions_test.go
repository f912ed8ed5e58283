package main_test

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/internal/dbtest"
	"github.com/outbox-relay/outbox-relay/internal/kafkatest"
)

// TestPartitionsCommand: 'partitions list' shows a topic grown past its pin, 'partitions repin'
// refuses while a relay leads, then pins the live count once none does.
func TestPartitionsCommand(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	ctx := context.Background()
	b := kafkatest.Start(t)
	topic := b.Topic(t, "repin", 3)
	env := []string{"OUTBOX_DATABASE_URL=" + dbtest.URL(), "OUTBOX_DATABASE_SCHEMA=" + table.Schema,
		"OUTBOX_KAFKA_BROKERS=" + strings.Join(b.Addrs, ",")}
	run := func(args ...string) (string, string, int) {
		t.Helper()
		return runBin(t, 60*time.Second, env, append([]string{"partitions"}, args...)...)
	}

	out, errOut, code := run("list")
	if code != 0 || !strings.Contains(out, "no topic pinned") {
		t.Fatalf("list with no pin: exit %d\n%s%s", code, out, errOut)
	}
	if _, err := postgres.NewPartitionPins(pool, table).Pin(ctx, topic, 3); err != nil {
		t.Fatal(err)
	}
	cl, err := kgo.NewClient(kgo.SeedBrokers(b.Addrs...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	resp, err := kadm.NewClient(cl).CreatePartitions(ctx, 3, topic)
	if err == nil {
		err = resp.Error()
	}
	if err != nil {
		t.Fatalf("add partitions: %v", err)
	}

	out, errOut, code = run("list")
	if code != 0 {
		t.Fatalf("list: exit %d\n%s%s", code, out, errOut)
	}
	if fields := strings.Fields(lineOf(out, topic)); len(fields) < 4 || fields[1] != "3" || fields[2] != "6" ||
		!strings.Contains(out, "stay unused until repinned") {
		t.Errorf("list after growth, want pinned 3, live 6 and a note:\n%s", out)
	}

	// A relay leads: repinning now would move keys under its feet at its next failover.
	sess := dbtest.Session(t, table, dbtest.URL())
	if ok, err := sess.TryLead(ctx); err != nil || !ok {
		t.Fatalf("take the leadership: %v, %v", ok, err)
	}
	out, errOut, code = run("repin", topic)
	if code == 0 || !strings.Contains(errOut, "a relay leads") || !strings.Contains(errOut, "--force") {
		t.Errorf("repin while a relay leads: exit %d\n%s%s", code, out, errOut)
	}
	if pins, _ := postgres.ListPins(ctx, pool, table); len(pins) != 1 || pins[0].Partitions != 3 {
		t.Errorf("pins after a refused repin: %+v", pins)
	}
	if err := sess.Close(ctx); err != nil {
		t.Fatal(err)
	}

	out, errOut, code = run("repin", topic)
	if code != 0 || !strings.Contains(out, "pinned to 6 partitions (was 3)") {
		t.Fatalf("repin: exit %d\n%s%s", code, out, errOut)
	}
	out, errOut, code = run("list", "--json")
	var rows []struct {
		Topic  string
		Pinned int
		Live   *int
	}
	if err := json.Unmarshal([]byte(out), &rows); code != 0 || err != nil {
		t.Fatalf("list --json: exit %d, %v\n%s%s", code, err, out, errOut)
	}
	if len(rows) != 1 || rows[0].Topic != topic || rows[0].Pinned != 6 || rows[0].Live == nil || *rows[0].Live != 6 {
		t.Errorf("list --json after repin: %s", out)
	}
	if _, errOut, code = run("repin", "no-such-topic"); code == 0 || !strings.Contains(errOut, "UNKNOWN_TOPIC_OR_PARTITION") {
		t.Errorf("repin of a missing topic: exit %d: %s", code, errOut)
	}
}

// lineOf returns the first line of out that starts with prefix.
func lineOf(out, prefix string) string {
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, prefix) {
			return l
		}
	}
	return ""
}

// TestSubcommandMistakes: the commands with subcommands print their usage and name the valid
// subcommands when none or a wrong one is given, and help exits 0.
func TestSubcommandMistakes(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		args    []string
		rc      int
		wantErr string
	}{
		{[]string{"parked"}, 1, "missing subcommand: list, retry or drop"},
		{[]string{"parked", "purge"}, 1, `unknown subcommand "purge": want list, retry or drop`},
		{[]string{"partitions"}, 1, "missing subcommand: list or repin"},
		{[]string{"partitions", "nope"}, 1, `unknown subcommand "nope": want list or repin`},
		{[]string{"parked", "--help"}, 0, "Usage: outbox-relay parked"},
		{[]string{"partitions", "help"}, 0, "Usage: outbox-relay partitions"},
	} {
		_, stderr, rc := runBin(t, 30*time.Second, nil, c.args...)
		if rc != c.rc || !strings.Contains(stderr, c.wantErr) {
			t.Errorf("%v: exit %d, stderr %q; want exit %d and %q", c.args, rc, stderr, c.rc, c.wantErr)
		}
	}
}
