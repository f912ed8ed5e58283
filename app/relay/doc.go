// Package relay is the engine of outbox-relay: it reads committed outbox rows through a Store,
// publishes them through a Sink in order per key, and marks each row only after the sink
// confirmed it, as the only leader of the outbox.
//
// The ports it needs (Store, Session, Sink, Observer, Fenced, Releaser) are declared here, where
// they are used; adapters implement them. The outbox contract every sink and writer follows (the
// reserved headers, what makes a key or a time invalid) is in contract.go.
//
// DESIGN.md, beside these files, maps them and lists the invariants the engine keeps (order per
// key, no skipped row, marks only after the ack and by the leader, bounded duplicates, what the
// horizon means), each with the test that guards it.
package relay
