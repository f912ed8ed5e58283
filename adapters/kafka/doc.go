// Package kafka is outbox-relay's Kafka adapter, built on franz-go.
//
// Publisher is the relay's sink: an idempotent producer with acks=all that turns outbox rows into
// records (key = aggregate id, value = payload, event metadata in headers) and reports the
// broker's acknowledgement of each. It hashes each topic's keys with the topic's pinned partition
// count (PartitionPins), so partitions added to a topic move no key.
//
// Consumer is an input adapter: a consumer group that hands each partition's records, in order,
// to a Handler (WelcomeHandler drives the SendWelcome use case), commits offsets only for records
// whose handling finished, and sends poison records to a dead-letter topic.
package kafka
