package postgres

import (
	"sync"
	"unsafe"

	"github.com/outbox-relay/outbox-relay/app/relay"
)

// chunksFreeMin is the fewest chunks kept for reuse (chunkSize each). More are kept when the
// claims may hold more (see budget): a chunk comes back when its last row is acknowledged, and
// the acknowledgements of a claim's rows free its chunks together, as the next claim needs them.
// A chunk dropped for want of room would be garbage, and a new one allocated and zeroed in its
// place: with 16 KB rows and only 4 kept, that churn was a tenth of the relay's CPU and a third
// of its resident memory.
const chunksFreeMin = 4

// chunksLiveMax bounds the chunks followed until their pieces are released (16 MiB of chunks,
// four times the default relay.max_in_flight_bytes). Past it the oldest is forgotten: left to
// the garbage collector, as is a chunk some piece of which is never released (a row dropped
// unpublished, the rows of a claim a stopping relay no longer publishes), which would otherwise
// be held here for ever.
const chunksLiveMax = 64

// chunks hands out the chunks the claims copy payloads and headers into, and takes them back
// for reuse once every piece copied into one was released: while a backlog drains, the payloads
// are most of what the relay allocates, and reusing their memory spares the garbage collector
// most of its work. A chunk one of whose pieces is never released (a row dropped unpublished, a
// session ended) is left to the garbage collector (see chunksLiveMax).
//
// The claim (decoder) and Release run on two goroutines (the relay's claims run in a goroutine
// of their own while the relay settles acknowledgements), hence the lock; the decoder takes it
// once per chunk, not per piece.
type chunks struct {
	mu      sync.Mutex
	live    []*chunk // chunks handed out, the current one included
	free    [][]byte
	freeMax int // the most chunks kept in free (see budget)
}

// chunk is one chunk handed out.
type chunk struct {
	buf      []byte
	base     uintptr // where buf's memory starts, to find a piece's chunk
	pieces   int     // pieces copied into it; set when full
	released int     // pieces released so far
	full     bool    // no more pieces go into it
}

// next retires cur (nil at first), which takes no more pieces after the pieces it holds, and
// returns an empty chunk: a free one if any.
func (c *chunks) next(cur *chunk, pieces int) *chunk {
	c.mu.Lock()
	defer c.mu.Unlock()
	if cur != nil {
		cur.pieces, cur.full = pieces, true
		c.reuse(cur)
	}
	var buf []byte
	if n := len(c.free); n > 0 {
		buf, c.free = c.free[n-1][:0], c.free[:n-1]
	} else {
		buf = make([]byte, 0, chunkSize)
	}
	if len(c.live) >= chunksLiveMax {
		c.live[0] = nil
		c.live = c.live[1:]
	}
	ch := &chunk{buf: buf, base: uintptr(unsafe.Pointer(unsafe.SliceData(buf[:1])))}
	c.live = append(c.live, ch)
	return ch
}

// reuse takes ch back if it is full and every piece of it was released. c.mu is held.
func (c *chunks) reuse(ch *chunk) {
	if !ch.full || ch.released < ch.pieces {
		return
	}
	for i, l := range c.live {
		if l == ch {
			c.live = append(c.live[:i], c.live[i+1:]...)
			break
		}
	}
	if len(c.free) < max(c.freeMax, chunksFreeMin) {
		c.free = append(c.free, ch.buf)
	}
}

// budget records that a claim may return up to n bytes: twice as many chunks are then kept for
// reuse (at most chunksLiveMax). The relay reads a claim while the rows of the previous one await
// their acknowledgements, so two claims' chunks can be released together and needed again.
func (c *chunks) budget(n int) {
	want := min(2*n/chunkSize, chunksLiveMax)
	c.mu.Lock()
	c.freeMax = max(c.freeMax, want)
	c.mu.Unlock()
}

// release records that nothing refers to the pieces of msgs any more.
func (c *chunks) release(msgs []*relay.Message) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var last *chunk // rows released together were mostly copied together: look there first
	for _, m := range msgs {
		last = c.releasePiece(m.Payload, last)
		last = c.releasePiece(m.Headers, last)
	}
}

// releasePiece releases b if it was copied into a live chunk (big payloads have their own
// allocation, and rows read with Scan are not in chunks), trying hint first. It returns the chunk
// b was in, if still live, for the next piece's hint. c.mu is held.
func (c *chunks) releasePiece(b []byte, hint *chunk) *chunk {
	if len(b) == 0 {
		return hint // empty pieces are not in chunks
	}
	p := uintptr(unsafe.Pointer(unsafe.SliceData(b)))
	in := func(ch *chunk) bool { return p >= ch.base && p < ch.base+uintptr(cap(ch.buf)) }
	ch := hint
	if ch == nil || !in(ch) {
		ch = nil
		for _, l := range c.live {
			if in(l) {
				ch = l
				break
			}
		}
		if ch == nil {
			return hint
		}
	}
	ch.released++
	c.reuse(ch)
	if !ch.full || ch.released < ch.pieces {
		return ch
	}
	return nil // taken back: not live any more
}
