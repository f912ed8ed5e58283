package postgres_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/app"
	"github.com/outbox-relay/outbox-relay/domain"
	"github.com/outbox-relay/outbox-relay/internal/dbtest"
)

func welcomeCount(t *testing.T, pool *pgxpool.Pool, table postgres.Table, userID string) int {
	t.Helper()
	var n int
	if err := pool.QueryRow(context.Background(), `SELECT count(*) FROM `+table.Schema+`.welcome_messages WHERE user_id = $1`,
		userID).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// TestInboxOnce: SendWelcome through the Postgres inbox processes an event id once per consumer,
// also when two deliveries of it race, and another consumer processes it for itself.
func TestInboxOnce(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	ctx := context.Background()
	inbox, err := postgres.NewInbox(pool, table)
	if err != nil {
		t.Fatal(err)
	}
	if err := inbox.Check(ctx); err != nil {
		t.Fatal(err)
	}
	uc, err := app.NewSendWelcome(inbox, "welcome")
	if err != nil {
		t.Fatal(err)
	}
	u, _ := domain.NewUser("Ann", "ann@example.com")
	ev := domain.NewUserCreated(u, time.Now())
	eventID := domain.NewID()

	// Eight deliveries of the same event at once: exactly one processes it.
	var wg sync.WaitGroup
	var mu sync.Mutex
	fresh := 0
	for range 8 {
		wg.Go(func() {
			ok, err := uc.Execute(ctx, eventID, ev)
			if err != nil {
				t.Errorf("execute: %v", err)
			}
			if ok {
				mu.Lock()
				fresh++
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if fresh != 1 || welcomeCount(t, pool, table, u.ID()) != 1 {
		t.Errorf("%d deliveries processed, %d welcome messages; want 1 and 1", fresh, welcomeCount(t, pool, table, u.ID()))
	}
	if ok, err := inbox.Processed(ctx, "welcome", eventID); err != nil || !ok {
		t.Errorf("processed = %t, %v; want true", ok, err)
	}

	// Another consumer keeps its own record.
	other, _ := app.NewSendWelcome(inbox, "audit")
	if ok, err := other.Execute(ctx, eventID, ev); err != nil || !ok {
		t.Errorf("another consumer: processed %t, %v; want true", ok, err)
	}

	// A failing effect records nothing: the event is processed on the next delivery.
	failID := domain.NewID()
	boom := errors.New("boom")
	if _, err := inbox.Once(ctx, "welcome", failID, func(context.Context, app.InboxRepositories) error { return boom }); !errors.Is(err, boom) {
		t.Fatalf("once with a failing effect: %v, want boom", err)
	}
	if ok, err := uc.Execute(ctx, failID, ev); err != nil || !ok {
		t.Errorf("after a failed attempt: processed %t, %v; want true", ok, err)
	}
}

// TestInboxErrorsClassified: values Postgres cannot take are invalid events; an unreachable
// database is unavailable (retried without counting), not a reason to dead-letter.
func TestInboxErrorsClassified(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	ctx := context.Background()
	inbox, _ := postgres.NewInbox(pool, table)
	uc, _ := app.NewSendWelcome(inbox, "welcome")
	u, _ := domain.NewUser("Ann", "ann@example.com")
	ev := domain.NewUserCreated(u, time.Now())
	if _, err := uc.Execute(ctx, "not-a-uuid", ev); !errors.Is(err, app.ErrInvalidEvent) {
		t.Errorf("malformed event id: %v, want app.ErrInvalidEvent", err)
	}

	down, err := pgxpool.New(ctx, "postgres://postgres@127.0.0.1:1/postgres?connect_timeout=2")
	if err != nil {
		t.Fatal(err)
	}
	defer down.Close()
	inboxDown, _ := postgres.NewInbox(down, table)
	ucDown, _ := app.NewSendWelcome(inboxDown, "welcome")
	_, err = ucDown.Execute(ctx, domain.NewID(), ev)
	if !errors.Is(err, app.ErrUnavailable) || errors.Is(err, app.ErrInvalidEvent) {
		t.Errorf("unreachable database: %v, want app.ErrUnavailable", err)
	}
}
