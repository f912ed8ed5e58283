package rabbitmq_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/adapters/rabbitmq"
	"github.com/outbox-relay/outbox-relay/app"
	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/app/relay/sinktest"
	"github.com/outbox-relay/outbox-relay/domain"
	"github.com/outbox-relay/outbox-relay/internal/dbtest"
)

// markCheck wraps the store so that every Mark checks that the sink confirmed each row first.
type markCheck struct {
	relay.Store
	t       *testing.T
	log     *sinktest.ConfirmLog
	marked  atomic.Int64
	badMark atomic.Int64
}

func (s *markCheck) Open(ctx context.Context) (relay.Session, error) {
	sess, err := s.Store.Open(ctx)
	if err != nil {
		return nil, err
	}
	return &markCheckSession{Session: sess, s: s}, nil
}

type markCheckSession struct {
	relay.Session
	s *markCheck
}

func (m *markCheckSession) Mark(ctx context.Context, ids []int64) error {
	for _, id := range m.s.log.Unconfirmed(ids) {
		m.s.badMark.Add(1)
		m.s.t.Errorf("row %d marked before RabbitMQ confirmed it", id)
	}
	m.s.marked.Add(int64(len(ids)))
	return m.Session.Mark(ctx, ids)
}

// TestRelayToRabbitMQSurvivesConnectionCuts runs CreateUser and ordered account events through
// the outbox and the relay to RabbitMQ, while a proxy cuts the relay's broker connection again
// and again: every committed event arrives, no rolled-back one does, each key's events arrive in
// commit order (ignoring repeats), and no row is marked before the broker confirmed it.
func TestRelayToRabbitMQSurvivesConnectionCuts(t *testing.T) {
	t.Parallel()
	const (
		writers       = 4
		usersPer      = 25
		keysPer       = 3
		eventsPerKey  = 30
		cutsWanted    = 5
		rollbackEvery = 7
	)
	pool, table := dbtest.Schema(t)
	ctx := context.Background()
	exchange := "outbox-e2e-" + domain.NewID()[:8]
	reader := newQueueReader(t, exchange, "#")
	px := startProxy(t, brokerHost(t))

	pub, err := rabbitmq.NewPublisher(rabbitmq.Config{URL: viaProxy(t, px.addr()), Exchange: exchange,
		RoutingKeyTemplate: "{aggregate_type}.{event_type}", ReconnectBackoffMax: 300 * time.Millisecond}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	sink := sinktest.NewConfirmLog(pub)
	connCfg, err := postgres.ParseURL(dbtest.URL())
	if err != nil {
		t.Fatal(err)
	}
	pgStore, err := postgres.NewStore(connCfg, postgres.StoreConfig{Table: table})
	if err != nil {
		t.Fatal(err)
	}
	store := &markCheck{Store: pgStore, t: t, log: sink}
	relay, err := relay.New(relay.Config{PollInterval: 50 * time.Millisecond, BatchSize: 20, MaxInFlight: 100},
		store, sink, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	relayCtx, stopRelay := context.WithCancel(ctx)
	relayDone := make(chan error, 1)
	go func() { relayDone <- relay.Run(relayCtx) }()
	defer func() { stopRelay(); <-relayDone }()

	// Cut the relay's connection to RabbitMQ, again and again, while the writers write.
	writing := make(chan struct{})
	var cutterWG sync.WaitGroup
	cutterWG.Go(func() {
		for {
			select {
			case <-writing:
				if px.cutCount() >= cutsWanted {
					return
				}
			default:
			}
			time.Sleep(150 * time.Millisecond)
			if pub.Connected() {
				px.cut()
			}
		}
	})

	uow, err := postgres.NewUnitOfWork(pool, table)
	if err != nil {
		t.Fatal(err)
	}
	createUser := app.NewCreateUser(uow, nil)
	w, err := postgres.NewWriter(table)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	committed := map[string]bool{}  // event ids of committed account events
	rolledBack := map[string]bool{} // event ids of rolled-back account events
	var wg sync.WaitGroup
	for wr := range writers {
		wg.Go(func() {
			for n := range eventsPerKey {
				if n < usersPer {
					if _, err := createUser.Execute(ctx, app.CreateUserCommand{Name: "U",
						Email: fmt.Sprintf("w%d-%d-%s@example.com", wr, n, domain.NewID()[:8])}); err != nil {
						t.Errorf("create user: %v", err)
						return
					}
				}
				for k := range keysPer {
					key := fmt.Sprintf("acct-%d-%d", wr, k)
					payload, _ := json.Marshal(map[string]any{"key": key, "seq": n})
					id := domain.NewID()
					rollback := (n*keysPer+k)%rollbackEvery == 3
					err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
						if err := w.Append(ctx, tx, postgres.Message{AggregateType: "account", AggregateID: key,
							EventType: "AccountCredited", Payload: payload, EventID: id}); err != nil {
							return err
						}
						if rollback {
							return errRollback
						}
						return nil
					})
					mu.Lock()
					switch {
					case rollback && errors.Is(err, errRollback):
						rolledBack[id] = true
					case err == nil:
						committed[id] = true
					default:
						t.Errorf("append: %v", err)
					}
					mu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	close(writing)
	cutterWG.Wait()

	var users []string
	rows, err := pool.Query(ctx, `SELECT id::text FROM `+table.Schema+`.users`)
	if err != nil {
		t.Fatal(err)
	}
	users, err = pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	if len(users) != writers*usersPer {
		t.Fatalf("%d users written, want %d", len(users), writers*usersPer)
	}

	// Wait until every committed event is at the broker and every row is marked.
	deadline := time.Now().Add(90 * time.Second)
	for {
		var pending int
		if err := pool.QueryRow(ctx, `SELECT count(*) FROM `+table.Schema+`.outbox`).Scan(&pending); err != nil {
			t.Fatal(err)
		}
		seen := map[string]bool{}
		for _, d := range reader.deliveries() {
			seen[d.MessageId] = true
		}
		missing := 0
		for id := range committed {
			if !seen[id] {
				missing++
			}
		}
		if pending == 0 && missing == 0 && len(seen) >= len(committed)+len(users) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 90s: %d rows pending, %d committed account events missing, %d distinct messages delivered",
				pending, missing, len(seen))
		}
		time.Sleep(100 * time.Millisecond)
	}

	// Check what arrived: L (nothing lost), P (no phantom), O (order per key), H (headers).
	welcomed := map[string]int{}
	last := map[string]int{}
	distinct := map[string]bool{}
	deliveries := reader.deliveries()
	for _, d := range deliveries {
		id := headerString(d, rabbitmq.HeaderEventID)
		if id == "" || id != d.MessageId {
			t.Errorf("message without its event-id header (message_id %q, header %q)", d.MessageId, id)
		}
		if rolledBack[id] {
			t.Errorf("rolled-back event %s was published", id)
		}
		repeat := distinct[id]
		distinct[id] = true
		switch headerString(d, rabbitmq.HeaderEventType) {
		case "UserCreated":
			if !repeat {
				welcomed[headerString(d, rabbitmq.HeaderAggregateID)]++
			}
		case "AccountCredited":
			var p struct {
				Key string
				Seq int
			}
			if err := json.Unmarshal(d.Body, &p); err != nil {
				t.Fatalf("payload %q: %v", d.Body, err)
			}
			prev, ok := last[p.Key]
			if ok && p.Seq <= prev {
				if !repeat {
					t.Errorf("key %s: seq %d arrived after %d", p.Key, p.Seq, prev)
				}
				continue
			}
			last[p.Key] = p.Seq
		}
	}
	for _, u := range users {
		if welcomed[u] != 1 {
			t.Errorf("user %s: %d distinct UserCreated events delivered, want 1", u, welcomed[u])
		}
	}
	for id := range committed {
		if !distinct[id] {
			t.Errorf("committed event %s was not delivered", id)
		}
	}
	if store.marked.Load() < int64(len(committed)+len(users)) {
		t.Errorf("%d rows marked, want at least %d", store.marked.Load(), len(committed)+len(users))
	}
	if px.cutCount() < cutsWanted {
		t.Errorf("the proxy cut the connection %d times, want at least %d", px.cutCount(), cutsWanted)
	}
	t.Logf("%d committed events (%d users), %d rolled back, %d deliveries (%d repeats), %d connection cuts",
		len(committed)+len(users), len(users), len(rolledBack), len(deliveries), len(deliveries)-len(distinct), px.cutCount())
}

var errRollback = fmt.Errorf("rollback on purpose")
