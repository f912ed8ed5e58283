// Package tcpproxy injects network faults in tests: a forwarding TCP proxy, and a listener wrapper
// for servers that must advertise their own address (a Kafka broker), both of which can cut every
// connection, stall them, or refuse new ones.
package tcpproxy

import (
	"errors"
	"io"
	"net"
	"sync"
	"time"
)

// gate is the fault state shared by the connections of one Proxy or Listener.
type gate struct {
	mu      sync.Mutex
	cond    *sync.Cond
	stalled bool
	down    bool
	conns   map[io.Closer]struct{}
	closed  bool
}

func newGate() *gate {
	g := &gate{conns: make(map[io.Closer]struct{})}
	g.cond = sync.NewCond(&g.mu)
	return g
}

// wait blocks while the gate is stalled; it reports false when the gate is closed.
func (g *gate) wait() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	for g.stalled && !g.closed {
		g.cond.Wait()
	}
	return !g.closed
}

func (g *gate) track(c io.Closer) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.down || g.closed {
		return false
	}
	g.conns[c] = struct{}{}
	return true
}

func (g *gate) untrack(c io.Closer) {
	g.mu.Lock()
	delete(g.conns, c)
	g.mu.Unlock()
}

// cut closes every tracked connection and returns how many there were.
func (g *gate) cut() int {
	g.mu.Lock()
	conns := make([]io.Closer, 0, len(g.conns))
	for c := range g.conns {
		conns = append(conns, c)
	}
	g.conns = make(map[io.Closer]struct{})
	g.mu.Unlock()
	for _, c := range conns {
		_ = c.Close()
	}
	return len(conns)
}

func (g *gate) set(f func()) {
	g.mu.Lock()
	f()
	g.mu.Unlock()
	g.cond.Broadcast()
}

// Faults is what Proxy and Listener let a test do to the connections passing through them.
type Faults struct{ g *gate }

// Cut closes every open connection now; new connections are still accepted. It returns how many
// connections it closed.
func (f Faults) Cut() int { return f.g.cut() }

// Stall stops moving bytes in both directions on every connection, open or new, until Resume.
// The connections stay open: the peers see silence, not an error.
func (f Faults) Stall() { f.g.set(func() { f.g.stalled = true }) }

// Resume undoes Stall.
func (f Faults) Resume() { f.g.set(func() { f.g.stalled = false }) }

// Down cuts every connection and refuses new ones (they are closed as soon as accepted) until Up.
func (f Faults) Down() {
	f.g.set(func() { f.g.down = true })
	f.g.cut()
}

// Up undoes Down.
func (f Faults) Up() { f.g.set(func() { f.g.down = false }) }

// Open returns how many connections are open.
func (f Faults) Open() int {
	f.g.mu.Lock()
	defer f.g.mu.Unlock()
	return len(f.g.conns)
}

// Proxy forwards TCP connections from its own address to a target address.
type Proxy struct {
	Faults
	ln     net.Listener
	target string
	wg     sync.WaitGroup
}

// New starts a proxy on a free port of 127.0.0.1 that forwards to target (host:port).
func New(target string) (*Proxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &Proxy{Faults: Faults{newGate()}, ln: ln, target: target}
	p.wg.Add(1)
	go p.accept()
	return p, nil
}

// Addr returns the proxy's host:port.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// Close stops accepting, closes every connection and waits for the proxy's goroutines.
func (p *Proxy) Close() error {
	err := p.ln.Close()
	p.g.set(func() { p.g.closed = true })
	p.g.cut()
	p.wg.Wait()
	return err
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			p.serve(c)
		}()
	}
}

func (p *Proxy) serve(client net.Conn) {
	if !p.g.track(client) {
		_ = client.Close()
		return
	}
	defer p.g.untrack(client)
	server, err := net.DialTimeout("tcp", p.target, 5*time.Second)
	if err != nil {
		_ = client.Close()
		return
	}
	if !p.g.track(server) {
		_ = client.Close()
		_ = server.Close()
		return
	}
	defer p.g.untrack(server)
	var wg sync.WaitGroup
	pipe := func(dst, src net.Conn) {
		defer wg.Done()
		buf := make([]byte, 32<<10)
		for {
			n, err := src.Read(buf)
			if n > 0 {
				if !p.g.wait() {
					break
				}
				if _, werr := dst.Write(buf[:n]); werr != nil {
					break
				}
			}
			if err != nil {
				break
			}
		}
		// One direction ended: end both, as a cut would.
		_ = client.Close()
		_ = server.Close()
	}
	wg.Add(2)
	go pipe(server, client)
	go pipe(client, server)
	wg.Wait()
}

// Listener wraps a server's listener so that the connections it accepts can be cut, stalled or
// refused. Use it where clients must reach the server at the address it advertises, such as a
// Kafka broker (kfake.ListenFn).
type Listener struct {
	net.Listener
	Faults
}

// Wrap returns ln with fault injection.
func Wrap(ln net.Listener) *Listener { return &Listener{Listener: ln, Faults: Faults{newGate()}} }

// Accept implements net.Listener: connections arriving while Down are closed at once.
func (l *Listener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		fc := &conn{Conn: c, g: l.g}
		if !l.g.track(fc) {
			_ = c.Close()
			continue
		}
		return fc, nil
	}
}

// Close implements net.Listener; it also closes every accepted connection.
func (l *Listener) Close() error {
	err := l.Listener.Close()
	l.g.set(func() { l.g.closed = true })
	l.g.cut()
	return err
}

type conn struct {
	net.Conn
	g    *gate
	once sync.Once
}

func (c *conn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if n > 0 && !c.g.wait() {
		return 0, net.ErrClosed
	}
	return n, err
}

func (c *conn) Write(b []byte) (int, error) {
	if !c.g.wait() {
		return 0, net.ErrClosed
	}
	return c.Conn.Write(b)
}

func (c *conn) Close() error {
	var err error
	c.once.Do(func() {
		c.g.untrack(c)
		err = c.Conn.Close()
	})
	if err != nil && !errors.Is(err, net.ErrClosed) {
		return err
	}
	return nil
}
