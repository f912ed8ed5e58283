package rawconn

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"
)

// pair returns a wrapped client connection and the server's end of it, over TCP on loopback or a
// Unix socket.
func pair(t *testing.T, network string) (client net.Conn, server net.Conn) {
	t.Helper()
	addr := "127.0.0.1:0"
	if network == "unix" {
		addr = filepath.Join(t.TempDir(), "s")
	}
	ln, err := net.Listen(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			close(accepted)
			return
		}
		accepted <- c
	}()
	c, err := Dial(func(ctx context.Context, network, addr string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, addr)
	})(context.Background(), network, ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := c.(*conn); !ok {
		t.Fatalf("Dial over %s returned a %T, want the raw connection", network, c)
	}
	s, ok := <-accepted
	if !ok {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c, s
}

// TestRoundTrip writes 16 MiB each way, more than the sockets' buffers hold, so that both
// calls return EAGAIN and wait in the poller, and checks every byte.
func TestRoundTrip(t *testing.T) {
	for _, network := range []string{"tcp", "unix"} {
		t.Run(network, func(t *testing.T) {
			c, s := pair(t, network)
			want := make([]byte, 16<<20)
			for i := range want {
				want[i] = byte(rand.Uint32())
			}
			errc := make(chan error, 1)
			go func() {
				// The peer echoes what it reads, in uneven pieces.
				buf := make([]byte, 70001)
				for sent := 0; sent < len(want); {
					n, err := s.Read(buf)
					if err != nil {
						errc <- err
						return
					}
					if _, err := s.Write(buf[:n]); err != nil {
						errc <- err
						return
					}
					sent += n
				}
				errc <- nil
			}()
			wrote := make(chan error, 1)
			go func() {
				n, err := c.Write(want)
				if err == nil && n != len(want) {
					err = io.ErrShortWrite
				}
				wrote <- err
			}()
			got := make([]byte, len(want))
			if _, err := io.ReadFull(c, got); err != nil {
				t.Fatalf("read back: %v", err)
			}
			if err := <-wrote; err != nil {
				t.Fatalf("write: %v", err)
			}
			if err := <-errc; err != nil {
				t.Fatalf("peer: %v", err)
			}
			if !bytes.Equal(got, want) {
				t.Fatal("the bytes read back differ from those written")
			}
		})
	}
}

// TestDeadlines: a read with nothing to read and a write the peer never reads end at their
// deadlines with net's timeout error.
func TestDeadlines(t *testing.T) {
	c, _ := pair(t, "tcp")
	if err := c.SetReadDeadline(time.Now().Add(50 * time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	n, err := c.Read(make([]byte, 10))
	var ne net.Error
	if n != 0 || !errors.Is(err, os.ErrDeadlineExceeded) || !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("read past its deadline: %d, %v; want 0 and a timeout", n, err)
	}
	if time.Since(start) < 40*time.Millisecond {
		t.Fatalf("the read returned after %s, before its deadline", time.Since(start))
	}
	var oe *net.OpError
	if !errors.As(err, &oe) || oe.Op != "read" {
		t.Errorf("read error %v: want a *net.OpError of op read", err)
	}
	if err := c.SetWriteDeadline(time.Now().Add(50 * time.Millisecond)); err != nil {
		t.Fatal(err)
	}
	big := make([]byte, 256<<20) // far more than the two sockets' buffers
	n, err = c.Write(big)
	if n >= len(big) || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("write past its deadline: %d of %d bytes, %v; want fewer and a timeout", n, len(big), err)
	}
}

// TestEnds: a closed connection, a peer that closed and a peer that reset give net's errors.
func TestEnds(t *testing.T) {
	t.Run("closed while reading", func(t *testing.T) {
		c, _ := pair(t, "tcp")
		errc := make(chan error, 1)
		go func() {
			_, err := c.Read(make([]byte, 10))
			errc <- err
		}()
		// Close once the read waits in the poller, so that Close has to wake it.
		deadline := time.Now().Add(10 * time.Second)
		for !readWaiting() {
			if time.Now().After(deadline) {
				t.Fatal("the read did not wait in the poller within 10s")
			}
			time.Sleep(time.Millisecond)
		}
		c.Close()
		select {
		case err := <-errc:
			if !errors.Is(err, net.ErrClosed) {
				t.Fatalf("read on a closed connection: %v, want net.ErrClosed", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("the read did not end when the connection was closed")
		}
		if _, err := c.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
			t.Fatalf("write on a closed connection: %v, want net.ErrClosed", err)
		}
	})
	t.Run("peer closed", func(t *testing.T) {
		c, s := pair(t, "tcp")
		if _, err := s.Write([]byte("last")); err != nil {
			t.Fatal(err)
		}
		s.Close()
		got, err := io.ReadAll(c)
		if err != nil || string(got) != "last" {
			t.Fatalf("read to the end: %q, %v; want \"last\" and io.EOF", got, err)
		}
		if n, err := c.Read(make([]byte, 1)); n != 0 || !errors.Is(err, io.EOF) {
			t.Fatalf("read after the end: %d, %v; want io.EOF", n, err)
		}
	})
	t.Run("peer reset", func(t *testing.T) {
		c, s := pair(t, "tcp")
		if err := s.(*net.TCPConn).SetLinger(0); err != nil {
			t.Fatal(err)
		}
		s.Close() // sends a reset
		deadline := time.Now().Add(10 * time.Second)
		var err error
		for err == nil && time.Now().Before(deadline) {
			_, err = c.Write([]byte("after the reset"))
		}
		if !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, syscall.EPIPE) {
			t.Fatalf("write after a reset: %v, want ECONNRESET or EPIPE", err)
		}
		var oe *net.OpError
		if !errors.As(err, &oe) || oe.Op != "write" {
			t.Errorf("write error %v: want a *net.OpError of op write", err)
		}
	})
}

// TestWrapLeavesOthers: what is not a TCP or Unix socket, and everything once Disable was
// called, passes through unchanged.
func TestWrapLeavesOthers(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	if got := Wrap(a); got != a {
		t.Fatalf("Wrap(net.Pipe) = %T, want the pipe itself", got)
	}
	if !Enabled() {
		t.Fatal("Enabled() = false before Disable")
	}
	c, _ := pair(t, "tcp")
	inner := c.(*conn).socket
	Disable()
	t.Cleanup(func() { off.Store(false) })
	if Enabled() {
		t.Fatal("Enabled() = true after Disable")
	}
	if got := Wrap(inner); got != net.Conn(inner) {
		t.Fatalf("Wrap after Disable = %T, want the socket itself", got)
	}
}

// TestConfigure: OUTBOX_RAW_IO turns raw reads and writes off, and a value it does not know is
// an error naming it, which changes nothing.
func TestConfigure(t *testing.T) {
	t.Cleanup(func() { off.Store(false) })
	for _, tc := range []struct {
		value   string
		enabled bool
		err     bool
	}{
		{"", true, false}, {"on", true, false}, {"TRUE", true, false}, {"1", true, false},
		{"maybe", true, true},
		{"off", false, false}, {" False ", false, false}, {"0", false, false},
	} {
		off.Store(false)
		err := Configure(func(k string) string {
			if k == EnvVar {
				return tc.value
			}
			return ""
		})
		if (err != nil) != tc.err || Enabled() != tc.enabled {
			t.Errorf("%s=%q: error %v, enabled %t; want error %t, enabled %t", EnvVar, tc.value, err, Enabled(), tc.err, tc.enabled)
		}
		if err != nil && !strings.Contains(err.Error(), EnvVar) {
			t.Errorf("%s=%q: error %q does not name the variable", EnvVar, tc.value, err)
		}
	}
}

// readWaiting reports whether a goroutine is in conn.Read, waiting in the network poller.
func readWaiting() bool {
	buf := make([]byte, 1<<20)
	for _, g := range bytes.Split(buf[:runtime.Stack(buf, true)], []byte("\n\n")) {
		if bytes.Contains(g, []byte("(*pollDesc).waitRead")) && bytes.Contains(g, []byte("rawconn.(*conn).Read")) {
			return true
		}
	}
	return false
}
