package postgres

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/app"
	"github.com/outbox-relay/outbox-relay/domain"
)

// UnitOfWork runs use cases in one Postgres transaction: the users they store and the events they
// publish (written to the outbox) commit together.
type UnitOfWork struct {
	pool   *pgxpool.Pool
	writer *Writer
	users  string
}

var _ app.UnitOfWork = (*UnitOfWork)(nil)

// NewUnitOfWork returns a UnitOfWork writing events to the outbox t and users to t's schema.
func NewUnitOfWork(pool *pgxpool.Pool, t Table) (*UnitOfWork, error) {
	t = t.WithDefaults()
	w, err := NewWriter(t)
	if err != nil {
		return nil, err
	}
	return &UnitOfWork{pool: pool, writer: w, users: pgx.Identifier{t.Schema, "users"}.Sanitize()}, nil
}

// Do implements app.UnitOfWork.
func (u *UnitOfWork) Do(ctx context.Context, fn func(ctx context.Context, r app.Repositories) error) error {
	return pgx.BeginFunc(ctx, u.pool, func(tx pgx.Tx) error {
		return fn(ctx, txRepos{tx: tx, uow: u})
	})
}

type txRepos struct {
	tx  pgx.Tx
	uow *UnitOfWork
}

func (r txRepos) Users() app.UserRepository { return &UserRepository{tx: r.tx, table: r.uow.users} }
func (r txRepos) Events() app.EventPublisher {
	return &EventPublisher{tx: r.tx, writer: r.uow.writer}
}

// UserRepository stores users within a transaction.
type UserRepository struct {
	tx    pgx.Tx
	table string
}

var _ app.UserRepository = (*UserRepository)(nil)

// Add implements app.UserRepository.
func (r *UserRepository) Add(ctx context.Context, u domain.User) error {
	_, err := r.tx.Exec(ctx, `INSERT INTO `+r.table+` (id, name, email) VALUES ($1, $2, $3)`, u.ID(), u.Name(), u.Email())
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "23505" {
		return fmt.Errorf("email %q: %w", u.Email(), app.ErrConflict)
	}
	return err
}

// EventPublisher writes domain events to the outbox within a transaction: the app's
// EventPublisher port, implemented with the transactional outbox.
type EventPublisher struct {
	tx     DBTX
	writer *Writer
}

var _ app.EventPublisher = (*EventPublisher)(nil)

// Publish implements app.EventPublisher: all events are appended in one round trip.
func (p *EventPublisher) Publish(ctx context.Context, events ...domain.Event) error {
	msgs := make([]Message, len(events))
	for i, ev := range events {
		payload, err := ev.MarshalJSON()
		if err != nil {
			return fmt.Errorf("encode %s: %w", ev.EventType(), err)
		}
		msgs[i] = Message{
			AggregateType: ev.AggregateType(),
			AggregateID:   ev.AggregateID(),
			EventType:     ev.EventType(),
			Payload:       payload,
			OccurredAt:    ev.OccurredAt(),
			Headers:       map[string]string{"content-type": "application/json"},
		}
	}
	return p.writer.Append(ctx, p.tx, msgs...)
}
