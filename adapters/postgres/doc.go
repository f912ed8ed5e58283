// Package postgres is outbox-relay's PostgreSQL adapter, built on pgx v5.
//
// It holds the write side (Writer appends events to the outbox inside a caller's pgx.Tx;
// UnitOfWork runs the app's use cases in one transaction), the relay's Store (claiming, marking,
// parking, leadership through an advisory lock, LISTEN/NOTIFY wake-ups), and Migrate.
package postgres
