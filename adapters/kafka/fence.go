package kafka

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"net"
	"sync/atomic"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/internal/rawconn"
)

// fence holds the context of the records the publisher was last handed: the relay's term
// (relay.Fenced). Once it is done, no produce request leaves the process, until records of a new
// context arrive.
//
// franz-go checks a record's context itself before it sends a partition's first buffered batch,
// but not a later batch of a partition whose previous batch is in flight (its idempotent
// producer cannot fail it then). A leader frozen with a batch in flight sent the next one when it
// woke, after the new leader's records (fault 25, three records in one run). The fence closes
// that window where the bytes leave: the connection refuses to write a Produce request for a
// term that has ended. Other requests (metadata, the readiness probe's) are never held back.
type fence struct {
	ctx atomic.Pointer[context.Context]
}

// set records ctx as the context of the records being published.
func (f *fence) set(ctx context.Context) {
	if cur := f.ctx.Load(); cur == nil || *cur != ctx {
		f.ctx.Store(&ctx)
	}
}

// closed returns the error of the current context, once it is done.
func (f *fence) closed() error {
	if c := f.ctx.Load(); c != nil {
		return (*c).Err()
	}
	return nil
}

// produceKey is the Kafka API key of Produce requests.
const produceKey = 0

// fencedConn is a broker connection that refuses to write a Produce request while its fence is
// closed. franz-go writes each request in one call: its size (int32), then its API key (int16).
type fencedConn struct {
	net.Conn
	f *fence
}

// Write implements net.Conn.
func (c fencedConn) Write(b []byte) (int, error) {
	if len(b) >= 6 && binary.BigEndian.Uint16(b[4:6]) == produceKey {
		if err := c.f.closed(); err != nil {
			return 0, fmt.Errorf("produce request refused: %w", err)
		}
	}
	return c.Conn.Write(b)
}

// dialer returns the clients' kgo.Dialer: a TCP connection whose reads and writes do not wake
// the runtime's monitor thread (internal/rawconn), with TLS on top when tc is not nil, behind
// the fence f when f is not nil (the publisher's).
func dialer(cfg Config, tc *tls.Config, f *fence) kgo.Opt {
	return kgo.Dialer(func(ctx context.Context, network, host string) (net.Conn, error) {
		d := &net.Dialer{Timeout: cfg.DialTimeout}
		conn, err := d.DialContext(ctx, network, host)
		if err != nil {
			return nil, err
		}
		conn = rawconn.Wrap(conn)
		if tc != nil {
			c := tc.Clone()
			if c.ServerName == "" {
				if h, _, err := net.SplitHostPort(host); err == nil {
					c.ServerName = h
				}
			}
			tconn := tls.Client(conn, c)
			if err := tconn.HandshakeContext(ctx); err != nil {
				_ = conn.Close()
				return nil, err
			}
			conn = tconn
		}
		if f == nil {
			return conn, nil
		}
		return fencedConn{Conn: conn, f: f}, nil
	})
}
