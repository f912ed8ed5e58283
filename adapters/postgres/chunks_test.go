package postgres_test

import (
	"bytes"
	"context"
	"runtime"
	"testing"
	"unsafe"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/internal/dbtest"
)

// chunkRowSize is the payload size of the chunk tests' rows: four to a chunk of 256 KiB.
const chunkRowSize = 60 << 10

// chunkRows fills a fresh outbox with n rows whose payloads are chunkRowSize bytes, each the hex
// byte of hexByte (an SQL expression over the row number i), and returns a session on it.
func chunkRows(t *testing.T, n int, hexByte string) relay.Session {
	t.Helper()
	pool, table := dbtest.Schema(t)
	ident := pgx.Identifier{table.Schema, table.Name}.Sanitize()
	if _, err := pool.Exec(context.Background(), `INSERT INTO `+ident+` (aggregate_type, aggregate_id, event_type, payload)
		SELECT 'o', 'k' || i, 'e', decode(repeat(`+hexByte+`, $1), 'hex') FROM generate_series(1, $2::int) i`, chunkRowSize, n); err != nil {
		t.Fatal(err)
	}
	return dbtest.Session(t, table, dbtest.URL())
}

// TestClaimReusesReleasedChunks: once every payload copied into a chunk is released, a later
// claim copies its payloads into that memory; payloads not released stay intact.
func TestClaimReusesReleasedChunks(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	const size = chunkRowSize
	sess := chunkRows(t, 24, `lpad(to_hex(i), 2, '0')`) // row i's payload: bytes of value i
	rel, ok := sess.(relay.Releaser)
	if !ok {
		t.Fatal("the postgres session is not an relay.Releaser")
	}
	var skip []int64
	claim := func(n int) []*relay.Message {
		t.Helper()
		rows, err := sess.Claim(ctx, 0, skip, n, 1<<30, nil)
		if err != nil {
			t.Fatal(err)
		}
		out := make([]*relay.Message, len(rows))
		for i := range rows {
			out[i] = &rows[i]
			skip = append(skip, rows[i].ID)
		}
		return out
	}
	intact := func(what string, msgs []*relay.Message) {
		t.Helper()
		for _, m := range msgs {
			if want := bytes.Repeat([]byte{byte(m.ID - skip[0] + 1)}, size); !bytes.Equal(m.Payload, want) {
				t.Fatalf("%s: row %d's payload changed (first byte %d)", what, m.ID, m.Payload[0])
			}
		}
	}
	addr := func(m *relay.Message) uintptr { return uintptr(unsafe.Pointer(unsafe.SliceData(m.Payload))) }

	first := claim(8) // rows 1-4 fill a chunk, 5-8 the next
	intact("first claim", first)
	rel.Release(first[:4])
	second := claim(8) // row 9 starts a chunk: the released one
	intact("second claim", second)
	intact("rows of the first claim not released", first[4:])
	if addr(second[0]) != addr(first[0]) {
		t.Errorf("row 9 was not copied into the released chunk")
	}
	third := claim(8) // rows 5-8's chunk is full but not released: not reused
	intact("third claim", third)
	intact("rows of the first claim not released, after another claim", first[4:])
	for _, m := range third {
		if addr(m) == addr(first[4]) {
			t.Errorf("row %d was copied into a chunk whose rows were not released", m.ID)
		}
	}
}

// TestClaimKeepsChunksForItsBudget: the chunks a claim's rows were copied into, released
// together (the broker acknowledged the claim), are all kept for the next claim when the claims'
// byte budget spans that many: none is left to the garbage collector and allocated again.
func TestClaimKeepsChunksForItsBudget(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	sess := chunkRows(t, 64, `'cd'`)
	rel := sess.(relay.Releaser)
	const budget = 3 << 20                                 // twelve chunks
	first, err := sess.Claim(ctx, 0, nil, 32, budget, nil) // eight chunks
	if err != nil {
		t.Fatal(err)
	}
	if len(first) != 32 {
		t.Fatalf("first claim: %d rows, want 32", len(first))
	}
	used := map[uintptr]bool{}
	var skip []int64
	msgs := make([]*relay.Message, len(first))
	for i := range first {
		msgs[i] = &first[i]
		used[uintptr(unsafe.Pointer(unsafe.SliceData(first[i].Payload)))] = true
		skip = append(skip, first[i].ID)
	}
	rel.Release(msgs) // first stays referenced: its chunks cannot be collected and handed out anew
	second, err := sess.Claim(ctx, 0, skip, 32, budget, nil)
	if err != nil {
		t.Fatal(err)
	}
	fresh := 0
	for _, m := range second {
		if !used[uintptr(unsafe.Pointer(unsafe.SliceData(m.Payload)))] {
			fresh++
		}
	}
	if fresh > 0 {
		t.Errorf("%d of the second claim's %d rows went into newly allocated chunks, want all in the released ones", fresh, len(second))
	}
}

// TestClaimForgetsChunksNeverReleased: claims whose rows are never released (the relay drops
// some rows unpublished) do not keep their chunks alive: the session follows a bounded number.
func TestClaimForgetsChunksNeverReleased(t *testing.T) {
	// Not parallel: it measures the process's live heap, which other tests would add to.
	ctx := context.Background()
	// 200 rows of 60 KiB: 50 chunks' worth, claimed again and again without a release.
	sess := chunkRows(t, 200, `'ab'`)
	var before, after runtime.MemStats
	claimAll := func() {
		for range 4 {
			if _, err := sess.Claim(ctx, 0, nil, 200, 1<<30, nil); err != nil {
				t.Fatal(err)
			}
		}
	}
	claimAll()
	runtime.GC()
	runtime.ReadMemStats(&before)
	claimAll() // 12 MiB more read, none of it released
	runtime.GC()
	runtime.ReadMemStats(&after)
	// What the session may hold: the chunks it follows (16 MiB) and its free ones.
	if grown := int64(after.HeapAlloc) - int64(before.HeapAlloc); grown > 8<<20 {
		t.Errorf("live heap grew by %d MiB over claims nothing refers to", grown>>20)
	}
}
