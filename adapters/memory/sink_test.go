package memory_test

import (
	"fmt"
	"testing"

	"github.com/outbox-relay/outbox-relay/adapters/memory"
	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/app/relay/sinktest"
)

func TestSinkConformance(t *testing.T) {
	sinktest.Run(t, func(t *testing.T) *sinktest.Env {
		s := memory.NewSink()
		s.Reject = func(m *relay.Message) error {
			if m.Topic == "refused" {
				return fmt.Errorf("topic %q refused", m.Topic)
			}
			return nil
		}
		return &sinktest.Env{
			Sink: s,
			Delivered: func(*testing.T) []sinktest.Delivered {
				var out []sinktest.Delivered
				for _, d := range s.Deliveries() {
					out = append(out, sinktest.Delivered{Key: d.Key, Payload: d.Payload, Headers: d.Headers})
				}
				return out
			},
			Pause:  func(*testing.T) { s.Hold() },
			Resume: func(*testing.T) { s.Release() },
			Reject: func(m *relay.Message) { m.Topic = "refused" },
		}
	})
}
