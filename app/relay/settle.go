package relay

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// verdict is the sink's callback for m: it notes a failure's key in the gate before handing the
// verdict to the loop.
func (l *term) verdict(m *Message, err error) {
	if err != nil {
		l.gate.failed(m)
	}
	l.results <- result{m: m, err: err, at: time.Now()}
}

// settleReady settles first (when given) and every result ready now, without blocking. The
// batch is gathered in a buffer kept from one call to the next (at a hundred thousand events a
// second, a new slice each time was a sixth of the relay's allocations), and cleared after:
// it must not keep the messages alive.
func (l *term) settleReady(ctx context.Context, first ...result) error {
	batch := append(l.ready[:0], first...)
	for more := true; more; {
		select {
		case res := <-l.results:
			batch = append(batch, res)
		default:
			more = false
		}
	}
	err := l.settle(ctx, batch)
	clear(batch)
	l.ready = batch[:0]
	return err
}

// missingRetryMax caps the delay between two sends of a row whose destination is missing, so
// that rows go out soon after an operator creates it.
const missingRetryMax = 10 * time.Second

// destinationMissing holds m's key and sends m again after a backoff, without an attempt counted
// against it: its destination does not exist (ErrDestinationMissing), which is no fault of the
// row. The sink says so once per destination; the row stays due in the database.
func (l *term) destinationMissing(m *Message) {
	at := l.gate.resendAfter(m, missingRetryMax, time.Now())
	l.log.Debug("destination missing, sending again without counting an attempt", "row_id", m.ID,
		"event_id", m.EventID, "retry_in", time.Until(at).Round(time.Millisecond))
}

// settle queues the acknowledged messages for marking and records the failures.
func (l *term) settle(ctx context.Context, results []result) error {
	if len(results) == 0 {
		return nil
	}
	ctx = context.WithoutCancel(ctx) // what the broker acknowledged is marked even when stopping
	defer l.startMark(false)
	acked := l.acked[:0]
	defer func() {
		// The broker has them: nothing reads their payloads and headers again. Their bytes leave
		// the byte budget now, their rows the in-flight set only once marked.
		l.conn.release(acked)
		clear(acked)
		l.acked = acked[:0]
	}()
	for _, res := range results {
		m := res.m
		if res.st != nil && l.streamSettled(res, &acked) {
			continue
		}
		if res.err == nil {
			if len(l.toMark) == 0 {
				l.toMarkSince = time.Now()
			}
			l.toMark = append(l.toMark, m) // in flight until marked
			l.bytes -= m.Size()
			acked = append(acked, m)
			if l.gate.acked(m, time.Now()) {
				l.cur.rewind(m.ID) // its key's later rows may lie below where claims start
			}
			l.obs.Acked(m, res.at)
			l.lastAck.Store(res.at.UnixNano())
			continue
		}
		if errors.Is(res.err, ErrNotLeader) {
			// The sink refused it for the term's lease: the leadership may be gone, so nothing
			// is counted against the row; the term ends and the row stays pending.
			return fmt.Errorf("row %d not sent: %w", m.ID, res.err)
		}
		// A failure is recorded, or its row parked, on the session, after the claim running on it
		// (conn.call). That claim's rows are handed to the sink after this failure is settled,
		// so the key's later rows among them are held back.
		delete(l.inflight, m.ID)
		l.bytes -= m.Size()
		l.gate.failureSettled(m) // the key stays held below, by the gate or the park's order policy
		l.obs.Failed(m, res.err)
		if l.gate.behindOwnFailure(m) {
			continue // an earlier row of this key failed first: this one only waits behind it
		}
		if errors.Is(res.err, ErrDestinationMissing) {
			l.destinationMissing(m)
			continue
		}
		if errors.Is(res.err, ErrSendAgain) {
			at := l.gate.resendAfter(m, missingRetryMax, time.Now())
			l.log.Debug("the sink aborted the row's transaction for another row, sending again without counting an attempt",
				"row_id", m.ID, "event_id", m.EventID, "retry_in", time.Until(at).Round(time.Millisecond))
			continue
		}
		if l.gate.collateral(m, res.err, res.at, time.Now()) { // the key's later rows wait behind m
			l.log.Debug("publish failed with its group, resending without counting an attempt",
				"row_id", m.ID, "event_id", m.EventID, "aggregate_type", m.AggregateType,
				"aggregate_id", m.AggregateID, "retry_in", time.Until(l.gate.resendTime(m.ID)).Round(time.Millisecond), "err", res.err)
			continue
		}
		if errors.Is(res.err, ErrInvalidMessage) || m.Attempts+1 >= l.cfg.MaxAttempts {
			if err := l.park(ctx, m, res.err.Error()); err != nil {
				return err
			}
			continue
		}
		delay := l.cfg.backoff(m.Attempts + 1)
		reason := res.err.Error()
		if err := l.conn.call(ctx, func(ctx context.Context, s Session) error {
			return s.Retry(ctx, m.ID, reason, delay)
		}); err != nil {
			return fmt.Errorf("record failed attempt of row %d: %w", m.ID, err)
		}
		l.gate.holdBehind(m)
		l.log.Warn("publish failed, will retry", "row_id", m.ID, "event_id", m.EventID,
			"aggregate_type", m.AggregateType, "aggregate_id", m.AggregateID,
			"attempt", m.Attempts+1, "retry_in", delay, "err", res.err)
	}
	return nil
}

// park moves m to the parked rows and applies the order policy to its key.
func (l *term) park(ctx context.Context, m *Message, reason string) error {
	if err := l.conn.call(context.WithoutCancel(ctx), func(ctx context.Context, s Session) error {
		return s.Park(ctx, m.ID, reason)
	}); err != nil {
		return fmt.Errorf("park row %d: %w", m.ID, err)
	}
	if l.gate.parked(m, l.cfg.OrderPolicy == OrderPolicyWait, time.Now()) {
		l.cur.rewind(m.ID) // its key's later rows may lie below where claims start
	}
	l.obs.Parked(m, reason)
	l.log.Warn("row parked", "row_id", m.ID, "event_id", m.EventID, "aggregate_type", m.AggregateType,
		"aggregate_id", m.AggregateID, "attempts", m.Attempts+1, "reason", reason, "order_policy", l.cfg.OrderPolicy)
	return nil
}
