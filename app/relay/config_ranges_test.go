package relay

import (
	"testing"
	"time"
)

// TestConfigRetryBackoff: the delay before a failing row's next attempt doubles from
// RetryBackoffMin and stops at RetryBackoffMax.
func TestConfigRetryBackoff(t *testing.T) {
	c := Config{RetryBackoffMin: time.Second, RetryBackoffMax: 5 * time.Second}
	for attempts, want := range map[int]time.Duration{0: time.Second, 1: time.Second, 2: 2 * time.Second,
		3: 4 * time.Second, 4: 5 * time.Second, 1000: 5 * time.Second} {
		if got := c.backoff(attempts); got != want {
			t.Errorf("backoff(%d) = %s, want %s", attempts, got, want)
		}
	}
}

// TestConfigValidate: the defaults are valid, and each field out of its range gets one error
// naming its key, the range and the value; the checks across fields come only when both fields
// are within their own ranges.
func TestConfigValidate(t *testing.T) {
	if err := (Config{}).WithDefaults().Validate(); err != nil {
		t.Fatalf("defaults refused: %v", err)
	}
	for _, c := range []struct {
		name string
		set  func(*Config)
		want string
	}{
		{"batch size", func(c *Config) { c.BatchSize = 10001 }, "relay.batch_size: must be an integer between 1 and 10000, got 10001"},
		{"in flight", func(c *Config) { c.MaxInFlight = 100001 }, "relay.max_in_flight: must be an integer between 1 and 100000, got 100001"},
		{"in flight below batch", func(c *Config) { c.BatchSize, c.MaxInFlight = 500, 100 },
			"relay.max_in_flight: must be between relay.batch_size (500) and 100000, got 100"},
		{"in flight bytes", func(c *Config) { c.MaxInFlightBytes = 1000 }, "relay.max_in_flight_bytes: must be an integer between 1048576 and 4294967296, got 1000"},
		{"poll interval", func(c *Config) { c.PollInterval = time.Millisecond }, "relay.poll_interval: must be a duration between 10ms and 1m0s, got 1ms"},
		{"leader retry", func(c *Config) { c.LeaderRetryInterval = time.Hour }, "relay.leader_retry_interval: must be a duration between 10ms and 1m0s, got 1h0m0s"},
		{"attempts", func(c *Config) { c.MaxAttempts = -1 }, "relay.max_attempts: must be an integer between 1 and 1000, got -1"},
		{"backoff min", func(c *Config) { c.RetryBackoffMin = -time.Second }, "relay.retry_backoff_min: must be a duration between 1ms and 1h0m0s, got -1s"},
		{"backoff max below min", func(c *Config) { c.RetryBackoffMin, c.RetryBackoffMax = time.Minute, time.Second },
			"relay.retry_backoff_max: must be at least relay.retry_backoff_min (1m0s), got 1s"},
		{"shutdown", func(c *Config) { c.ShutdownTimeout = time.Millisecond }, "relay.shutdown_timeout: must be a duration between 100ms and 1h0m0s, got 1ms"},
		{"order policy", func(c *Config) { c.OrderPolicy = "drop" }, `relay.order_policy: must be one of wait, skip, got "drop"`},
	} {
		cfg := Config{}.WithDefaults()
		c.set(&cfg)
		err := cfg.Validate()
		if err == nil || err.Error() != c.want {
			t.Errorf("%s: got %v, want exactly %q", c.name, err, c.want)
		}
	}
}
