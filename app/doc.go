// Package app holds the use cases of outbox-relay and the small interfaces (ports) they need.
//
// The write side: CreateUser publishes domain events through an EventPublisher inside a
// UnitOfWork, so an adapter can write them into the outbox in the same transaction as the
// aggregate. The consumer side: SendWelcome, driven by UserCreated events, welcomes each user
// once through a Mailer, made idempotent by an Inbox that records each event id in the same
// transaction.
//
// The relay that moves committed outbox rows to a broker is its own package, app/relay.
package app
