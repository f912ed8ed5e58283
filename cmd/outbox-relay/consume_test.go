package main_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/adapters/kafka"
	"github.com/outbox-relay/outbox-relay/domain"
	"github.com/outbox-relay/outbox-relay/internal/dbtest"
	"github.com/outbox-relay/outbox-relay/internal/kafkatest"
	"github.com/outbox-relay/outbox-relay/internal/logbuf"
)

// subcommandProc is one outbox-relay process.
type subcommandProc struct {
	cmd    *exec.Cmd
	stderr *logbuf.Buffer
	done   chan error
}

// startSubcommand starts the binary with args and env (nothing of the test's OUTBOX_*
// environment leaks in); the process is killed when the test ends if it still runs.
func startSubcommand(t *testing.T, env []string, args ...string) *subcommandProc {
	t.Helper()
	cmd := exec.Command(relayBin(t), args...)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "OUTBOX_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, env...)
	p := &subcommandProc{cmd: cmd, stderr: &logbuf.Buffer{}, done: make(chan error, 1)}
	cmd.Stderr = p.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.done <- cmd.Wait() }()
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			_ = cmd.Process.Kill()
			<-p.done
		}
	})
	return p
}

// TestConsumeCommandKilledAndRestarted runs the 'consume' command on records produced twice,
// SIGKILLs it mid-run (its last transactions committed, their offsets not), starts it again and
// stops it with SIGTERM: every user is welcomed exactly once and the process exits 0.
func TestConsumeCommandKilledAndRestarted(t *testing.T) {
	t.Parallel()
	const users = 300
	pool, table := dbtest.Schema(t)
	b := kafkatest.Start(t)
	topic := b.Topic(t, "consume-users", 3)
	dlt := b.Topic(t, "consume-dlt", 1)
	ctx := context.Background()

	cl, err := kgo.NewClient(kgo.SeedBrokers(b.Addrs...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	var recs []*kgo.Record
	for i := range users {
		u, err := domain.NewUser("U", fmt.Sprintf("u%d@example.com", i))
		if err != nil {
			t.Fatal(err)
		}
		payload, _ := domain.NewUserCreated(u, time.Now()).MarshalJSON()
		recs = append(recs, &kgo.Record{Topic: topic, Key: []byte(u.ID()), Value: payload, Headers: []kgo.RecordHeader{
			{Key: kafka.HeaderEventID, Value: []byte(domain.NewID())}, {Key: kafka.HeaderEventType, Value: []byte("UserCreated")}}})
	}
	// Every record twice: the second copy comes after all the first ones. One poison record
	// (its payload does not decode) sits in the middle. The poison and the second copies are
	// produced once the first process is killed: however far it got, it never saw them.
	if err := cl.ProduceSync(ctx, recs...).FirstErr(); err != nil {
		t.Fatal(err)
	}

	group := "consume-" + domain.NewID()[:8]
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	metricsAddr := ln.Addr().String()
	_ = ln.Close()
	env := []string{
		"OUTBOX_DATABASE_URL=" + dbtest.URL(),
		"OUTBOX_DATABASE_SCHEMA=" + table.Schema,
		"OUTBOX_KAFKA_BROKERS=" + strings.Join(b.Addrs, ","),
		"OUTBOX_CONSUMER_GROUP=" + group,
		"OUTBOX_CONSUMER_TOPICS=" + topic,
		"OUTBOX_CONSUMER_DEAD_LETTER_TOPIC=" + dlt,
		"OUTBOX_CONSUMER_MAX_POLL_RECORDS=10",
		"OUTBOX_CONSUMER_SESSION_TIMEOUT=6s", // the killed member's partitions move on sooner
		"OUTBOX_CONSUMER_HTTP_ADDR=" + metricsAddr,
		"OUTBOX_LOG_FORMAT=text",
	}
	welcomes := func() (n, distinct int) {
		if err := pool.QueryRow(ctx, `SELECT count(*), count(DISTINCT user_id) FROM `+table.Schema+`.welcome_messages`).Scan(&n, &distinct); err != nil {
			t.Fatal(err)
		}
		return n, distinct
	}

	first := startSubcommand(t, env, "consume")
	deadline := time.Now().Add(2 * time.Minute)
	for {
		if n, _ := welcomes(); n >= 60 {
			break
		}
		select {
		case err := <-first.done:
			t.Fatalf("consume exited early: %v\n%s", err, first.stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("consume welcomed fewer than 60 users in 2 min\n%s", first.stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := first.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-first.done
	killedAt, _ := welcomes()
	poison := &kgo.Record{Topic: topic, Key: []byte("poison"), Value: []byte("{not json"), Headers: []kgo.RecordHeader{
		{Key: kafka.HeaderEventID, Value: []byte(domain.NewID())}, {Key: kafka.HeaderEventType, Value: []byte("UserCreated")}}}
	if err := cl.ProduceSync(ctx, poison).FirstErr(); err != nil {
		t.Fatal(err)
	}
	if err := cl.ProduceSync(ctx, recs...).FirstErr(); err != nil {
		t.Fatal(err)
	}

	second := startSubcommand(t, env, "consume")
	adm := kadm.NewClient(cl)
	deadline = time.Now().Add(90 * time.Second)
	for {
		ends, err1 := adm.ListEndOffsets(ctx, topic)
		committed, err2 := adm.FetchOffsets(ctx, group)
		done := err1 == nil && err2 == nil
		if done {
			ends.Each(func(e kadm.ListedOffset) {
				if c, ok := committed.Lookup(topic, e.Partition); !ok || c.At != e.Offset {
					done = false
				}
			})
		}
		if done {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the restarted consumer did not commit every offset within 90s\n%s", second.stderr.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	// The poison record came after the first process was killed: the second dead-lettered it.
	resp, err := http.Get("http://" + metricsAddr + "/metrics")
	if err != nil {
		t.Fatalf("scrape the consumer's metrics: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	want := fmt.Sprintf("outbox_consumer_dead_lettered_total{kind=%q,topic=%q} 1", "invalid", topic)
	if !strings.Contains(string(body), want) {
		t.Errorf("/metrics lacks %s:\n%s", want, body)
	}
	if err := second.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-second.done:
		if err != nil {
			t.Errorf("consume after SIGTERM: %v (want exit 0)\n%s", err, second.stderr.String())
		}
	case <-time.After(60 * time.Second):
		t.Fatal("consume did not exit within 60s of SIGTERM")
	}

	n, distinct := welcomes()
	if n != users || distinct != users {
		t.Errorf("%d welcome messages for %d distinct users, want %d for %d", n, distinct, users, users)
	}
	var dead int64
	if offs, err := adm.ListEndOffsets(ctx, dlt); err == nil {
		offs.Each(func(o kadm.ListedOffset) { dead += o.Offset })
	}
	if dead != 1 {
		t.Errorf("%d records dead-lettered, want 1 (the poison record)", dead)
	}
	t.Logf("killed after %d welcomes; %d records (each twice) consumed by two processes", killedAt, users)
}
