package kafka

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"strings"
	"testing"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/internal/kafkatest"
)

// defaultPartition is the partition franz-go's default partitioner gives a keyed record among n:
// where every key went before the relay pinned counts.
func defaultPartition(t *testing.T, key []byte, n int) int {
	t.Helper()
	p, ok := kgo.UniformBytesPartitioner(64<<10, true, true, nil).ForTopic("t").(kgo.TopicBackupPartitioner)
	if !ok {
		t.Fatal("franz-go's default partitioner no longer partitions by backup")
	}
	return p.PartitionByBackup(&kgo.Record{Key: key}, n, nil)
}

// TestPinnedPartition: the partitioner hashes keys as franz-go's default (Kafka's murmur2) does,
// over the pinned count whatever the live count; without a pin it keeps the first count it saw.
func TestPinnedPartition(t *testing.T) {
	t.Parallel()
	keys := make([][]byte, 500)
	for i := range keys {
		keys[i] = fmt.Appendf(nil, "order-%d", i)
	}
	moved := 0
	for _, k := range keys {
		if defaultPartition(t, k, 3) != defaultPartition(t, k, 6) {
			moved++
		}
	}
	if moved == 0 {
		t.Fatal("no key changes partition from 3 to 6 partitions: the cases below prove nothing")
	}
	for _, tc := range []struct {
		name   string
		pinned int32 // the pin known before the first record; 0 for none
		lives  []int // the live counts the producer passes, in order
		want   int   // the count keys must be hashed with
	}{
		{"pinned 3, live 3", 3, []int{3}, 3},
		{"pinned 3, topic grown to 6", 3, []int{3, 6}, 3},
		{"pinned 3, first seen grown to 12", 3, []int{12}, 3},
		{"no pin: the first count seen, 3, stays", 0, []int{3, 6, 12}, 3},
		{"no pin: the first count seen, 6", 0, []int{6}, 6},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ts := &topicState{topic: "t"}
			ts.pinned.Store(tc.pinned)
			hash := kgo.StickyKeyPartitioner(nil).ForTopic("t")
			for _, n := range tc.lives {
				for _, k := range keys {
					got := pinnedPartition(ts, hash, &kgo.Record{Key: k}, n)
					if want := defaultPartition(t, k, tc.want); got != want {
						t.Fatalf("key %s among %d partitions: partition %d, want %d (hashed over %d)", k, n, got, want, tc.want)
					}
				}
				if got := ts.live.Load(); int(got) != n {
					t.Errorf("live count %d after records among %d partitions", got, n)
				}
			}
			if got := ts.pinned.Load(); int(got) != tc.want {
				t.Errorf("pinned count %d, want %d", got, tc.want)
			}
		})
	}
	t.Run("pin above the live count stays within it", func(t *testing.T) {
		ts := &topicState{topic: "t"}
		ts.pinned.Store(6)
		hash := kgo.StickyKeyPartitioner(nil).ForTopic("t")
		for _, k := range keys {
			if got, want := pinnedPartition(ts, hash, &kgo.Record{Key: k}, 3), defaultPartition(t, k, 3); got != want {
				t.Fatalf("key %s: partition %d of 3, want %d", k, got, want)
			}
		}
	})
}

// observed records what a PartitionObserver is told.
type observed struct{ calls []string }

func (o *observed) TopicPartitions(topic string, pinned, live int) {
	o.calls = append(o.calls, fmt.Sprintf("%s %d/%d", topic, pinned, live))
}

// TestReportPartitionChanges: one observer call per new (pinned, live) pair, one warning per
// change while the counts differ, naming the topic, both counts and what to do.
func TestReportPartitionChanges(t *testing.T) {
	t.Parallel()
	var logs bytes.Buffer
	obs := &observed{}
	p := &Publisher{deps: PublisherDeps{Pins: nopPins{}, Observer: obs}, log: slog.New(slog.NewTextHandler(&logs, nil))}
	ts := &topicState{topic: "orders"}
	p.report(ts) // nothing known yet
	ts.pinned.Store(3)
	ts.live.Store(3)
	p.report(ts)
	p.report(ts)
	if logs.Len() != 0 {
		t.Errorf("logged with equal counts:\n%s", logs.String())
	}
	ts.live.Store(6)
	for range 3 {
		p.report(ts)
	}
	warns := strings.Count(logs.String(), "level=WARN")
	if warns != 1 {
		t.Errorf("%d warnings for one change, want 1:\n%s", warns, logs.String())
	}
	for _, want := range []string{"topic=orders", "pinned=3", "live=6", "outbox-relay partitions repin orders"} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("warning lacks %q:\n%s", want, logs.String())
		}
	}
	ts.pinned.Store(6) // repinned and restarted
	p.report(ts)
	if !strings.Contains(logs.String(), "matches its pin again") {
		t.Errorf("no line when the counts agree again:\n%s", logs.String())
	}
	if got, want := strings.Join(obs.calls, ", "), "orders 3/3, orders 3/6, orders 6/6"; got != want {
		t.Errorf("observer told %q, want %q", got, want)
	}
}

// nopPins is a PartitionPins that pins whatever it is given.
type nopPins struct{}

func (nopPins) Pin(_ context.Context, _ string, live int) (int, error) { return live, nil }

// TestReadLimitSaysWhenBatchesOutgrowIt: when the producer sized a topic's batches before the
// topic's lower max.message.bytes was read (the topic was created after the relay's first record
// to it, or its limit lowered since), the publisher says that its batches may exceed the limit
// until a restart; read before, the batches take the limit and nothing is said.
func TestReadLimitSaysWhenBatchesOutgrowIt(t *testing.T) {
	t.Parallel()
	for _, askedFirst := range []bool{true, false} {
		t.Run(fmt.Sprintf("producer asked first=%v", askedFirst), func(t *testing.T) {
			t.Parallel()
			b := kafkatest.Start(t)
			topic, limit := kafkatest.Name("outgrown"), "4096"
			b.CreateWith(t, topic, 1, map[string]*string{"max.message.bytes": &limit})
			var logs bytes.Buffer
			p, err := NewPublisher(Config{Brokers: b.Addrs, TopicTemplate: topic, Log: slog.New(slog.NewTextHandler(&logs, nil))})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(p.Close)
			capFor := p.parts.batchMaxBytes(p.cfg.MaxRecordBytes)
			ts := p.parts.get(topic)
			if askedFirst {
				capFor(topic) // as franz-go asks when it first sees a partition
			}
			p.readLimit(context.Background(), ts)
			if !askedFirst {
				if got := capFor(topic); got != 4096 {
					t.Errorf("batch cap %d after the limit was read, want the topic's 4096", got)
				}
			}
			said := strings.Contains(logs.String(), "may exceed its max.message.bytes until the relay restarts")
			if said != askedFirst {
				t.Errorf("warned that batches may exceed the limit: %v, want %v:\n%s", said, askedFirst, logs.String())
			}
		})
	}
}
