package relay

import (
	"errors"
	"fmt"
	"time"
)

// Defaults of Config.
const (
	BatchSizeDefault           = 1000
	MaxInFlightDefault         = 4000
	MaxInFlightBytesDefault    = 4 << 20
	PollIntervalDefault        = 500 * time.Millisecond
	LeaderRetryIntervalDefault = time.Second
	MaxAttemptsDefault         = 10
	RetryBackoffMinDefault     = time.Second
	RetryBackoffMaxDefault     = 5 * time.Minute
	ShutdownTimeoutDefault     = 15 * time.Second
	ReconnectBackoffMaxDefault = 10 * time.Second
	OrderPolicyDefault         = OrderPolicyWait
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
	// rows of the previous one are with the broker. Default 4 MiB: a sidecar stays at about 64
	// MiB resident or less with rows up to 16 KB, and the 4000 rows of MaxInFlight still fit
	// when rows are small (see BENCHMARKS.md).
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
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("relay.%s: %s", key, fmt.Sprintf(format, args...)))
	}
	if c.BatchSize < 1 || c.BatchSize > 10000 {
		bad("batch_size", "must be between 1 and 10000, got %d", c.BatchSize)
	}
	if c.MaxInFlight < c.BatchSize || c.MaxInFlight > 100000 {
		bad("max_in_flight", "must be between relay.batch_size (%d) and 100000, got %d", c.BatchSize, c.MaxInFlight)
	}
	if c.MaxInFlightBytes < 1<<20 {
		bad("max_in_flight_bytes", "must be at least 1048576 (1 MiB), got %d", c.MaxInFlightBytes)
	}
	if c.PollInterval < 10*time.Millisecond || c.PollInterval > time.Minute {
		bad("poll_interval", "must be between 10ms and 1m, got %s", c.PollInterval)
	}
	if c.LeaderRetryInterval < 10*time.Millisecond || c.LeaderRetryInterval > time.Minute {
		bad("leader_retry_interval", "must be between 10ms and 1m, got %s", c.LeaderRetryInterval)
	}
	if c.MaxAttempts < 1 || c.MaxAttempts > 1000 {
		bad("max_attempts", "must be between 1 and 1000, got %d", c.MaxAttempts)
	}
	if c.RetryBackoffMin <= 0 || c.RetryBackoffMax < c.RetryBackoffMin {
		bad("retry_backoff_max", "must be at least relay.retry_backoff_min (%s), got %s", c.RetryBackoffMin, c.RetryBackoffMax)
	}
	if c.OrderPolicy != OrderPolicyWait && c.OrderPolicy != OrderPolicySkip {
		bad("order_policy", "must be %q or %q, got %q", OrderPolicyWait, OrderPolicySkip, c.OrderPolicy)
	}
	if c.ShutdownTimeout <= 0 {
		bad("shutdown_timeout", "must be positive, got %s", c.ShutdownTimeout)
	}
	if c.ReconnectBackoffMax <= 0 {
		bad("reconnect_backoff_max", "must be positive, got %s", c.ReconnectBackoffMax)
	}
	return errors.Join(errs...)
}

// backoff returns the delay before attempt number attempts+1 of a failing row.
func (c Config) backoff(attempts int) time.Duration {
	d := c.RetryBackoffMin
	for i := 1; i < attempts && d < c.RetryBackoffMax; i++ {
		d *= 2
	}
	return min(d, c.RetryBackoffMax)
}
