package app

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/outbox-relay/outbox-relay/domain"
)

// ErrInvalidEvent is wrapped by consumers' use cases and adapters when a consumed event can never
// be processed as it is (a payload that does not decode, a missing event id...). Consumers send
// such events to their dead-letter destination at once instead of retrying them.
var ErrInvalidEvent = errors.New("invalid event")

// ErrUnavailable is wrapped by adapters when a dependency (the database) cannot be reached or
// failed transiently: the same work will succeed later. Consumers retry such failures without
// counting them against the event, so an outage delays events instead of dead-lettering them.
var ErrUnavailable = errors.New("dependency unavailable")

// Mailer is the output port that sends messages to users.
type Mailer interface {
	// SendWelcome sends the welcome message of user userID to email. eventID names the event
	// that asked for it.
	SendWelcome(ctx context.Context, userID, email, eventID string) error
}

// InboxRepositories gives an inbox's function the ports bound to its transaction.
type InboxRepositories interface {
	Mailer() Mailer
}

// Inbox makes a consumer's processing idempotent: it remembers the ids of the events each
// consumer processed, in the same transaction as the processing's effects.
type Inbox interface {
	// Once runs fn in one transaction with the record that consumer processed eventID, unless
	// that record exists already. It reports whether fn ran and committed. When fn fails,
	// nothing is recorded and its error is returned. Concurrent calls for one event wait for
	// each other: at most one commits.
	Once(ctx context.Context, consumer, eventID string, fn func(ctx context.Context, r InboxRepositories) error) (bool, error)
}

// SendWelcome is the use case driven by UserCreated events: it welcomes each new user once,
// however many times the event is delivered.
type SendWelcome struct {
	inbox    Inbox
	consumer string
}

// NewSendWelcome returns the use case. consumer names the consumer in the inbox (events are
// deduplicated per consumer); it must not be empty.
func NewSendWelcome(inbox Inbox, consumer string) (*SendWelcome, error) {
	if inbox == nil {
		return nil, errors.New("new send welcome: inbox is required")
	}
	if strings.TrimSpace(consumer) == "" {
		return nil, errors.New("new send welcome: consumer name is required")
	}
	return &SendWelcome{inbox: inbox, consumer: consumer}, nil
}

// Execute welcomes the user of ev, delivered as the event eventID, unless this consumer already
// processed eventID. It reports whether the event was processed now (false: a repeat, skipped).
// An event without an email wraps ErrInvalidEvent.
func (uc *SendWelcome) Execute(ctx context.Context, eventID string, ev domain.UserCreated) (bool, error) {
	if eventID == "" {
		return false, fmt.Errorf("send welcome: %w: event id is empty", ErrInvalidEvent)
	}
	if ev.UserID() == "" || ev.Email() == "" {
		return false, fmt.Errorf("send welcome: %w: UserCreated %s has no user id or no email", ErrInvalidEvent, eventID)
	}
	done, err := uc.inbox.Once(ctx, uc.consumer, eventID, func(ctx context.Context, r InboxRepositories) error {
		return r.Mailer().SendWelcome(ctx, ev.UserID(), ev.Email(), eventID)
	})
	if err != nil {
		return false, fmt.Errorf("send welcome for event %s: %w", eventID, err)
	}
	return done, nil
}
