package domain

import (
	"crypto/rand"
	"fmt"
	"time"
)

// Event is a domain event: an immutable fact about one aggregate.
//
// Implementations expose their data through methods only, so a published event cannot be changed,
// and describe their wire form with encoding/json's Marshaler.
type Event interface {
	// EventType names the fact, for example "UserCreated".
	EventType() string
	// AggregateType names the kind of aggregate the fact is about, for example "user".
	AggregateType() string
	// AggregateID identifies the aggregate; all events of one aggregate keep their order.
	AggregateID() string
	// OccurredAt is when the fact happened, as seen by the service.
	OccurredAt() time.Time
	// MarshalJSON returns the event's payload.
	MarshalJSON() ([]byte, error)
}

// NewID returns a random RFC 4122 version 4 UUID in its canonical text form.
func NewID() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never returns an error.
	b[6] = (b[6] & 0x0f) | 0x40
	b[8] = (b[8] & 0x3f) | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}
