package kafka

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"strconv"
	"sync"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	"github.com/outbox-relay/outbox-relay/app"
	"github.com/outbox-relay/outbox-relay/domain"
	"github.com/outbox-relay/outbox-relay/internal/backoff"
	"github.com/outbox-relay/outbox-relay/internal/bounds"
)

// Defaults of ConsumerConfig.
const (
	ConsumerMaxAttemptsDefault     = 5
	ConsumerRetryBackoffDefault    = 200 * time.Millisecond
	ConsumerRetryBackoffMaxDefault = 5 * time.Second
	ConsumerMaxPollRecordsDefault  = 500
	ConsumerSessionTimeoutDefault  = 45 * time.Second
)

// Header names the consumer adds to a dead-lettered record, besides the original's headers.
const (
	HeaderDeadLetterReason    = "dead-letter-reason"
	HeaderDeadLetterTopic     = "dead-letter-topic"
	HeaderDeadLetterPartition = "dead-letter-partition"
	HeaderDeadLetterOffset    = "dead-letter-offset"
	HeaderDeadLetterAttempts  = "dead-letter-attempts"
	HeaderDeadLetterGroup     = "dead-letter-group"
)

var uuidRE = regexp.MustCompile(`^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$`)

// ConsumerConfig configures a Consumer. The zero value of a field means its default.
type ConsumerConfig struct {
	// Group is the consumer group. Required.
	Group string
	// Topics are the topics consumed. Required.
	Topics []string
	// DeadLetterTopic receives the records that cannot be processed, with the reason in the
	// dead-letter-reason header. Required; it must exist unless kafka.auto_create_topics is on.
	DeadLetterTopic string
	// MaxAttempts is how many times a failing record is tried before it is dead-lettered.
	// Records whose error wraps app.ErrInvalidEvent are dead-lettered at the first failure.
	// Default 5; 1 to 100.
	MaxAttempts int
	// RetryBackoff is the delay after a record's first failure; it doubles at each attempt up
	// to RetryBackoffMax. Defaults 200ms and 5s. A partition waits while its record is retried,
	// and so does a rebalance: keep the sum of the delays well under the rebalance timeout (60s).
	RetryBackoff, RetryBackoffMax time.Duration
	// MaxPollRecords bounds the records processed between two offset commits. Default 500.
	MaxPollRecords int
	// SessionTimeout is how long the group waits for a member that stopped heartbeating (a
	// crashed process) before giving its partitions to the others. Default 45s; 6s to 5m.
	SessionTimeout time.Duration
	// ReadCommitted reads at read_committed: records of aborted or still open Kafka transactions
	// are never handed over (the relay's kafka.delivery=exactly_once). Default false
	// (read_uncommitted).
	ReadCommitted bool
}

// Ranges of ConsumerConfig's fields: Validate checks them, and cmd parses the consumer.* keys
// with them.
var (
	ConsumerMaxAttemptsRange     = bounds.Int{Min: 1, Max: 100}
	ConsumerRetryBackoffRange    = bounds.Duration{Min: time.Millisecond, Max: time.Minute}
	ConsumerRetryBackoffMaxRange = bounds.Duration{Min: time.Millisecond, Max: 10 * time.Minute} // and at least RetryBackoff
	ConsumerMaxPollRecordsRange  = bounds.Int{Min: 1, Max: 100000}
	ConsumerSessionTimeoutRange  = bounds.Duration{Min: 6 * time.Second, Max: 5 * time.Minute}
)

// WithDefaults returns c with zero fields set to their defaults.
func (c ConsumerConfig) WithDefaults() ConsumerConfig {
	if c.MaxAttempts == 0 {
		c.MaxAttempts = ConsumerMaxAttemptsDefault
	}
	if c.RetryBackoff == 0 {
		c.RetryBackoff = ConsumerRetryBackoffDefault
	}
	if c.RetryBackoffMax == 0 {
		c.RetryBackoffMax = ConsumerRetryBackoffMaxDefault
	}
	if c.MaxPollRecords == 0 {
		c.MaxPollRecords = ConsumerMaxPollRecordsDefault
	}
	if c.SessionTimeout == 0 {
		c.SessionTimeout = ConsumerSessionTimeoutDefault
	}
	return c
}

// Validate reports every invalid field, naming its configuration key.
func (c ConsumerConfig) Validate() error {
	var errs []error
	if !validName(c.Group, topicMaxLen) {
		errs = append(errs, fmt.Errorf("consumer.group: must be 1 to 249 characters of [a-zA-Z0-9._-], got %q", c.Group))
	}
	if len(c.Topics) == 0 {
		errs = append(errs, errors.New("consumer.topics: at least one topic is required"))
	}
	for _, t := range c.Topics {
		if !validName(t, topicMaxLen) {
			errs = append(errs, fmt.Errorf("consumer.topics: %q is not a valid Kafka topic name", t))
		}
		if t == c.DeadLetterTopic {
			errs = append(errs, fmt.Errorf("consumer.dead_letter_topic: %q is also consumed (consumer.topics)", t))
		}
	}
	if !validName(c.DeadLetterTopic, topicMaxLen) {
		errs = append(errs, fmt.Errorf("consumer.dead_letter_topic: must be a valid Kafka topic name, got %q", c.DeadLetterTopic))
	}
	backoff := ConsumerRetryBackoffRange.Check("consumer.retry_backoff", c.RetryBackoff)
	backoffMax := ConsumerRetryBackoffMaxRange.Check("consumer.retry_backoff_max", c.RetryBackoffMax)
	errs = append(errs, ConsumerMaxAttemptsRange.Check("consumer.max_attempts", c.MaxAttempts), backoff, backoffMax,
		ConsumerMaxPollRecordsRange.Check("consumer.max_poll_records", c.MaxPollRecords),
		ConsumerSessionTimeoutRange.Check("consumer.session_timeout", c.SessionTimeout))
	if backoff == nil && backoffMax == nil && c.RetryBackoffMax < c.RetryBackoff {
		errs = append(errs, fmt.Errorf("consumer.retry_backoff_max: must be at least consumer.retry_backoff (%s), got %s", c.RetryBackoff, c.RetryBackoffMax))
	}
	return errors.Join(errs...)
}

// Event is a consumed record as a Handler sees it.
type Event struct {
	ID            string            // the event-id header
	Type          string            // the event-type header
	AggregateType string            // the aggregate-type header
	Key           string            // the record key: the aggregate's id
	Payload       []byte            // the record value
	Headers       map[string]string // every header of the record
	Topic         string
	Partition     int32
	Offset        int64
}

// Outcome is what a Handler did with an event.
type Outcome int

// Outcomes of a Handler.
const (
	// Processed: the event's effects committed now.
	Processed Outcome = iota
	// Duplicate: the event was processed before; it is acknowledged and skipped.
	Duplicate
	// Ignored: the handler has nothing to do with events of this type.
	Ignored
)

// String returns the outcome's name, used as a metric label.
func (o Outcome) String() string {
	switch o {
	case Processed:
		return "processed"
	case Duplicate:
		return "duplicate"
	case Ignored:
		return "ignored"
	}
	return "unknown"
}

// Handler processes one event. An error wrapping app.ErrInvalidEvent sends the record to the
// dead-letter topic at once; one wrapping app.ErrUnavailable is retried until it succeeds (the
// partition waits); any other error is retried up to ConsumerConfig.MaxAttempts. A
// Handler must be idempotent: records are delivered at least once.
type Handler func(ctx context.Context, ev Event) (Outcome, error)

// WelcomeHandler returns the Handler that decodes UserCreated events and runs the SendWelcome use
// case with them. Events of other types are ignored.
func WelcomeHandler(uc *app.SendWelcome) Handler {
	return func(ctx context.Context, ev Event) (Outcome, error) {
		if ev.Type != "UserCreated" {
			return Ignored, nil
		}
		uce, err := domain.UnmarshalUserCreated(ev.Payload)
		if err != nil {
			return 0, fmt.Errorf("%w: %w", app.ErrInvalidEvent, err)
		}
		fresh, err := uc.Execute(ctx, ev.ID, uce)
		if err != nil {
			return 0, err
		}
		if !fresh {
			return Duplicate, nil
		}
		return Processed, nil
	}
}

// ConsumerObserver is told what a Consumer does, for metrics. Its methods must not block.
type ConsumerObserver interface {
	// Handled reports a record handled with outcome o.
	Handled(topic string, o Outcome)
	// Failed reports a failed attempt at a record.
	Failed(topic string, err error)
	// DeadLettered reports a record sent to the dead-letter topic; invalid tells whether its
	// error wrapped app.ErrInvalidEvent (else the attempts ran out).
	DeadLettered(topic string, invalid bool)
	// Committed reports offsets committed for n partitions.
	Committed(n int)
}

// NopConsumerObserver is a ConsumerObserver that does nothing.
type NopConsumerObserver struct{}

// Handled implements ConsumerObserver.
func (NopConsumerObserver) Handled(string, Outcome) {}

// Failed implements ConsumerObserver.
func (NopConsumerObserver) Failed(string, error) {}

// DeadLettered implements ConsumerObserver.
func (NopConsumerObserver) DeadLettered(string, bool) {}

// Committed implements ConsumerObserver.
func (NopConsumerObserver) Committed(int) {}

// Consumer is an input adapter: it reads events with a Kafka consumer group and hands them, one
// partition's records in order, to a Handler. Offsets are committed only for records whose
// handling finished (processed, skipped as a repeat, or dead-lettered), after a poll's records
// are done and whenever partitions are revoked; so a crash, a restart or a rebalance delivers
// again at most what was not committed, and the Handler's inbox skips it.
type Consumer struct {
	cl         *kgo.Client
	cfg        ConsumerConfig
	autoCreate bool
	handle     Handler
	obs        ConsumerObserver
	log        *slog.Logger
	tr         *tracing // starts a span per handled record; nil when tracing is off

	mu   sync.Mutex
	done map[topicPartition]*kgo.Record // the last finished record of each partition, not yet committed
}

type topicPartition struct {
	topic     string
	partition int32
}

// NewConsumer returns a consumer of ccfg.Topics in group ccfg.Group on the brokers of kcfg. obs
// and log may be nil. extra options (hooks such as metrics) are added to the client's.
func NewConsumer(kcfg Config, ccfg ConsumerConfig, handle Handler, obs ConsumerObserver, log *slog.Logger, extra ...kgo.Opt) (*Consumer, error) {
	kcfg = kcfg.WithDefaults()
	ccfg = ccfg.WithDefaults()
	if err := errors.Join(kcfg.Validate(), ccfg.Validate()); err != nil {
		return nil, err
	}
	if handle == nil {
		return nil, errors.New("new consumer: a handler is required")
	}
	if obs == nil {
		obs = NopConsumerObserver{}
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c := &Consumer{cfg: ccfg, autoCreate: kcfg.AutoCreateTopics, handle: handle, obs: obs, log: log, done: make(map[topicPartition]*kgo.Record),
		tr: newTracing(kcfg.Tracing)}
	opts, err := kcfg.clientOpts()
	if err != nil {
		return nil, err
	}
	opts = append(opts,
		kgo.ConsumerGroup(ccfg.Group),
		kgo.SessionTimeout(ccfg.SessionTimeout),
		kgo.ConsumeTopics(ccfg.Topics...),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
		kgo.DisableAutoCommit(),
		kgo.BlockRebalanceOnPoll(),
		kgo.OnPartitionsRevoked(c.revoked),
		kgo.OnPartitionsLost(c.lost),
		kgo.RequiredAcks(kgo.AllISRAcks()), // for the dead-letter records
	)
	if kcfg.AutoCreateTopics {
		opts = append(opts, kgo.AllowAutoTopicCreation())
	}
	if ccfg.ReadCommitted {
		opts = append(opts, kgo.FetchIsolationLevel(kgo.ReadCommitted()))
	}
	opts = append(opts, extra...)
	cl, err := kgo.NewClient(opts...)
	if err != nil {
		return nil, fmt.Errorf("new kafka client: %w", err)
	}
	c.cl = cl
	return c, nil
}

// Ping checks that a broker answers a metadata request and, unless topics are created
// automatically, that the dead-letter topic exists: a poison event would otherwise stall its
// partition until the topic is created.
func (c *Consumer) Ping(ctx context.Context) error {
	if err := c.cl.Ping(ctx); err != nil {
		return fmt.Errorf("kafka brokers unreachable: %w", err)
	}
	if c.autoCreate {
		return nil
	}
	topics, err := kadm.NewClient(c.cl).ListTopics(ctx, c.cfg.DeadLetterTopic)
	if err != nil {
		return fmt.Errorf("kafka metadata: %w", err)
	}
	if d, ok := topics[c.cfg.DeadLetterTopic]; !ok || d.Err != nil {
		return fmt.Errorf("consumer.dead_letter_topic: topic %q does not exist (create it, or set kafka.auto_create_topics)", c.cfg.DeadLetterTopic)
	}
	return nil
}

// Close leaves the group and closes the client. Call it after Run returned.
func (c *Consumer) Close() { c.cl.Close() }

// Run consumes until ctx ends or the client is closed. On the way out it commits the offsets
// of the records it finished, and returns nil.
func (c *Consumer) Run(ctx context.Context) error {
	defer func() {
		c.commit(context.WithoutCancel(ctx), nil)
	}()
	for {
		fetches := c.cl.PollRecords(ctx, c.cfg.MaxPollRecords)
		if fetches.IsClientClosed() {
			return nil
		}
		if ctx.Err() != nil {
			c.cl.AllowRebalance()
			return nil
		}
		fetches.EachError(func(topic string, partition int32, err error) {
			if !errors.Is(err, context.Canceled) {
				c.log.Warn("fetch failed", "topic", topic, "partition", partition, "err", err)
			}
		})
		var wg sync.WaitGroup
		fetches.EachPartition(func(p kgo.FetchTopicPartition) {
			if len(p.Records) > 0 {
				wg.Go(func() { c.partition(ctx, p.Records) })
			}
		})
		wg.Wait()
		c.commit(context.WithoutCancel(ctx), nil)
		c.cl.AllowRebalance()
	}
}

// partition handles one partition's records in order. It stops early only when ctx ends: a
// record is never passed over, so no later offset of its partition is committed before it.
func (c *Consumer) partition(ctx context.Context, recs []*kgo.Record) {
	for _, r := range recs {
		if !c.record(ctx, r) {
			return
		}
		c.mu.Lock()
		c.done[topicPartition{r.Topic, r.Partition}] = r
		c.mu.Unlock()
	}
}

// record handles r until it is processed, skipped or dead-lettered; it reports false when ctx
// ended first. Failures wrapping app.ErrUnavailable (the database is down) are retried for as
// long as they last, without counting as attempts.
func (c *Consumer) record(ctx context.Context, r *kgo.Record) bool {
	delay := c.cfg.RetryBackoff
	for attempt := 1; ; attempt++ {
		out, err := c.try(ctx, r)
		if err == nil {
			c.obs.Handled(r.Topic, out)
			return true
		}
		if ctx.Err() != nil {
			return false
		}
		c.obs.Failed(r.Topic, err)
		if errors.Is(err, app.ErrUnavailable) && !errors.Is(err, app.ErrInvalidEvent) {
			attempt--
			c.log.Warn("event not handled, a dependency is unavailable; retrying", "topic", r.Topic,
				"partition", r.Partition, "offset", r.Offset, "retry_in", delay, "err", err)
			if !backoff.Sleep(ctx, delay) {
				return false
			}
			delay = backoff.Double(delay, c.cfg.RetryBackoffMax)
			continue
		}
		invalid := errors.Is(err, app.ErrInvalidEvent)
		if invalid || attempt >= c.cfg.MaxAttempts {
			return c.deadLetter(ctx, r, err, attempt, invalid)
		}
		c.log.Warn("event failed, will retry", "topic", r.Topic, "partition", r.Partition, "offset", r.Offset,
			"event_id", header(r, HeaderEventID), "attempt", attempt, "retry_in", delay, "err", err)
		if !backoff.Sleep(ctx, delay) {
			return false
		}
		delay = backoff.Double(delay, c.cfg.RetryBackoffMax)
	}
}

// try decodes r and calls the handler once, in a span of its own when tracing is on: the child
// of the span whose trace context r carries.
func (c *Consumer) try(ctx context.Context, r *kgo.Record) (out Outcome, err error) {
	if c.tr != nil {
		var span trace.Span
		ctx, span = c.tr.startProcess(ctx, r, c.cfg.Group, header(r, HeaderEventID))
		defer func() {
			if err != nil {
				span.RecordError(err)
				span.SetStatus(codes.Error, err.Error())
			}
			span.End()
		}()
	}
	ev := Event{Key: string(r.Key), Payload: r.Value, Headers: make(map[string]string, len(r.Headers)),
		Topic: r.Topic, Partition: r.Partition, Offset: r.Offset}
	for _, h := range r.Headers {
		ev.Headers[h.Key] = string(h.Value)
	}
	ev.ID, ev.Type, ev.AggregateType = ev.Headers[HeaderEventID], ev.Headers[HeaderEventType], ev.Headers[HeaderAggregateType]
	if !uuidRE.MatchString(ev.ID) {
		return 0, fmt.Errorf("%w: header %s is missing or not a UUID: %q", app.ErrInvalidEvent, HeaderEventID, truncate(ev.ID, 100))
	}
	return c.handle(ctx, ev)
}

// deadLetter produces r to the dead-letter topic with the reason, retrying until the broker
// acknowledges it or ctx ends (a record is never dropped).
func (c *Consumer) deadLetter(ctx context.Context, r *kgo.Record, cause error, attempts int, invalid bool) bool {
	dl := &kgo.Record{Topic: c.cfg.DeadLetterTopic, Key: r.Key, Value: r.Value}
	dl.Headers = append(dl.Headers, r.Headers...)
	dl.Headers = append(dl.Headers,
		kgo.RecordHeader{Key: HeaderDeadLetterReason, Value: []byte(truncate(cause.Error(), 4000))},
		kgo.RecordHeader{Key: HeaderDeadLetterTopic, Value: []byte(r.Topic)},
		kgo.RecordHeader{Key: HeaderDeadLetterPartition, Value: []byte(strconv.Itoa(int(r.Partition)))},
		kgo.RecordHeader{Key: HeaderDeadLetterOffset, Value: []byte(strconv.FormatInt(r.Offset, 10))},
		kgo.RecordHeader{Key: HeaderDeadLetterAttempts, Value: []byte(strconv.Itoa(attempts))},
		kgo.RecordHeader{Key: HeaderDeadLetterGroup, Value: []byte(c.cfg.Group)},
	)
	delay := c.cfg.RetryBackoff
	for {
		err := c.cl.ProduceSync(ctx, dl).FirstErr()
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return false
		}
		c.log.Error("dead-letter produce failed, retrying", "dead_letter_topic", c.cfg.DeadLetterTopic,
			"topic", r.Topic, "partition", r.Partition, "offset", r.Offset, "retry_in", delay, "err", err)
		if !backoff.Sleep(ctx, delay) {
			return false
		}
		delay = backoff.Double(delay, c.cfg.RetryBackoffMax)
	}
	c.obs.DeadLettered(r.Topic, invalid)
	c.log.Error("event dead-lettered", "topic", r.Topic, "partition", r.Partition, "offset", r.Offset,
		"event_id", header(r, HeaderEventID), "attempts", attempts, "dead_letter_topic", c.cfg.DeadLetterTopic, "reason", cause)
	return true
}

// commit commits the finished records of the partitions in only (every partition when nil).
func (c *Consumer) commit(ctx context.Context, only map[string][]int32) {
	c.mu.Lock()
	var recs []*kgo.Record
	for tp, r := range c.done {
		if only != nil && !contains(only[tp.topic], tp.partition) {
			continue
		}
		recs = append(recs, r)
	}
	c.mu.Unlock()
	if len(recs) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := c.cl.CommitRecords(ctx, recs...); err != nil {
		// Not fatal: the records are delivered again and the handler's inbox skips them.
		c.log.Warn("offset commit failed; uncommitted records will be delivered again", "partitions", len(recs), "err", err)
		return
	}
	c.obs.Committed(len(recs))
	c.mu.Lock()
	for _, r := range recs {
		tp := topicPartition{r.Topic, r.Partition}
		if c.done[tp] == r {
			delete(c.done, tp)
		}
	}
	c.mu.Unlock()
}

// revoked commits what was finished on the partitions taken away, before another member gets them.
func (c *Consumer) revoked(ctx context.Context, _ *kgo.Client, revoked map[string][]int32) {
	c.commit(ctx, revoked)
	c.forget(revoked)
}

// lost forgets the partitions lost without a chance to commit: another member has them now.
func (c *Consumer) lost(_ context.Context, _ *kgo.Client, lost map[string][]int32) { c.forget(lost) }

func (c *Consumer) forget(parts map[string][]int32) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for tp := range c.done {
		if contains(parts[tp.topic], tp.partition) {
			delete(c.done, tp)
		}
	}
}

func contains(ps []int32, p int32) bool {
	for _, x := range ps {
		if x == p {
			return true
		}
	}
	return false
}

func header(r *kgo.Record, key string) string {
	for _, h := range r.Headers {
		if h.Key == key {
			return string(h.Value)
		}
	}
	return ""
}
