// Package app holds the use cases of outbox-relay and the small interfaces (ports) they need.
//
// Two families live here. The write side: CreateUser publishes domain events through an
// EventPublisher inside a UnitOfWork, so an adapter can write them into the outbox in the same
// transaction as the aggregate. The relay: Relay reads committed outbox rows through a Store,
// publishes them through a Sink and marks them only after the sink confirmed them. The consumer
// side: SendWelcome, driven by UserCreated events, welcomes each user once through a Mailer,
// made idempotent by an Inbox that records each event id in the same transaction.
//
// The relay's engine is the files relay*.go: DESIGN.md, beside them, maps them and lists the
// invariants the engine keeps (order per key, no skipped row, marks only after the ack and by
// the leader, bounded duplicates, what the horizon means), each with the test that guards it.
package app
