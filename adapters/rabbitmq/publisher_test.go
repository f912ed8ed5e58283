package rabbitmq_test

import (
	"errors"
	"fmt"
	"net/url"
	"os"
	"sync"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/outbox-relay/outbox-relay/adapters/rabbitmq"
	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/app/relay/sinktest"
	"github.com/outbox-relay/outbox-relay/domain"
)

// brokerURL is the RabbitMQ the tests use: OUTBOX_TEST_RABBITMQ_URL, else the local server.
func brokerURL() string {
	if u := os.Getenv("OUTBOX_TEST_RABBITMQ_URL"); u != "" {
		return u
	}
	return "amqp://guest:guest@127.0.0.1:5672/"
}

// viaProxy returns the broker URL with its host replaced by addr.
func viaProxy(t *testing.T, addr string) string {
	t.Helper()
	u, err := url.Parse(brokerURL())
	if err != nil {
		t.Fatal(err)
	}
	u.Host = addr
	return u.String()
}

func brokerHost(t *testing.T) string {
	t.Helper()
	u, err := url.Parse(brokerURL())
	if err != nil {
		t.Fatal(err)
	}
	if u.Port() == "" {
		return u.Hostname() + ":5672"
	}
	return u.Host
}

// queueReader declares exchange (durable topic, as the publisher does) and a queue bound to it
// with binding, and collects what arrives on the queue.
type queueReader struct {
	mu   sync.Mutex
	got  []amqp.Delivery
	conn *amqp.Connection
}

func newQueueReader(t *testing.T, exchange, binding string) *queueReader {
	t.Helper()
	conn, err := amqp.Dial(brokerURL())
	if err != nil {
		t.Fatalf("RabbitMQ unreachable at %s (start it, or set OUTBOX_TEST_RABBITMQ_URL): %v", brokerHost(t), err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	ch, err := conn.Channel()
	if err != nil {
		t.Fatal(err)
	}
	if err := ch.ExchangeDeclare(exchange, "topic", true, false, false, false, nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if c, err := amqp.Dial(brokerURL()); err == nil {
			if ch, err := c.Channel(); err == nil {
				_ = ch.ExchangeDelete(exchange, false, false)
			}
			_ = c.Close()
		}
	})
	q, err := ch.QueueDeclare("", false, false, true, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := ch.QueueBind(q.Name, binding, exchange, false, nil); err != nil {
		t.Fatal(err)
	}
	deliveries, err := ch.Consume(q.Name, "", true, true, false, false, nil)
	if err != nil {
		t.Fatal(err)
	}
	r := &queueReader{conn: conn}
	go func() {
		for d := range deliveries {
			r.mu.Lock()
			r.got = append(r.got, d)
			r.mu.Unlock()
		}
	}()
	return r
}

func (r *queueReader) deliveries() []amqp.Delivery {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]amqp.Delivery(nil), r.got...)
}

func headerString(d amqp.Delivery, k string) string {
	if v, ok := d.Headers[k]; ok {
		return fmt.Sprint(v)
	}
	return ""
}

// TestPublisherConformance runs the relay.Sink conformance suite against the RabbitMQ publisher
// and the local RabbitMQ, through a proxy that can hold back the broker's confirms.
func TestPublisherConformance(t *testing.T) {
	t.Parallel()
	sinktest.Run(t, func(t *testing.T) *sinktest.Env {
		exchange := "outbox-conformance-" + domain.NewID()[:8]
		reader := newQueueReader(t, exchange, "order.#")
		px := startProxy(t, brokerHost(t))
		pub, err := rabbitmq.NewPublisher(rabbitmq.Config{URL: viaProxy(t, px.addr()), Exchange: exchange,
			RoutingKeyTemplate: "{aggregate_type}.{aggregate_id}"}, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(pub.Close)
		return &sinktest.Env{
			Sink: pub,
			Delivered: func(*testing.T) []sinktest.Delivered {
				var out []sinktest.Delivered
				for _, d := range reader.deliveries() {
					h := map[string]string{}
					for k := range d.Headers {
						h[k] = headerString(d, k)
					}
					out = append(out, sinktest.Delivered{Key: h[rabbitmq.HeaderAggregateID], Headers: h, Payload: d.Body})
				}
				return out
			},
			Pause:  func(*testing.T) { px.pause() },
			Resume: func(*testing.T) { px.resume() },
			// No queue is bound for this routing key: the broker returns the message.
			Reject: func(m *relay.Message) { m.AggregateType = "unrouted" },
		}
	})
}

// TestPublisherMessageProperties checks what AMQP consumers see besides the headers: persistent
// delivery, message_id = event id, type = event type, content type from the row's headers.
func TestPublisherMessageProperties(t *testing.T) {
	t.Parallel()
	exchange := "outbox-props-" + domain.NewID()[:8]
	reader := newQueueReader(t, exchange, "#")
	pub, err := rabbitmq.NewPublisher(rabbitmq.Config{URL: brokerURL(), Exchange: exchange}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	m := &relay.Message{ID: 1, EventID: domain.NewID(), AggregateType: "user", AggregateID: "u1", EventType: "UserCreated",
		Payload: []byte(`{}`), Headers: []byte(`{"content-type":"application/json"}`), OccurredAt: time.Now()}
	done := make(chan error, 1)
	if err := pub.Publish(t.Context(), m, func(err error) { done <- err }); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("no confirm within 60s")
	}
	deadline := time.Now().Add(60 * time.Second)
	for len(reader.deliveries()) == 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	ds := reader.deliveries()
	if len(ds) != 1 {
		t.Fatalf("%d deliveries, want 1", len(ds))
	}
	d := ds[0]
	if d.DeliveryMode != amqp.Persistent || d.MessageId != m.EventID || d.Type != "UserCreated" ||
		d.ContentType != "application/json" || d.RoutingKey != "user.UserCreated" {
		t.Errorf("delivery mode %d, message id %q, type %q, content type %q, routing key %q; want persistent, %s, UserCreated, application/json, user.UserCreated",
			d.DeliveryMode, d.MessageId, d.Type, d.ContentType, d.RoutingKey, m.EventID)
	}
}

// TestPublisherCloseWhileBrokerSilent closes a publisher whose broker stopped answering (its
// confirms held back by the proxy): Close returns, and the unconfirmed messages fail with
// ErrClosed instead of being reported published.
func TestPublisherCloseWhileBrokerSilent(t *testing.T) {
	t.Parallel()
	exchange := "outbox-close-" + domain.NewID()[:8]
	newQueueReader(t, exchange, "#")
	px := startProxy(t, brokerHost(t))
	// A long heartbeat: only Close itself may end the silent connection.
	pub, err := rabbitmq.NewPublisher(rabbitmq.Config{URL: viaProxy(t, px.addr()), Exchange: exchange,
		Heartbeat: 10 * time.Minute}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := pub.Ping(t.Context()); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(60 * time.Second)
	for !pub.Connected() && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	px.pause()
	results := make(chan error, 5)
	for i := range 5 {
		m := &relay.Message{ID: int64(i + 1), EventID: domain.NewID(), AggregateType: "user", AggregateID: "u",
			EventType: "UserCreated", Payload: []byte(`{}`), OccurredAt: time.Now()}
		if err := pub.Publish(t.Context(), m, func(err error) { results <- err }); err != nil {
			t.Fatal(err)
		}
	}
	closed := make(chan struct{})
	go func() { pub.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(30 * time.Second):
		px.resume()
		t.Fatal("Close did not return within 30s while the broker was silent")
	}
	for range 5 {
		if err := <-results; !errors.Is(err, rabbitmq.ErrClosed) {
			t.Errorf("message settled with %v, want ErrClosed", err)
		}
	}
}
