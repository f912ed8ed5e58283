package main

import (
	"context"
	"log/slog"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/adapters/kafka"
	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/adapters/prometheus"
	"github.com/outbox-relay/outbox-relay/adapters/rabbitmq"
	"github.com/outbox-relay/outbox-relay/app/relay"
)

// relaySink is the sink the relay publishes to, as the daemon uses it.
type relaySink interface {
	relay.Sink
	// Ping checks that the broker answers.
	Ping(ctx context.Context) error
	// Close releases the sink's connections.
	Close()
}

var (
	_ relaySink               = (*kafka.Publisher)(nil)
	_ relaySink               = (*rabbitmq.Publisher)(nil)
	_ relaySink               = (*kafka.TxPublisher)(nil)
	_ kafka.PartitionPins     = (*postgres.PartitionPins)(nil)
	_ kafka.PartitionObserver = (*prometheus.Metrics)(nil)
)

// newRelaySink returns the sink named by the sink key: Kafka (with deps, and kafkaOpts added to
// its client's options) or RabbitMQ.
func newRelaySink(cfg *Config, log *slog.Logger, deps kafka.PublisherDeps, kafkaOpts ...kgo.Opt) (relaySink, error) {
	if cfg.Sink == "rabbitmq" {
		return rabbitmq.NewPublisher(cfg.RabbitMQ, log.With("sink", "rabbitmq"))
	}
	kc := cfg.Kafka
	kc.Log = log.With("sink", "kafka")
	if cfg.Delivery == deliveryExactlyOnce {
		tx := cfg.Tx
		tx.MaxRows = cfg.Relay.WithDefaults().BatchSize
		return kafka.NewTxPublisher(kc, tx, deps, kafkaOpts...)
	}
	return kafka.NewPublisherWith(kc, deps, kafkaOpts...)
}
