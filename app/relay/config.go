package relay

import (
	"errors"
	"fmt"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/backoff"
	"github.com/outbox-relay/outbox-relay/internal/bounds"
)

// Defaults of Config.
const (
	BatchSizeDefault           = 1000
	MaxInFlightDefault         = 4000
	MaxInFlightBytesDefault    = 2 << 20
	PollIntervalDefault        = 500 * time.Millisecond
	LeaderRetryIntervalDefault = time.Second
	MaxAttemptsDefault         = 10
	RetryBackoffMinDefault     = time.Second
	RetryBackoffMaxDefault     = 5 * time.Minute
	ShutdownTimeoutDefault     = 15 * time.Second
	ReconnectBackoffMaxDefault = 10 * time.Second
	OrderPolicyDefault         = OrderPolicyWait
)

// Ranges of Config's fields: Validate checks them, and cmd parses the relay.* keys with them.
var (
	BatchSizeRange           = bounds.Int{Min: 1, Max: 10000}
	MaxInFlightRange         = bounds.Int{Min: 1, Max: 100000} // and at least BatchSize
	MaxInFlightBytesRange    = bounds.Int{Min: 1 << 20, Max: 1 << 32}
	PollIntervalRange        = bounds.Duration{Min: 10 * time.Millisecond, Max: time.Minute}
	LeaderRetryIntervalRange = bounds.Duration{Min: 10 * time.Millisecond, Max: time.Minute}
	MaxAttemptsRange         = bounds.Int{Min: 1, Max: 1000}
	RetryBackoffMinRange     = bounds.Duration{Min: time.Millisecond, Max: time.Hour}
	RetryBackoffMaxRange     = bounds.Duration{Min: time.Millisecond, Max: 24 * time.Hour} // and at least RetryBackoffMin
	ShutdownTimeoutRange     = bounds.Duration{Min: 100 * time.Millisecond, Max: time.Hour}
	ReconnectBackoffMaxRange = bounds.Duration{Min: time.Millisecond, Max: 10 * time.Minute}
)

// Order policies: what happens to a key's later events when one of its events is parked.
const (
	// OrderPolicyWait holds the key's later events until the parked event is retried or dropped,
	// so the key's order holds.
	OrderPolicyWait = "wait"
	// OrderPolicySkip lets the key's later events go on without the parked one.
	OrderPolicySkip = "skip"
)

// Config configures a Relay. The zero value of a field means its default.
type Config struct {
	// BatchSize is the most rows one claim query returns. Default 1000; 1 to 10000.
	BatchSize int
	// MaxInFlight is the most rows published but not yet marked. It bounds the duplicates a crash
	// can cause. Default 4000; at least BatchSize, at most 100000.
	MaxInFlight int
	// MaxInFlightBytes bounds the memory held by rows in flight, in bytes: the rows claimed and
	// not yet acknowledged by the broker (an acknowledged row waiting for its mark keeps only its
	// id and key). One claim asks for at most half of it, so the next one can read while the
	// rows of the previous one are with the broker. Default 2 MiB: `outbox-relay run` peaks
	// under 40 MiB resident draining 1 KB rows, as fast as it did with 4 MiB, and the 4000 rows
	// of MaxInFlight still fit when rows are 512 bytes or less (see BENCHMARKS.md).
	MaxInFlightBytes int
	// PollInterval is how often the outbox is read without a wake-up notification, how often
	// the keys blocked behind failing or parked rows are reloaded, and how often a claim reads
	// from the oldest row rather than from the id horizon. Default 500ms.
	PollInterval time.Duration
	// LeaderRetryInterval is how often a standby replica tries to take the leadership. Default 1s.
	LeaderRetryInterval time.Duration
	// MaxAttempts is how many failed publishes park a row. Default 10.
	MaxAttempts int
	// RetryBackoffMin and RetryBackoffMax bound the exponential delay between attempts of a
	// failing row. Defaults 1s and 5m.
	RetryBackoffMin, RetryBackoffMax time.Duration
	// OrderPolicy is OrderPolicyWait (default) or OrderPolicySkip.
	OrderPolicy string
	// ShutdownTimeout bounds how long a stopping relay waits for the broker to acknowledge what is
	// in flight. Default 15s.
	ShutdownTimeout time.Duration
	// ReconnectBackoffMax caps the delay between reconnections to the database. Default 10s.
	ReconnectBackoffMax time.Duration
}

// WithDefaults returns c with every zero field set to its default.
func (c Config) WithDefaults() Config {
	def := func(v *int, d int) {
		if *v == 0 {
			*v = d
		}
	}
	defd := func(v *time.Duration, d time.Duration) {
		if *v == 0 {
			*v = d
		}
	}
	def(&c.BatchSize, BatchSizeDefault)
	def(&c.MaxInFlight, max(MaxInFlightDefault, c.BatchSize))
	def(&c.MaxInFlightBytes, MaxInFlightBytesDefault)
	def(&c.MaxAttempts, MaxAttemptsDefault)
	defd(&c.PollInterval, PollIntervalDefault)
	defd(&c.LeaderRetryInterval, LeaderRetryIntervalDefault)
	defd(&c.RetryBackoffMin, RetryBackoffMinDefault)
	defd(&c.RetryBackoffMax, RetryBackoffMaxDefault)
	defd(&c.ShutdownTimeout, ShutdownTimeoutDefault)
	defd(&c.ReconnectBackoffMax, ReconnectBackoffMaxDefault)
	if c.OrderPolicy == "" {
		c.OrderPolicy = OrderPolicyDefault
	}
	return c
}

// Validate reports every invalid field, naming its configuration key.
func (c Config) Validate() error {
	errs := []error{
		BatchSizeRange.Check("relay.batch_size", c.BatchSize),
		MaxInFlightRange.Check("relay.max_in_flight", c.MaxInFlight),
		MaxInFlightBytesRange.Check("relay.max_in_flight_bytes", c.MaxInFlightBytes),
		PollIntervalRange.Check("relay.poll_interval", c.PollInterval),
		LeaderRetryIntervalRange.Check("relay.leader_retry_interval", c.LeaderRetryInterval),
		MaxAttemptsRange.Check("relay.max_attempts", c.MaxAttempts),
		RetryBackoffMinRange.Check("relay.retry_backoff_min", c.RetryBackoffMin),
		RetryBackoffMaxRange.Check("relay.retry_backoff_max", c.RetryBackoffMax),
		ShutdownTimeoutRange.Check("relay.shutdown_timeout", c.ShutdownTimeout),
		// Not a configuration key: the field's name.
		ReconnectBackoffMaxRange.Check("ReconnectBackoffMax", c.ReconnectBackoffMax),
	}
	if c.MaxInFlight < c.BatchSize && errs[0] == nil && errs[1] == nil {
		errs = append(errs, fmt.Errorf("relay.max_in_flight: must be between relay.batch_size (%d) and %d, got %d",
			c.BatchSize, MaxInFlightRange.Max, c.MaxInFlight))
	}
	if c.RetryBackoffMax < c.RetryBackoffMin && errs[6] == nil && errs[7] == nil {
		errs = append(errs, fmt.Errorf("relay.retry_backoff_max: must be at least relay.retry_backoff_min (%s), got %s",
			c.RetryBackoffMin, c.RetryBackoffMax))
	}
	if c.OrderPolicy != OrderPolicyWait && c.OrderPolicy != OrderPolicySkip {
		errs = append(errs, fmt.Errorf("relay.order_policy: must be one of %s, %s, got %q", OrderPolicyWait, OrderPolicySkip, c.OrderPolicy))
	}
	return errors.Join(errs...)
}

// backoff returns the delay before attempt number attempts+1 of a failing row.
func (c Config) backoff(attempts int) time.Duration {
	d := min(c.RetryBackoffMin, c.RetryBackoffMax)
	for i := 1; i < attempts && d < c.RetryBackoffMax; i++ {
		d = backoff.Double(d, c.RetryBackoffMax)
	}
	return d
}
