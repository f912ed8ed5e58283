package kafka

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/internal/bounds"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
)

// HeaderTxID is the header naming the database transaction that wrote a record's row, set in
// exactly-once delivery (TxPublisher) for every row written since the tx column exists: the
// records of one database transaction carry the same value, and are committed in one Kafka
// transaction.
const HeaderTxID = "tx-id"

// Defaults of TxConfig.
const (
	ProgressTopicDefault           = "outbox-relay.progress"
	TxMaxRowsDefault               = 1000
	TxLingerDefault                = 5 * time.Millisecond
	TransactionTimeoutDefault      = 60 * time.Second
	progressVersion           byte = 1
)

// TxLingerRange is the range of TxConfig.Linger (kafka.transaction_linger).
var TxLingerRange = bounds.Duration{Min: time.Millisecond, Max: 10 * time.Second}

// TransactionTimeoutRange is the range of TxConfig.TransactionTimeout (kafka.transaction_timeout).
var TransactionTimeoutRange = bounds.Duration{Min: time.Second, Max: 15 * time.Minute}

// ErrTransactionAborted is the error of a record whose Kafka transaction was aborted because
// another record of it failed: it is sent again, without an attempt counted against its row.
var ErrTransactionAborted = errors.New("kafka transaction aborted: another record of it failed")

// Outcomes of a Kafka transaction, for TxObserver.TxEnded.
const (
	TxCommitted = "committed" // committed: its rows are marked next
	TxAborted   = "aborted"   // aborted: a record failed, a row of its hand-over was refused, or the term ended
	TxFailed    = "failed"    // could not be ended, or its commit's outcome is unknown: the term ends
)

// TxObserver is told what the transactions of a TxPublisher do. Its methods must not block.
type TxObserver interface {
	// TxEnded is told each Kafka transaction's end (TxCommitted, TxAborted, TxFailed) and rows.
	TxEnded(outcome string, rows int)
	// ProgressWritten is told each progress record written, with how many rows it names.
	ProgressWritten(rows int)
	// Recovered is told, when a term starts, how many rows the last progress record named: rows
	// an earlier term published, marked now without being published again.
	Recovered(rows int)
}

// nopTxObserver is the TxObserver of a publisher without one.
type nopTxObserver struct{}

func (nopTxObserver) TxEnded(string, int) {}
func (nopTxObserver) ProgressWritten(int) {}
func (nopTxObserver) Recovered(int)       {}

// TxConfig configures exactly-once delivery (TxPublisher).
type TxConfig struct {
	// TransactionalID is the producer's transactional id: one per outbox, the same for every
	// replica, so that a new leader fences every earlier one at the broker. Required.
	TransactionalID string
	// ProgressTopic is the compacted topic, of one partition, where each Kafka transaction also
	// writes the ids of the rows it and the earlier ones published that may not be marked yet.
	// Created (compacted, one partition) when missing. Required.
	ProgressTopic string
	// Identity is the key of the outbox's progress records (database, schema, table). Required.
	Identity string
	// MaxRows ends a Kafka transaction, at the end of a claim, once it holds this many rows.
	// Default 1000 (relay.batch_size).
	MaxRows int
	// Linger ends a Kafka transaction, at the end of a claim, once this long passed since its
	// first row (kafka.transaction_linger). Default 5ms: the commit-to-visibility p99 at 1k
	// events/s stays under 15 ms; a longer linger makes fewer, larger transactions (fewer
	// commit markers on the broker) for a later visibility.
	Linger time.Duration
	// TransactionTimeout is the producer's transaction.timeout.ms: a transaction left open
	// longer (its producer frozen or dead) is aborted by the broker. Default 60s.
	TransactionTimeout time.Duration
}

// WithDefaults returns c with every zero field set to its default.
func (c TxConfig) WithDefaults() TxConfig {
	if c.MaxRows == 0 {
		c.MaxRows = TxMaxRowsDefault
	}
	if c.Linger == 0 {
		c.Linger = TxLingerDefault
	}
	if c.TransactionTimeout == 0 {
		c.TransactionTimeout = TransactionTimeoutDefault
	}
	return c
}

// Validate reports every invalid field, naming its configuration key.
func (c TxConfig) Validate() error {
	var errs []error
	if c.TransactionalID == "" {
		errs = append(errs, errors.New("kafka.transactional_id: must not be empty"))
	}
	if !validName(c.ProgressTopic, topicMaxLen) || c.ProgressTopic == "." || c.ProgressTopic == ".." {
		errs = append(errs, fmt.Errorf("kafka.progress_topic: %q is not a valid Kafka topic name ([a-zA-Z0-9._-], 1 to 249 characters)", c.ProgressTopic))
	}
	if c.Identity == "" {
		errs = append(errs, errors.New("kafka progress identity: must not be empty"))
	}
	if c.MaxRows < 1 {
		errs = append(errs, fmt.Errorf("kafka transaction rows: must be at least 1, got %d", c.MaxRows))
	}
	if err := TransactionTimeoutRange.Check("kafka.transaction_timeout", c.TransactionTimeout); err != nil {
		errs = append(errs, err)
	}
	if err := TxLingerRange.Check("kafka.transaction_linger", c.Linger); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// TxPublisher publishes outbox rows exactly once: relay.Sink, with the optional ports
// relay.BatchEnder, relay.Recoverer and relay.MarkNoter.
//
// Rows are produced inside Kafka transactions of a transactional producer. A transaction ends only
// at the end of a claim's hand-over (EndBatch), once it holds TxConfig.MaxRows rows or its first
// row is TxConfig.Linger old: claims never end inside a database transaction
// (postgres.StoreConfig.Transactions), so neither does a Kafka transaction. Before the commit the
// transaction also writes a progress record: the ids of every row committed so far whose mark is
// not known (MarkNoter), this transaction's included. Only after the commit is each row's done
// called with nil, and the relay marks it.
//
// A record that fails aborts its whole transaction: its row's failure is reported with the
// broker's error, the other rows' with ErrTransactionAborted, all as one group
// (relay.GroupError), so only one row counts an attempt. A commit whose outcome is unknown (its
// response lost, the producer fenced) fails every row with relay.ErrNotLeader: the term ends and
// the next one, here or on another replica, reads the last committed progress record back
// (Recover) and marks the rows it names without publishing them again.
type TxPublisher struct {
	cfg   Config
	tx    TxConfig
	deps  PublisherDeps
	extra []kgo.Opt
	log   *slog.Logger
	obs   TxObserver

	// mu guards the transaction: Publish, EndBatch, the commit, Abort, Recover and Close.
	mu      sync.Mutex
	pub     *Publisher // this term's producer; nil until the first Recover
	broken  error      // set when the producer cannot go on: Publish fails until Recover
	open    bool       // a Kafka transaction is begun
	handing bool       // a claim's rows are being handed over: no commit until EndBatch
	began   time.Time  // when the open transaction got its first row
	// doomed is set when a row of the hand-over was refused or failed at once: the transaction
	// that holds the hand-over's other rows (open or begun after) is aborted, not committed, so
	// that no database transaction is committed without one of its rows (relay.ErrSendAgain).
	doomed error
	recs   []*txRecord

	// A stream (stream.go): while streaming the transaction is not ended; streamIDs are the rows
	// it produced, streamDone is EndStream's done, called when the transaction ends.
	streaming    bool
	streamIDs    []int64
	streamDone   func(error)
	streamFailed atomic.Bool // a streamed record failed: the transaction must not commit

	// umu guards unmarked: the rows committed whose mark is not known.
	umu      sync.Mutex
	unmarked map[int64]struct{}

	kick      chan struct{}
	stop      chan struct{}
	stopped   chan struct{}
	closeOnce sync.Once
}

// txRecord is one row in the open transaction.
type txRecord struct {
	id   int64
	done func(error)
	mu   sync.Mutex
	err  error // the producer's verdict, set by its promise
}

// result is the producer's promise of the record: it keeps the verdict for the commit.
func (r *txRecord) result(err error) {
	r.mu.Lock()
	r.err = err
	r.mu.Unlock()
}

func (r *txRecord) verdict() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.err
}

var (
	_ relay.Sink       = (*TxPublisher)(nil)
	_ relay.BatchEnder = (*TxPublisher)(nil)
	_ relay.Recoverer  = (*TxPublisher)(nil)
	_ relay.MarkNoter  = (*TxPublisher)(nil)
)

// NewTxPublisher returns an exactly-once publisher. It connects nothing: each term's Recover
// starts a new transactional producer. extra options are added to each producer's.
func NewTxPublisher(cfg Config, tx TxConfig, deps PublisherDeps, extra ...kgo.Opt) (*TxPublisher, error) {
	cfg = cfg.WithDefaults()
	tx = tx.WithDefaults()
	if err := errors.Join(cfg.Validate(), tx.Validate()); err != nil {
		return nil, err
	}
	log := deps.Log
	if log == nil {
		log = cfg.Log
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	obs := deps.Tx
	if obs == nil {
		obs = nopTxObserver{}
	}
	p := &TxPublisher{cfg: cfg, tx: tx, deps: deps, extra: extra, log: log, obs: obs,
		unmarked: make(map[int64]struct{}),
		kick:     make(chan struct{}, 1), stop: make(chan struct{}), stopped: make(chan struct{})}
	go p.loop()
	return p, nil
}

// Recover implements relay.Recoverer. It starts a new transactional producer, whose
// InitProducerID fences every earlier producer of the transactional id (an earlier term's, here
// or on another replica): their open transaction is aborted, or completed if its commit was
// accepted. It then reads, at read_committed, the last progress record of the outbox and returns
// the ids it names.
func (p *TxPublisher) Recover(ctx context.Context) ([]int64, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.failOpen(fmt.Errorf("%w: a new term started", ErrTransactionAborted))
	if p.pub != nil {
		p.pub.Close()
		p.pub = nil
	}
	opts := append(slices.Clone(p.extra), kgo.TransactionalID(p.tx.TransactionalID), kgo.TransactionTimeout(p.tx.TransactionTimeout))
	pub, err := NewPublisherWith(p.cfg, p.deps, opts...)
	if err != nil {
		return nil, err
	}
	fail := func(err error) ([]int64, error) {
		pub.Close()
		return nil, err
	}
	if _, _, err := pub.cl.ProducerID(ctx); err != nil {
		return fail(fmt.Errorf("init the transactional producer %q: %w", p.tx.TransactionalID, err))
	}
	if err := p.progressTopic(ctx, pub.cl); err != nil {
		return fail(err)
	}
	ids, err := p.readProgress(ctx, pub.cl)
	if err != nil {
		return fail(err)
	}
	p.pub, p.broken = pub, nil
	p.obs.Recovered(len(ids))
	p.umu.Lock()
	clear(p.unmarked)
	for _, id := range ids {
		p.unmarked[id] = struct{}{}
	}
	p.umu.Unlock()
	return ids, nil
}

// progressTopic creates the progress topic when missing (compacted, one partition), and checks
// it has one partition. It creates first and lists only when the topic exists: a metadata request
// for a missing topic makes a broker that creates topics on demand (auto.create.topics.enable)
// create it with its default partition count.
func (p *TxPublisher) progressTopic(ctx context.Context, cl *kgo.Client) error {
	adm := kadm.NewClient(cl)
	topic := p.tx.ProgressTopic
	compact := "compact"
	resp, err := adm.CreateTopic(ctx, 1, -1, map[string]*string{"cleanup.policy": &compact}, topic)
	if err == nil {
		err = resp.Err
	}
	switch {
	case err == nil:
		p.log.Info("created the progress topic of exactly-once delivery", "topic", topic)
		return nil
	case !errors.Is(err, kerr.TopicAlreadyExists) && !errors.Is(err, kerr.TopicAuthorizationFailed) && !errors.Is(err, kerr.ClusterAuthorizationFailed):
		return fmt.Errorf("create kafka.progress_topic %q: %w", topic, err)
	}
	// It exists (or this principal may not create topics: then it must exist).
	details, err := adm.ListTopics(ctx, topic)
	if err != nil {
		return fmt.Errorf("kafka.progress_topic %q: %w", topic, err)
	}
	d, ok := details[topic]
	if !ok || d.Err != nil {
		return fmt.Errorf("kafka.progress_topic %q: cannot create it nor find it (create it: compacted, one partition): %v", topic, d.Err)
	}
	if n := len(d.Partitions); n != 1 {
		return fmt.Errorf("kafka.progress_topic %q has %d partitions: it must have one (the relay reads its outbox's last record there)", topic, n)
	}
	return nil
}

// readProgress returns the ids of the last progress record of the outbox, read at
// read_committed once no transaction is open on the progress topic (its last stable offset is
// its end): an earlier producer's last transaction is then committed or aborted for good.
func (p *TxPublisher) readProgress(ctx context.Context, cl *kgo.Client) ([]int64, error) {
	adm := kadm.NewClient(cl)
	topic := p.tx.ProgressTopic
	ctx, cancel := context.WithTimeout(ctx, 2*p.tx.TransactionTimeout)
	defer cancel()
	var start, end int64
	for {
		ends, err := adm.ListEndOffsets(ctx, topic)
		if err == nil {
			err = ends.Error()
		}
		stable, serr := adm.ListCommittedOffsets(ctx, topic)
		if err == nil && serr == nil {
			serr = stable.Error()
		}
		err = errors.Join(err, serr)
		if err != nil && !errors.Is(err, kerr.UnknownTopicOrPartition) { // just created: retried
			return nil, fmt.Errorf("read the end of kafka.progress_topic %q: %w", topic, err)
		}
		hw, _ := ends.Lookup(topic, 0)
		ls, _ := stable.Lookup(topic, 0)
		if err == nil && ls.Offset >= hw.Offset {
			end = ls.Offset
			break
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("kafka.progress_topic %q: a transaction stays open (last stable offset %d, end %d; %v): %w", topic, ls.Offset, hw.Offset, err, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
	starts, err := adm.ListStartOffsets(ctx, topic)
	if err == nil {
		err = starts.Error()
	}
	if err != nil {
		return nil, fmt.Errorf("read the start of kafka.progress_topic %q: %w", topic, err)
	}
	so, _ := starts.Lookup(topic, 0)
	start = so.Offset
	// The last record is near the end: read a window before it, growing until one is found.
	for window := int64(256); ; window *= 8 {
		from := max(start, end-window)
		rec, err := p.lastRecord(ctx, from, end)
		if err != nil {
			return nil, err
		}
		if rec != nil {
			ids, err := decodeProgress(rec.Value)
			if err != nil {
				return nil, fmt.Errorf("kafka.progress_topic %q, offset %d: %w", topic, rec.Offset, err)
			}
			return ids, nil
		}
		if from == start {
			return nil, nil
		}
	}
}

// lastRecord returns the last committed record of the outbox's identity in [from, end) of the
// progress topic, nil if none.
func (p *TxPublisher) lastRecord(ctx context.Context, from, end int64) (*kgo.Record, error) {
	if from >= end {
		return nil, nil
	}
	opts, err := p.cfg.clientOptsFenced(nil)
	if err != nil {
		return nil, err
	}
	cl, err := kgo.NewClient(append(opts,
		kgo.ConsumePartitions(map[string]map[int32]kgo.Offset{p.tx.ProgressTopic: {0: kgo.NewOffset().At(from)}}),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()),
		// The commit and abort markers are returned too: the offset after the last one read is
		// the end, whatever the last records were.
		kgo.KeepControlRecords())...)
	if err != nil {
		return nil, fmt.Errorf("read kafka.progress_topic: %w", err)
	}
	defer cl.Close()
	var last *kgo.Record
	for next := from; next < end; {
		fetches := cl.PollFetches(ctx)
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("read kafka.progress_topic %q up to offset %d (at %d): %w", p.tx.ProgressTopic, end, next, err)
		}
		var ferr error
		fetches.EachError(func(_ string, _ int32, err error) { ferr = errors.Join(ferr, err) })
		if ferr != nil {
			return nil, fmt.Errorf("read kafka.progress_topic %q: %w", p.tx.ProgressTopic, ferr)
		}
		fetches.EachRecord(func(r *kgo.Record) {
			next = max(next, r.Offset+1)
			if r.Offset < end && !r.Attrs.IsControl() && string(r.Key) == p.tx.Identity {
				last = r
			}
		})
	}
	return last, nil
}

// encodeProgress encodes sorted ids as runs of consecutive ids: a version byte, then for each
// run the gap from the end of the previous one and its length less one, as uvarints.
func encodeProgress(ids []int64) []byte {
	out := []byte{progressVersion}
	prev := int64(0)
	for i := 0; i < len(ids); {
		j := i + 1
		for j < len(ids) && ids[j] == ids[j-1]+1 {
			j++
		}
		out = binary.AppendUvarint(out, uint64(ids[i]-prev))
		out = binary.AppendUvarint(out, uint64(j-i-1))
		prev = ids[j-1]
		i = j
	}
	return out
}

// DecodeProgress decodes the value of a progress record (kafka.progress_topic): the ids of the
// outbox rows committed and not known to be marked when its Kafka transaction committed, that
// transaction's own rows included. For tests and tools that check what each Kafka transaction
// published.
func DecodeProgress(b []byte) ([]int64, error) { return decodeProgress(b) }

// decodeProgress decodes what encodeProgress encoded.
func decodeProgress(b []byte) ([]int64, error) {
	if len(b) == 0 || b[0] != progressVersion {
		return nil, errors.New("progress record of an unknown version")
	}
	b = b[1:]
	var ids []int64
	prev := int64(0)
	for len(b) > 0 {
		gap, n := binary.Uvarint(b)
		if n <= 0 {
			return nil, errors.New("progress record cut short")
		}
		b = b[n:]
		run, n := binary.Uvarint(b)
		if n <= 0 || run > 1<<24 {
			return nil, errors.New("progress record cut short")
		}
		b = b[n:]
		first := prev + int64(gap)
		for k := int64(0); k <= int64(run); k++ {
			ids = append(ids, first+k)
		}
		prev = first + int64(run)
	}
	return ids, nil
}

// Publish implements relay.Sink: m's record joins the open Kafka transaction (begun if none is).
// done is called once the transaction committed or aborted.
func (p *TxPublisher) Publish(ctx context.Context, m *relay.Message, done func(error)) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.pub == nil {
		done(fmt.Errorf("%w: exactly-once delivery: no producer (the term did not recover)", relay.ErrNotLeader))
		return nil
	}
	if p.broken != nil {
		done(fmt.Errorf("%w: %w", relay.ErrNotLeader, p.broken))
		return nil
	}
	pr, ts, err := p.txRecord(m)
	if err != nil {
		return err
	}
	if err := p.pub.pinned(ctx, ts); err != nil {
		p.doom(m, err)
		done(&relay.GroupError{Group: ts.topic + "/partition-count", Err: err})
		return nil
	}
	if err := p.pub.fitsTopic(ctx, ts, &pr.rec); err != nil {
		return err
	}
	if !p.open {
		if err := p.pub.cl.BeginTransaction(); err != nil {
			p.broken = fmt.Errorf("begin a kafka transaction: %w", err)
			done(fmt.Errorf("%w: %w", relay.ErrNotLeader, p.broken))
			return nil
		}
		p.open, p.began = true, time.Now()
	}
	p.handing = true
	rec := &txRecord{id: m.ID, done: done}
	p.pub.report(ts)
	pr.rec.Context, pr.done = ctx, rec.result
	p.pub.fence.set(ctx)
	p.pub.cl.Produce(ctx, &pr.rec, p.pub.promise)
	p.recs = append(p.recs, rec)
	return nil
}

// doom makes the transaction of this hand-over abort instead of commit: row m of it was refused
// or failed at once with err. Called with mu held.
func (p *TxPublisher) doom(m *relay.Message, err error) {
	if p.doomed == nil {
		p.doomed = fmt.Errorf("row %d of the same hand-over was refused: %w", m.ID, err)
	}
}

// BeginBatch implements relay.BatchEnder: no transaction ends until EndBatch. A commit running
// now ends first (its rows' verdicts are given before BeginBatch returns).
func (p *TxPublisher) BeginBatch() {
	p.mu.Lock()
	p.handing = true
	if !p.open {
		p.doomed = nil
	}
	p.mu.Unlock()
}

// EndBatch implements relay.BatchEnder: the open transaction may end now.
func (p *TxPublisher) EndBatch() {
	p.mu.Lock()
	p.handing = false
	p.mu.Unlock()
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// ReleasesMessages implements relay.ReleasingSink: the records refer to the messages' payloads
// until their promises ran, which is before the commit, before done.
func (p *TxPublisher) ReleasesMessages() bool { return true }

// Marked implements relay.MarkNoter: the rows are marked, no progress record needs to name them.
func (p *TxPublisher) Marked(ids []int64) {
	p.umu.Lock()
	for _, id := range ids {
		delete(p.unmarked, id)
	}
	p.umu.Unlock()
}

// loop ends the open transaction when it is due: at the end of a claim's hand-over (kick) or when
// its linger ran out after one.
func (p *TxPublisher) loop() {
	defer close(p.stopped)
	t := time.NewTimer(time.Hour)
	t.Stop()
	for {
		select {
		case <-p.stop:
			return
		case <-p.kick:
		case <-t.C:
		}
		if wait := p.maybeCommit(); wait > 0 {
			t.Reset(wait)
		}
	}
}

// maybeCommit commits the open transaction if it is due, and returns how long until it is
// otherwise (0: nothing to wait for).
func (p *TxPublisher) maybeCommit() time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.open || p.handing || p.streaming {
		return 0
	}
	if p.doomed != nil {
		recs, cause := p.recs, p.doomed
		p.recs, p.open, p.doomed = nil, false, nil
		p.abortDoomed(recs, cause)
		return 0
	}
	if age := time.Since(p.began); p.streamDone == nil && len(p.recs) < p.tx.MaxRows && age < p.tx.Linger {
		return p.tx.Linger - age
	}
	p.commit()
	return 0
}

// commit ends the open transaction: flushes its records, writes the progress record, commits,
// and calls every record's done. Called with mu held.
func (p *TxPublisher) commit() {
	recs := p.recs
	p.recs, p.open = nil, false
	cl := p.pub.cl
	ctx, cancel := context.WithTimeout(context.Background(), p.tx.TransactionTimeout)
	defer cancel()
	// The progress record goes with the rows' records, not after them: the flush waits for all,
	// one round trip instead of two. It names rows whose records may still fail: the
	// transaction then aborts, the progress record with it.
	ids := make([]int64, 0, len(recs)+len(p.streamIDs))
	p.umu.Lock()
	for id := range p.unmarked {
		ids = append(ids, id)
	}
	p.umu.Unlock()
	for _, r := range recs {
		ids = append(ids, r.id)
	}
	ids = append(ids, p.streamIDs...)
	slices.Sort(ids)
	ids = slices.Compact(ids)
	prog := &kgo.Record{Topic: p.tx.ProgressTopic, Key: []byte(p.tx.Identity), Value: encodeProgress(ids)}
	progDone := make(chan error, 1)
	cl.Produce(ctx, prog, func(_ *kgo.Record, err error) { progDone <- err })
	if err := cl.Flush(ctx); err != nil {
		p.abort(recs, fmt.Errorf("flush the kafka transaction: %w", err))
		return
	}
	for _, r := range recs {
		if r.verdict() != nil {
			p.abort(recs, nil)
			return
		}
	}
	if p.streamFailed.Load() {
		p.abortDoomed(recs, errors.New("a record of its stream failed"))
		return
	}
	var progErr error
	select {
	case progErr = <-progDone:
	default: // Flush returns once every promise ran: not expected
		progErr = errors.New("not acknowledged when the flush returned")
	}
	if progErr != nil {
		p.abort(recs, fmt.Errorf("write the progress record to kafka.progress_topic %q: %w", p.tx.ProgressTopic, progErr))
		return
	}
	p.obs.ProgressWritten(len(ids))
	if err := cl.EndTransaction(ctx, kgo.TryCommit); err != nil {
		// The outcome may be unknown: the next term reads it back from the progress topic.
		p.broken = fmt.Errorf("commit the kafka transaction (outcome unknown until the next term reads the progress topic): %w", err)
		_ = cl.EndTransaction(ctx, kgo.TryAbort)
		p.log.Warn("exactly-once: kafka commit failed, ending the term", "rows", len(recs), "err", err)
		p.obs.TxEnded(TxFailed, len(recs)+len(p.streamIDs))
		for _, r := range recs {
			r.done(fmt.Errorf("%w: %w", relay.ErrNotLeader, p.broken))
		}
		p.streamOver(p.broken)
		return
	}
	p.umu.Lock()
	for _, r := range recs {
		p.unmarked[r.id] = struct{}{}
	}
	for _, id := range p.streamIDs {
		p.unmarked[id] = struct{}{}
	}
	p.umu.Unlock()
	p.obs.TxEnded(TxCommitted, len(recs)+len(p.streamIDs))
	for _, r := range recs {
		r.done(nil)
	}
	p.streamOver(nil)
}

// abort aborts the transaction of recs and fails them. With cause nil, a record failed: its
// failure is reported, and the others' as ErrTransactionAborted, all in one group. With a cause
// (the transaction itself failed), every record fails with relay.ErrNotLeader: the term ends.
// Called with mu held.
func (p *TxPublisher) abort(recs []*txRecord, cause error) {
	aerr := p.abortOpen()
	if aerr != nil {
		cause = errors.Join(cause, fmt.Errorf("abort the kafka transaction: %w", aerr))
	}
	if cause != nil {
		p.broken = cause
		p.obs.TxEnded(TxFailed, len(recs))
		p.log.Warn("exactly-once: kafka transaction failed, ending the term", "rows", len(recs), "err", cause)
		for _, r := range recs {
			r.done(fmt.Errorf("%w: %w", relay.ErrNotLeader, cause))
		}
		p.streamOver(cause)
		return
	}
	p.streamOver(errors.New("a record of it failed"))
	p.obs.TxEnded(TxAborted, len(recs))
	const group = "kafka-transaction"
	// The records that failed first, so that one of them counts the group's attempt.
	for _, r := range recs {
		if err := r.verdict(); err != nil {
			r.done(&relay.GroupError{Group: group, Err: err})
		}
	}
	for _, r := range recs {
		if r.verdict() == nil {
			r.done(&relay.GroupError{Group: group, Err: ErrTransactionAborted})
		}
	}
}

// abortDoomed aborts the transaction of recs, doomed by cause, and fails every record with
// relay.ErrSendAgain: none of them is at fault, they are sent again without an attempt counted.
// Called with mu held.
func (p *TxPublisher) abortDoomed(recs []*txRecord, cause error) {
	aerr := p.abortOpen()
	if aerr != nil {
		p.broken = fmt.Errorf("abort the kafka transaction: %w", aerr)
		p.obs.TxEnded(TxFailed, len(recs))
		p.log.Warn("exactly-once: kafka transaction failed, ending the term", "rows", len(recs), "err", p.broken)
		for _, r := range recs {
			r.done(fmt.Errorf("%w: %w", relay.ErrNotLeader, p.broken))
		}
		p.streamOver(p.broken)
		return
	}
	p.streamOver(cause)
	p.obs.TxEnded(TxAborted, len(recs))
	p.log.Debug("exactly-once: kafka transaction aborted, a row of its hand-over was refused", "rows", len(recs), "cause", cause)
	for _, r := range recs {
		r.done(fmt.Errorf("%w: %w", relay.ErrSendAgain, cause))
	}
}

// failOpen aborts the open transaction, if any, and fails its records with cause. Called with mu
// held.
func (p *TxPublisher) failOpen(cause error) {
	if !p.open {
		p.streaming = false
		return
	}
	recs := p.recs
	p.recs, p.open, p.handing, p.doomed = nil, false, false, nil
	ctx, cancel := context.WithTimeout(context.Background(), p.tx.TransactionTimeout)
	defer cancel()
	outcome := TxAborted
	if err := p.pub.cl.AbortBufferedRecords(ctx); err == nil {
		if err := p.pub.cl.EndTransaction(ctx, kgo.TryAbort); err != nil {
			p.broken = fmt.Errorf("abort the kafka transaction: %w", err)
			outcome = TxFailed
		}
	}
	p.obs.TxEnded(outcome, len(recs))
	for _, r := range recs {
		r.done(cause)
	}
	p.streamOver(cause)
}

// Abort implements relay.Sink: the open transaction is aborted, and its records fail.
func (p *TxPublisher) Abort(context.Context) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.failOpen(fmt.Errorf("%w: the term ended", ErrTransactionAborted))
	return nil
}

// Ping checks that a broker answers a metadata request.
func (p *TxPublisher) Ping(ctx context.Context) error {
	p.mu.Lock()
	pub := p.pub
	p.mu.Unlock()
	if pub == nil {
		opts, err := p.cfg.clientOptsFenced(nil)
		if err != nil {
			return err
		}
		cl, err := kgo.NewClient(opts...)
		if err != nil {
			return err
		}
		defer cl.Close()
		return cl.Ping(ctx)
	}
	return pub.Ping(ctx)
}

// Close aborts what is open and closes the producer.
func (p *TxPublisher) Close() {
	p.closeOnce.Do(func() {
		close(p.stop)
		<-p.stopped
		p.mu.Lock()
		defer p.mu.Unlock()
		p.failOpen(fmt.Errorf("%w: the relay stopped", ErrTransactionAborted))
		if p.pub != nil {
			p.pub.Close()
			p.pub = nil
		}
	})
}

// txRecord builds m's record with its transaction in the tx-id header. A row whose own headers
// set tx-id is refused (relay.ErrInvalidMessage): the relay alone sets it in this mode. On an
// error the open transaction is doomed.
func (p *TxPublisher) txRecord(m *relay.Message) (*produced, *topicState, error) {
	var extra []kgo.RecordHeader
	if m.TxID != 0 {
		extra = []kgo.RecordHeader{{Key: HeaderTxID, Value: strconv.AppendInt(nil, m.TxID, 10)}}
	}
	pr, ts, err := p.pub.record(m, extra...)
	if err != nil {
		p.doom(m, err)
		return nil, nil, err
	}
	for _, h := range pr.rec.Headers[:len(pr.rec.Headers)-len(extra)] {
		if h.Key == HeaderTxID {
			err := fmt.Errorf("%w: header %q is reserved: with kafka.delivery=exactly_once the relay sets it to the row's transaction", relay.ErrInvalidMessage, h.Key)
			p.doom(m, err)
			return nil, nil, err
		}
	}
	return pr, ts, nil
}

// abortOpen drops the records still buffered and aborts the open Kafka transaction, within
// kafka.transaction_timeout. Called with mu held.
func (p *TxPublisher) abortOpen() error {
	ctx, cancel := context.WithTimeout(context.Background(), p.tx.TransactionTimeout)
	defer cancel()
	if err := p.pub.cl.AbortBufferedRecords(ctx); err != nil {
		return err
	}
	return p.pub.cl.EndTransaction(ctx, kgo.TryAbort)
}
