package relay

import (
	"fmt"
	"strings"
	"time"
)

// The outbox contract's rules on a row, written once here for every sink and for the Go writer:
// the headers the relay sets and a writer may not, what makes a key invalid, and the range of
// occurred_at. A row that breaks one is parked at once with the reason these checks return.

// Header names the relay sets on every message it publishes. They are reserved: a row whose
// headers set one of them, in any letter case, is refused (see CheckHeader).
const (
	HeaderEventID       = "event-id"       // the row's event_id, for consumers to drop repeats
	HeaderEventType     = "event-type"     // the row's event_type
	HeaderAggregateType = "aggregate-type" // the row's aggregate_type
	HeaderAggregateID   = "aggregate-id"   // the row's aggregate_id, where the broker has no record key (RabbitMQ)
	HeaderOccurredAt    = "occurred-at"    // the row's occurred_at in RFC 3339, in UTC
	HeaderReplayedAt    = "replayed-at"    // set by 'outbox-relay replay' only: when it sent the event again, RFC 3339, UTC
)

// reservedHeaders lists the Header constants: every name the relay sets on a message.
var reservedHeaders = [...]string{HeaderEventID, HeaderEventType, HeaderAggregateType, HeaderAggregateID, HeaderOccurredAt,
	HeaderReplayedAt}

// ReservedHeaders returns the header names a row may not set, in the order they are documented.
func ReservedHeaders() []string { return append([]string(nil), reservedHeaders[:]...) }

// IsReservedHeader reports whether name is a header the relay sets, compared without regard to
// letter case: consumers often normalise header names, so "Event-ID" would pass for the relay's.
func IsReservedHeader(name string) bool {
	for _, r := range reservedHeaders {
		if strings.EqualFold(name, r) {
			return true
		}
	}
	return false
}

// CheckHeader returns an error wrapping ErrInvalidMessage when a row's headers set name, a header
// the relay sets itself: a consumer reading the writer's value would take it for the relay's.
func CheckHeader(name string) error {
	if IsReservedHeader(name) {
		return fmt.Errorf("%w: header %q is reserved: the relay sets %s itself", ErrInvalidMessage,
			name, strings.Join(reservedHeaders[:], ", "))
	}
	return nil
}

// The years an occurred_at may have, in UTC: the occurred-at header is RFC 3339, whose years have
// four digits, and year 0 (1 BC) is not one a consumer's parser takes for granted.
const (
	OccurredAtMinYear = 1
	OccurredAtMaxYear = 9999
)

// CheckOccurredAt returns an error wrapping ErrInvalidMessage when t, an occurred_at, cannot be
// sent: its year in UTC is outside OccurredAtMinYear to OccurredAtMaxYear. 0001-01-01T00:00:00Z
// (the zero time.Time) is valid; 'infinity' is told apart by Message.OccurredAtInfinite.
func CheckOccurredAt(t time.Time) error {
	if y := t.UTC().Year(); y < OccurredAtMinYear || y > OccurredAtMaxYear {
		return fmt.Errorf("%w: occurred_at year %d (UTC) is outside %04d to %04d, the years of an RFC 3339 time",
			ErrInvalidMessage, y, OccurredAtMinYear, OccurredAtMaxYear)
	}
	return nil
}

// Check returns an error wrapping ErrInvalidMessage, saying what is wrong, when m cannot be
// published by any sink: its aggregate_id (the key that orders its events) is NULL or empty, or
// its occurred_at is infinite or outside the years CheckOccurredAt takes. Every sink calls it
// first, then checks what is its own (headers, topic, size...) with CheckHeader among them.
func (m *Message) Check() error {
	switch {
	case m.AggregateIDNull:
		return fmt.Errorf("%w: aggregate_id is NULL: every event needs a key, which orders its aggregate's events", ErrInvalidMessage)
	case m.AggregateID == "":
		return fmt.Errorf("%w: aggregate_id is empty: every event needs a key, which orders its aggregate's events", ErrInvalidMessage)
	case m.OccurredAtInfinite:
		return fmt.Errorf("%w: occurred_at is not a finite time ('infinity' or '-infinity')", ErrInvalidMessage)
	}
	return CheckOccurredAt(m.OccurredAt)
}

// keyed reports whether m has a valid key. Rows without one are parked one by one, each for
// itself: they have no order to keep, so they never wait behind another row, nor hold one back.
func (m *Message) keyed() bool { return m.AggregateID != "" && !m.AggregateIDNull }
