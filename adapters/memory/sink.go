package memory

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/outbox-relay/outbox-relay/app/relay"
)

// ErrAborted is the error of the messages failed by Sink.Abort.
var ErrAborted = errors.New("memory sink: publish aborted")

// Sink is an in-memory broker for the relay: relay.Sink. A message it accepts is confirmed at
// once (done runs within Publish) and kept, in order, unless Hold was called: then messages wait,
// unconfirmed, until Release. Reject, when set, lets a test refuse chosen messages.
type Sink struct {
	// Reject, when not nil, is asked about every message before it is kept: a non-nil error
	// refuses the message (done is called with it, nothing is kept). Set it before use.
	Reject func(m *relay.Message) error

	mu      sync.Mutex
	kept    []Delivery
	holding bool
	held    []heldMessage
}

type heldMessage struct {
	m    *relay.Message
	done func(error)
}

var _ relay.Sink = (*Sink)(nil)

// NewSink returns an empty sink.
func NewSink() *Sink { return &Sink{} }

// Publish implements relay.Sink. Like the other sinks, it refuses with relay.ErrInvalidMessage a
// message that relay.Message.Check refuses, or whose headers are not a JSON object of strings or
// set one of the relay's own (relay.CheckHeader).
func (s *Sink) Publish(_ context.Context, m *relay.Message, done func(error)) error {
	if err := m.Check(); err != nil {
		return err
	}
	if m.Headers != nil {
		var hs map[string]string
		if err := json.Unmarshal(m.Headers, &hs); err != nil {
			return fmt.Errorf("%w: headers is not a JSON object of strings: %v", relay.ErrInvalidMessage, err)
		}
		for k := range hs {
			if err := relay.CheckHeader(k); err != nil {
				return err
			}
		}
	}
	s.mu.Lock()
	if s.holding {
		s.held = append(s.held, heldMessage{m: m, done: done})
		s.mu.Unlock()
		return nil
	}
	err := s.keep(m)
	s.mu.Unlock()
	done(err)
	return nil
}

// Delivery is a message as the in-memory broker keeps it: the row, and the key, headers and
// payload a consumer would read (the same headers as the Kafka sink's).
type Delivery struct {
	Message relay.Message
	Key     string
	Headers map[string]string
	Payload []byte
}

// keep stores m unless Reject refuses it. s.mu is held.
func (s *Sink) keep(m *relay.Message) error {
	if s.Reject != nil {
		if err := s.Reject(m); err != nil {
			return err
		}
	}
	h := map[string]string{
		relay.HeaderEventID:       m.EventID,
		relay.HeaderEventType:     m.EventType,
		relay.HeaderAggregateType: m.AggregateType,
		relay.HeaderOccurredAt:    m.OccurredAt.UTC().Format(time.RFC3339Nano),
	}
	if m.Headers != nil {
		var hs map[string]string
		_ = json.Unmarshal(m.Headers, &hs) // checked by Publish
		for k, v := range hs {
			h[k] = v
		}
	}
	s.kept = append(s.kept, Delivery{Message: *m, Key: m.AggregateID, Headers: h, Payload: m.Payload})
	return nil
}

// Abort implements relay.Sink: the held messages fail with ErrAborted.
func (s *Sink) Abort(context.Context) error {
	s.mu.Lock()
	held := s.held
	s.held = nil
	s.mu.Unlock()
	for _, h := range held {
		h.done(ErrAborted)
	}
	return nil
}

// Hold makes the sink accept messages without confirming them, until Release.
func (s *Sink) Hold() {
	s.mu.Lock()
	s.holding = true
	s.mu.Unlock()
}

// Release keeps and confirms the held messages, in order, and confirms at once again.
func (s *Sink) Release() {
	s.mu.Lock()
	held := s.held
	s.held = nil
	s.holding = false
	errs := make([]error, len(held))
	for i, h := range held {
		errs[i] = s.keep(h.m)
	}
	s.mu.Unlock()
	for i, h := range held {
		h.done(errs[i])
	}
}

// Deliveries returns a copy of the messages kept (confirmed), in order.
func (s *Sink) Deliveries() []Delivery {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Delivery(nil), s.kept...)
}
