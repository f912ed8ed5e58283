// Package kafka is outbox-relay's Kafka adapter, built on franz-go.
//
// Publisher is the relay's sink: an idempotent producer with acks=all that turns outbox rows into
// records (key = aggregate id, value = payload, event metadata in headers) and reports the
// broker's acknowledgement of each.
package kafka
