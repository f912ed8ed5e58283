package app

import "errors"

// ErrConflict is returned by repositories when a unique fact (such as an email) already exists.
var ErrConflict = errors.New("conflict")

// ErrInvalidMessage is wrapped by a Sink when an outbox row can never be published as it is (an
// invalid topic name, an empty key, a record over the size limit...). The relay parks such a row
// at once, with the error as its reason.
var ErrInvalidMessage = errors.New("invalid message")

// ErrNotLeader is returned by a Session when it lost the leadership it held.
var ErrNotLeader = errors.New("leadership lost")

// ErrReadOnly is returned by a Session connected to a database that cannot be written (a standby
// or a read-only node): the relay never publishes what it could not mark.
var ErrReadOnly = errors.New("database is read-only")
