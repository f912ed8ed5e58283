package kafka_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/outbox-relay/outbox-relay/adapters/kafka"
	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/app"
	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/domain"
	"github.com/outbox-relay/outbox-relay/internal/dbtest"
	"github.com/outbox-relay/outbox-relay/internal/kafkatest"
)

// consumerCounts is a ConsumerObserver that counts.
type consumerCounts struct {
	mu       sync.Mutex
	outcomes map[kafka.Outcome]int
	failed   int
	dead     int
	invalid  int
}

func (c *consumerCounts) Handled(_ string, o kafka.Outcome) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.outcomes == nil {
		c.outcomes = map[kafka.Outcome]int{}
	}
	c.outcomes[o]++
}
func (c *consumerCounts) Failed(string, error) { c.mu.Lock(); c.failed++; c.mu.Unlock() }
func (c *consumerCounts) DeadLettered(_ string, invalid bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.dead++
	if invalid {
		c.invalid++
	}
}
func (c *consumerCounts) Committed(int) {}

// counts returns the failed, dead-lettered and invalid dead-lettered counts.
func (c *consumerCounts) counts() (failed, dead, invalid int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.failed, c.dead, c.invalid
}

func (c *consumerCounts) get(o kafka.Outcome) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.outcomes[o]
}

// runConsumer starts c.Run in the background; the returned function stops it and closes c.
func runConsumer(t *testing.T, c *kafka.Consumer) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("consumer run: %v", err)
				}
			case <-time.After(60 * time.Second):
				t.Errorf("consumer did not stop within 60s")
			}
			c.Close()
		})
	}
	t.Cleanup(stop)
	return stop
}

func waitFor(t *testing.T, what string, deadline time.Duration, cond func() bool) {
	t.Helper()
	end := time.Now().Add(deadline)
	for !cond() {
		if time.Now().After(end) {
			t.Fatalf("timed out after %s waiting for %s", deadline, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func count(t *testing.T, pool *pgxpool.Pool, query string, args ...any) int {
	t.Helper()
	var n int
	if err := pool.QueryRow(context.Background(), query, args...).Scan(&n); err != nil {
		t.Fatalf("%s: %v", query, err)
	}
	return n
}

// TestConsumerEndToEndExactlyOnceEffects runs CreateUser → outbox → relay → Kafka → consumer →
// inbox with every record produced twice, a consumer that stops mid-batch without committing
// (its commits fail, as if it crashed after its transactions), a restart and a rebalance: every
// user gets exactly one welcome message.
func TestConsumerEndToEndExactlyOnceEffects(t *testing.T) {
	t.Parallel()
	const users = 150
	pool, table := dbtest.Schema(t)
	b := kafkatest.Start(t)
	topic := b.Topic(t, "e2e-users", 3)
	dlt := b.Topic(t, "e2e-users-dlt", 1)
	ctx := context.Background()

	// The relay, publishing the outbox to topic.
	pub, err := kafka.NewPublisher(kafka.Config{Brokers: b.Addrs, TopicTemplate: topic})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pub.Close)
	connCfg, err := postgres.ParseURL(dbtest.URL())
	if err != nil {
		t.Fatal(err)
	}
	store, err := postgres.NewStore(connCfg, postgres.StoreConfig{Table: table})
	if err != nil {
		t.Fatal(err)
	}
	relay, err := relay.New(relay.Config{PollInterval: 50 * time.Millisecond}, store, pub, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	relayCtx, stopRelay := context.WithCancel(ctx)
	relayDone := make(chan error, 1)
	go func() { relayDone <- relay.Run(relayCtx) }()
	t.Cleanup(func() { stopRelay(); <-relayDone })

	// The writers: the CreateUser use case, four at a time.
	uow, err := postgres.NewUnitOfWork(pool, table)
	if err != nil {
		t.Fatal(err)
	}
	createUser := app.NewCreateUser(uow, nil)
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			for i := w; i < users; i += 4 {
				if _, err := createUser.Execute(ctx, app.CreateUserCommand{Name: fmt.Sprintf("U%d", i),
					Email: fmt.Sprintf("u%d-%s@example.com", i, domain.NewID()[:8])}); err != nil {
					t.Errorf("create user %d: %v", i, err)
				}
			}
		})
	}
	wg.Wait()
	recs := b.ReadAll(t, topic, users, time.Minute)
	if len(recs) != users {
		t.Fatalf("relay published %d records, want %d", len(recs), users)
	}

	// Duplicates: the same records produced a second time (same key, so same partition).
	dupCl, err := kgo.NewClient(kgo.SeedBrokers(b.Addrs...))
	if err != nil {
		t.Fatal(err)
	}
	defer dupCl.Close()
	for _, r := range recs {
		cp := &kgo.Record{Topic: topic, Key: r.Key, Value: r.Value, Headers: r.Headers}
		if err := dupCl.ProduceSync(ctx, cp).FirstErr(); err != nil {
			t.Fatalf("produce duplicate: %v", err)
		}
	}

	inbox, err := postgres.NewInbox(pool, table)
	if err != nil {
		t.Fatal(err)
	}
	uc, err := app.NewSendWelcome(inbox, "welcome")
	if err != nil {
		t.Fatal(err)
	}
	group := "welcome-" + domain.NewID()[:8]
	ccfg := kafka.ConsumerConfig{Group: group, Topics: []string{topic}, DeadLetterTopic: dlt, MaxPollRecords: 40}
	obs := &consumerCounts{}
	newConsumer := func(h kafka.Handler) *kafka.Consumer {
		c, err := kafka.NewConsumer(kafka.Config{Brokers: b.Addrs}, ccfg, h, obs, nil)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}

	// Consumer A: its offset commits fail (with kfake), and after 60 records it stops in the
	// middle of a batch. Its effects committed; its offsets did not.
	var failCommits atomic.Bool
	if b.Fake != nil {
		failCommits.Store(true)
		b.Fake.ControlKey(int16(kmsg.OffsetCommit), func(req kmsg.Request) (kmsg.Response, error, bool) {
			b.Fake.KeepControl()
			if !failCommits.Load() {
				return nil, nil, false
			}
			creq := req.(*kmsg.OffsetCommitRequest)
			resp := creq.ResponseKind().(*kmsg.OffsetCommitResponse)
			for _, rt := range creq.Topics {
				st := kmsg.NewOffsetCommitResponseTopic()
				st.Topic = rt.Topic
				for _, rp := range rt.Partitions {
					sp := kmsg.NewOffsetCommitResponseTopicPartition()
					sp.Partition = rp.Partition
					sp.ErrorCode = kerr.OffsetMetadataTooLarge.Code
					st.Partitions = append(st.Partitions, sp)
				}
				resp.Topics = append(resp.Topics, st)
			}
			return resp, nil, true
		})
	}
	welcome := kafka.WelcomeHandler(uc)
	var handledA atomic.Int64
	stopped := make(chan struct{})
	var stopOnce sync.Once
	a := newConsumer(func(ctx context.Context, ev kafka.Event) (kafka.Outcome, error) {
		if handledA.Load() >= 60 {
			stopOnce.Do(func() { close(stopped) })
			<-ctx.Done()
			return 0, ctx.Err()
		}
		out, err := welcome(ctx, ev)
		if err == nil {
			handledA.Add(1)
		}
		return out, err
	})
	stopA := runConsumer(t, a)
	select {
	case <-stopped:
	case <-time.After(60 * time.Second):
		t.Fatal("consumer A did not handle 60 records within 60s")
	}
	stopA()
	failCommits.Store(false)
	if n := count(t, pool, `SELECT count(*) FROM `+table.Schema+`.welcome_messages`); n == 0 || n >= users {
		t.Fatalf("consumer A welcomed %d users before stopping, want some but not all", n)
	}

	// Restart: consumer B resumes from the committed offsets; consumer C joins mid-way (a
	// rebalance), then B stops (its partitions are committed on revoke).
	var handledB atomic.Int64
	bc := newConsumer(func(ctx context.Context, ev kafka.Event) (kafka.Outcome, error) {
		handledB.Add(1)
		return welcome(ctx, ev)
	})
	stopB := runConsumer(t, bc)
	waitFor(t, "consumer B to handle 50 records", 60*time.Second, func() bool { return handledB.Load() >= 50 })
	var handledC atomic.Int64
	cc := newConsumer(func(ctx context.Context, ev kafka.Event) (kafka.Outcome, error) {
		handledC.Add(1)
		return welcome(ctx, ev)
	})
	runConsumer(t, cc)
	waitFor(t, "consumers B and C to handle 150 records", 60*time.Second, func() bool { return handledB.Load()+handledC.Load() >= 150 })
	stopB()

	// Done when the group committed every offset of the topic.
	adm := kadm.NewClient(dupCl)
	waitFor(t, "the group to commit every offset", 90*time.Second, func() bool {
		ends, err := adm.ListEndOffsets(ctx, topic)
		if err != nil {
			return false
		}
		committed, err := adm.FetchOffsets(ctx, group)
		if err != nil {
			return false
		}
		ok := true
		ends.Each(func(e kadm.ListedOffset) {
			c, found := committed.Lookup(topic, e.Partition)
			if !found || c.At != e.Offset {
				ok = false
			}
		})
		return ok
	})

	if n := count(t, pool, `SELECT count(*) FROM `+table.Schema+`.welcome_messages`); n != users {
		t.Errorf("welcome messages: %d, want %d", n, users)
	}
	if n := count(t, pool, `SELECT count(*) FROM (SELECT user_id FROM `+table.Schema+`.welcome_messages
		GROUP BY user_id HAVING count(*) <> 1) x`); n != 0 {
		t.Errorf("%d users have more than one welcome message", n)
	}
	if n := count(t, pool, `SELECT count(*) FROM `+table.Schema+`.users u WHERE NOT EXISTS
		(SELECT 1 FROM `+table.Schema+`.welcome_messages w WHERE w.user_id = u.id)`); n != 0 {
		t.Errorf("%d users have no welcome message", n)
	}
	if n := count(t, pool, `SELECT count(*) FROM `+table.Schema+`.inbox WHERE consumer = 'welcome'`); n != users {
		t.Errorf("inbox rows: %d, want %d", n, users)
	}
	// Every record was produced twice, so at least as many repeats as users were skipped.
	if d := obs.get(kafka.Duplicate); d < users {
		t.Errorf("repeats skipped: %d, want at least %d", d, users)
	}
	if _, dead, _ := obs.counts(); dead != 0 {
		t.Errorf("%d records dead-lettered, want none", dead)
	}
	t.Logf("processed %d, repeats skipped %d", obs.get(kafka.Processed), obs.get(kafka.Duplicate))
}

// TestConsumerPoisonGoesToDeadLetterTopic checks that poison records are retried a bounded number
// of times, then dead-lettered with the reason, without stalling the records behind them, and
// that a partition's records are handled in order.
func TestConsumerPoisonGoesToDeadLetterTopic(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	b := kafkatest.Start(t)
	topic := b.Topic(t, "poison", 1)
	dlt := b.Topic(t, "poison-dlt", 1)
	ctx := context.Background()

	userEvent := func(email string) (*kgo.Record, string, string) {
		u, err := domain.NewUser("Ann", email)
		if err != nil {
			t.Fatal(err)
		}
		payload, _ := domain.NewUserCreated(u, time.Now()).MarshalJSON()
		id := domain.NewID()
		return &kgo.Record{Topic: topic, Key: []byte(u.ID()), Value: payload, Headers: []kgo.RecordHeader{
			{Key: kafka.HeaderEventID, Value: []byte(id)}, {Key: kafka.HeaderEventType, Value: []byte("UserCreated")},
		}}, id, u.ID()
	}
	good1, _, user1 := userEvent("a@example.com")
	badJSON := &kgo.Record{Topic: topic, Key: []byte("k"), Value: []byte("{not json"), Headers: []kgo.RecordHeader{
		{Key: kafka.HeaderEventID, Value: []byte(domain.NewID())}, {Key: kafka.HeaderEventType, Value: []byte("UserCreated")}}}
	noID, _, _ := userEvent("b@example.com")
	noID.Headers = noID.Headers[1:]
	failing, failingID, _ := userEvent("c@example.com")
	otherType := &kgo.Record{Topic: topic, Key: []byte("k"), Value: []byte("{}"), Headers: []kgo.RecordHeader{
		{Key: kafka.HeaderEventID, Value: []byte(domain.NewID())}, {Key: kafka.HeaderEventType, Value: []byte("UserRenamed")}}}
	good2, good2ID, user2 := userEvent("d@example.com")

	cl, err := kgo.NewClient(kgo.SeedBrokers(b.Addrs...), kgo.ConsumeTopics(dlt), kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	if err := cl.ProduceSync(ctx, good1, badJSON, noID, failing, otherType, good2).FirstErr(); err != nil {
		t.Fatal(err)
	}

	inbox, err := postgres.NewInbox(pool, table)
	if err != nil {
		t.Fatal(err)
	}
	uc, err := app.NewSendWelcome(inbox, "welcome")
	if err != nil {
		t.Fatal(err)
	}
	welcome := kafka.WelcomeHandler(uc)
	var mu sync.Mutex
	var order []string
	var failingAttempts atomic.Int64
	handler := func(ctx context.Context, ev kafka.Event) (kafka.Outcome, error) {
		mu.Lock()
		order = append(order, ev.ID)
		mu.Unlock()
		if ev.ID == failingID {
			failingAttempts.Add(1)
			return 0, errors.New("mail server says no") // a failure that never ends
		}
		return welcome(ctx, ev)
	}
	obs := &consumerCounts{}
	c, err := kafka.NewConsumer(kafka.Config{Brokers: b.Addrs}, kafka.ConsumerConfig{Group: "poison-" + domain.NewID()[:8],
		Topics: []string{topic}, DeadLetterTopic: dlt, MaxAttempts: 3, RetryBackoff: 10 * time.Millisecond}, handler, obs, nil)
	if err != nil {
		t.Fatal(err)
	}
	runConsumer(t, c)

	processed := func(ev string) bool {
		ok, err := inbox.Processed(ctx, "welcome", ev)
		return err == nil && ok
	}
	waitFor(t, "the record behind the poison to be processed", 60*time.Second, func() bool { return processed(good2ID) })
	var dead []*kgo.Record
	waitFor(t, "3 dead letters", 60*time.Second, func() bool {
		fctx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		cl.PollFetches(fctx).EachRecord(func(r *kgo.Record) { dead = append(dead, r) })
		return len(dead) >= 3
	})
	want := []struct {
		key, attempts, reason string
	}{
		{"k", "1", "decode UserCreated"},
		{string(noID.Key), "1", "header event-id is missing"},
		{string(failing.Key), "3", "mail server says no"},
	}
	for i, w := range want {
		r := dead[i]
		if string(r.Key) != w.key || kafkatest.Header(r, kafka.HeaderDeadLetterAttempts) != w.attempts ||
			!strings.Contains(kafkatest.Header(r, kafka.HeaderDeadLetterReason), w.reason) ||
			kafkatest.Header(r, kafka.HeaderDeadLetterTopic) != topic {
			t.Errorf("dead letter %d: key %q attempts %q topic %q reason %q; want key %q attempts %s reason containing %q",
				i, r.Key, kafkatest.Header(r, kafka.HeaderDeadLetterAttempts), kafkatest.Header(r, kafka.HeaderDeadLetterTopic),
				kafkatest.Header(r, kafka.HeaderDeadLetterReason), w.key, w.attempts, w.reason)
		}
	}
	if len(dead) != 3 {
		t.Errorf("%d dead letters, want 3", len(dead))
	}
	if n := failingAttempts.Load(); n != 3 {
		t.Errorf("failing record tried %d times, want 3 (consumer.max_attempts)", n)
	}
	if _, dead, invalid := obs.counts(); dead != 3 || invalid != 2 {
		t.Errorf("dead-letter metric: %d (%d invalid), want 3 (2 invalid)", dead, invalid)
	}
	if obs.get(kafka.Ignored) != 1 {
		t.Errorf("ignored events: %d, want 1 (the UserRenamed)", obs.get(kafka.Ignored))
	}
	for _, u := range []string{user1, user2} {
		if n := count(t, pool, `SELECT count(*) FROM `+table.Schema+`.welcome_messages WHERE user_id = $1`, u); n != 1 {
			t.Errorf("user %s: %d welcome messages, want 1", u, n)
		}
	}
	// The partition's records were handled in order: the good record after the poison came last.
	mu.Lock()
	defer mu.Unlock()
	if len(order) == 0 || order[len(order)-1] != good2ID {
		t.Errorf("handling order %v: want %s last", order, good2ID)
	}
}

// TestConsumerWaitsOutUnavailableDependency: failures wrapping app.ErrUnavailable (the database is
// down) do not count as attempts: the event is handled once the dependency is back, never
// dead-lettered, and the records behind it follow in order.
func TestConsumerWaitsOutUnavailableDependency(t *testing.T) {
	t.Parallel()
	b := kafkatest.Start(t)
	topic := b.Topic(t, "unavailable", 1)
	dlt := b.Topic(t, "unavailable-dlt", 1)
	ctx := context.Background()
	cl, err := kgo.NewClient(kgo.SeedBrokers(b.Addrs...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	var ids []string
	for range 3 {
		id := domain.NewID()
		ids = append(ids, id)
		if err := cl.ProduceSync(ctx, &kgo.Record{Topic: topic, Key: []byte("k"), Value: []byte("{}"),
			Headers: []kgo.RecordHeader{{Key: kafka.HeaderEventID, Value: []byte(id)}}}).FirstErr(); err != nil {
			t.Fatal(err)
		}
	}
	var mu sync.Mutex
	var handled []string
	var outage atomic.Int64
	handler := func(_ context.Context, ev kafka.Event) (kafka.Outcome, error) {
		if ev.ID == ids[0] && outage.Add(1) <= 8 {
			return 0, fmt.Errorf("send welcome: %w: connection refused", app.ErrUnavailable)
		}
		mu.Lock()
		handled = append(handled, ev.ID)
		mu.Unlock()
		return kafka.Processed, nil
	}
	obs := &consumerCounts{}
	c, err := kafka.NewConsumer(kafka.Config{Brokers: b.Addrs}, kafka.ConsumerConfig{Group: "unavailable-" + domain.NewID()[:8],
		Topics: []string{topic}, DeadLetterTopic: dlt, MaxAttempts: 2, RetryBackoff: 5 * time.Millisecond,
		RetryBackoffMax: 20 * time.Millisecond}, handler, obs, nil)
	if err != nil {
		t.Fatal(err)
	}
	runConsumer(t, c)
	waitFor(t, "the three events to be handled", 60*time.Second, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(handled) == 3
	})
	mu.Lock()
	defer mu.Unlock()
	for i, id := range ids {
		if handled[i] != id {
			t.Errorf("handled %v, want %v (in order)", handled, ids)
			break
		}
	}
	if failed, dead, _ := obs.counts(); dead != 0 || failed != 8 {
		t.Errorf("%d events dead-lettered and %d failed attempts reported during the outage, want 0 and 8", dead, failed)
	}
}

// TestConsumerPingChecksDeadLetterTopic: a missing dead-letter topic is reported at start, naming
// the key, instead of stalling a partition at the first poison event.
func TestConsumerPingChecksDeadLetterTopic(t *testing.T) {
	t.Parallel()
	b := kafkatest.Start(t)
	topic := b.Topic(t, "ping", 1)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	noop := func(context.Context, kafka.Event) (kafka.Outcome, error) { return kafka.Processed, nil }
	missing, err := kafka.NewConsumer(kafka.Config{Brokers: b.Addrs}, kafka.ConsumerConfig{Group: "ping",
		Topics: []string{topic}, DeadLetterTopic: "no-such-dlt-" + domain.NewID()[:8]}, noop, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer missing.Close()
	if err := missing.Ping(ctx); err == nil || !strings.Contains(err.Error(), "consumer.dead_letter_topic") {
		t.Errorf("ping with a missing dead-letter topic: %v, want an error naming consumer.dead_letter_topic", err)
	}
	present, err := kafka.NewConsumer(kafka.Config{Brokers: b.Addrs}, kafka.ConsumerConfig{Group: "ping",
		Topics: []string{topic}, DeadLetterTopic: b.Topic(t, "ping-dlt", 1)}, noop, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer present.Close()
	if err := present.Ping(ctx); err != nil {
		t.Errorf("ping: %v", err)
	}
}
