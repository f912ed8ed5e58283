package main_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/domain"
	"github.com/outbox-relay/outbox-relay/internal/dbtest"
)

func rabbitURL() string {
	if u := os.Getenv("OUTBOX_TEST_RABBITMQ_URL"); u != "" {
		return u
	}
	return "amqp://guest:guest@127.0.0.1:5672/"
}

// TestRunWithRabbitMQSink runs 'outbox-relay run' with sink rabbitmq: rows reach a queue bound
// to the configured exchange, in order per key, the outbox empties, and SIGTERM exits 0.
func TestRunWithRabbitMQSink(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	ctx := context.Background()
	exchange := "outbox-run-" + domain.NewID()[:8]

	conn, err := amqp.Dial(rabbitURL())
	if err != nil {
		t.Fatalf("RabbitMQ unreachable (start it, or set OUTBOX_TEST_RABBITMQ_URL): %v", err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	if err := ch.ExchangeDeclare(exchange, "topic", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ch.ExchangeDelete(exchange, false, false) }()
	q, err := ch.QueueDeclare("", false, false, true, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := ch.QueueBind(q.Name, "account.*", exchange, false, nil); err != nil {
		t.Fatal(err)
	}
	deliveries, err := ch.Consume(q.Name, "", true, true, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var got []amqp.Delivery
	go func() {
		for d := range deliveries {
			mu.Lock()
			got = append(got, d)
			mu.Unlock()
		}
	}()

	w, err := postgres.NewWriter(table)
	if err != nil {
		t.Fatal(err)
	}
	const keys, per = 5, 20
	for seq := range per {
		var msgs []postgres.Message
		for k := range keys {
			payload, _ := json.Marshal(map[string]any{"key": fmt.Sprintf("a%d", k), "seq": seq})
			msgs = append(msgs, postgres.Message{AggregateType: "account", AggregateID: fmt.Sprintf("a%d", k),
				EventType: "AccountCredited", Payload: payload})
		}
		if err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error { return w.Append(ctx, tx, msgs...) }); err != nil {
			t.Fatal(err)
		}
	}

	p := startSubcommand(t, []string{
		"OUTBOX_DATABASE_URL=" + dbtest.URL(),
		"OUTBOX_DATABASE_SCHEMA=" + table.Schema,
		"OUTBOX_SINK=rabbitmq",
		"OUTBOX_RABBITMQ_URL=" + rabbitURL(),
		"OUTBOX_RABBITMQ_EXCHANGE=" + exchange,
		"OUTBOX_HTTP_ADDR=",
		"OUTBOX_LOG_FORMAT=text",
	}, "run")
	deadline := time.Now().Add(60 * time.Second)
	for {
		var pending int
		if err := pool.QueryRow(ctx, `SELECT count(*) FROM `+table.Schema+`.outbox`).Scan(&pending); err != nil {
			t.Fatal(err)
		}
		mu.Lock()
		n := len(got)
		mu.Unlock()
		if pending == 0 && n >= keys*per {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 60s: %d rows pending, %d messages delivered\n%s", pending, n, p.stderr.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-p.done:
		if err != nil {
			t.Errorf("run after SIGTERM: %v (want exit 0)\n%s", err, p.stderr.String())
		}
	case <-time.After(60 * time.Second):
		t.Fatal("run did not exit within 60s of SIGTERM")
	}

	mu.Lock()
	defer mu.Unlock()
	last := map[string]int{}
	for _, d := range got {
		var pl struct {
			Key string
			Seq int
		}
		if err := json.Unmarshal(d.Body, &pl); err != nil {
			t.Fatal(err)
		}
		if prev, ok := last[pl.Key]; ok && pl.Seq <= prev {
			continue // a repeat
		} else if (ok && pl.Seq != prev+1) || (!ok && pl.Seq != 0) {
			t.Errorf("key %s: seq %d after %d", pl.Key, pl.Seq, prev)
		}
		last[pl.Key] = pl.Seq
		if d.RoutingKey != "account.AccountCredited" || d.DeliveryMode != amqp.Persistent || d.MessageId == "" {
			t.Errorf("routing key %q, delivery mode %d, message id %q", d.RoutingKey, d.DeliveryMode, d.MessageId)
		}
	}
	for k := range keys {
		if last[fmt.Sprintf("a%d", k)] != per-1 {
			t.Errorf("key a%d: last seq %d, want %d", k, last[fmt.Sprintf("a%d", k)], per-1)
		}
	}
}

// TestRunRabbitMQUnreachableExitsWithoutSecret: a broker that cannot be reached stops 'run' at
// start with a message naming the broker, never its password.
func TestRunRabbitMQUnreachableExitsWithoutSecret(t *testing.T) {
	t.Parallel()
	_, table := dbtest.Schema(t)
	_, stderr, code := runBin(t, 60*time.Second, []string{
		"OUTBOX_DATABASE_URL=" + dbtest.URL(),
		"OUTBOX_DATABASE_SCHEMA=" + table.Schema,
		"OUTBOX_SINK=rabbitmq",
		"OUTBOX_RABBITMQ_URL=amqp://guest:hunter2-secret@127.0.0.1:1/",
		"OUTBOX_RELAY_STARTUP_TIMEOUT=3s",
		"OUTBOX_HTTP_ADDR=",
	}, "run")
	if code == 0 {
		t.Fatalf("run exited 0 with an unreachable broker\n%s", stderr)
	}
	if !strings.Contains(stderr, "rabbitmq 127.0.0.1:1") {
		t.Errorf("error does not name the broker:\n%s", stderr)
	}
	if strings.Contains(stderr, "hunter2-secret") {
		t.Errorf("the password leaked:\n%s", stderr)
	}
}
