package kafka

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"
	"unsafe"

	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"go.opentelemetry.io/otel/trace"
)

// Header names set on every record: the relay's reserved headers (relay.ReservedHeaders) but
// aggregate-id, which a Kafka record carries as its key.
const (
	HeaderEventID       = relay.HeaderEventID
	HeaderEventType     = relay.HeaderEventType
	HeaderAggregateType = relay.HeaderAggregateType
	HeaderOccurredAt    = relay.HeaderOccurredAt
	// HeaderReplayedAt is set by Replay only: when the event was sent again, RFC 3339, UTC.
	HeaderReplayedAt = relay.HeaderReplayedAt
)

// recordBatchOverhead bounds the bytes a batch of one record adds to the record's key, value
// and headers: the batch header (61) and the record's own lengths, offset and timestamp (36).
const recordBatchOverhead = 61 + 36

// nameRE is the characters of a Kafka name (a topic, a group, a header); validName checks the
// length apart: a bounded repetition such as {1,249} compiles to a program of 249 copies of the
// class, about 100 kB of heap held for the life of the process by each such expression.
var nameRE = regexp.MustCompile(`^[a-zA-Z0-9._-]+$`)

// validName reports whether s is 1 to maxLen characters of [a-zA-Z0-9._-].
func validName(s string, maxLen int) bool { return len(s) <= maxLen && nameRE.MatchString(s) }

// topicMaxLen is the longest topic (or group) name Kafka takes.
const topicMaxLen = 249

// Publisher publishes outbox rows to Kafka: relay.Sink. It hashes each topic's keys with the
// topic's pinned partition count (see PartitionPins), so adding partitions to a topic moves no
// key.
type Publisher struct {
	cl   *kgo.Client
	cfg  Config
	deps PublisherDeps
	log  *slog.Logger
	// promise is the promise of every record, bound once (see (*Publisher).settle).
	promise func(*kgo.Record, error)
	// fence refuses Produce requests once the context of the last published record is done.
	fence *fence

	// missing holds the topics the brokers said do not exist, since when; a publish to one that
	// succeeds removes it. missingN is its size, read without the lock on every acknowledgement.
	missingMu sync.Mutex
	missing   map[string]time.Time
	missingN  atomic.Int32

	// topics caches the valid topic of each (topic override, aggregate type, event type): the
	// template expansion and the name check cost more than the rest of a record.
	topicsMu sync.Mutex
	topics   map[topicKey]*topicState
	parts    *partitions
	// ceSource is kafka.cloudevents.source cut by splitSource.
	ceSource []string
	// tr starts a span per record; nil when tracing is off.
	tr *tracing
}

// topicKey is what a row's topic depends on.
type topicKey struct{ topic, aggregateType, eventType string }

// topicCacheSize bounds the topic cache; it is emptied when full.
const topicCacheSize = 4096

var (
	_ relay.Sink          = (*Publisher)(nil)
	_ relay.ReleasingSink = (*Publisher)(nil)
)

// produceRequestSlack is what a produce request may hold beyond one batch of
// kafka.max_record_bytes: its header, and the names and framing of its topics and partitions.
const produceRequestSlack = 64 << 10

// NewPublisher returns a publisher with an idempotent, acks=all producer, which hashes each
// topic's keys with the partition count it saw first for the topic. extra options (hooks such
// as metrics) are added to the client's.
func NewPublisher(cfg Config, extra ...kgo.Opt) (*Publisher, error) {
	return NewPublisherWith(cfg, PublisherDeps{}, extra...)
}

// NewPublisherWith returns a publisher as NewPublisher does, with deps: with deps.Pins, each
// topic's partition count is pinned across restarts and replicas.
func NewPublisherWith(cfg Config, deps PublisherDeps, extra ...kgo.Opt) (*Publisher, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	f := &fence{}
	opts, err := cfg.clientOptsFenced(f)
	if err != nil {
		return nil, err
	}
	comp, _ := codec(cfg.Compression)
	parts := &partitions{topics: make(map[string]*topicState)}
	opts = append(opts,
		kgo.RequiredAcks(kgo.AllISRAcks()),
		kgo.ProducerLinger(cfg.Linger),
		kgo.ProducerBatchCompression(comp),
		// Never pack rows into a batch larger than the broker takes: it refuses the whole batch
		// (MESSAGE_TOO_LARGE), the batches behind it still succeed, and keys are reordered.
		// kafka.max_record_bytes is documented to be at most the broker's limit.
		// A topic's own max.message.bytes, when lower, caps its batches (batchMaxBytes).
		kgo.ProducerBatchMaxBytesFn(parts.batchMaxBytes(cfg.MaxRecordBytes)),
		kgo.MaxBufferedRecords(1<<20), // the relay bounds what is in flight; never block Publish
		kgo.MaxBufferedBytes(0),
		// A produce request carries at most one full batch: franz-go encodes a request whole into
		// one pooled buffer, so requests that held every partition's batch (several MiB in a
		// backlog) kept a second copy of the payloads in flight that large, and the pool's
		// buffers, grown again after each collection, were a quarter of what a drain allocated.
		// Up to five requests still go out at once to each broker.
		kgo.BrokerMaxWriteBytes(int32(cfg.MaxRecordBytes+produceRequestSlack)),
	)
	if cfg.AutoCreateTopics {
		opts = append(opts, kgo.AllowAutoTopicCreation())
	} else {
		// A topic that does not exist fails its records after the second metadata answer that
		// says so, within a second, instead of the fifth, some 25 s: the relay sends them again
		// later without counting an attempt (relay.ErrDestinationMissing), so saying it at once
		// costs nothing, and one more answer covers a topic created a moment ago.
		opts = append(opts, kgo.UnknownTopicRetries(1))
	}
	opts = append(opts, extra...)
	// Last: keys must be hashed with the pinned count, whatever extra says.
	opts = append(opts, kgo.RecordPartitioner(pinnedPartitioner{parts}))
	cl, err := kgo.NewClient(opts...)
	if err != nil {
		return nil, fmt.Errorf("new kafka client: %w", err)
	}
	log := deps.Log
	if log == nil {
		log = cfg.Log
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	p := &Publisher{cl: cl, cfg: cfg, deps: deps, log: log, fence: f, topics: make(map[topicKey]*topicState), parts: parts,
		ceSource: splitSource(cfg.CloudEventsSource), tr: newTracing(cfg.Tracing),
		missing: make(map[string]time.Time)}
	p.promise = p.settle
	return p, nil
}

// Client returns the underlying franz-go client.
func (p *Publisher) Client() *kgo.Client { return p.cl }

// Ping checks that a broker answers a metadata request.
func (p *Publisher) Ping(ctx context.Context) error {
	if err := p.cl.Ping(ctx); err != nil {
		return fmt.Errorf("kafka brokers %s unreachable: %w", strings.Join(p.cfg.Brokers, ","), err)
	}
	return nil
}

// produced is a record in flight: the record, its four fixed headers, the bytes of its key and
// header values when they fit in text, and the relay's callback in one object, which the promise
// (settle) hands back to producedPool. The record is its first field, so the promise, given the
// record, finds the callback without a closure or a lookup per record (producedOf).
type produced struct {
	rec     kgo.Record // first: producedOf
	headers [4]kgo.RecordHeader
	text    [producedText]byte
	done    func(error)
	span    trace.Span // the record's publish span; nil when tracing is off
}

// producedText holds a record's key and header values when they fit: a UUID key and event id,
// a type of 40 bytes each and the occurred-at time.
const producedText = 192

// The record is produced's first field (producedOf): this does not compile otherwise.
const _ = uint(0) - uint(unsafe.Offsetof(produced{}.rec))

// producedOf returns the produced whose record r is: every record the publisher hands franz-go is
// the rec field, at offset 0, of a produced.
func producedOf(r *kgo.Record) *produced { return (*produced)(unsafe.Pointer(r)) }

// producedPool recycles the records in flight. Allocated per record, they and their keys and
// header values were a third of the bytes a drain allocated (about 450 B an event), and under
// the memory limit the bytes allocated set how often the collector runs. franz-go refers to a
// record only until its promise returns (the hooks run before it), and the relay's callback
// keeps nothing of it, so settle recycles it once the callback returned. What franz-go may keep
// longer is the record's Context: the goroutine that waits for a new topic's partitions watches
// the first record's, and may look at it again after the record was acknowledged. So the
// Context is the caller's own, never the recycled object (which an earlier version made it).
var producedPool = sync.Pool{New: func() any { return new(produced) }}

// settle is the promise of every record: it hands the broker's verdict to the relay's callback,
// and keeps track of the topics that do not exist.
func (p *Publisher) settle(r *kgo.Record, err error) {
	pr := producedOf(r)
	switch {
	case err == nil:
		if p.missingN.Load() > 0 {
			p.topicFound(r.Topic)
		}
	case errors.Is(err, kerr.MessageTooLarge):
		p.parts.get(r.Topic).limitStale() // the topic's limit may have been lowered
	case errors.Is(err, kerr.UnknownTopicOrPartition):
		p.topicMissing(r.Topic)
		err = fmt.Errorf("%w: kafka topic %q does not exist; %s: %w", relay.ErrDestinationMissing, r.Topic, p.missingFix(), err)
	}
	if pr.span != nil {
		endPublish(pr.span, r, err)
	}
	pr.done(classify(r, err))
	*pr = produced{}
	producedPool.Put(pr)
}

// missingFix says what makes a missing topic exist.
func (p *Publisher) missingFix() string {
	if p.cfg.AutoCreateTopics {
		return "the brokers did not create it (is auto.create.topics.enable off?): create it"
	}
	return "create it, or set kafka.auto_create_topics=true to let the brokers create it"
}

// topicMissing records that topic does not exist, and says so once, at error level, until it is
// found.
func (p *Publisher) topicMissing(topic string) {
	p.missingMu.Lock()
	defer p.missingMu.Unlock()
	if _, ok := p.missing[topic]; ok {
		return
	}
	p.missing[topic] = time.Now()
	p.missingN.Store(int32(len(p.missing)))
	p.log.Error("kafka topic does not exist: its rows wait, and are sent again until it does", "topic", topic,
		"fix", p.missingFix())
}

// topicFound records that a publish to topic succeeded: it exists.
func (p *Publisher) topicFound(topic string) {
	p.missingMu.Lock()
	defer p.missingMu.Unlock()
	since, ok := p.missing[topic]
	if !ok {
		return
	}
	delete(p.missing, topic)
	p.missingN.Store(int32(len(p.missing)))
	p.log.Info("kafka topic exists now: its rows go out", "topic", topic, "missing_for", time.Since(since).Round(time.Millisecond))
}

// MissingTopics returns, sorted, the topics a publish found missing that no publish found since.
func (p *Publisher) MissingTopics() []string {
	p.missingMu.Lock()
	defer p.missingMu.Unlock()
	out := make([]string, 0, len(p.missing))
	for t := range p.missing {
		out = append(out, t)
	}
	slices.Sort(out)
	return out
}

// Record builds the Kafka record of m, or returns an error wrapping relay.ErrInvalidMessage that
// says why m cannot be published.
func (p *Publisher) Record(m *relay.Message) (*kgo.Record, error) {
	pr, _, err := p.record(m)
	if err != nil {
		return nil, err
	}
	return &pr.rec, nil // never produced, so never recycled: the caller's to keep
}

// record builds the record of m, with extra headers after the row's.
func (p *Publisher) record(m *relay.Message, extra ...kgo.RecordHeader) (*produced, *topicState, error) {
	key := topicKey{m.Topic, m.AggregateType, m.EventType}
	if m.Topic != "" {
		key.aggregateType, key.eventType = "", "" // an override does not depend on them
	}
	p.topicsMu.Lock()
	ts, cached := p.topics[key]
	p.topicsMu.Unlock()
	if !cached {
		topic := m.Topic
		if topic == "" {
			topic = strings.NewReplacer("{aggregate_type}", m.AggregateType, "{event_type}", m.EventType).
				Replace(p.cfg.TopicTemplate)
		}
		if !validName(topic, topicMaxLen) || topic == "." || topic == ".." {
			return nil, nil, fmt.Errorf("%w: topic %q is not a valid Kafka topic name ([a-zA-Z0-9._-], 1 to 249 characters)", relay.ErrInvalidMessage, truncate(topic, 300))
		}
		ts = p.parts.get(topic)
		p.topicsMu.Lock()
		if len(p.topics) >= topicCacheSize {
			clear(p.topics)
		}
		p.topics[key] = ts
		p.topicsMu.Unlock()
	}
	topic := ts.topic
	if err := m.Check(); err != nil { // the key and occurred_at
		return nil, nil, err
	}
	if m.Payload == nil && !p.cfg.Tombstones {
		return nil, nil, fmt.Errorf("%w: payload is NULL and tombstones are disabled (kafka.tombstones)", relay.ErrInvalidMessage)
	}
	pr := producedPool.Get().(*produced)
	// The key and the four header values share the record's text, or one allocation when they
	// do not fit in it.
	buf := pr.text[:0]
	if n := len(m.AggregateID) + len(m.EventID) + len(m.EventType) + len(m.AggregateType) + len(time.RFC3339Nano); n > len(pr.text) {
		buf = make([]byte, 0, n)
	}
	piece := func(s string) []byte {
		start := len(buf)
		buf = append(buf, s...)
		return buf[start:len(buf):len(buf)]
	}
	keyBytes, eventID, eventType, aggregateType := piece(m.AggregateID), piece(m.EventID), piece(m.EventType), piece(m.AggregateType)
	start := len(buf)
	buf = m.OccurredAt.UTC().AppendFormat(buf, time.RFC3339Nano)
	pr.rec = kgo.Record{Topic: topic, Key: keyBytes, Value: m.Payload}
	rec := &pr.rec
	if p.cfg.RecordTimestamp == TimestampOccurredAt {
		// Kafka timestamps are milliseconds since 1970, never negative; franz-go takes a zero
		// time.Time for "now", which 1970-01-01T00:00:00Z is not.
		if m.OccurredAt.Before(time.Unix(0, 0)) {
			return nil, nil, fmt.Errorf("%w: occurred_at %s is before 1970, which a Kafka record timestamp cannot be (kafka.record_timestamp=occurred_at)",
				relay.ErrInvalidMessage, m.OccurredAt.UTC().Format(time.RFC3339Nano))
		}
		rec.Timestamp = m.OccurredAt
	}
	rec.Headers = append(pr.headers[:0],
		kgo.RecordHeader{Key: HeaderEventID, Value: eventID},
		kgo.RecordHeader{Key: HeaderEventType, Value: eventType},
		kgo.RecordHeader{Key: HeaderAggregateType, Value: aggregateType},
		kgo.RecordHeader{Key: HeaderOccurredAt, Value: buf[start:len(buf):len(buf)]},
	)
	if p.cfg.IDHeader != "" {
		rec.Headers = append(rec.Headers, kgo.RecordHeader{Key: p.cfg.IDHeader, Value: eventID})
	}
	if p.cfg.Format == FormatCloudEvents {
		ce, err := p.cloudEvent(m, eventID, eventType, keyBytes, buf[start:len(buf):len(buf)])
		if err != nil {
			return nil, nil, err
		}
		rec.Headers = append(ce, rec.Headers...)
	}
	if m.Headers != nil {
		var hs map[string]any
		if err := json.Unmarshal(m.Headers, &hs); err != nil {
			return nil, nil, fmt.Errorf("%w: headers is not a JSON object: %v", relay.ErrInvalidMessage, err)
		}
		// In the name order, so that a record's headers are the same bytes each time its row is
		// published (a retry, 'outbox-relay replay'), not in the map's random order.
		names := make([]string, 0, len(hs))
		for k := range hs {
			names = append(names, k)
		}
		slices.Sort(names)
		for _, k := range names {
			v := hs[k]
			if err := relay.CheckHeader(k); err != nil {
				return nil, nil, err
			}
			if p.cfg.IDHeader != "" && strings.EqualFold(k, p.cfg.IDHeader) {
				return nil, nil, fmt.Errorf("%w: header %q is reserved: the relay sets it to the event id (kafka.id_header)", relay.ErrInvalidMessage, k)
			}
			if p.cfg.Format == FormatCloudEvents && len(k) >= len(ceHeaderPrefix) && strings.EqualFold(k[:len(ceHeaderPrefix)], ceHeaderPrefix) {
				return nil, nil, fmt.Errorf("%w: header %q is reserved: with kafka.format=cloudevents the relay sets the ce_ headers itself", relay.ErrInvalidMessage, k)
			}
			s, ok := v.(string)
			if !ok {
				return nil, nil, fmt.Errorf("%w: header %q is not a string", relay.ErrInvalidMessage, k)
			}
			rec.Headers = append(rec.Headers, kgo.RecordHeader{Key: k, Value: []byte(s)})
		}
	}
	rec.Headers = append(rec.Headers, extra...)
	// A record travels in a batch, and the broker's limit (like the producer's batch cap, set to
	// kafka.max_record_bytes) counts the batch header and the record's framing too: at most 61 +
	// 36 bytes, and 10 per header. A record that fits only without them would fail in the
	// producer, after its key's later rows were handed over, and they would go out first.
	if err := p.checkSize(rec); err != nil {
		return nil, nil, err
	}
	return pr, ts, nil
}

// checkSize returns an error wrapping relay.ErrInvalidMessage when rec is larger than
// kafka.max_record_bytes.
func (p *Publisher) checkSize(rec *kgo.Record) error {
	if size := recordSize(rec); size > p.cfg.MaxRecordBytes {
		return fmt.Errorf("%w: record of %d bytes exceeds kafka.max_record_bytes (%d)", relay.ErrInvalidMessage, size, p.cfg.MaxRecordBytes)
	}
	return nil
}

// checkTopicSize returns an error wrapping relay.ErrInvalidMessage when rec is larger than the
// max.message.bytes of its topic, ts's, read before (readLimit) and below kafka.max_record_bytes,
// or than the batches franz-go was told the topic takes when it first saw one of its partitions
// (a limit raised since takes effect at the next start).
func (p *Publisher) checkTopicSize(rec *kgo.Record, ts *topicState) error {
	limit, batchCap := int(ts.maxBytes.Load()), int(ts.batchCap.Load())
	if limit == 0 && (batchCap == 0 || batchCap >= p.cfg.MaxRecordBytes) {
		return nil
	}
	size := recordSize(rec)
	switch {
	case limit > 0 && size > limit:
		return fmt.Errorf("%w: record of %d bytes exceeds the max.message.bytes of topic %q (%d): raise the topic's limit, then retry the parked row",
			relay.ErrInvalidMessage, size, ts.topic, limit)
	case batchCap > 0 && size > batchCap:
		return fmt.Errorf("%w: record of %d bytes exceeds the %d bytes this process's producer takes for topic %q (the topic's max.message.bytes when the relay first wrote to it): restart the relay to take a raised limit, then retry the parked row",
			relay.ErrInvalidMessage, size, batchCap, ts.topic)
	}
	return nil
}

// recordSize bounds the bytes rec takes in a batch of its own, as a broker measures it.
func recordSize(rec *kgo.Record) int {
	size := len(rec.Key) + len(rec.Value) + recordBatchOverhead + 10*len(rec.Headers)
	for _, h := range rec.Headers {
		size += len(h.Key) + len(h.Value)
	}
	return size
}

// ceHeaderPrefix starts the name of every CloudEvents attribute header of the Kafka binding.
const ceHeaderPrefix = "ce_"

// cloudEvent returns the CloudEvents attribute headers of m (the Kafka protocol binding, binary
// mode, spec version 1.0), with room for the native headers and the row's after them. The
// header values given share the record's buffer; ce_time is occurred_at as RFC 3339 in UTC.
func (p *Publisher) cloudEvent(m *relay.Message, eventID, eventType, subject, occurredAt []byte) ([]kgo.RecordHeader, error) {
	if m.EventType == "" {
		return nil, fmt.Errorf("%w: event_type is empty: a CloudEvent needs a type (kafka.format=cloudevents)", relay.ErrInvalidMessage)
	}
	source := make([]byte, 0, len(p.cfg.CloudEventsSource)+len(m.AggregateType)+len(m.EventType))
	for _, part := range p.ceSource {
		switch part {
		case "{aggregate_type}":
			source = appendPathSegment(source, m.AggregateType)
		case "{event_type}":
			source = appendPathSegment(source, m.EventType)
		default:
			source = append(source, part...)
		}
	}
	if len(source) == 0 {
		return nil, fmt.Errorf("%w: kafka.cloudevents.source %q makes an empty ce_source for this row", relay.ErrInvalidMessage, p.cfg.CloudEventsSource)
	}
	hs := make([]kgo.RecordHeader, 0, 6+4+bytes.Count(m.Headers, []byte{':'}))
	return append(hs,
		kgo.RecordHeader{Key: "ce_specversion", Value: ceSpecVersion},
		kgo.RecordHeader{Key: "ce_id", Value: eventID},
		kgo.RecordHeader{Key: "ce_type", Value: eventType},
		kgo.RecordHeader{Key: "ce_source", Value: source},
		kgo.RecordHeader{Key: "ce_subject", Value: subject},
		kgo.RecordHeader{Key: "ce_time", Value: occurredAt},
	), nil
}

// splitSource cuts a kafka.cloudevents.source template into its placeholders and the literal
// text between them, once, so that a record's source costs no template expansion.
func splitSource(tmpl string) []string {
	var parts []string
	for tmpl != "" {
		loc := placeholderRE.FindStringIndex(tmpl)
		if loc == nil {
			return append(parts, tmpl)
		}
		if loc[0] > 0 {
			parts = append(parts, tmpl[:loc[0]])
		}
		parts = append(parts, tmpl[loc[0]:loc[1]])
		tmpl = tmpl[loc[1]:]
	}
	return parts
}

// appendPathSegment appends s to dst percent-encoded as a URI path segment (url.PathEscape),
// without allocating when s needs no escape (letters, digits, '-', '.', '_' and '~').
func appendPathSegment(dst []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '.' || c == '_' || c == '~') {
			return append(dst, url.PathEscape(s)...)
		}
	}
	return append(dst, s...)
}

// ceSpecVersion is the CloudEvents version of every record with kafka.format=cloudevents. It is
// never written to.
var ceSpecVersion = []byte("1.0")

// Publish implements relay.Sink. The first record of a topic waits for the topic's pinned
// partition count (a metadata request and PublisherDeps.Pins, bounded by 10s); when it cannot be
// read, the record fails at once (done is called before Publish returns) and so do the topic's
// records for the next second, as one group (relay.GroupError), without being produced.
func (p *Publisher) Publish(ctx context.Context, m *relay.Message, done func(error)) error {
	pr, ts, err := p.record(m)
	if err != nil {
		return err
	}
	if err := p.pinned(ctx, ts); err != nil {
		done(&relay.GroupError{Group: ts.topic + "/partition-count", Err: err})
		return nil
	}
	if err := p.fitsTopic(ctx, ts, &pr.rec); err != nil {
		return err
	}
	if p.tr != nil {
		pr.span = p.tr.startPublish(ctx, m, &pr.rec)
		err := p.checkSize(&pr.rec)
		if err == nil {
			err = p.checkTopicSize(&pr.rec, ts)
		}
		if err != nil { // the relay's traceparent made it too large
			endPublish(pr.span, &pr.rec, err)
			return err
		}
	}
	p.report(ts)
	pr.rec.Context, pr.done = ctx, done
	p.fence.set(ctx)
	p.cl.Produce(ctx, &pr.rec, p.promise)
	return nil
}

// Replay publishes m again as Publish would (the same key, value and headers, and partition:
// the topic's pinned count), with the header replayed-at set to at, to topic when it is not ""
// (m's own topic otherwise). done is called with the broker's verdict.
func (p *Publisher) Replay(ctx context.Context, m *relay.Message, topic string, at time.Time, done func(error)) error {
	if topic != "" {
		c := *m
		c.Topic = topic
		m = &c
	}
	pr, ts, err := p.record(m, kgo.RecordHeader{Key: HeaderReplayedAt, Value: at.UTC().AppendFormat(nil, time.RFC3339Nano)})
	if err != nil {
		return err
	}
	if err := p.pinned(ctx, ts); err != nil {
		return err
	}
	if err := p.fitsTopic(ctx, ts, &pr.rec); err != nil {
		return err
	}
	p.report(ts)
	pr.rec.Context, pr.done = ctx, done
	p.fence.set(ctx)
	p.cl.Produce(ctx, &pr.rec, p.promise)
	return nil
}

// ReleasesMessages implements relay.ReleasingSink: franz-go refers to a record's value and headers
// until it calls the record's promise, which calls done; the relay's callback keeps nothing.
func (p *Publisher) ReleasesMessages() bool { return true }

// Abort implements relay.Sink.
func (p *Publisher) Abort(ctx context.Context) error { return p.cl.AbortBufferedRecords(ctx) }

// Flush waits until every buffered record is acknowledged or failed.
func (p *Publisher) Flush(ctx context.Context) error { return p.cl.Flush(ctx) }

// Close closes the client.
func (p *Publisher) Close() { p.cl.Close() }

// classify tags a broker error with the record's partition: franz-go fails every buffered record
// of a partition when one of its batches fails, so the relay must know which failures belong
// together. Broker rejections (MESSAGE_TOO_LARGE, TOPIC_AUTHORIZATION_FAILED...) are not marked
// invalid: a batch holds several rows and the broker does not say which one it refused, so the
// relay retries with backoff and parks only the row that keeps failing, with the broker's reason.
func classify(r *kgo.Record, err error) error {
	if err == nil {
		return nil
	}
	return &relay.GroupError{Group: fmt.Sprintf("%s/%d", r.Topic, r.Partition), Err: err}
}

// truncate returns s cut to at most n bytes, at a character boundary, with "..." when cut.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n] + "..."
}
