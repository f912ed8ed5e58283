package main

import (
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/adapters/kafka"
	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/adapters/rabbitmq"
	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/internal/bounds"
)

// keyRanges is every numeric key and the range its owner defines (a bounds.Int or a
// bounds.Duration). TestConfigRangesOneErrorEach checks that it covers every such key.
var keyRanges = map[string]fmt.Stringer{
	"database.connect_timeout":       connectTimeoutRange,
	"database.query_timeout":         postgres.QueryTimeoutRange,
	"relay.leader_lease":             postgres.LeaderLeaseRange,
	"relay.linger":                   postgres.LingerRange,
	"http.backlog_scan_rows":         postgres.BacklogScanRowsRange,
	"kafka.max_record_bytes":         kafka.MaxRecordBytesRange,
	"kafka.linger":                   kafka.LingerRange,
	"kafka.transaction_timeout":      kafka.TransactionTimeoutRange,
	"kafka.transaction_linger":       kafka.TxLingerRange,
	"kafka.dial_timeout":             kafka.DialTimeoutRange,
	"rabbitmq.max_message_bytes":     rabbitmq.MaxMessageBytesRange,
	"rabbitmq.dial_timeout":          rabbitmq.DialTimeoutRange,
	"rabbitmq.heartbeat":             rabbitmq.HeartbeatRange,
	"rabbitmq.reconnect_backoff_max": rabbitmq.ReconnectBackoffMaxRange,
	"consumer.max_attempts":          kafka.ConsumerMaxAttemptsRange,
	"consumer.retry_backoff":         kafka.ConsumerRetryBackoffRange,
	"consumer.retry_backoff_max":     kafka.ConsumerRetryBackoffMaxRange,
	"consumer.max_poll_records":      kafka.ConsumerMaxPollRecordsRange,
	"consumer.session_timeout":       kafka.ConsumerSessionTimeoutRange,
	"relay.batch_size":               relay.BatchSizeRange,
	"relay.max_in_flight":            relay.MaxInFlightRange,
	"relay.max_in_flight_bytes":      relay.MaxInFlightBytesRange,
	"relay.poll_interval":            relay.PollIntervalRange,
	"relay.leader_retry_interval":    relay.LeaderRetryIntervalRange,
	"relay.max_attempts":             relay.MaxAttemptsRange,
	"relay.retry_backoff_min":        relay.RetryBackoffMinRange,
	"relay.retry_backoff_max":        relay.RetryBackoffMaxRange,
	"relay.shutdown_timeout":         relay.ShutdownTimeoutRange,
	"relay.retention":                retentionRange,
	"relay.purge_interval":           purgeIntervalRange,
	"relay.purge_batch":              purgeBatchRange,
	"relay.startup_timeout":          startupTimeoutRange,
	"http.stall_timeout":             stallTimeoutRange,
}

// TestConfigRangesOneErrorEach sets every numeric key, in turn, just below its range, just above
// it and to a word, and checks that the run command's checks (parsing, then each component's
// Validate) report it exactly once, in one message naming the key, the value as written and the
// range its owner defines. Every key whose default is a number or a duration must be in keyRanges.
func TestConfigRangesOneErrorEach(t *testing.T) {
	for _, s := range settings {
		_, intErr := strconv.Atoi(s.def)
		_, durErr := time.ParseDuration(s.def)
		if _, ok := keyRanges[s.key]; (intErr == nil || durErr == nil) && !ok {
			t.Errorf("%s (default %q) is numeric but has no range in keyRanges", s.key, s.def)
		}
	}
	for key, rng := range keyRanges {
		var bad []string
		switch r := rng.(type) {
		case bounds.Int:
			bad = []string{strconv.Itoa(r.Min - 1), strconv.Itoa(r.Max + 1), "many"}
		case bounds.Duration:
			bad = []string{(r.Min - time.Millisecond).String(), (r.Max + time.Second).String(), "500", "soon"}
		default:
			t.Fatalf("%s: range of type %T", key, rng)
		}
		for _, value := range bad {
			t.Run(key+"="+value, func(t *testing.T) {
				env := map[string]string{}
				for k, v := range validEnv {
					env[k] = v
				}
				env[envName(key)] = value
				configEnv(t, env)
				_, err := loadFor(t, "")
				errs := leaves(err)
				if len(errs) != 1 {
					t.Fatalf("%d errors, want exactly one: %v", len(errs), err)
				}
				want := fmt.Sprintf("%s: must be %s", key, rng)
				got := errs[0].Error()
				if !strings.HasPrefix(got, want) || !strings.HasSuffix(got, strconv.Quote(value)) {
					t.Errorf("error %q\nwant %q ... %q", got, want, strconv.Quote(value))
				}
			})
		}
	}
}
