package app

import (
	"context"

	"github.com/outbox-relay/outbox-relay/domain"
)

// EventPublisher is the output port use cases publish domain events through. Publishing inside a
// UnitOfWork makes the events part of the same transaction as the aggregate's change.
type EventPublisher interface {
	Publish(ctx context.Context, events ...domain.Event) error
}

// UserRepository stores users.
type UserRepository interface {
	// Add stores a new user. It returns ErrConflict when the email is taken.
	Add(ctx context.Context, u domain.User) error
}

// Repositories gives a unit of work's function the repositories and the publisher bound to its
// transaction.
type Repositories interface {
	Users() UserRepository
	Events() EventPublisher
}

// UnitOfWork runs fn in one transaction: everything fn stored and published commits together, or
// nothing does when fn returns an error.
type UnitOfWork interface {
	Do(ctx context.Context, fn func(ctx context.Context, r Repositories) error) error
}
