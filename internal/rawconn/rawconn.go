// Package rawconn makes the relay's database and broker sockets cheaper to use at low rates.
//
// Go's net package reads and writes a socket through syscall.Syscall, which tells the scheduler
// that the goroutine may block. When every processor was idle before, that call also wakes the
// runtime's monitor thread (sysmon) from its deep sleep; sysmon then polls every 20 µs until the
// process is idle again. A relay at 1,000 events/s goes idle and busy again hundreds of times a
// second, and on a virtual machine each of sysmon's sleeps and wake-ups is a costly context
// switch: a bare producer at that rate spent half its CPU in sysmon's thread, and raw reads and
// writes cut the relay's CPU there by a quarter to a third (BENCHMARKS.md, "The runtime's
// monitor thread and the sockets' system calls").
//
// The sockets are non-blocking, so a read or a write never waits in the kernel: when there is
// nothing to read or no room to write the call returns EAGAIN at once and the goroutine waits in
// the network poller, as net does. Wrap does the read and write calls with syscall.RawSyscall,
// which the scheduler does not see, through the connection's syscall.RawConn, which keeps the
// poller's waits and the connection's deadlines.
package rawconn

import (
	"context"
	"fmt"
	"net"
	"strings"
	"sync/atomic"
)

// off turns Wrap into the identity: Disable.
var off atomic.Bool

// Disable makes Wrap return connections unchanged from now on (the relay's kill switch,
// OUTBOX_RAW_IO=off). Connections already wrapped stay as they are.
func Disable() { off.Store(true) }

// EnvVar is the environment variable that turns raw reads and writes off: Configure.
const EnvVar = "OUTBOX_RAW_IO"

// Configure reads EnvVar through getenv: off, false or 0 calls Disable; on, true, 1 or unset
// leaves Wrap on. Anything else is an error naming the variable, and changes nothing.
func Configure(getenv func(string) string) error {
	switch v := strings.ToLower(strings.TrimSpace(getenv(EnvVar))); v {
	case "", "on", "true", "1":
		return nil
	case "off", "false", "0":
		Disable()
		return nil
	default:
		return fmt.Errorf("%s: must be on or off, got %q", EnvVar, v)
	}
}

// Enabled reports whether Wrap wraps connections.
func Enabled() bool { return supported && !off.Load() }

// DialFunc is the shape of the dialers of pgx and franz-go.
type DialFunc func(ctx context.Context, network, addr string) (net.Conn, error)

// Dial returns a dialer that wraps what dial returns.
func Dial(dial DialFunc) DialFunc {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return Wrap(c), nil
	}
}
