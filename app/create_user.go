package app

import (
	"context"
	"fmt"
	"time"

	"github.com/outbox-relay/outbox-relay/domain"
)

// CreateUserCommand is the input of CreateUser.
type CreateUserCommand struct {
	Name  string
	Email string
}

// CreateUser creates a user and publishes UserCreated after the action, in the same unit of work.
type CreateUser struct {
	uow UnitOfWork
	now func() time.Time
}

// NewCreateUser returns the use case. now is the clock; nil means time.Now.
func NewCreateUser(uow UnitOfWork, now func() time.Time) *CreateUser {
	if now == nil {
		now = time.Now
	}
	return &CreateUser{uow: uow, now: now}
}

// Execute validates the command, stores the user and publishes UserCreated. The event exists
// only if the user does: both commit or roll back together.
func (uc *CreateUser) Execute(ctx context.Context, cmd CreateUserCommand) (string, error) {
	u, err := domain.NewUser(cmd.Name, cmd.Email)
	if err != nil {
		return "", fmt.Errorf("create user: %w", err)
	}
	err = uc.uow.Do(ctx, func(ctx context.Context, r Repositories) error {
		if err := r.Users().Add(ctx, u); err != nil {
			return fmt.Errorf("add user: %w", err)
		}
		if err := r.Events().Publish(ctx, domain.NewUserCreated(u, uc.now())); err != nil {
			return fmt.Errorf("publish UserCreated: %w", err)
		}
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("create user: %w", err)
	}
	return u.ID(), nil
}
