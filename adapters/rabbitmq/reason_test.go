package rabbitmq_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/outbox-relay/outbox-relay/adapters/prometheus"
	"github.com/outbox-relay/outbox-relay/adapters/rabbitmq"
	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/domain"
)

// boundedQueue declares exchange and a queue bound to it with "#" that holds at most one message
// and refuses more with a nack (x-overflow=reject-publish); nothing consumes it.
func boundedQueue(t *testing.T, exchange string) {
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
	q, err := ch.QueueDeclare(exchange+"-bounded", false, false, false, false,
		amqp.Table{"x-max-length": int32(1), "x-overflow": "reject-publish"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_, _ = ch.QueueDelete(q.Name, false, false, false)
		_ = ch.ExchangeDelete(exchange, false, false)
	})
	if err := ch.QueueBind(q.Name, "#", exchange, false, nil); err != nil {
		t.Fatal(err)
	}
}

func reasonMessage(id int64) *relay.Message {
	return &relay.Message{ID: id, EventID: domain.NewID(), AggregateType: "user", AggregateID: "u",
		EventType: "UserCreated", Payload: []byte(`{}`), OccurredAt: time.Now()}
}

// publishAll publishes n messages and returns the channel their done errors arrive on.
func publishAll(t *testing.T, pub *rabbitmq.Publisher, n int) chan error {
	t.Helper()
	results := make(chan error, n)
	for i := range n {
		if err := pub.Publish(t.Context(), reasonMessage(int64(i+1)), func(err error) { results <- err }); err != nil {
			t.Fatal(err)
		}
	}
	return results
}

// settled waits for one done error.
func settled(t *testing.T, results chan error) error {
	t.Helper()
	select {
	case err := <-results:
		return err
	case <-time.After(60 * time.Second):
		t.Fatal("no message settled within 60s")
		return nil
	}
}

// TestPublisherFailureReasons provokes, on the real broker, each way a RabbitMQ publish fails and
// checks the label the relay's metrics count it under: unroutable (returned by the broker),
// nacked (a full reject-publish queue), aborted, publisher_closed, invalid_message. A cut
// connection fails nothing: its unconfirmed message is published again and confirmed.
func TestPublisherFailureReasons(t *testing.T) {
	t.Parallel()
	metrics := prometheus.New("test", "test")
	check := func(t *testing.T, err error, sentinel error, reason string) {
		t.Helper()
		if !errors.Is(err, sentinel) {
			t.Fatalf("message settled with %v, want %v", err, sentinel)
		}
		if got := prometheus.Reason(err); got != reason {
			t.Errorf("Reason(%q) = %q, want %q", err, got, reason)
		}
		before := publishErrors(t, metrics, reason)
		metrics.Failed(nil, err)
		if after := publishErrors(t, metrics, reason); after != before+1 {
			t.Errorf("outbox_relay_publish_errors_total{reason=%q} went from %v to %v, want +1", reason, before, after)
		}
	}
	newPub := func(t *testing.T, exchange, url string) *rabbitmq.Publisher {
		t.Helper()
		pub, err := rabbitmq.NewPublisher(rabbitmq.Config{URL: url, Exchange: exchange, Heartbeat: 10 * time.Minute}, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(pub.Close)
		if err := pub.Ping(t.Context()); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(60 * time.Second)
		for !pub.Connected() && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
		return pub
	}

	t.Run("unroutable", func(t *testing.T) {
		exchange := "outbox-reason-unrouted-" + domain.NewID()[:8]
		newQueueReader(t, exchange, "nothing.matches")
		pub := newPub(t, exchange, brokerURL())
		err := settled(t, publishAll(t, pub, 1))
		check(t, err, rabbitmq.ErrUnroutable, "unroutable")
		if !strings.Contains(err.Error(), "NO_ROUTE") {
			t.Errorf("error %q does not carry the broker's reply", err)
		}
	})
	t.Run("nacked", func(t *testing.T) {
		exchange := "outbox-reason-nack-" + domain.NewID()[:8]
		boundedQueue(t, exchange)
		pub := newPub(t, exchange, brokerURL())
		results := publishAll(t, pub, 2)
		first, second := settled(t, results), settled(t, results)
		if first != nil {
			t.Fatalf("the first message, which fits the queue, settled with %v", first)
		}
		check(t, second, rabbitmq.ErrNacked, "nacked")
	})
	t.Run("aborted", func(t *testing.T) {
		exchange := "outbox-reason-abort-" + domain.NewID()[:8]
		newQueueReader(t, exchange, "#")
		px := startProxy(t, brokerHost(t))
		pub := newPub(t, exchange, viaProxy(t, px.addr()))
		px.pause() // the confirm never comes
		results := publishAll(t, pub, 1)
		if err := pub.Abort(t.Context()); err != nil {
			t.Fatal(err)
		}
		check(t, settled(t, results), rabbitmq.ErrAborted, "aborted")
	})
	t.Run("publisher closed", func(t *testing.T) {
		exchange := "outbox-reason-close-" + domain.NewID()[:8]
		newQueueReader(t, exchange, "#")
		px := startProxy(t, brokerHost(t))
		pub := newPub(t, exchange, viaProxy(t, px.addr()))
		px.pause()
		results := publishAll(t, pub, 1)
		pub.Close()
		check(t, settled(t, results), rabbitmq.ErrClosed, "publisher_closed")
	})
	t.Run("invalid message", func(t *testing.T) {
		exchange := "outbox-reason-invalid-" + domain.NewID()[:8]
		pub, err := rabbitmq.NewPublisher(rabbitmq.Config{URL: brokerURL(), Exchange: exchange}, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(pub.Close)
		m := reasonMessage(1)
		m.Payload = nil
		err = pub.Publish(t.Context(), m, func(error) { t.Error("done called for a refused message") })
		check(t, err, relay.ErrInvalidMessage, "invalid_message")
	})
	t.Run("connection cut fails nothing", func(t *testing.T) {
		exchange := "outbox-reason-cut-" + domain.NewID()[:8]
		reader := newQueueReader(t, exchange, "#")
		px := startProxy(t, brokerHost(t))
		pub := newPub(t, exchange, viaProxy(t, px.addr()))
		px.pause()
		results := publishAll(t, pub, 1)
		deadline := time.Now().Add(60 * time.Second)
		for px.cutCount() == 0 && time.Now().Before(deadline) {
			px.cut()
			time.Sleep(20 * time.Millisecond)
		}
		px.resume()
		if err := settled(t, results); err != nil {
			t.Errorf("a message unconfirmed when the connection was cut settled with %v (reason %s), want published again",
				err, prometheus.Reason(err))
		}
		for len(reader.deliveries()) == 0 && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
		if len(reader.deliveries()) == 0 {
			t.Error("the message never reached the queue")
		}
	})
}

// publishErrors reads outbox_relay_publish_errors_total{reason} from m's registry; 0 when absent.
func publishErrors(t *testing.T, m *prometheus.Metrics, reason string) float64 {
	t.Helper()
	families, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() != "outbox_relay_publish_errors_total" {
			continue
		}
		for _, c := range f.GetMetric() {
			for _, l := range c.GetLabel() {
				if l.GetName() == "reason" && l.GetValue() == reason {
					return c.GetCounter().GetValue()
				}
			}
		}
	}
	return 0
}
