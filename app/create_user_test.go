package app_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/adapters/memory"
	"github.com/outbox-relay/outbox-relay/app"
	"github.com/outbox-relay/outbox-relay/domain"
)

func TestCreateUserPublishesUserCreated(t *testing.T) {
	t.Parallel()
	uow := memory.NewUnitOfWork()
	at := time.Date(2026, 5, 6, 7, 8, 9, 0, time.UTC)
	uc := app.NewCreateUser(uow, func() time.Time { return at })

	id, err := uc.Execute(context.Background(), app.CreateUserCommand{Name: "Ann", Email: "ann@example.com"})
	if err != nil {
		t.Fatal(err)
	}
	events := uow.Published.Events()
	if len(events) != 1 {
		t.Fatalf("published %d events, want 1", len(events))
	}
	ev, ok := events[0].(domain.UserCreated)
	if !ok {
		t.Fatalf("published %T, want domain.UserCreated", events[0])
	}
	if ev.UserID() != id || ev.Email() != "ann@example.com" || !ev.OccurredAt().Equal(at) {
		t.Errorf("event = {%s %s %s}, want {%s ann@example.com %s}", ev.UserID(), ev.Email(), ev.OccurredAt(), id, at)
	}
}

func TestCreateUserFailurePublishesNothing(t *testing.T) {
	t.Parallel()
	uow := memory.NewUnitOfWork()
	uc := app.NewCreateUser(uow, nil)
	ctx := context.Background()
	if _, err := uc.Execute(ctx, app.CreateUserCommand{Name: "Ann", Email: "ann@example.com"}); err != nil {
		t.Fatal(err)
	}
	_, err := uc.Execute(ctx, app.CreateUserCommand{Name: "Other Ann", Email: "ann@example.com"})
	if !errors.Is(err, app.ErrConflict) {
		t.Fatalf("second user with the same email: err = %v, want ErrConflict", err)
	}
	_, err = uc.Execute(ctx, app.CreateUserCommand{Name: "", Email: "bob@example.com"})
	if !errors.Is(err, domain.ErrInvalidUser) {
		t.Fatalf("user without a name: err = %v, want ErrInvalidUser", err)
	}
	if n := len(uow.Published.Events()); n != 1 {
		t.Errorf("published %d events, want 1: failed use cases must publish nothing", n)
	}
	if n := len(uow.Users()); n != 1 {
		t.Errorf("stored %d users, want 1", n)
	}
}
