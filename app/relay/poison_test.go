package relay_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/outbox-relay/outbox-relay/adapters/kafka"
	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/internal/dbtest"
	"github.com/outbox-relay/outbox-relay/internal/kafkatest"
	"github.com/outbox-relay/outbox-relay/internal/logbuf"
)

// poisonEnv is one relay on its own schema and topic.
type poisonEnv struct {
	pool   *pgxpool.Pool
	table  postgres.Table
	broker *kafkatest.Broker
	topic  string
	obs    *parkCounter
	logs   *logbuf.Buffer
	pub    *kafka.Publisher
}

// parkCounter is a Observer counting parked rows, as the metric does, and failed publishes.
type parkCounter struct {
	relay.NopObserver
	mu     sync.Mutex
	n      int
	failed atomic.Int64
}

func (c *parkCounter) Failed(*relay.Message, error) { c.failed.Add(1) }

func (c *parkCounter) Parked(*relay.Message, string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.n++
}

func (c *parkCounter) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n
}

func setupPoison(t *testing.T, partitions int32) *poisonEnv {
	t.Helper()
	pool, table := integrationSchema(t)
	b := kafkatest.Start(t)
	return &poisonEnv{pool: pool, table: table, broker: b, topic: b.Topic(t, "poison", partitions)}
}

// row is an outbox row as a writer could insert it; nil pointers are NULL.
type row struct {
	aggType string
	key     *string
	payload []byte
	topic   *string
	headers *string
}

func str(s string) *string { return &s }

// insert writes rows in one transaction, in order, and returns their ids.
func (e *poisonEnv) insert(t *testing.T, rows ...row) []int64 {
	t.Helper()
	ctx := context.Background()
	tx, err := e.pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = tx.Rollback(ctx) }()
	ids := make([]int64, len(rows))
	for i, r := range rows {
		if r.aggType == "" {
			r.aggType = "order"
		}
		err := tx.QueryRow(ctx, `INSERT INTO `+pgx.Identifier{e.table.Schema, e.table.Name}.Sanitize()+`
			(aggregate_type, aggregate_id, event_type, payload, topic, headers)
			VALUES ($1, $2, 'OrderPlaced', $3, $4, $5::jsonb) RETURNING id`,
			r.aggType, r.key, r.payload, r.topic, r.headers).Scan(&ids[i])
		if err != nil {
			t.Fatalf("insert row %d: %v", i, err)
		}
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	return ids
}

// run starts a relay on e and stops it when t ends.
func (e *poisonEnv) run(t *testing.T, rc relay.Config, kc kafka.Config, mark string) {
	t.Helper()
	conn, err := postgres.ParseURL(dbtest.URL())
	if err != nil {
		t.Fatal(err)
	}
	store, err := postgres.NewStore(conn, postgres.StoreConfig{Table: e.table, Mark: mark})
	if err != nil {
		t.Fatal(err)
	}
	kc.Brokers = e.broker.Addrs
	kc.TopicTemplate = e.topic
	e.obs, e.logs = &parkCounter{}, &logbuf.Buffer{}
	log := slog.New(slog.NewJSONHandler(e.logs, nil))
	kc.Log = log
	pub, err := kafka.NewPublisher(kc)
	if err != nil {
		t.Fatal(err)
	}
	if rc.PollInterval == 0 {
		rc.PollInterval = 50 * time.Millisecond
	}
	rc.LeaderRetryInterval = 50 * time.Millisecond
	e.pub = pub
	relay, err := relay.New(rc, store, pub, e.obs, log)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() {
		if err := relay.Run(ctx); err != nil {
			t.Errorf("relay: %v", err)
		}
	})
	t.Cleanup(func() {
		cancel()
		wg.Wait()
		pub.Close()
	})
}

// parkedRow is a row of the parked table.
type parkedRow struct {
	attempts int
	reason   string
}

func (e *poisonEnv) parked(t *testing.T) map[int64]parkedRow {
	t.Helper()
	rows, err := e.pool.Query(context.Background(), `SELECT id, attempts, reason FROM `+
		pgx.Identifier{e.table.Schema, e.table.Name + "_parked"}.Sanitize())
	if err != nil {
		t.Fatal(err)
	}
	out := map[int64]parkedRow{}
	var id int64
	var p parkedRow
	if _, err := pgx.ForEachRow(rows, []any{&id, &p.attempts, &p.reason}, func() error {
		out[id] = p
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return out
}

// pending returns the ids of the outbox rows not published yet, and the attempts of every row.
// outboxEventually reads the outbox until its pending rows print as want, or 60 s passed: a row is
// marked a moment after the broker acknowledged it, so after a consumer may already read it.
func (e *poisonEnv) outboxEventually(t *testing.T, want string) (pending []int64, attempts map[int64]int) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		pending, attempts = e.outbox(t)
		if fmt.Sprint(pending) == want || time.Now().After(deadline) {
			return pending, attempts
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (e *poisonEnv) outbox(t *testing.T) (pending []int64, attempts map[int64]int) {
	t.Helper()
	rows, err := e.pool.Query(context.Background(), `SELECT id, attempts, dispatched_at IS NULL FROM `+
		pgx.Identifier{e.table.Schema, e.table.Name}.Sanitize()+` ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	attempts = map[int64]int{}
	var id int64
	var n int
	var isPending bool
	if _, err := pgx.ForEachRow(rows, []any{&id, &n, &isPending}, func() error {
		attempts[id] = n
		if isPending {
			pending = append(pending, id)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return pending, attempts
}

// waitParked polls until n rows are parked.
func (e *poisonEnv) waitParked(t *testing.T, n int) map[int64]parkedRow {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		p := e.parked(t)
		if len(p) >= n {
			return p
		}
		if time.Now().After(deadline) {
			t.Fatalf("parked rows: got %d, want %d: %v", len(p), n, p)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// keys returns the keys of the records of e's topic, reading until want arrived.
func (e *poisonEnv) keys(t *testing.T, want int) []string {
	t.Helper()
	var out []string
	for _, r := range e.broker.ReadAll(t, e.topic, want, time.Minute) {
		out = append(out, string(r.Key))
	}
	return out
}

// TestRelayParksInvalidRowsAtOnce: rows that can never be published are parked at the first
// attempt with a reason that says what is wrong, their keys' later rows wait (order_policy
// wait), and other keys keep flowing.
func TestRelayParksInvalidRowsAtOnce(t *testing.T) {
	t.Parallel()
	e := setupPoison(t, 3)
	cases := []struct {
		name   string
		bad    row
		later  bool // the key can have a later, valid row
		reason string
	}{
		{"invalid topic", row{key: str("k-topic"), payload: []byte("x"), topic: str("bad topic!")}, true, `topic "bad topic!" is not a valid Kafka topic name`},
		{"topic too long", row{key: str("k-long"), payload: []byte("x"), topic: str(strings.Repeat("t", 250))}, true, "is not a valid Kafka topic name"},
		{"NULL key", row{aggType: "nullkey", payload: []byte("x")}, false, "aggregate_id is NULL"},
		{"empty key", row{aggType: "emptykey", key: str(""), payload: []byte("x")}, false, "aggregate_id is empty"},
		{"oversized", row{key: str("k-big"), payload: bytes.Repeat([]byte("b"), 3000)}, true, "exceeds kafka.max_record_bytes (2048)"},
		{"oversized headers", row{key: str("k-bighdr"), payload: []byte("x"), headers: str(`{"trace": "` + strings.Repeat("h", 3000) + `"}`)}, true, "exceeds kafka.max_record_bytes (2048)"},
		{"NULL payload", row{key: str("k-null")}, true, "payload is NULL and tombstones are disabled"},
		{"headers not an object", row{key: str("k-hdr"), payload: []byte("x"), headers: str(`[1, 2]`)}, true, "headers is not a JSON object"},
		{"header not a string", row{key: str("k-hdr2"), payload: []byte("x"), headers: str(`{"n": 1}`)}, true, `header "n" is not a string`},
	}
	var rows []row
	for _, c := range cases {
		rows = append(rows, c.bad, row{key: str("good-" + c.name), payload: []byte("ok")})
		if c.later {
			rows = append(rows, row{key: c.bad.key, payload: []byte("later")})
		}
	}
	ids := e.insert(t, rows...)
	e.run(t, relay.Config{MaxAttempts: 5}, kafka.Config{MaxRecordBytes: 2048}, postgres.MarkDelete)

	parked := e.waitParked(t, len(cases))
	i := 0
	var laterIDs []int64
	for _, c := range cases {
		p, ok := parked[ids[i]]
		switch {
		case !ok:
			t.Errorf("%s: row %d not parked; parked: %v", c.name, ids[i], parked)
		case p.attempts != 1:
			t.Errorf("%s: parked after %d attempts, want 1 (at once)", c.name, p.attempts)
		case !strings.Contains(p.reason, c.reason):
			t.Errorf("%s: reason %q, want it to contain %q", c.name, p.reason, c.reason)
		}
		i += 2
		if c.later {
			laterIDs = append(laterIDs, ids[i])
			i++
		}
	}
	if len(parked) != len(cases) {
		t.Errorf("parked %d rows, want %d: %v", len(parked), len(cases), parked)
	}
	// One metric increment and one log line per parked row. Both come right after the park's
	// commit, which waitParked may have seen first: wait for them (on a loaded machine "right
	// after" can be seconds).
	parkLines := func() int { return strings.Count(e.logs.String(), `"msg":"row parked"`) }
	for deadline := time.Now().Add(60 * time.Second); e.obs.count() < len(cases) || parkLines() < len(cases); {
		if time.Now().After(deadline) {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	if n := e.obs.count(); n != len(cases) {
		t.Errorf("observer told of %d parked rows, want %d", n, len(cases))
	}
	if n := parkLines(); n != len(cases) {
		t.Errorf("%d 'row parked' log lines, want %d", n, len(cases))
	}
	// Other keys keep flowing; a sentinel written last proves the relay went past the held rows.
	e.insert(t, row{key: str("sentinel"), payload: []byte("ok")})
	got := e.keys(t, len(cases)+1)
	want := map[string]bool{"sentinel": true}
	for _, c := range cases {
		want["good-"+c.name] = true
	}
	seen := map[string]bool{}
	for _, k := range got {
		switch {
		case seen[k]:
			t.Errorf("record with key %q published twice", k)
		case !want[k]:
			t.Errorf("record with key %q published; only valid rows of unblocked keys may be", k)
		}
		seen[k] = true
		delete(want, k)
	}
	if len(want) > 0 {
		t.Errorf("valid rows of other keys not published: %v", want)
	}
	pending, _ := e.outboxEventually(t, fmt.Sprint(laterIDs))
	if fmt.Sprint(pending) != fmt.Sprint(laterIDs) {
		t.Errorf("pending rows %v, want the parked keys' later rows %v waiting (order_policy wait)", pending, laterIDs)
	}
}

// TestRelayOrderPolicySkip: with order_policy skip, a parked row's key goes on without it.
func TestRelayOrderPolicySkip(t *testing.T) {
	t.Parallel()
	e := setupPoison(t, 1)
	ids := e.insert(t,
		row{key: str("k"), payload: []byte("bad"), topic: str("no/slashes")},
		row{key: str("k"), payload: []byte("after")},
		row{key: str("other"), payload: []byte("other")},
	)
	e.run(t, relay.Config{OrderPolicy: relay.OrderPolicySkip}, kafka.Config{}, postgres.MarkDelete)
	parked := e.waitParked(t, 1)
	if _, ok := parked[ids[0]]; !ok {
		t.Fatalf("row %d not parked: %v", ids[0], parked)
	}
	recs := e.broker.ReadAll(t, e.topic, 2, time.Minute)
	var got []string
	for _, r := range recs {
		got = append(got, string(r.Key)+"="+string(r.Value))
	}
	if fmt.Sprint(got) != "[k=after other=other]" {
		t.Errorf("records %v, want [k=after other=other]", got)
	}
}

// TestRelayTombstones: with kafka.tombstones a NULL payload is published as a record with a null
// value instead of being parked.
func TestRelayTombstones(t *testing.T) {
	t.Parallel()
	e := setupPoison(t, 1)
	e.insert(t, row{key: str("deleted")}, row{key: str("deleted"), payload: []byte{}})
	e.run(t, relay.Config{}, kafka.Config{Tombstones: true}, postgres.MarkDelete)
	recs := e.broker.ReadAll(t, e.topic, 2, time.Minute)
	if len(recs) != 2 {
		t.Fatalf("got %d records, want 2", len(recs))
	}
	if recs[0].Value != nil {
		t.Errorf("NULL payload published as %q, want a tombstone (null value)", recs[0].Value)
	}
	if recs[1].Value == nil {
		t.Errorf("empty payload published as a tombstone, want an empty value")
	}
	if p := e.parked(t); len(p) != 0 {
		t.Errorf("parked rows %v, want none", p)
	}
}

// rejectProduce makes the fake broker reject, with code, every produce to a partition whose records
// contain marker; the other partitions of such a request get a retriable error and are sent again.
// It returns a function that stops the rejections: the broker's configuration is fixed.
func rejectProduce(c *kfake.Cluster, marker []byte, code int16) (fix func()) {
	var fixed atomic.Bool
	c.ControlKey(int16(kmsg.Produce), func(kr kmsg.Request) (kmsg.Response, error, bool) {
		if fixed.Load() {
			c.DropControl()
			return nil, nil, false
		}
		c.KeepControl()
		req := kr.(*kmsg.ProduceRequest)
		hit := false
		for _, tp := range req.Topics {
			for _, p := range tp.Partitions {
				hit = hit || bytes.Contains(p.Records, marker)
			}
		}
		if !hit {
			return nil, nil, false
		}
		resp := req.ResponseKind().(*kmsg.ProduceResponse)
		for _, tp := range req.Topics {
			rt := kmsg.NewProduceResponseTopic()
			rt.Topic, rt.TopicID = tp.Topic, tp.TopicID
			for _, p := range tp.Partitions {
				rp := kmsg.NewProduceResponseTopicPartition()
				rp.Partition = p.Partition
				rp.ErrorCode = 6 // NOT_LEADER_OR_FOLLOWER: retried by the producer
				if bytes.Contains(p.Records, marker) {
					rp.ErrorCode = code
				}
				rt.Partitions = append(rt.Partitions, rp)
			}
			resp.Topics = append(resp.Topics, rt)
		}
		return resp, nil, true
	})
	return func() { fixed.Store(true) }
}

// TestRelayBrokerRejection: a row the broker keeps refusing is retried a bounded number of times
// with backoff, then parked with the broker's reason. Its neighbours in the same partition, which
// franz-go fails along with it, are sent again without an attempt counted against them.
func TestRelayBrokerRejection(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		code   int16
		reason string
		policy string
	}{
		{"message too large, wait", 10, "MESSAGE_TOO_LARGE", relay.OrderPolicyWait},
		{"topic authorization failed, skip", 29, "TOPIC_AUTHORIZATION_FAILED", relay.OrderPolicySkip},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := setupPoison(t, 1)
			if e.broker.Fake == nil {
				t.Skip("needs kfake to inject broker errors (KAFKA_BROKERS is set)")
			}
			marker := []byte("POISON-MARKER")
			fix := rejectProduce(e.broker.Fake, marker, tc.code)
			rows := []row{{key: str("poison"), payload: marker}}
			for i := range 10 {
				rows = append(rows, row{key: str(fmt.Sprintf("k%d", i)), payload: []byte("ok")})
			}
			ids := e.insert(t, rows...)
			const maxAttempts = 3
			e.run(t, relay.Config{MaxAttempts: maxAttempts, RetryBackoffMin: 100 * time.Millisecond,
				RetryBackoffMax: 400 * time.Millisecond, OrderPolicy: tc.policy}, kafka.Config{}, postgres.MarkRetain)
			// The key's later row is written once its head's first failure is recorded. Handed to
			// the producer in the same claim, it could be accepted ahead of the refused head: the
			// gap the README documents (franz-go fails the records buffered when the batch fails,
			// and a record handed over in the microseconds before its callback starts a new batch).
			for deadline := time.Now().Add(30 * time.Second); ; {
				if _, attempts := e.outbox(t); attempts[ids[0]] > 0 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("the poison row's first failure was not recorded")
				}
				time.Sleep(5 * time.Millisecond)
			}
			ids = append(ids, e.insert(t, row{key: str("poison"), payload: []byte("later")})...)

			parked := e.waitParked(t, 1)
			p, ok := parked[ids[0]]
			if !ok || len(parked) != 1 {
				t.Fatalf("parked %v, want only row %d", parked, ids[0])
			}
			if p.attempts != maxAttempts {
				t.Errorf("parked after %d attempts, want %d", p.attempts, maxAttempts)
			}
			if !strings.Contains(p.reason, tc.reason) {
				t.Errorf("reason %q, want the broker's %s", p.reason, tc.reason)
			}
			want := 10
			if tc.policy == relay.OrderPolicySkip {
				want = 11
			}
			got := e.keys(t, want)
			if len(got) != want {
				var kv []string
				for _, r := range e.broker.ReadAll(t, e.topic, len(got), time.Minute) {
					kv = append(kv, string(r.Key)+"="+string(r.Value)+fmt.Sprintf("@%d", r.Offset))
				}
				t.Fatalf("published %d records %v, want %d", len(got), kv, want)
			}
			if n := strings.Count(fmt.Sprint(got), "poison"); tc.policy == relay.OrderPolicySkip && n != 1 {
				t.Errorf("the poison key's later row published %d times, want once (order_policy skip): %v", n, got)
			}
			wantPending := "[]"
			if tc.policy == relay.OrderPolicyWait {
				wantPending = fmt.Sprint([]int64{ids[len(ids)-1]})
			}
			pending, attempts := e.outboxEventually(t, wantPending)
			if fmt.Sprint(pending) != wantPending {
				t.Errorf("pending rows %v, want %s", pending, wantPending)
			}
			for _, id := range ids[1:11] {
				if attempts[id] != 0 {
					t.Errorf("row %d of another key has %d failed attempts counted against it, want 0", id, attempts[id])
				}
			}

			// Once the broker accepts the row, retrying it from the parked table delivers it, and
			// with order_policy wait its key's later row after it.
			fix()
			retried, err := postgres.RetryParked(context.Background(), e.pool, e.table, postgres.ParkedFilter{IDs: ids[:1]})
			if err != nil || len(retried) != 1 {
				t.Fatalf("retry parked row: %v, %d rows", err, len(retried))
			}
			wantTail, total := "[poison=POISON-MARKER poison=later]", want+2
			if tc.policy == relay.OrderPolicySkip {
				wantTail, total = "[poison=POISON-MARKER]", want+1 // the later row went out before
			}
			e.broker.ReadAll(t, e.topic, total, time.Minute) // waits for them
			recs := e.broker.ReadToEnd(t, e.topic, time.Minute)
			var tail []string
			for _, r := range recs[min(want, len(recs)):] {
				tail = append(tail, string(r.Key)+"="+string(r.Value))
			}
			if fmt.Sprint(tail) != wantTail {
				t.Errorf("after the retry the topic ends with %v, want %s", tail, wantTail)
			}
		})
	}
}

// TestRelayKeepsToTheTopicsMaxMessageBytes: a topic whose max.message.bytes is below
// kafka.max_record_bytes. A row larger than the topic takes is parked at its first attempt, with
// the topic's limit named, and its key's later row waits (order_policy wait): refused by the
// broker instead, the row would fail with its batch a moment after that later row was handed
// over, which could then go out first. And rows that fit are never packed into a batch the
// topic refuses whole: 60 incompressible rows of 1 kB over 6 keys go out, in order, without a
// failure.
func TestRelayKeepsToTheTopicsMaxMessageBytes(t *testing.T) {
	t.Parallel()
	pool, table := integrationSchema(t)
	b := kafkatest.Start(t)
	topic, limit := kafkatest.Name("small-records"), "4096"
	b.CreateWith(t, topic, 1, map[string]*string{"max.message.bytes": &limit})
	e := &poisonEnv{pool: pool, table: table, broker: b, topic: topic}
	noise := func(n int) []byte {
		p := make([]byte, n)
		_, _ = rand.Read(p)
		return p
	}
	rows := []row{{key: str("big"), payload: noise(6000)}}
	for i := range 60 {
		rows = append(rows, row{key: str(fmt.Sprintf("k%d", i%6)), payload: append(fmt.Appendf(nil, "%02d:", i), noise(1000)...)})
	}
	rows = append(rows, row{key: str("big"), payload: []byte("later")})
	ids := e.insert(t, rows...)
	e.run(t, relay.Config{MaxAttempts: 5, OrderPolicy: relay.OrderPolicyWait}, kafka.Config{}, postgres.MarkRetain)

	parked := e.waitParked(t, 1)
	p, ok := parked[ids[0]]
	switch {
	case !ok || len(parked) != 1:
		t.Fatalf("parked %v, want only row %d", parked, ids[0])
	case p.attempts != 1:
		t.Errorf("parked after %d attempts, want 1 (at once)", p.attempts)
	case !strings.Contains(p.reason, "max.message.bytes") || !strings.Contains(p.reason, topic):
		t.Errorf("reason %q, want the topic's max.message.bytes named", p.reason)
	}
	wantPending := fmt.Sprint([]int64{ids[len(ids)-1]})
	pending, attempts := e.outboxEventually(t, wantPending)
	if fmt.Sprint(pending) != wantPending {
		t.Errorf("pending rows %v, want %s: the big key's later row waits behind its parked head", pending, wantPending)
	}
	for _, id := range ids[1:61] {
		if attempts[id] != 0 {
			t.Errorf("row %d has %d failed attempts, want 0", id, attempts[id])
		}
	}
	recs := b.ReadToEnd(t, topic, time.Minute)
	if len(recs) != 60 {
		t.Errorf("the topic holds %d records, want the 60 that fit", len(recs))
	}
	last := map[string]int{}
	for _, r := range recs {
		n, err := strconv.Atoi(string(r.Value[:2]))
		if err != nil || string(r.Key) == "big" {
			t.Fatalf("record of key %s at offset %d is not one of the rows that fit", r.Key, r.Offset)
		}
		if prev, ok := last[string(r.Key)]; ok && n <= prev {
			t.Errorf("key %s: row %d after row %d", r.Key, n, prev)
		}
		last[string(r.Key)] = n
	}
	if n := e.obs.failed.Load(); n != 0 {
		t.Errorf("%d publishes failed, want none: no batch above the topic's max.message.bytes", n)
	}
}

// TestRelayHeldRowsDoNotHoldUpOtherKeys: more rows of a waiting key than a claim returns, at the
// front of the outbox, must not keep the other keys from being published: claims pass over them.
// Once the key is released its rows follow, in order, before a row of the key written after the
// release (claimed at once on its wake-up, long before the next claim from the oldest row).
// Before, every claim read the same waiting rows and nothing else was ever published.
func TestRelayHeldRowsDoNotHoldUpOtherKeys(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		// first is the key's first row; release lets it through.
		first   func(t *testing.T, e *poisonEnv) (row, func(ids []int64))
		backoff time.Duration
	}{
		{"behind a parked row", func(t *testing.T, e *poisonEnv) (row, func([]int64)) {
			return row{key: str("k"), payload: []byte("bad"), topic: str("no/slashes")}, func(ids []int64) {
				e.waitParked(t, 1)
				if _, err := postgres.DropParked(context.Background(), e.pool, e.table, postgres.ParkedFilter{IDs: ids[:1]}); err != nil {
					t.Fatal(err)
				}
			}
		}, 0},
		{"behind a failing row waiting for its retry", func(t *testing.T, e *poisonEnv) (row, func([]int64)) {
			if e.broker.Fake == nil {
				t.Skip("needs kfake to inject broker errors (KAFKA_BROKERS is set)")
			}
			marker := []byte("POISON-MARKER")
			fix := rejectProduce(e.broker.Fake, marker, 10) // MESSAGE_TOO_LARGE
			return row{key: str("k"), payload: marker}, func(ids []int64) {
				fix()
				// The key is released when its first row is acknowledged (and deleted).
				for deadline := time.Now().Add(30 * time.Second); ; {
					if _, attempts := e.outbox(t); attempts[ids[0]] == 0 {
						return
					}
					if time.Now().After(deadline) {
						t.Fatal("the key's first row was not published once the broker took it")
					}
					time.Sleep(10 * time.Millisecond)
				}
			}
		}, 2 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := setupPoison(t, 1)
			first, release := tc.first(t, e)
			rows := []row{first}
			for i := range 40 {
				rows = append(rows, row{key: str("k"), payload: []byte(fmt.Sprint(i))})
			}
			ids := e.insert(t, rows...)
			// Claims from the oldest row come once per poll interval: long enough for the row
			// written after the release to be claimed before.
			rc := relay.Config{BatchSize: 5, MaxInFlight: 5, MaxAttempts: 1000, PollInterval: 3 * time.Second}
			if tc.backoff > 0 {
				rc.RetryBackoffMin, rc.RetryBackoffMax = tc.backoff, tc.backoff
			}
			e.run(t, rc, kafka.Config{}, postgres.MarkDelete)
			// Wait until the key waits: its first row parked, or failed once.
			deadline := time.Now().Add(30 * time.Second)
			for {
				_, attempts := e.outbox(t)
				if attempts[ids[0]] > 0 || len(e.parked(t)) > 0 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("the key's first row neither failed nor was parked")
				}
				time.Sleep(20 * time.Millisecond)
			}
			e.insert(t, row{key: str("other"), payload: []byte("other")})
			if got := e.keys(t, 1); fmt.Sprint(got) != "[other]" {
				t.Fatalf("published %v, want the other key's row while k waits", got)
			}

			release(ids)
			e.insert(t, row{key: str("k"), payload: []byte("late")})
			want := []string{"other=other"}
			if tc.backoff > 0 {
				want = append(want, "k=POISON-MARKER")
			}
			for i := range 40 {
				want = append(want, fmt.Sprintf("k=%d", i))
			}
			want = append(want, "k=late")
			recs := e.broker.ReadAll(t, e.topic, len(want), 30*time.Second)
			var got []string
			for _, r := range recs {
				got = append(got, string(r.Key)+"="+string(r.Value))
			}
			if fmt.Sprint(got) != fmt.Sprint(want) {
				t.Errorf("records %v, want %v: the key's rows in order once released", got, want)
			}
		})
	}
}

// TestRelayWaitsForAMissingTopic: rows whose topic does not exist (and the brokers do not create
// it) are sent again and again without an attempt counted, never parked, while the publisher
// says once that the topic is missing; rows of other topics keep flowing. Once the topic is
// created, every row goes out, in order per key, and the topic is no longer listed as missing.
// Before, each row burnt its attempts and the keys were parked one after the other.
func TestRelayWaitsForAMissingTopic(t *testing.T) {
	t.Parallel()
	pool, table := integrationSchema(t)
	b := kafkatest.Start(t)
	if b.Fake == nil {
		t.Skip("a real cluster may create topics (KAFKA_BROKERS is set)")
	}
	other := b.Topic(t, "present", 1)
	e := &poisonEnv{pool: pool, table: table, broker: b, topic: kafkatest.Name("missing")}
	var rows []row
	for i := range 3 {
		for _, k := range []string{"a", "b", "c"} {
			rows = append(rows, row{key: str(k), payload: []byte(fmt.Sprintf("%s%d", k, i))})
		}
	}
	rows = append(rows, row{key: str("elsewhere"), payload: []byte("x"), topic: str(other)})
	ids := e.insert(t, rows...)
	e.run(t, relay.Config{MaxAttempts: 2, RetryBackoffMin: 50 * time.Millisecond, RetryBackoffMax: 200 * time.Millisecond},
		kafka.Config{}, postgres.MarkDelete)

	if got := e.broker.ReadAll(t, other, 1, 30*time.Second); len(got) != 1 {
		t.Fatalf("the row of an existing topic: %d records, want 1", len(got))
	}
	// Every key's row sent at least three times: with relay.max_attempts 2 they would be parked.
	deadline := time.Now().Add(60 * time.Second)
	for e.obs.failed.Load() < 9 {
		if time.Now().After(deadline) {
			t.Fatalf("%d failed publishes, want the rows of the missing topic sent again and again", e.obs.failed.Load())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if p := e.parked(t); len(p) != 0 {
		t.Errorf("parked %v, want nothing parked for a missing topic", p)
	}
	pending, attempts := e.outboxEventually(t, fmt.Sprint(ids[:9]))
	if fmt.Sprint(pending) != fmt.Sprint(ids[:9]) {
		t.Errorf("pending rows %v, want the 9 rows of the missing topic %v", pending, ids[:9])
	}
	for _, id := range ids[:9] {
		if attempts[id] != 0 {
			t.Errorf("row %d has %d attempts counted, want 0", id, attempts[id])
		}
	}
	if n := strings.Count(e.logs.String(), `"msg":"kafka topic does not exist`); n != 1 {
		t.Errorf("%d 'kafka topic does not exist' lines, want one", n)
	}
	if got := e.pub.MissingTopics(); fmt.Sprint(got) != fmt.Sprint([]string{e.topic}) {
		t.Errorf("missing topics %v, want [%s]", got, e.topic)
	}

	b.Create(t, e.topic, 1)
	recs := b.ReadAll(t, e.topic, 9, 30*time.Second)
	byKey := map[string][]string{}
	for _, r := range recs {
		byKey[string(r.Key)] = append(byKey[string(r.Key)], string(r.Value))
	}
	if want := "map[a:[a0 a1 a2] b:[b0 b1 b2] c:[c0 c1 c2]]"; fmt.Sprint(byKey) != want {
		t.Errorf("records per key %v, want %s", byKey, want)
	}
	if pending, _ := e.outboxEventually(t, "[]"); len(pending) != 0 {
		t.Errorf("pending rows %v once the topic exists", pending)
	}
	if p := e.parked(t); len(p) != 0 {
		t.Errorf("parked %v, want nothing parked", p)
	}
	if got := e.pub.MissingTopics(); len(got) != 0 {
		t.Errorf("missing topics %v once the topic exists, want none", got)
	}
}
