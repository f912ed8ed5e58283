package relay

import (
	"testing"
	"time"
)

// TestWholeTxsWaitWithTheirKeys: a database transaction with a row that may not go waits whole,
// and every later row of its keys waits with it, transitively, so that no key's order is broken
// by a transaction that went ahead of a waiting one. A row without a transaction is one of its own.
func TestWholeTxsWaitWithTheirKeys(t *testing.T) {
	l := &term{gate: newKeyGate(func(int) time.Duration { return time.Second }), inflight: map[int64]*Message{}}
	row := func(id, tx int64, key string, held bool) Message {
		return Message{ID: id, TxID: tx, AggregateType: "t", AggregateID: key, TxHeld: held}
	}
	rows := []Message{
		row(1, 10, "a", false),
		row(2, 20, "c", false),
		row(3, 10, "b", true),  // tx 10 waits
		row(4, 20, "b", false), // after tx 10's row of b: tx 20 waits
		row(5, 30, "a", false), // after tx 10's row of a: tx 30 waits
		row(6, 40, "d", false), // free
		row(7, 0, "c", false),  // after tx 20's row of c: waits
		row(8, 0, "e", false),  // free
	}
	waits := l.wholeTxs(rows, time.Now())
	want := map[int64]bool{1: true, 2: true, 3: true, 4: true, 5: true, 6: false, 7: true, 8: false}
	for i := range rows {
		if got := waits[txOf(&rows[i])]; got != want[rows[i].ID] {
			t.Errorf("row %d (tx %d, key %s): waits %t, want %t", rows[i].ID, rows[i].TxID, rows[i].AggregateID, got, want[rows[i].ID])
		}
	}
	// A row in flight makes its transaction wait too; nothing waits when all are free.
	free := []Message{row(1, 10, "a", false), row(2, 10, "b", false), row(3, 20, "c", false)}
	if w := l.wholeTxs(free, time.Now()); w != nil {
		t.Errorf("free rows: %v wait, want none", w)
	}
	l.inflight[2] = &free[1]
	if w := l.wholeTxs(free, time.Now()); !w[10] || w[20] {
		t.Errorf("row 2 in flight: waits %v, want transaction 10 only", w)
	}
	// A key held by the gate makes the transaction of its row wait.
	delete(l.inflight, 2)
	l.gate.holdParked(&free[2])
	free = append(free, row(4, 30, "c", false))
	if w := l.wholeTxs(free, time.Now()); w[10] || !w[30] {
		t.Errorf("key c parked: waits %v, want transaction 30 (behind the parked row) only", w)
	}
}
