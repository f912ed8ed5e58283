package kafka_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/adapters/kafka"
	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/internal/kafkatest"
)

// memPins is a kafka.PartitionPins in memory, written from the interface's doc; fail makes Pin
// fail.
type memPins struct {
	mu    sync.Mutex
	pins  map[string]int
	calls []string
	fail  error
}

func (m *memPins) Pin(_ context.Context, topic string, live int) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.calls = append(m.calls, fmt.Sprintf("%s/%d", topic, live))
	if m.fail != nil {
		return 0, m.fail
	}
	if _, ok := m.pins[topic]; !ok {
		m.pins[topic] = live
	}
	return m.pins[topic], nil
}

func (m *memPins) setFail(err error) {
	m.mu.Lock()
	m.fail = err
	m.mu.Unlock()
}

func (m *memPins) callCount() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.calls)
}

// liveObserver remembers the last live count reported per topic.
type liveObserver struct {
	mu   sync.Mutex
	live map[string]int
}

func (o *liveObserver) TopicPartitions(topic string, _, live int) {
	o.mu.Lock()
	o.live[topic] = live
	o.mu.Unlock()
}

func (o *liveObserver) get(topic string) int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.live[topic]
}

// publishRound publishes one message per key and waits for every acknowledgement.
func publishRound(t *testing.T, pub *kafka.Publisher, keys int, round int) {
	t.Helper()
	msgs := make([]*relay.Message, keys)
	for k := range msgs {
		msgs[k] = &relay.Message{EventID: fmt.Sprintf("e-%d-%d", round, k), AggregateType: "order", AggregateID: fmt.Sprintf("k%02d", k),
			EventType: "placed", Payload: []byte("{}"), OccurredAt: time.Now()}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := publishAll(ctx, pub, msgs); err != nil {
		t.Fatalf("round %d: %v", round, err)
	}
}

// TestPublisherKeepsKeysOnPinnedPartitions grows a topic from 3 to 6 partitions while a
// publisher writes to it, then starts a second publisher (a restart) on the same pins: every
// key's records stay on one partition, among the first 3. The pin is read once per publisher.
func TestPublisherKeepsKeysOnPinnedPartitions(t *testing.T) {
	t.Parallel()
	b := kafkatest.Start(t)
	topic := b.Topic(t, "pinned", 3)
	pins := &memPins{pins: map[string]int{}}
	obs := &liveObserver{live: map[string]int{}}
	cfg := kafka.Config{Brokers: b.Addrs, TopicTemplate: topic}
	fast := []kgo.Opt{kgo.MetadataMinAge(50 * time.Millisecond), kgo.MetadataMaxAge(200 * time.Millisecond)}
	pub, err := kafka.NewPublisherWith(cfg, kafka.PublisherDeps{Pins: pins, Observer: obs}, fast...)
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	const keys = 40
	round := 0
	publishRound(t, pub, keys, round)

	adm, err := kgo.NewClient(kgo.SeedBrokers(b.Addrs...))
	if err != nil {
		t.Fatal(err)
	}
	defer adm.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	resp, err := kadm.NewClient(adm).CreatePartitions(ctx, 3, topic)
	if err == nil {
		err = resp.Error()
	}
	if err != nil {
		t.Fatalf("add 3 partitions: %v", err)
	}
	// The producer's metadata refreshes: rounds go on until it has seen the 6 partitions.
	deadline := time.Now().Add(30 * time.Second)
	for obs.get(topic) != 6 {
		if time.Now().After(deadline) {
			t.Fatalf("the publisher never saw the 6 partitions (last live count %d)", obs.get(topic))
		}
		round++
		publishRound(t, pub, keys, round)
	}
	round++
	publishRound(t, pub, keys, round)
	pub.Close()

	// A restart: the new publisher reads 6 partitions from the brokers and 3 from the pins.
	pub2, err := kafka.NewPublisherWith(cfg, kafka.PublisherDeps{Pins: pins, Observer: obs}, fast...)
	if err != nil {
		t.Fatal(err)
	}
	defer pub2.Close()
	round++
	publishRound(t, pub2, keys, round)
	if got := pins.callCount(); got != 2 {
		t.Errorf("Pin called %d times (%v), want once per publisher", got, pins.calls)
	}
	if pins.calls[0] != topic+"/3" || pins.calls[1] != topic+"/6" {
		t.Errorf("Pin called with %v, want the live counts 3 then 6", pins.calls)
	}

	recs := b.ReadAll(t, topic, keys*(round+1), 10*time.Second)
	if len(recs) != keys*(round+1) {
		t.Fatalf("read %d records, want %d", len(recs), keys*(round+1))
	}
	parts := map[string]map[int32]int{}
	for _, r := range recs {
		if parts[string(r.Key)] == nil {
			parts[string(r.Key)] = map[int32]int{}
		}
		parts[string(r.Key)][r.Partition]++
	}
	for k, ps := range parts {
		if len(ps) != 1 {
			t.Errorf("key %s on %d partitions: %v", k, len(ps), ps)
		}
		for p := range ps {
			if p >= 3 {
				t.Errorf("key %s on partition %d, added after the pin", k, p)
			}
		}
	}
}

// TestPublisherPinFailure: while the pin cannot be read, the topic's records fail at once, as one
// group, before Publish returns and without reaching the broker, and the store is asked at most
// once a second; once it answers, records flow.
func TestPublisherPinFailure(t *testing.T) {
	t.Parallel()
	b := kafkatest.Start(t)
	topic := b.Topic(t, "pinfail", 3)
	pins := &memPins{pins: map[string]int{}}
	down := errors.New("database down")
	pins.setFail(down)
	pub, err := kafka.NewPublisherWith(kafka.Config{Brokers: b.Addrs, TopicTemplate: topic}, kafka.PublisherDeps{Pins: pins})
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	start := time.Now()
	for i := range 20 {
		var got error
		called := false
		m := &relay.Message{EventID: fmt.Sprint(i), AggregateType: "order", AggregateID: fmt.Sprintf("k%d", i),
			EventType: "placed", Payload: []byte("{}"), OccurredAt: time.Now()}
		if err := pub.Publish(context.Background(), m, func(err error) { got, called = err, true }); err != nil {
			t.Fatalf("Publish returned %v: a pin failure must not park the row", err)
		}
		if !called {
			t.Fatal("done not called before Publish returned")
		}
		var ge *relay.GroupError
		if !errors.As(got, &ge) || !errors.Is(got, down) || ge.Group != topic+"/partition-count" {
			t.Fatalf("done(%v), want a GroupError of group %s/partition-count wrapping %v", got, topic, down)
		}
	}
	if n, limit := pins.callCount(), 1+int(time.Since(start)/time.Second); n > limit {
		t.Errorf("Pin called %d times for 20 records in %s", n, time.Since(start))
	}
	pins.setFail(nil)
	deadline := time.Now().Add(30 * time.Second)
	for {
		errc := make(chan error, 1)
		m := &relay.Message{EventID: "ok", AggregateType: "order", AggregateID: "k", EventType: "placed",
			Payload: []byte("{}"), OccurredAt: time.Now()}
		if err := pub.Publish(context.Background(), m, func(err error) { errc <- err }); err != nil {
			t.Fatal(err)
		}
		if err := <-errc; err == nil {
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("still failing 30s after the store came back: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if recs := b.ReadToEnd(t, topic, time.Minute); len(recs) != 1 { // every record the topic holds, however slow the machine
		t.Errorf("%d records on the topic, want only the one published after the store came back", len(recs))
	}
}
