// Package bounds holds the allowed range of a numeric configuration value. The package that owns
// a value defines its range once, as an exported Int or Duration; its Validate checks the value
// with it, and cmd parses the configuration key with the same range. So a range is written in one
// place, and a bad value reads the same wherever it is caught:
//
//	relay.batch_size: must be an integer between 1 and 10000, got "0"
//
// It imports only the standard library.
package bounds

import (
	"fmt"
	"strconv"
	"time"
)

// Int is an inclusive range of integers.
type Int struct{ Min, Max int }

// String describes the range: "an integer between 1 and 10000".
func (r Int) String() string { return fmt.Sprintf("an integer between %d and %d", r.Min, r.Max) }

// Check returns nil when v is within r, else an error naming key, the range and v.
func (r Int) Check(key string, v int) error {
	if v < r.Min || v > r.Max {
		return fmt.Errorf("%s: must be %s, got %d", key, r, v)
	}
	return nil
}

// Parse reads s, the raw value of key, as an integer within r. The error names key, the range
// and s as written.
func (r Int) Parse(key, s string) (int, error) {
	n, err := strconv.Atoi(s)
	if err != nil || n < r.Min || n > r.Max {
		return n, fmt.Errorf("%s: must be %s, got %q", key, r, s)
	}
	return n, nil
}

// Duration is an inclusive range of durations.
type Duration struct{ Min, Max time.Duration }

// String describes the range: "a duration between 10ms and 1m0s".
func (r Duration) String() string {
	return fmt.Sprintf("a duration between %s and %s", r.Min, r.Max)
}

// Check returns nil when d is within r, else an error naming key, the range and d.
func (r Duration) Check(key string, d time.Duration) error {
	if d < r.Min || d > r.Max {
		return fmt.Errorf("%s: must be %s, got %s", key, r, d)
	}
	return nil
}

// Parse reads s, the raw value of key, as a duration within r. The error names key, the range,
// the syntax and s as written.
func (r Duration) Parse(key, s string) (time.Duration, error) {
	d, err := time.ParseDuration(s)
	if err != nil || d < r.Min || d > r.Max {
		return d, fmt.Errorf("%s: must be %s (like 500ms, 10s, 2m), got %q", key, r, s)
	}
	return d, nil
}
