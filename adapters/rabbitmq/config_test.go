package rabbitmq_test

import (
	"strings"
	"testing"

	"github.com/outbox-relay/outbox-relay/adapters/rabbitmq"
)

// TestConfigNameLengths: the exchange and the routing key template are checked for their
// characters and, apart, for their length (at most 255).
func TestConfigNameLengths(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		exchange, template string
		bad                string // the key named in the error; "" for none
	}{
		{strings.Repeat("e", 255), strings.Repeat("k", 255), ""},
		{"", "{aggregate_type}", ""},
		{strings.Repeat("e", 256), "k", "rabbitmq.exchange"},
		{"e x", "k", "rabbitmq.exchange"},
		{"e", strings.Repeat("k", 256), "rabbitmq.routing_key_template"},
		{"e", "k k", "rabbitmq.routing_key_template"},
	} {
		err := rabbitmq.Config{URL: "amqp://localhost", Exchange: tc.exchange, RoutingKeyTemplate: tc.template}.WithDefaults().Validate()
		switch {
		case tc.bad == "" && err != nil:
			t.Errorf("exchange of %d, template of %d characters: %v", len(tc.exchange), len(tc.template), err)
		case tc.bad != "" && (err == nil || !strings.Contains(err.Error(), tc.bad+": must match")):
			t.Errorf("exchange %.10q… (%d), template %.10q… (%d): err %v, want one about %s", tc.exchange, len(tc.exchange),
				tc.template, len(tc.template), err, tc.bad)
		}
	}
}
