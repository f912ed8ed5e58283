// Package kafkatest gives tests a Kafka-protocol broker: the real cluster named by KAFKA_BROKERS
// when set, else an in-process kfake cluster, and helpers to read topics back.
package kafkatest

import (
	"context"
	"fmt"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
)

var seq atomic.Int64

// Broker is a broker for one test.
type Broker struct {
	// Addrs are the seed brokers.
	Addrs []string
	// Fake is the kfake cluster, or nil when testing against KAFKA_BROKERS. Tests that inject
	// errors with Fake.ControlKey skip themselves when it is nil.
	Fake *kfake.Cluster
}

// Real reports whether the tests run against a real cluster (KAFKA_BROKERS is set).
func Real() bool { return os.Getenv("KAFKA_BROKERS") != "" }

// Start returns a broker for t, closed when t ends. opts apply to kfake only.
func Start(t testing.TB, opts ...kfake.Opt) *Broker {
	t.Helper()
	if env := os.Getenv("KAFKA_BROKERS"); env != "" {
		return &Broker{Addrs: strings.Split(env, ",")}
	}
	c, err := kfake.NewCluster(append([]kfake.Opt{kfake.NumBrokers(1), kfake.DefaultNumPartitions(3)}, opts...)...)
	if err != nil {
		t.Fatalf("start kfake: %v", err)
	}
	t.Cleanup(c.Close)
	return &Broker{Addrs: c.ListenAddrs(), Fake: c}
}

// Topic creates a topic with a unique name and the given partitions, and returns its name.
func (b *Broker) Topic(t testing.TB, prefix string, partitions int32) string {
	t.Helper()
	name := Name(prefix)
	b.Create(t, name, partitions)
	return name
}

// AlterTopicConfig sets (value) or deletes (nil) the configuration key of topic.
func (b *Broker) AlterTopicConfig(topic, key string, value *string) error {
	cl, err := kgo.NewClient(kgo.SeedBrokers(b.Addrs...))
	if err != nil {
		return err
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	op := kadm.SetConfig
	if value == nil {
		op = kadm.DeleteConfig
	}
	resps, err := kadm.NewClient(cl).AlterTopicConfigs(ctx, []kadm.AlterConfig{{Op: op, Name: key, Value: value}}, topic)
	if err != nil {
		return fmt.Errorf("alter %s of topic %s: %w", key, topic, err)
	}
	r, err := resps.On(topic, nil)
	if err == nil {
		err = r.Err
	}
	if err != nil {
		return fmt.Errorf("alter %s of topic %s: %w", key, topic, err)
	}
	return nil
}

// Name returns a unique topic name, for a topic a test creates later, or never.
func Name(prefix string) string { return fmt.Sprintf("%s-%d-%d", prefix, os.Getpid(), seq.Add(1)) }

// Create creates the topic name with the given partitions.
func (b *Broker) Create(t testing.TB, name string, partitions int32) {
	t.Helper()
	b.CreateWith(t, name, partitions, nil)
}

// CreateWith creates the topic name with the given partitions and topic configuration (such as
// max.message.bytes).
func (b *Broker) CreateWith(t testing.TB, name string, partitions int32, configs map[string]*string) {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(b.Addrs...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	resp, err := kadm.NewClient(cl).CreateTopic(ctx, partitions, 1, configs, name)
	if err == nil {
		err = resp.Err
	}
	if err != nil {
		t.Fatalf("create topic %s: %v", name, err)
	}
}

// ReadAll reads topic from the start until want records arrived or no record came for idle.
// Records may still be on their way when it is called: give idle a generous bound (a minute),
// it is spent only when fewer than want arrive. To read what a topic holds now, use ReadToEnd.
func (b *Broker) ReadAll(t testing.TB, topic string, want int, idle time.Duration) []*kgo.Record {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(b.Addrs...), kgo.ConsumeTopics(topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	var out []*kgo.Record
	for len(out) < want {
		ctx, cancel := context.WithTimeout(context.Background(), idle)
		fetches := cl.PollFetches(ctx)
		cancel()
		n := 0
		fetches.EachRecord(func(r *kgo.Record) { out = append(out, r); n++ })
		if n == 0 && ctx.Err() != nil {
			break
		}
	}
	return out
}

// Header returns the value of header key of r, or "".
func Header(r *kgo.Record, key string) string {
	for _, h := range r.Headers {
		if h.Key == key {
			return string(h.Value)
		}
	}
	return ""
}

// ReadToEnd reads every record topic holds now: up to the end offsets it lists first, however
// long a loaded machine takes (up to timeout, which then fails t).
func (b *Broker) ReadToEnd(t testing.TB, topic string, timeout time.Duration) []*kgo.Record {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cl, err := kgo.NewClient(kgo.SeedBrokers(b.Addrs...), kgo.ConsumeTopics(topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ends, err := kadm.NewClient(cl).ListEndOffsets(ctx, topic)
	if err == nil {
		err = ends.Error()
	}
	if err != nil {
		t.Fatalf("list end offsets of %s: %v", topic, err)
	}
	want := map[int32]int64{}
	ends.Each(func(o kadm.ListedOffset) { want[o.Partition] = o.Offset })
	next := map[int32]int64{}
	behind := func() bool {
		for p, end := range want {
			if next[p] < end {
				return true
			}
		}
		return false
	}
	var out []*kgo.Record
	for behind() {
		fetches := cl.PollFetches(ctx)
		if ctx.Err() != nil {
			t.Fatalf("read %s: %d records after %s, positions %v, ends %v", topic, len(out), timeout, next, want)
		}
		fetches.EachRecord(func(r *kgo.Record) {
			if r.Offset < want[r.Partition] {
				out = append(out, r)
			}
			next[r.Partition] = r.Offset + 1
		})
	}
	return out
}
