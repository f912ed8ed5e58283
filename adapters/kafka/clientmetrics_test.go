package kafka_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/outbox-relay/outbox-relay/adapters/kafka"
)

// TestClientMetricsOffByDefault: the publisher asks no broker for a KIP-714 client-metrics
// subscription (each push cost 8 MiB of heap for an lz4 writer) unless kafka.client_metrics is
// on. kfake subscribes every client that asks; the client with the key on is the witness that
// the question is asked once a request was made.
func TestClientMetricsOffByDefault(t *testing.T) {
	t.Parallel()
	asked := func(t *testing.T, on bool) (*kafka.Publisher, *atomic.Int32) {
		c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(1, "t"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(c.Close)
		var n atomic.Int32
		c.ControlKey(int16(kmsg.GetTelemetrySubscriptions), func(kmsg.Request) (kmsg.Response, error, bool) {
			c.KeepControl()
			n.Add(1)
			return nil, nil, false
		})
		pub, err := kafka.NewPublisher(kafka.Config{Brokers: c.ListenAddrs(), ClientMetrics: on})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(pub.Close)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		// The client asks after its first produce (or fetch) request.
		if err := pub.Client().ProduceSync(ctx, &kgo.Record{Topic: "t", Value: []byte("x")}).FirstErr(); err != nil {
			t.Fatal(err)
		}
		return pub, &n
	}
	_, off := asked(t, false)
	_, on := asked(t, true)
	for deadline := time.Now().Add(60 * time.Second); on.Load() == 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("with kafka.client_metrics on, no GetTelemetrySubscriptions request within 60 s")
		}
	}
	if n := off.Load(); n != 0 {
		t.Errorf("with kafka.client_metrics off (the default), %d GetTelemetrySubscriptions requests", n)
	}
}
