package relay

import (
	"context"
	"strings"
	"time"
)

// Message is one outbox row claimed by the relay.
type Message struct {
	ID            int64     // the row's id: its place in the outbox's order
	EventID       string    // the event's UUID, sent as the event-id header
	AggregateType string    // the aggregate's kind, used by the topic template
	AggregateID   string    // the record key; "" when the column is NULL or empty (AggregateIDNull)
	EventType     string    // sent as the event-type header
	Payload       []byte    // the record value; nil when the column is NULL
	Topic         string    // the row's topic override; "" when NULL
	Headers       []byte    // the row's headers as a JSON object; nil when NULL
	OccurredAt    time.Time // when the fact happened, as the writer said; zero for 'infinity' (OccurredAtInfinite)
	CreatedAt     time.Time // when the row was inserted (clock of the database)
	Attempts      int       // failed publish attempts so far
	// TxID is the database transaction that wrote the row, when the store reads it (exactly-once
	// delivery; 0 otherwise, and for rows written before the store recorded it).
	TxID int64
	// TxHeld is set on a row the claim returned only to say that its transaction (TxID) is not
	// whole now: the row may not go (it is in flight, backing off, or its key is held), so no row
	// of its transaction goes in this hand-over. Such a row is never handed to the sink.
	TxHeld bool
	// AggregateIDNull is true when the aggregate_id column is NULL (AggregateID is then ""): a
	// NULL and an empty key are both invalid (Check), and each such row is parked on its own.
	AggregateIDNull bool
	// OccurredAtInfinite is true when occurred_at is 'infinity' or '-infinity': there is no time
	// to send, and sinks refuse the row (Check). A zero OccurredAt alone is 0001-01-01T00:00:00Z,
	// a valid time.
	OccurredAtInfinite bool
}

// Size returns an estimate of the bytes m holds in memory.
func (m *Message) Size() int {
	return len(m.Payload) + len(m.Headers) + len(m.AggregateID) + len(m.AggregateType) +
		len(m.EventType) + len(m.Topic) + len(m.EventID) + 96
}

// orderKey identifies the sequence m belongs to: events of one aggregate keep their order. It is
// also m's key in Blocked.
func (m *Message) orderKey() string { return BlockKey(m.AggregateType, m.AggregateID) }

// Blocked names the ordering keys that must wait, with the id of the only row of the key that
// may still be published (the failing head); 0 means none may (the head is parked).
type Blocked map[string]int64

// BlockKey returns the key used in Blocked for an aggregate.
func BlockKey(aggregateType, aggregateID string) string { return aggregateType + "\x00" + aggregateID }

// SplitBlockKey returns the aggregate type and id of a key of Blocked. Neither can hold a NUL
// (PostgreSQL text cannot), so the split is unambiguous.
func SplitBlockKey(k string) (aggregateType, aggregateID string) {
	aggregateType, aggregateID, _ = strings.Cut(k, "\x00")
	return aggregateType, aggregateID
}

// Store opens sessions on the outbox.
type Store interface {
	// Open connects a new Session. It fails when the database cannot be reached.
	Open(ctx context.Context) (Session, error)
}

// Session is one database connection of the relay. Leadership is tied to it: when the connection
// ends, the leadership ends with it.
//
// Concurrency. The relay makes its calls of a session one at a time, each returning before
// the next starts, as from a single goroutine, with these exceptions only:
//   - Mark runs beside any other call but TryLead and Close (one Mark at a time): a session
//     marks on a connection of its own, or orders its marks with its other calls itself.
//   - Fenced.TermContext may be called beside any call but Close; the context it returns is
//     read by the sink's goroutines.
//
// That includes Notified and, when the session is a Releaser, Release: neither runs beside
// another call but Mark. Close is called once, last, when every other call returned.
type Session interface {
	// TryLead tries to become the only publisher of the outbox. It returns ErrReadOnly when the
	// database cannot be written.
	TryLead(ctx context.Context) (bool, error)
	// Claim returns pending, due rows with ids from from, in id order, leaving out the rows whose
	// ids are in skip (the relay's rows in flight: distinct ids, in any order) and the rows of
	// the keys in hold but for the head each names (none for 0): at most limit rows and, past
	// the first row, at most maxBytes of them. It reads them in one snapshot, so it never returns a row while leaving out
	// (outside skip and hold, at or above from) an earlier row of its key that committed before
	// it. hold is the claim's own: the session may read it, never change it.
	Claim(ctx context.Context, from int64, skip []int64, limit, maxBytes int, hold Blocked) ([]Message, error)
	// Horizon returns an id at or below which no new row can appear, except rows put back from
	// the parked table: every row with an id up to it is committed or never will be. Claims
	// may then start past the pending rows below it that the relay accounted for, instead of
	// walking from the oldest row (in delete mode, over every row deleted since the last
	// vacuum). 0 means none is known; an error wrapping ErrNoHorizon means none ever will be.
	Horizon(ctx context.Context) (int64, error)
	// Mark records that the rows were published (deletes them or stamps them dispatched).
	Mark(ctx context.Context, ids []int64) error
	// Retry records a failed attempt on a row and makes it due again after delay.
	Retry(ctx context.Context, id int64, reason string, delay time.Duration) error
	// Park moves a row out of the pending rows, with the reason it cannot be published.
	Park(ctx context.Context, id int64, reason string) error
	// Blocked returns the keys with a failing row and, when withParked, those with a parked row.
	Blocked(ctx context.Context, withParked bool) (Blocked, error)
	// Wait blocks until a wake-up notification arrives or timeout passes. It may return sooner
	// with Notified set, when the session wants a claim before it sleeps (the Postgres session
	// does, so writers need not notify a relay that is awake).
	Wait(ctx context.Context, timeout time.Duration) error
	// Notified reports, and clears, whether a wake-up arrived since the last call.
	Notified() bool
	// Close ends the session and with it any leadership.
	Close(ctx context.Context) error
}

// Sleeper is implemented by a Session whose wake-ups can be relied on while it sleeps. Asleep
// reports whether it sleeps now: from here on, every row committed to the outbox through its
// trigger makes Wait return with Notified set (the Postgres session's wake-up protocol proves no
// such wake-up is lost). The relay then polls less often (see term.pollEvery): the poll is
// left to find what sends no wake-up, rows written with the trigger disabled or bypassed. It is
// called like Notified, after a use of the session, never beside another call but Mark.
type Sleeper interface {
	Asleep() bool
}

// Releaser is implemented by a Session that reuses the memory of the messages its claims
// returned. Release tells it that nothing refers any more to the payloads and headers of msgs:
// the relay calls it for the rows the broker acknowledged (and the rows it read but did not
// publish), when the sink is a ReleasingSink.
type Releaser interface {
	Release(msgs []*Message)
}

// ReleasingSink is implemented by a Sink that keeps no reference to a message, its payload or
// its headers once it called the message's done.
type ReleasingSink interface {
	// ReleasesMessages reports whether the sink lets go of each message when it calls done.
	ReleasesMessages() bool
}

// Sink publishes messages to a broker.
type Sink interface {
	// Publish hands m to the broker asynchronously and calls done exactly once with the broker's
	// verdict: nil means the broker acknowledged m durably. An error wrapping ErrInvalidMessage,
	// returned at once, means m can never be published as it is; done is then not called.
	Publish(ctx context.Context, m *Message, done func(error)) error
	// Abort fails every message not yet acknowledged, and returns once their done calls ran.
	Abort(ctx context.Context) error
}

// Observer is told what the relay does, for metrics. Its methods must not block, nor keep a
// message's Payload or Headers after they return (their memory may be reused, see Releaser).
type Observer interface {
	// Claimed reports a claim query that returned n rows.
	Claimed(n int, elapsed time.Duration)
	// Acked reports a message the broker acknowledged.
	Acked(m *Message, at time.Time)
	// Marked reports n rows marked as published.
	Marked(n int, elapsed time.Duration)
	// Failed reports a publish that failed.
	Failed(m *Message, err error)
	// Parked reports a row parked with a reason.
	Parked(m *Message, reason string)
	// Leading reports a change of leadership of this process.
	Leading(leader bool)
	// Connected reports whether the relay's database session is up.
	Connected(up bool)
}

// NopObserver is a Observer that does nothing.
type NopObserver struct{}

// Claimed implements Observer.
func (NopObserver) Claimed(int, time.Duration) {}

// Acked implements Observer.
func (NopObserver) Acked(*Message, time.Time) {}

// Marked implements Observer.
func (NopObserver) Marked(int, time.Duration) {}

// Failed implements Observer.
func (NopObserver) Failed(*Message, error) {}

// Parked implements Observer.
func (NopObserver) Parked(*Message, string) {}

// Leading implements Observer.
func (NopObserver) Leading(bool) {}

// Connected implements Observer.
func (NopObserver) Connected(bool) {}

// Fenced is implemented by a Session that keeps confirming its leadership while it leads.
// TermContext returns, once TryLead succeeded, a context that is done as soon as the leadership
// was last confirmed more than a lease ago (its Err wraps ErrNotLeader), and how long the previous
// leader's lease may still run (zero when there was none, or it ran out). The relay hands every
// record to the sink with that context, so that a sink that checks it where the record leaves the
// process (the Kafka producer does, per batch) sends nothing for a term that may have ended; and
// it waits holdOff before it publishes, so that the old leader's lease ran out first. It may be
// called beside any method of the Session but Close (see Session).
type Fenced interface {
	TermContext() (ctx context.Context, holdOff time.Duration)
}
