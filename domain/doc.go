// Package domain holds the example service's entities and the domain events they give birth to.
//
// Domain events are immutable facts that already happened: they carry ids and the minimum of
// data, never whole entities. The package imports only the standard library; it knows nothing of
// the outbox, Postgres or Kafka.
package domain
