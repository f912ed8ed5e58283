// Package oracle proves the relay's promises in fault tests: a Loader writes events from
// concurrent transactions and records which committed and which rolled back, and Check reads
// every topic back from offset 0 and reports lost events, phantoms, duplicates, reorders and
// records without the event-id header.
//
// Each event carries its key and a sequence number per key in its payload. The sequence is taken
// from a per-key row locked in the event's own transaction, so for one key it follows commit
// order. When a COMMIT's outcome is unknown (the connection dropped during it), the loader asks
// the database afterwards: every transaction also writes its event ids to a ledger table.
package oracle

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/domain"
)

// Outcome is what became of an event's transaction.
type Outcome int

// Outcomes of a transaction.
const (
	// Unknown: the COMMIT was sent but its answer was lost; Resolve asks the database.
	Unknown Outcome = iota
	// Committed: the event must be published.
	Committed
	// RolledBack: the event must never be published.
	RolledBack
)

// Event is one event the loader wrote.
type Event struct {
	ID    string
	Key   string
	Topic string
	Seq   int
	// Tx names the loader's database transaction that wrote the event (its first event's id).
	Tx string
	// RowID is the event's outbox id, with Config.RowIDs (0 otherwise).
	RowID int64
}

// Payload is the JSON value of every event the loader writes.
type Payload struct {
	Key string `json:"key"`
	Seq int    `json:"seq"`
	Pad string `json:"pad,omitempty"`
}

// Config configures a Loader. Zero fields take their defaults.
type Config struct {
	// Topics receive the events, spread by key (a key always goes to the same topic). Required.
	Topics []string
	// Keys is the number of distinct keys. Default 16.
	Keys int
	// Workers is the number of concurrent writing transactions. Default 4.
	Workers int
	// EventsPerTx is how many events of each of its keys each transaction writes. Default 1.
	EventsPerTx int
	// KeysPerTx is how many distinct keys each transaction writes events of (interleaved, so the
	// transaction spans several partitions and topics). Default 1.
	KeysPerTx int
	// RowIDs records each event's outbox id (Event.RowID), read back in its transaction, for
	// Options.ProgressTopic. Default false.
	RowIDs bool
	// RollbackRatio is the share of transactions rolled back on purpose. Default 0.
	RollbackRatio float64
	// FailCommitRatio is the share of transactions whose COMMIT fails (a deferred unique
	// constraint is violated), so the events were inserted but never committed. Default 0.
	FailCommitRatio float64
	// PayloadBytes pads each payload to about this size. Default 0 (small payloads).
	PayloadBytes int
	// ClockSkew skews each event's occurred_at at random by up to ± this. Default 0.
	ClockSkew time.Duration
	// AggregateType of the events. Default "order".
	AggregateType string
}

// Loader writes events into an outbox and records their fate.
type Loader struct {
	pool                   *pgxpool.Pool
	table                  postgres.Table
	writer                 *postgres.Writer // nil for a mapped table: append writes it with plain SQL
	insert                 string           // append's statement for a mapped table
	cfg                    Config
	keys, ledger, deferred string

	mu       sync.Mutex
	topicOf  map[string]string // per-key topic overrides
	events   map[string]Event
	outcome  map[string]Outcome
	failures int
}

// New creates the loader's tables (per-key sequences, ledger) in the outbox's schema and returns
// a Loader.
func New(ctx context.Context, pool *pgxpool.Pool, table postgres.Table, cfg Config) (*Loader, error) {
	if len(cfg.Topics) == 0 {
		return nil, errors.New("oracle: at least one topic is required")
	}
	if cfg.Keys == 0 {
		cfg.Keys = 16
	}
	if cfg.Workers == 0 {
		cfg.Workers = 4
	}
	if cfg.EventsPerTx == 0 {
		cfg.EventsPerTx = 1
	}
	if cfg.KeysPerTx == 0 {
		cfg.KeysPerTx = 1
	}
	if cfg.AggregateType == "" {
		cfg.AggregateType = "order"
	}
	table = table.WithDefaults()
	var w *postgres.Writer
	insert := ""
	if table.Mapped() {
		// An adopted table (Debezium's, or one with renamed columns) is written as its own
		// writers write it: an INSERT of its columns. Events then go to the topic the relay's
		// template makes of the aggregate type, unless the table has a topic column.
		insert = mappedInsert(table)
	} else {
		var err error
		if w, err = postgres.NewWriter(table); err != nil {
			return nil, err
		}
	}
	l := &Loader{pool: pool, table: table, writer: w, insert: insert, cfg: cfg,
		keys:     pgx.Identifier{table.Schema, "oracle_keys"}.Sanitize(),
		ledger:   pgx.Identifier{table.Schema, "oracle_ledger"}.Sanitize(),
		deferred: pgx.Identifier{table.Schema, "oracle_deferred"}.Sanitize(),
		events:   make(map[string]Event), outcome: make(map[string]Outcome), topicOf: make(map[string]string)}
	ddl := `CREATE TABLE IF NOT EXISTS ` + l.keys + ` (key text PRIMARY KEY, seq int NOT NULL DEFAULT 0);
		CREATE TABLE IF NOT EXISTS ` + l.ledger + ` (event_id uuid PRIMARY KEY);
		CREATE TABLE IF NOT EXISTS ` + l.deferred + ` (v int UNIQUE DEFERRABLE INITIALLY DEFERRED);`
	if _, err := pool.Exec(ctx, ddl); err != nil {
		return nil, fmt.Errorf("oracle: create tables: %w", err)
	}
	if _, err := pool.Exec(ctx, `INSERT INTO `+l.keys+` (key) SELECT format('k%s', lpad(g::text, 4, '0'))
		FROM generate_series(0, $1 - 1) g ON CONFLICT DO NOTHING`, cfg.Keys); err != nil {
		return nil, fmt.Errorf("oracle: create keys: %w", err)
	}
	return l, nil
}

// Key returns the name of key number i.
func Key(i int) string { return fmt.Sprintf("k%04d", i) }

// SetTopic sends the events of key to topic from now on, and adds topic to the topics Check
// reads.
func (l *Loader) SetTopic(key, topic string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.topicOf[key] = topic
}

// TopicOf returns the topic of key.
func (l *Loader) TopicOf(key string) string {
	l.mu.Lock()
	t, ok := l.topicOf[key]
	l.mu.Unlock()
	if ok {
		return t
	}
	h := 0
	for _, c := range key {
		h = h*31 + int(c)
	}
	if h < 0 {
		h = -h
	}
	return l.cfg.Topics[h%len(l.cfg.Topics)]
}

// Topics returns the topics the loader writes to.
func (l *Loader) Topics() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := append([]string(nil), l.cfg.Topics...)
	for _, t := range l.topicOf {
		if !slices.Contains(out, t) {
			out = append(out, t)
		}
	}
	return out
}

// Run writes txs transactions with the configured number of workers, and returns when they are
// written or ctx ends. Transactions that fail (the database is down, the connection was cut) are
// recorded as rolled back, or as unknown when the COMMIT itself failed, and the workers go on.
func (l *Loader) Run(ctx context.Context, txs int) {
	var wg sync.WaitGroup
	jobs := make(chan struct{})
	for range l.cfg.Workers {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64()))
			for range jobs {
				if err := l.one(ctx, rng); err != nil {
					l.mu.Lock()
					l.failures++
					l.mu.Unlock()
					select { // the database may be down: do not spin
					case <-ctx.Done():
					case <-time.After(20 * time.Millisecond):
					}
				}
			}
		})
	}
	for i := 0; i < txs; i++ {
		select {
		case jobs <- struct{}{}:
		case <-ctx.Done():
			i = txs
		}
	}
	close(jobs)
	wg.Wait()
}

// Go runs the loader in the background until the returned stop function is called; stop waits
// for the transactions under way.
func (l *Loader) Go(ctx context.Context) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		l.Run(ctx, 1<<62)
	}()
	return func() {
		cancel()
		<-done
	}
}

func (l *Loader) one(ctx context.Context, rng *rand.Rand) error {
	keys := make([]string, 0, l.cfg.KeysPerTx)
	for len(keys) < min(l.cfg.KeysPerTx, l.cfg.Keys) {
		if key := Key(rng.IntN(l.cfg.Keys)); !slices.Contains(keys, key) {
			keys = append(keys, key)
		}
	}
	r := rng.Float64()
	rollback := r < l.cfg.RollbackRatio
	failCommit := !rollback && r < l.cfg.RollbackRatio+l.cfg.FailCommitRatio
	p, err := l.begin(ctx, keys, l.cfg.EventsPerTx, l.cfg.PayloadBytes, rng)
	if err != nil {
		return err
	}
	if failCommit {
		if _, err := p.tx.Exec(ctx, `INSERT INTO `+l.deferred+` (v) VALUES (1), (1)`); err != nil {
			p.Rollback(ctx)
			return err
		}
	}
	if rollback {
		p.Rollback(ctx)
		return nil
	}
	err = p.Commit(ctx)
	if failCommit {
		return nil // expected to fail
	}
	return err
}

// Pending is a transaction that wrote events and is not finished yet.
type Pending struct {
	l      *Loader
	tx     pgx.Tx
	Events []Event
}

// Begin opens a transaction that writes n events of key, and leaves it open: the key's row stays
// locked until Commit or Rollback. key may be any name, not only one of the loader's keys.
func (l *Loader) Begin(ctx context.Context, key string, n int) (*Pending, error) {
	return l.BeginPadded(ctx, key, n, l.cfg.PayloadBytes)
}

// BeginPadded is Begin with payloads padded to about pad bytes.
func (l *Loader) BeginPadded(ctx context.Context, key string, n, pad int) (*Pending, error) {
	return l.begin(ctx, []string{key}, n, pad, rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64())))
}

// Write writes n events of key in one transaction and commits it.
func (l *Loader) Write(ctx context.Context, key string, n int) error {
	p, err := l.Begin(ctx, key, n)
	if err != nil {
		return err
	}
	return p.Commit(ctx)
}

func (l *Loader) begin(ctx context.Context, keys []string, n, pad int, rng *rand.Rand) (*Pending, error) {
	tx, err := l.pool.Begin(ctx)
	if err != nil {
		return nil, err
	}
	p := &Pending{l: l, tx: tx}
	// The keys' rows are locked in one order, so that writers of several keys never deadlock.
	sorted := slices.Sorted(slices.Values(keys))
	last := make(map[string]int, len(keys))
	for _, key := range slices.Compact(sorted) {
		var seq int
		if err := tx.QueryRow(ctx, `INSERT INTO `+l.keys+` AS k (key, seq) VALUES ($1, $2)
			ON CONFLICT (key) DO UPDATE SET seq = k.seq + excluded.seq RETURNING seq`, key, n).Scan(&seq); err != nil {
			p.Rollback(ctx)
			return nil, err
		}
		last[key] = seq
	}
	// The events of the keys interleave: the first of each key, then the second of each...
	msgs := make([]postgres.Message, 0, n*len(keys))
	ids := make([]string, 0, n*len(keys))
	for i := range n {
		for _, key := range keys {
			topic := l.TopicOf(key)
			ev := Event{ID: domain.NewID(), Key: key, Topic: topic, Seq: last[key] - n + 1 + i}
			ids = append(ids, ev.ID)
			ev.Tx = ids[0]
			p.Events = append(p.Events, ev)
			payload, _ := json.Marshal(Payload{Key: key, Seq: ev.Seq, Pad: strings.Repeat("x", pad)})
			occurred := time.Now()
			if l.cfg.ClockSkew > 0 {
				occurred = occurred.Add(time.Duration((rng.Float64()*2 - 1) * float64(l.cfg.ClockSkew)))
			}
			msgs = append(msgs, postgres.Message{AggregateType: l.cfg.AggregateType, AggregateID: key, EventType: "OracleEvent",
				Payload: payload, Topic: topic, EventID: ev.ID, OccurredAt: occurred})
		}
	}
	// The events are known from here on: if anything below fails they are rolled back.
	l.record(p.Events, RolledBack)
	if err := l.append(ctx, tx, msgs); err != nil {
		p.Rollback(ctx)
		return nil, err
	}
	if _, err := tx.Exec(ctx, `INSERT INTO `+l.ledger+` SELECT unnest($1::uuid[])`, ids); err != nil {
		p.Rollback(ctx)
		return nil, err
	}
	if l.cfg.RowIDs {
		if err := p.rowIDs(ctx, ids); err != nil {
			p.Rollback(ctx)
			return nil, err
		}
	}
	return p, nil
}

// rowIDs reads the outbox ids of the events ids into p.Events: the rows the transaction wrote.
func (p *Pending) rowIDs(ctx context.Context, ids []string) error {
	rows, err := p.tx.Query(ctx, `SELECT id, event_id::text FROM `+pgx.Identifier{p.l.table.Schema, p.l.table.Name}.Sanitize()+
		` WHERE tx = pg_current_xact_id() AND dispatched_at IS NULL`) // the tx column's index (003_tx.sql)
	if err != nil {
		return err
	}
	byEvent := make(map[string]int64, len(ids))
	for rows.Next() {
		var id int64
		var ev string
		if err := rows.Scan(&id, &ev); err != nil {
			rows.Close()
			return err
		}
		byEvent[ev] = id
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return err
	}
	for i := range p.Events {
		p.Events[i].RowID = byEvent[p.Events[i].ID]
	}
	return nil
}

// BeginKeys opens a transaction that writes n events of each of keys, interleaved (the first
// event of each key, then the second...), and leaves it open. Its events span the keys' topics
// and partitions: Check's all-or-none test covers them together.
func (l *Loader) BeginKeys(ctx context.Context, keys []string, n int) (*Pending, error) {
	return l.begin(ctx, keys, n, l.cfg.PayloadBytes, rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64())))
}

// AppendRaw writes msgs in p's transaction, as they are: they are not the oracle's events (no
// sequence, never expected on a topic), such as a poison row the relay must park.
func (p *Pending) AppendRaw(ctx context.Context, msgs ...postgres.Message) error {
	return p.l.writer.Append(ctx, p.tx, msgs...)
}

// Commit commits the transaction. When the COMMIT fails its outcome is recorded as unknown, to be
// resolved by Resolve.
func (p *Pending) Commit(ctx context.Context) error {
	if err := p.tx.Commit(ctx); err != nil {
		p.l.record(p.Events, Unknown)
		return fmt.Errorf("commit: %w", err)
	}
	p.l.record(p.Events, Committed)
	return nil
}

// Rollback rolls the transaction back.
func (p *Pending) Rollback(ctx context.Context) {
	_ = p.tx.Rollback(context.WithoutCancel(ctx))
	p.l.record(p.Events, RolledBack)
}

func (l *Loader) record(evs []Event, o Outcome) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, ev := range evs {
		l.events[ev.ID] = ev
		l.outcome[ev.ID] = o
	}
}

// Bulk writes n committed events with few, large transactions (a backlog), spread over the keys.
func (l *Loader) Bulk(ctx context.Context, n, perTx int) error {
	for n > 0 {
		size := min(n, perTx)
		if err := l.bulkTx(ctx, size); err != nil {
			return err
		}
		n -= size
	}
	return nil
}

func (l *Loader) bulkTx(ctx context.Context, n int) error {
	tx, err := l.pool.Begin(ctx)
	if err != nil {
		return err
	}
	defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()
	perKey := make([]int, l.cfg.Keys)
	for i := range n {
		perKey[i%l.cfg.Keys]++
	}
	var evs []Event
	var msgs []postgres.Message
	var ids []string
	for k, cnt := range perKey {
		if cnt == 0 {
			continue
		}
		key := Key(k)
		var last int
		if err := tx.QueryRow(ctx, `UPDATE `+l.keys+` SET seq = seq + $2 WHERE key = $1 RETURNING seq`, key, cnt).Scan(&last); err != nil {
			return err
		}
		topic := l.TopicOf(key)
		for i := range cnt {
			ev := Event{ID: domain.NewID(), Key: key, Topic: topic, Seq: last - cnt + 1 + i}
			if len(evs) > 0 {
				ev.Tx = evs[0].ID
			} else {
				ev.Tx = ev.ID
			}
			evs = append(evs, ev)
			ids = append(ids, ev.ID)
			payload, _ := json.Marshal(Payload{Key: key, Seq: ev.Seq, Pad: strings.Repeat("x", l.cfg.PayloadBytes)})
			msgs = append(msgs, postgres.Message{AggregateType: l.cfg.AggregateType, AggregateID: key,
				EventType: "OracleEvent", Payload: payload, Topic: topic, EventID: ev.ID})
		}
	}
	if err := l.append(ctx, tx, msgs); err != nil {
		l.record(evs, RolledBack)
		return err
	}
	if l.cfg.RowIDs { // as Pending.rowIDs: the rows this transaction wrote
		p := &Pending{l: l, tx: tx, Events: evs}
		if err := p.rowIDs(ctx, ids); err != nil {
			return err
		}
	}
	l.record(evs, RolledBack)
	if _, err := tx.Exec(ctx, `INSERT INTO `+l.ledger+` SELECT unnest($1::uuid[])`, ids); err != nil {
		return err
	}
	if err := tx.Commit(ctx); err != nil {
		l.record(evs, Unknown)
		return err
	}
	l.record(evs, Committed)
	return nil
}

// Resolve asks the database about every transaction whose outcome is unknown: an event whose id is
// in the ledger committed. It retries until the database answers or ctx ends, and returns how many
// events it resolved.
func (l *Loader) Resolve(ctx context.Context) (int, error) {
	l.mu.Lock()
	var ids []string
	for id, o := range l.outcome {
		if o == Unknown {
			ids = append(ids, id)
		}
	}
	l.mu.Unlock()
	if len(ids) == 0 {
		return 0, nil
	}
	for {
		found := map[string]bool{}
		rows, err := l.pool.Query(ctx, `SELECT event_id::text FROM `+l.ledger+` WHERE event_id = ANY($1::uuid[])`, ids)
		if err == nil {
			var id string
			_, err = pgx.ForEachRow(rows, []any{&id}, func() error { found[id] = true; return nil })
		}
		if err == nil {
			l.mu.Lock()
			for _, id := range ids {
				if found[id] {
					l.outcome[id] = Committed
				} else {
					l.outcome[id] = RolledBack
				}
			}
			l.mu.Unlock()
			return len(ids), nil
		}
		select {
		case <-ctx.Done():
			return 0, fmt.Errorf("resolve unknown commits: %w", err)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// Counts returns how many events committed, rolled back, are still unknown, and how many
// transactions failed.
func (l *Loader) Counts() (committed, rolledBack, unknown, failures int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, o := range l.outcome {
		switch o {
		case Committed:
			committed++
		case RolledBack:
			rolledBack++
		default:
			unknown++
		}
	}
	return committed, rolledBack, unknown, l.failures
}

// snapshot returns every event and its outcome.
func (l *Loader) snapshot() (map[string]Event, map[string]Outcome) {
	l.mu.Lock()
	defer l.mu.Unlock()
	evs := make(map[string]Event, len(l.events))
	outs := make(map[string]Outcome, len(l.outcome))
	for id, ev := range l.events {
		evs[id] = ev
		outs[id] = l.outcome[id]
	}
	return evs, outs
}

// mappedInsert is the INSERT of one event into a mapped table: its event id, aggregate type,
// key, event type and payload columns, and its topic and occurred-at columns when it has them
// ($6 and $7, in that order after the others).
func mappedInsert(t postgres.Table) string {
	c := t.Columns
	cols := []string{c.EventID, c.AggregateType, c.Key, c.EventType, c.Payload}
	for _, opt := range []string{c.Topic, c.OccurredAt} {
		if opt != postgres.Absent {
			cols = append(cols, opt)
		}
	}
	vals := make([]string, len(cols))
	for i, col := range cols {
		cols[i] = pgx.Identifier{col}.Sanitize()
		vals[i] = fmt.Sprintf("$%d", i+1)
	}
	return `INSERT INTO ` + pgx.Identifier{t.Schema, t.Name}.Sanitize() + ` (` + strings.Join(cols, ", ") +
		`) VALUES (` + strings.Join(vals, ", ") + `)`
}

// append writes msgs in tx: with the relay's writer, or the mapped table's INSERT.
func (l *Loader) append(ctx context.Context, tx pgx.Tx, msgs []postgres.Message) error {
	if l.writer != nil {
		return l.writer.Append(ctx, tx, msgs...)
	}
	c := l.table.Columns
	for _, m := range msgs {
		args := []any{m.EventID, m.AggregateType, m.AggregateID, m.EventType, m.Payload}
		if c.Topic != postgres.Absent {
			args = append(args, m.Topic)
		}
		if c.OccurredAt != postgres.Absent {
			args = append(args, m.OccurredAt)
		}
		if _, err := tx.Exec(ctx, l.insert, args...); err != nil {
			return fmt.Errorf("oracle: insert into %s: %w", l.table, err)
		}
	}
	return nil
}
