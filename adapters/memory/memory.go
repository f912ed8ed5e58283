// Package memory holds in-memory adapters for tests and development: a UnitOfWork whose
// Publisher records the domain events a use case emitted, committed only when the unit of work
// succeeds, and Sink, an in-memory broker for the relay.
package memory

import (
	"context"
	"fmt"
	"sync"

	"github.com/outbox-relay/outbox-relay/app"
	"github.com/outbox-relay/outbox-relay/domain"
)

// Publisher records published domain events: app.EventPublisher.
type Publisher struct {
	mu     sync.Mutex
	events []domain.Event
}

var _ app.EventPublisher = (*Publisher)(nil)

// Publish implements app.EventPublisher.
func (p *Publisher) Publish(_ context.Context, events ...domain.Event) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.events = append(p.events, events...)
	return nil
}

// Events returns a copy of the events published so far, in order.
func (p *Publisher) Events() []domain.Event {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]domain.Event(nil), p.events...)
}

// UnitOfWork keeps users and events in memory. A unit of work that fails leaves no trace:
// neither its users nor its events.
type UnitOfWork struct {
	mu        sync.Mutex
	users     map[string]domain.User // by email
	Published Publisher              // the events of committed units of work
}

var _ app.UnitOfWork = (*UnitOfWork)(nil)

// NewUnitOfWork returns an empty UnitOfWork.
func NewUnitOfWork() *UnitOfWork { return &UnitOfWork{users: make(map[string]domain.User)} }

// Do implements app.UnitOfWork. Units of work run one at a time.
func (u *UnitOfWork) Do(ctx context.Context, fn func(ctx context.Context, r app.Repositories) error) error {
	u.mu.Lock()
	defer u.mu.Unlock()
	tx := &txRepos{uow: u, users: make(map[string]domain.User)}
	if err := fn(ctx, tx); err != nil {
		return err
	}
	for k, v := range tx.users {
		u.users[k] = v
	}
	return u.Published.Publish(ctx, tx.events.Events()...)
}

// Users returns the committed users.
func (u *UnitOfWork) Users() []domain.User {
	u.mu.Lock()
	defer u.mu.Unlock()
	out := make([]domain.User, 0, len(u.users))
	for _, v := range u.users {
		out = append(out, v)
	}
	return out
}

type txRepos struct {
	uow    *UnitOfWork
	users  map[string]domain.User
	events Publisher
}

func (t *txRepos) Users() app.UserRepository  { return (*userRepo)(t) }
func (t *txRepos) Events() app.EventPublisher { return &t.events }

type userRepo txRepos

func (r *userRepo) Add(_ context.Context, usr domain.User) error {
	if _, ok := r.uow.users[usr.Email()]; ok {
		return fmt.Errorf("email %q: %w", usr.Email(), app.ErrConflict)
	}
	if _, ok := r.users[usr.Email()]; ok {
		return fmt.Errorf("email %q: %w", usr.Email(), app.ErrConflict)
	}
	r.users[usr.Email()] = usr
	return nil
}
