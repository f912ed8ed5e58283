package kafka

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/outbox-relay/outbox-relay/app/relay"
)

// Streams (relay.StreamSink): the rows of database transactions too large to hold in memory go
// into one Kafka transaction a page at a time. While a stream is open the transaction is not
// ended; each streamed record's row is released by the relay as soon as its produce is
// acknowledged, and the publisher keeps only its id, for the progress record the commit writes.

var _ relay.StreamSink = (*TxPublisher)(nil)

// ErrStreamTooOld is the error of PublishStreamed once the stream's Kafka transaction has been
// open for three quarters of kafka.transaction_timeout: the broker would abort it at the
// timeout, so the relay aborts it first, says so, and claims the rows again later.
var ErrStreamTooOld = errors.New("the streamed kafka transaction is too old")

// BeginStream implements relay.StreamSink.
func (p *TxPublisher) BeginStream() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.streaming = true
	p.streamIDs = nil
	p.streamFailed.Store(false)
}

// PublishStreamed implements relay.StreamSink: m's record joins the open transaction (begun if
// none is), and produced is called with the produce's verdict.
func (p *TxPublisher) PublishStreamed(ctx context.Context, m *relay.Message, produced func(error)) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case !p.streaming:
		return errors.New("exactly-once: the stream's kafka transaction ended")
	case p.pub == nil:
		return fmt.Errorf("%w: exactly-once delivery: no producer (the term did not recover)", relay.ErrNotLeader)
	case p.broken != nil:
		return fmt.Errorf("%w: %w", relay.ErrNotLeader, p.broken)
	case p.open && time.Since(p.began) > p.tx.TransactionTimeout*3/4:
		return fmt.Errorf("%w: open for %s with %d rows, kafka.transaction_timeout is %s: raise it (and the brokers' transaction.max.timeout.ms) to publish this database transaction",
			ErrStreamTooOld, time.Since(p.began).Round(time.Millisecond), len(p.streamIDs), p.tx.TransactionTimeout)
	}
	pr, ts, err := p.txRecord(m)
	if err != nil {
		return err
	}
	if err := p.pub.pinned(ctx, ts); err != nil {
		p.doom(m, err)
		return fmt.Errorf("partition count of %s: %w", ts.topic, err)
	}
	if err := p.pub.fitsTopic(ctx, ts, &pr.rec); err != nil {
		return err
	}
	if !p.open {
		if err := p.pub.cl.BeginTransaction(); err != nil {
			p.broken = fmt.Errorf("begin a kafka transaction: %w", err)
			return fmt.Errorf("%w: %w", relay.ErrNotLeader, p.broken)
		}
		p.open, p.began = true, time.Now()
	}
	p.pub.report(ts)
	pr.rec.Context, pr.done = ctx, func(err error) {
		if err != nil {
			p.streamFailed.Store(true)
		}
		produced(err)
	}
	p.pub.fence.set(ctx)
	p.pub.cl.Produce(ctx, &pr.rec, p.pub.promise)
	p.streamIDs = append(p.streamIDs, m.ID)
	return nil
}

// EndStream implements relay.StreamSink: with commit, the open transaction commits now (on the
// publisher's loop); without, it is aborted before EndStream returns.
func (p *TxPublisher) EndStream(commit bool, done func(error)) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.streaming = false
	if !p.open {
		p.streamIDs = nil
		done(fmt.Errorf("%w: the stream's transaction ended before the stream", ErrTransactionAborted))
		return
	}
	p.streamDone = done
	if !commit {
		recs := p.recs
		p.recs, p.open, p.doomed = nil, false, nil
		p.abortDoomed(recs, errors.New("its stream was aborted"))
		return
	}
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// streamOver ends the stream of the transaction that just ended, if any: its done is told the
// outcome (nil: committed). Called with mu held.
func (p *TxPublisher) streamOver(err error) {
	p.streaming = false
	p.streamIDs = nil
	if done := p.streamDone; done != nil {
		p.streamDone = nil
		if err == nil {
			done(nil)
			return
		}
		done(fmt.Errorf("%w: %w", ErrTransactionAborted, err))
	}
}
