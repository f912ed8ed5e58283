package relay

import "errors"

// ErrInvalidMessage is wrapped by a Sink when an outbox row can never be published as it is (an
// invalid topic name, an empty key, a record over the size limit...). The relay parks such a row
// at once, with the error as its reason.
var ErrInvalidMessage = errors.New("invalid message")

// ErrDestinationMissing is wrapped by a Sink when a message's destination (a Kafka topic) does
// not exist. That is an operator's mistake that concerns every message sent there, not this row:
// the relay counts no attempt against the row and parks nothing; it holds the row's key and sends
// the row again after a backoff (relay.retry_backoff_min, doubling up to 10s or
// relay.retry_backoff_max if lower) until the destination exists. Meanwhile the rows stay due:
// with nothing else published it is a stall.
var ErrDestinationMissing = errors.New("destination missing")

// ErrSendAgain is wrapped by a Sink when it dropped a message for no fault of the message's row:
// a transaction the message was in was aborted because another message of it was refused (a
// transactional sink never commits a transaction that lost a row of a database transaction). The
// relay counts no attempt against the row and parks nothing; it holds the row's key and sends the
// row again after a backoff, as for ErrDestinationMissing.
var ErrSendAgain = errors.New("sent again: its transaction was aborted for another message")

// ErrNotLeader is returned by a Session when it lost the leadership it held.
var ErrNotLeader = errors.New("leadership lost")

// ErrNoHorizon is wrapped by Session.Horizon when the outbox cannot give one (its ids are
// cached per session, or cannot be read): every claim then reads from the oldest pending row.
var ErrNoHorizon = errors.New("no id horizon")

// ErrReadOnly is returned by a Session connected to a database that cannot be written (a standby
// or a read-only node): the relay never publishes what it could not mark.
var ErrReadOnly = errors.New("database is read-only")

// GroupError is the error a Sink reports for a message that failed together with the other
// messages of its group, such as every buffered record of one Kafka partition when one of its
// batches fails. The relay counts such a failure against one key of the group only, so the
// poison row's neighbours are not parked for its fault.
type GroupError struct {
	Group string // names the group, such as "topic/partition"
	Err   error  // the sink's error
}

// Error implements error.
func (e *GroupError) Error() string { return e.Err.Error() }

// Unwrap returns the sink's error.
func (e *GroupError) Unwrap() error { return e.Err }

// ErrSessionUnsupported is returned by a Store whose connections cannot keep a database session
// (a connection pooler in transaction or statement mode). The relay's leadership, wake-ups and
// mark fence depend on one, so Run stops with this error instead of retrying.
var ErrSessionUnsupported = errors.New("database session unsupported")

// ErrTakeoverDenied is returned by Session.TryLead when the leader gave no sign of life for longer
// than its lease while rows wait, and this session may not end the leader's session (it lacks the
// privilege). The relay stays standby and says so; the session stays usable.
var ErrTakeoverDenied = errors.New("cannot take over a silent leader")
