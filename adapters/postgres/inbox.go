package postgres

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/app"
)

// Inbox is the consumer side's idempotency record in Postgres: app.Inbox. Its tables (inbox and
// welcome_messages) are created by MigrateExample in the schema of the Table it is given.
type Inbox struct {
	pool     *pgxpool.Pool
	inbox    string
	welcomes string
}

var _ app.Inbox = (*Inbox)(nil)

// NewInbox returns the inbox in t's schema.
func NewInbox(pool *pgxpool.Pool, t Table) (*Inbox, error) {
	t = t.WithDefaults()
	if err := t.Validate(); err != nil {
		return nil, err
	}
	return &Inbox{
		pool:     pool,
		inbox:    pgx.Identifier{t.Schema, "inbox"}.Sanitize(),
		welcomes: pgx.Identifier{t.Schema, "welcome_messages"}.Sanitize(),
	}, nil
}

// Once implements app.Inbox. The inbox row is inserted first: a concurrent transaction holding
// the same event waits on it, then finds it and skips. Values Postgres cannot take (an event id
// or a user id that is not a UUID) wrap app.ErrInvalidEvent.
func (i *Inbox) Once(ctx context.Context, consumer, eventID string, fn func(ctx context.Context, r app.InboxRepositories) error) (bool, error) {
	var ran bool
	err := pgx.BeginFunc(ctx, i.pool, func(tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, `INSERT INTO `+i.inbox+` (consumer, event_id) VALUES ($1, $2)
			ON CONFLICT (consumer, event_id) DO NOTHING`, consumer, eventID)
		if err != nil {
			return fmt.Errorf("record event in inbox: %w", invalid(err))
		}
		if tag.RowsAffected() == 0 {
			return nil // processed before: nothing to do, nothing to write
		}
		if err := fn(ctx, inboxRepos{tx: tx, inbox: i}); err != nil {
			return err
		}
		ran = true
		return nil
	})
	if err != nil {
		return false, unavailable(err)
	}
	return ran, nil
}

// Check reports an error naming the missing piece when the inbox tables are not there.
func (i *Inbox) Check(ctx context.Context) error {
	for _, t := range []string{i.inbox, i.welcomes} {
		if _, err := i.pool.Exec(ctx, `SELECT 1 FROM `+t+` LIMIT 0`); err != nil {
			return fmt.Errorf("table %s: %w (create it with 'outbox-relay migrate --example')", t, err)
		}
	}
	return nil
}

// Processed reports whether consumer processed eventID.
func (i *Inbox) Processed(ctx context.Context, consumer, eventID string) (bool, error) {
	var ok bool
	err := i.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM `+i.inbox+` WHERE consumer = $1 AND event_id = $2)`,
		consumer, eventID).Scan(&ok)
	if err != nil {
		return false, fmt.Errorf("read inbox: %w", invalid(err))
	}
	return ok, nil
}

type inboxRepos struct {
	tx    pgx.Tx
	inbox *Inbox
}

func (r inboxRepos) Mailer() app.Mailer { return &WelcomeMailer{tx: r.tx, table: r.inbox.welcomes} }

// WelcomeMailer records welcome messages in the welcome_messages table instead of mailing them:
// app.Mailer, bound to an inbox transaction.
type WelcomeMailer struct {
	tx    pgx.Tx
	table string
}

var _ app.Mailer = (*WelcomeMailer)(nil)

// SendWelcome implements app.Mailer.
func (m *WelcomeMailer) SendWelcome(ctx context.Context, userID, email, eventID string) error {
	_, err := m.tx.Exec(ctx, `INSERT INTO `+m.table+` (user_id, email, event_id) VALUES ($1, $2, $3)`, userID, email, eventID)
	if err != nil {
		return fmt.Errorf("record welcome message: %w", invalid(err))
	}
	return nil
}

// unavailable wraps app.ErrUnavailable around the errors that say the database could not be
// reached or failed transiently: connection failures and timeouts, SQLSTATE class 08
// (connection exception), 57P01-57P03 (shutdown, cannot connect now), 53300 (too many
// connections), 40001 and 40P01 (serialization failure, deadlock).
func unavailable(err error) error {
	if errors.Is(err, app.ErrInvalidEvent) || errors.Is(err, context.Canceled) {
		return err
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		switch {
		case strings.HasPrefix(pgErr.Code, "08"), pgErr.Code == "57P01", pgErr.Code == "57P02", pgErr.Code == "57P03",
			pgErr.Code == "53300", pgErr.Code == "40001", pgErr.Code == "40P01":
			return fmt.Errorf("%w: %w", app.ErrUnavailable, err)
		}
		return err
	}
	var connErr *pgconn.ConnectError
	var netErr net.Error
	if errors.As(err, &connErr) || errors.As(err, &netErr) || pgconn.Timeout(err) || pgconn.SafeToRetry(err) ||
		errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%w: %w", app.ErrUnavailable, err)
	}
	return err
}

// invalid wraps app.ErrInvalidEvent around the errors that say a value can never be stored
// (invalid_text_representation, such as a malformed UUID; string_data_right_truncation;
// character_not_in_repertoire; untranslatable_character).
func invalid(err error) error {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		switch pgErr.Code {
		case "22P02", "22001", "22021", "22P05":
			return fmt.Errorf("%w: %w", app.ErrInvalidEvent, err)
		}
	}
	return err
}
