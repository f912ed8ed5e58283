package kafka

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
)

// A record's partition is hash(key) mod the topic's partition count. When partitions are added
// to a topic, the count changes and so does the partition of most keys: a consumer group would
// then read a key's new events from one partition while its older ones still wait in another,
// and could process them first. The publisher therefore hashes each topic's keys with the count
// pinned for the topic (PartitionPins), not with the live one, until an operator repins it.
//
// The partitioner runs under franz-go's locks: it does no I/O, and reads the pin from memory.
// Publish resolves a topic's pin before the topic's first record is produced (one metadata
// request and one PartitionPins call per topic and process), and reports changes of the live
// count seen by the partitioner.

// PartitionPins stores the partition count each topic's keys are hashed with, beyond the life of
// one process. It may be called concurrently.
type PartitionPins interface {
	// Pin returns the count pinned for topic; a topic without one is pinned to live first.
	Pin(ctx context.Context, topic string, live int) (int, error)
}

// PartitionObserver is told the partition counts of the topics the publisher writes, for
// metrics. It must not block.
type PartitionObserver interface {
	// TopicPartitions reports the count topic's keys are hashed with (pinned) and the count
	// the brokers have (live), once when known and again whenever either changes.
	TopicPartitions(topic string, pinned, live int)
}

// PublisherDeps are the optional collaborators of a Publisher.
type PublisherDeps struct {
	// Pins keeps each topic's partition count across restarts and replicas. When nil, each
	// topic's keys are hashed with the count this process saw first, until it exits.
	Pins PartitionPins
	// Observer is told each topic's pinned and live partition counts. Default none.
	Observer PartitionObserver
	// Log receives one warning per topic and change of its partition count. Default
	// slog.Default().
	Log *slog.Logger
	// Tx is told how the Kafka transactions of exactly-once delivery end (TxPublisher). Default
	// none.
	Tx TxObserver
}

const (
	// pinTimeout bounds the resolution of one topic's pin (a metadata request and a pin).
	pinTimeout = 10 * time.Second
	// pinRetryDelay is how long records of a topic whose pin could not be resolved fail
	// without trying again, so that a batch of them costs one attempt, not one each.
	pinRetryDelay = time.Second
)

// topicState is what the publisher knows of one topic's partitions. The partitioner reads and
// writes it without locks.
type topicState struct {
	topic string
	// pinned is the count keys are hashed with; 0 until known (the partitioner then takes the
	// first live count it sees).
	pinned atomic.Int32
	// live is the count the producer's metadata has, as the partitioner last saw it, or as the
	// pin's resolution read it; 0 until known.
	live atomic.Int32
	// resolved is set once pinned comes from the pin store (or no store is configured).
	resolved atomic.Bool
	// reported is the (pinned, live) pair last reported, pinned<<32 | live.
	reported atomic.Int64

	mu      sync.Mutex // serializes resolutions
	retryAt time.Time  // under mu: no new resolution before
	err     error      // under mu: why the last resolution failed

	// maxBytes is the topic's max.message.bytes when it is below kafka.max_record_bytes: the
	// largest batch, and so record, the brokers take for it (readLimit); 0 when not lower or
	// not known. limitRead is set once it was read, or could not be and the log said so.
	maxBytes  atomic.Int32
	limitRead atomic.Bool
	// batchCap is the smallest cap on the topic's batches the producer was given
	// (batchMaxBytes), which franz-go keeps for the life of the process: a record larger cannot
	// be sent by this process even once the topic takes it. 0 until the producer asked.
	batchCap    atomic.Int32
	limitNext   time.Time // under mu: no new read before (limitRecheck after a read, longer after a failure)
	limitWarned bool      // under mu: the log said the limit could not be read
}

// limitRecheck is how long a topic's max.message.bytes is trusted before a record it refuses, or
// the broker's MESSAGE_TOO_LARGE, makes the publisher read it again: an operator who raised the
// limit and retried the parked rows must not see them parked again, and one who lowered it must
// not see its batches refused until the next restart.
const limitRecheck = time.Second

// limitRetryDelay is how long a topic whose max.message.bytes could not be read, for a reason
// other than a refusal, is published to without trying again.
const limitRetryDelay = 30 * time.Second

// batchMaxBytes returns the producer's cap on a topic's record batches (kgo.ProducerBatchMaxBytesFn):
// the topic's max.message.bytes when readLimit found it below kafka.max_record_bytes (def), else
// def. A batch above the topic's limit is refused whole (MESSAGE_TOO_LARGE) while the batches
// behind it succeed: its keys would be reordered. franz-go asks once per partition, when the
// producer first sees it: after the topic's first record went through Publish, and readLimit.
func (ps *partitions) batchMaxBytes(def int) func(topic string) int32 {
	return func(topic string) int32 {
		if topic == "" { // the client checks the option as it is made
			return int32(def)
		}
		ts := ps.get(topic)
		n := int32(def)
		if m := ts.maxBytes.Load(); m > 0 {
			n = max(m, 512) // franz-go's least; a record larger than m is refused before (checkTopicSize)
		}
		for {
			c := ts.batchCap.Load()
			if (c > 0 && c <= n) || ts.batchCap.CompareAndSwap(c, n) {
				return n
			}
		}
	}
}

// readLimit reads the max.message.bytes of ts's topic once, before its first record is produced,
// when the topic exists: a record larger is then refused (ErrInvalidMessage, parked with the
// limit named) before it is handed to the producer, and the producer's batches for the topic
// stay below it. Refused by the broker instead, the record would fail with its batch a moment
// after its key's later rows were handed over, and those could go out first. When the limit
// cannot be read (no DescribeConfigs permission, say), the log says so once and records up to
// kafka.max_record_bytes are sent.
func (p *Publisher) readLimit(ctx context.Context, ts *topicState) {
	if ts.limitRead.Load() {
		return
	}
	ts.mu.Lock()
	defer ts.mu.Unlock()
	if ts.limitRead.Load() || time.Now().Before(ts.limitNext) {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, pinTimeout)
	defer cancel()
	ts.limitNext = time.Now().Add(limitRecheck)
	limit, err := p.topicMaxMessageBytes(ctx, ts.topic)
	switch {
	case errors.Is(err, kerr.UnknownTopicOrPartition):
		ts.limitNext = time.Now().Add(pinRetryDelay) // read again once it exists
		return
	case err != nil:
		if !ts.limitWarned {
			ts.limitWarned = true
			p.log.Warn("could not read the topic's max.message.bytes: records up to kafka.max_record_bytes are sent, and one the brokers refuse as too large is retried and parked",
				"topic", ts.topic, "kafka.max_record_bytes", p.cfg.MaxRecordBytes, "err", err)
		}
		if !errors.Is(err, kerr.TopicAuthorizationFailed) && !errors.Is(err, kerr.ClusterAuthorizationFailed) {
			ts.limitNext = time.Now().Add(limitRetryDelay) // a broker away: read it again later
			return
		}
	case limit < p.cfg.MaxRecordBytes:
		if old := ts.maxBytes.Swap(int32(limit)); int(old) != limit {
			p.log.Info("topic takes smaller records than kafka.max_record_bytes: larger rows are parked",
				"topic", ts.topic, "max.message.bytes", limit, "kafka.max_record_bytes", p.cfg.MaxRecordBytes)
		}
		if c := int(ts.batchCap.Load()); c > limit {
			// The producer sized the topic's batches before the limit was known (the topic was
			// created after the relay's first record to it), or before it was lowered.
			p.log.Warn("the producer's batches for this topic may exceed its max.message.bytes until the relay restarts: a refused batch can reorder its keys",
				"topic", ts.topic, "max.message.bytes", limit, "batch_cap", c)
		}
	default:
		if ts.maxBytes.Swap(0) != 0 {
			p.log.Info("topic takes records up to kafka.max_record_bytes again", "topic", ts.topic,
				"max.message.bytes", limit, "kafka.max_record_bytes", p.cfg.MaxRecordBytes)
		}
	}
	ts.limitRead.Store(true)
}

// limitStale makes the next record of ts's topic read its max.message.bytes again (readLimit), at
// most once per limitRecheck: the limit read may be out of date.
func (ts *topicState) limitStale() { ts.limitRead.Store(false) }

// fitsTopic returns an error wrapping relay.ErrInvalidMessage when rec is larger than the
// max.message.bytes of its topic, ts's, as last read, or than the producer takes for it
// (checkTopicSize). Before refusing it, it reads the limit again if it was read more than
// limitRecheck ago: the operator may have raised it, and retried the parked rows.
func (p *Publisher) fitsTopic(ctx context.Context, ts *topicState, rec *kgo.Record) error {
	err := p.checkTopicSize(rec, ts)
	if err == nil {
		return nil
	}
	ts.limitStale()
	p.readLimit(ctx, ts)
	return p.checkTopicSize(rec, ts)
}

// topicMaxMessageBytes returns topic's max.message.bytes, from a DescribeConfigs request. It
// returns an error wrapping kerr.UnknownTopicOrPartition when the topic does not exist.
func (p *Publisher) topicMaxMessageBytes(ctx context.Context, topic string) (int, error) {
	rcs, err := kadm.NewClient(p.cl).DescribeTopicConfigs(ctx, topic)
	if err != nil {
		return 0, fmt.Errorf("describe the configuration of topic %q: %w", topic, err)
	}
	rc, err := rcs.On(topic, nil)
	if err == nil {
		err = rc.Err
	}
	if err != nil {
		return 0, fmt.Errorf("describe the configuration of topic %q: %w", topic, err)
	}
	for _, c := range rc.Configs {
		if c.Key != "max.message.bytes" {
			continue
		}
		n, err := strconv.Atoi(c.MaybeValue())
		if err != nil || n < 1 {
			return 0, fmt.Errorf("topic %q: max.message.bytes %q is not a positive integer", topic, c.MaybeValue())
		}
		return n, nil
	}
	return 0, fmt.Errorf("topic %q: the brokers did not say its max.message.bytes", topic)
}

// partitions holds the publisher's topicStates.
type partitions struct {
	mu     sync.Mutex
	topics map[string]*topicState
}

func (ps *partitions) get(topic string) *topicState {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	ts, ok := ps.topics[topic]
	if !ok {
		ts = &topicState{topic: topic}
		ps.topics[topic] = ts
	}
	return ts
}

// pinnedPartitioner is the kgo.Partitioner of the publisher: Kafka's default hashing of keys
// (murmur2, as kgo.StickyKeyPartitioner(nil), franz-go's default partitioner for keyed records
// and the Java client do), over the pinned count. Every record the publisher produces has a key.
type pinnedPartitioner struct{ ps *partitions }

// ForTopic implements kgo.Partitioner.
func (p pinnedPartitioner) ForTopic(topic string) kgo.TopicPartitioner {
	return &pinnedTopicPartitioner{ts: p.ps.get(topic), hash: kgo.StickyKeyPartitioner(nil).ForTopic(topic)}
}

// pinnedTopicPartitioner partitions one topic's records.
type pinnedTopicPartitioner struct {
	ts   *topicState
	hash kgo.TopicPartitioner
}

// RequiresConsistency implements kgo.TopicPartitioner: a keyed record always goes to its key's
// partition, even while that partition has no leader.
func (p *pinnedTopicPartitioner) RequiresConsistency(r *kgo.Record) bool {
	return p.hash.RequiresConsistency(r)
}

// Partition implements kgo.TopicPartitioner.
func (p *pinnedTopicPartitioner) Partition(r *kgo.Record, n int) int {
	return pinnedPartition(p.ts, p.hash, r, n)
}

// pinnedPartition picks r's partition among the n the topic has now: the key's partition under
// the pinned count. Without a pin yet, the first n seen becomes the pin. A pin above n (the
// topic was deleted and recreated smaller) cannot be honoured: keys are hashed over n.
func pinnedPartition(ts *topicState, hash kgo.TopicPartitioner, r *kgo.Record, n int) int {
	if int(ts.live.Load()) != n {
		ts.live.Store(int32(n))
	}
	pinned := int(ts.pinned.Load())
	if pinned == 0 {
		ts.pinned.CompareAndSwap(0, int32(n))
		pinned = int(ts.pinned.Load())
	}
	return hash.Partition(r, min(pinned, n))
}

// pinned makes sure the pin of ts's topic is resolved before its first record is produced. It
// returns an error when it cannot be: the record must not be produced then. A topic the brokers
// do not know is left unresolved, and its records produced, so that the producer reports the
// missing topic (or creates it, with AutoCreateTopics); the pin is resolved at a later record.
//
// It reads the topic's max.message.bytes first (readLimit): after it, checkTopicSize holds.
func (p *Publisher) pinned(ctx context.Context, ts *topicState) error {
	p.readLimit(ctx, ts)
	if ts.resolved.Load() {
		return nil
	}
	ts.mu.Lock()
	defer ts.mu.Unlock()
	if ts.resolved.Load() {
		return nil
	}
	if p.deps.Pins == nil {
		ts.resolved.Store(true) // the partitioner pins the first count it sees
		return nil
	}
	if time.Now().Before(ts.retryAt) {
		return ts.err
	}
	ctx, cancel := context.WithTimeout(ctx, pinTimeout)
	defer cancel()
	live, err := p.partitionCount(ctx, ts.topic)
	if errors.Is(err, kerr.UnknownTopicOrPartition) {
		ts.retryAt, ts.err = time.Now().Add(pinRetryDelay), nil
		return nil
	}
	want := live
	if seen := int(ts.pinned.Load()); seen > 0 {
		want = seen // this process produced to the topic before it existed: keep its keys there
	}
	var pinned int
	if err == nil {
		pinned, err = p.deps.Pins.Pin(ctx, ts.topic, want)
	}
	if err != nil {
		ts.retryAt, ts.err = time.Now().Add(pinRetryDelay), err
		return err
	}
	ts.pinned.Store(int32(pinned))
	ts.live.Store(int32(live))
	ts.resolved.Store(true)
	return nil
}

// PartitionCount returns the number of partitions topic has, from a metadata request. It
// returns an error wrapping kerr.UnknownTopicOrPartition when the topic does not exist.
func (p *Publisher) PartitionCount(ctx context.Context, topic string) (int, error) {
	return p.partitionCount(ctx, topic)
}

func (p *Publisher) partitionCount(ctx context.Context, topic string) (int, error) {
	details, err := kadm.NewClient(p.cl).ListTopics(ctx, topic)
	if err != nil {
		return 0, fmt.Errorf("read the partition count of topic %q: %w", topic, err)
	}
	td, ok := details[topic]
	if !ok {
		return 0, fmt.Errorf("read the partition count of topic %q: %w", topic, kerr.UnknownTopicOrPartition)
	}
	if td.Err != nil {
		return 0, fmt.Errorf("read the partition count of topic %q: %w", topic, td.Err)
	}
	if len(td.Partitions) == 0 {
		return 0, fmt.Errorf("read the partition count of topic %q: no partitions", topic)
	}
	return len(td.Partitions), nil
}

// report tells the observer and the log about a new (pinned, live) pair of ts's topic: one
// warning per change while they differ, one line when they agree again.
func (p *Publisher) report(ts *topicState) {
	pinned, live := ts.pinned.Load(), ts.live.Load()
	if pinned == 0 || live == 0 {
		return
	}
	pair := int64(pinned)<<32 | int64(live)
	old := ts.reported.Load()
	if old == pair || !ts.reported.CompareAndSwap(old, pair) {
		return
	}
	if p.deps.Observer != nil {
		p.deps.Observer.TopicPartitions(ts.topic, int(pinned), int(live))
	}
	switch {
	case pinned != live:
		action := "to use all partitions, stop the relay, let the topic's consumers catch up, run 'outbox-relay partitions repin " +
			ts.topic + "' and start the relay"
		if p.deps.Pins == nil {
			action = "keys move to the new count when this process restarts"
		}
		p.log.Warn("topic partition count differs from its pin: keys stay on the partitions of the pinned count",
			"topic", ts.topic, "pinned", pinned, "live", live, "action", action)
	case old != 0 && int32(old>>32) != int32(old): // they differed before
		p.log.Info("topic partition count matches its pin again", "topic", ts.topic, "partitions", live)
	}
}
