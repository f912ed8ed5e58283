package main

import (
	"context"
	"fmt"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/adapters/kafka"
)

// consume is the consume role: a consumer of the bench topic, in a process of its own as an
// application's would be, that records when each record arrived (the acks of its report, by
// event id). It starts at the end offsets the topic had when the child started, so it is ready
// only once it knows where to read: nothing written after "ready" is missed.
func (c *child) consume(ctx context.Context) (work, error) {
	admCl, err := kgo.NewClient(kgo.SeedBrokers(c.cfg.Brokers...))
	if err != nil {
		return nil, err
	}
	defer admCl.Close()
	lctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	ends, err := kadm.NewClient(admCl).ListEndOffsets(lctx, topic)
	if err != nil {
		return nil, fmt.Errorf("end offsets: %w", err)
	}
	if err := ends.Error(); err != nil {
		return nil, fmt.Errorf("end offsets: %w", err)
	}
	from := map[string]map[int32]kgo.Offset{topic: {}}
	ends.Each(func(o kadm.ListedOffset) { from[topic][o.Partition] = kgo.NewOffset().At(o.Offset) })
	if len(from[topic]) == 0 {
		return nil, fmt.Errorf("topic %s has no partitions", topic)
	}
	// A fetch waits at the broker until a record arrives (or a second passes): no polling.
	cl, err := kgo.NewClient(kgo.SeedBrokers(c.cfg.Brokers...), kgo.ConsumePartitions(from), kgo.FetchMaxWait(time.Second))
	if err != nil {
		return nil, err
	}
	return func(ctx context.Context) error {
		defer cl.Close()
		for {
			fs := cl.PollFetches(ctx)
			if ctx.Err() != nil {
				return nil
			}
			at := time.Now().UnixNano()
			var ferr error
			fs.EachError(func(_ string, _ int32, err error) { ferr = err })
			if ferr != nil {
				return fmt.Errorf("fetch: %w", ferr)
			}
			c.mu.Lock()
			fs.EachRecord(func(r *kgo.Record) {
				for _, h := range r.Headers {
					if h.Key == kafka.HeaderEventID {
						c.acks = append(c.acks, ack{EventID: string(h.Value), At: at})
					}
				}
			})
			c.mu.Unlock()
			c.events.Add(int64(fs.NumRecords()))
		}
	}, nil
}
