package rabbitmq

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/internal/backoff"
)

// Header names set on every message: the relay's reserved headers (relay.ReservedHeaders), the
// Kafka sink's plus aggregate-id (Kafka carries it as the record key).
const (
	HeaderEventID       = relay.HeaderEventID
	HeaderEventType     = relay.HeaderEventType
	HeaderAggregateType = relay.HeaderAggregateType
	HeaderAggregateID   = relay.HeaderAggregateID
	HeaderOccurredAt    = relay.HeaderOccurredAt
)

// The errors a message's done receives: each is, or wraps, one of these. Their Reason is the
// label the relay's metrics count the failure under (outbox_relay_publish_errors_total{reason}).
// A lost connection or channel fails no message: the unconfirmed ones are published again.
var (
	// ErrUnroutable: the broker returned the message, no queue being bound for its routing key
	// (the message is published mandatory unless rabbitmq.drop_unroutable is set).
	ErrUnroutable error = &failure{reason: "unroutable", text: "rabbitmq returned the message as unroutable"}
	// ErrNacked: the broker refused the message (a nack), for instance a queue with
	// x-overflow=reject-publish that is full.
	ErrNacked error = &failure{reason: "nacked", text: "rabbitmq nacked the message"}
	// ErrAborted is the error of the messages failed by Abort.
	ErrAborted error = &failure{reason: "aborted", text: "rabbitmq: publish aborted"}
	// ErrClosed is the error of the messages published to, or pending in, a closed Publisher.
	ErrClosed error = &failure{reason: "publisher_closed", text: "rabbitmq: publisher closed"}
)

// failure is a kind of failed publish, with its metrics label.
type failure struct{ reason, text string }

func (f *failure) Error() string { return f.text }

// Reason returns the label of the failure in outbox_relay_publish_errors_total.
func (f *failure) Reason() string { return f.reason }

// Publisher publishes outbox rows to a RabbitMQ exchange: relay.Sink.
//
// It publishes on one channel in confirm mode, so messages leave in the order Publish was called
// and each one's done is called only after the broker confirmed it (for a persistent message
// routed to durable queues: written to disk). When the connection or the channel fails, the
// Publisher reconnects with capped exponential backoff and publishes again, first and in their
// order, the messages that were not confirmed: a broker outage delays messages, it does not fail
// them. Those republished messages may reach consumers twice; message_id is the event id.
//
// A broker nack (an internal error of a queue, rare) fails only its message, while later messages
// of the same key may already be confirmed: the relay then publishes the nacked one again after
// them. Kafka's idempotent producer fails the whole partition instead; AMQP has no equivalent.
type Publisher struct {
	cfg Config
	log *slog.Logger

	mu     sync.Mutex
	queue  []*pending             // accepted, not yet sent on the current channel, in order
	sent   map[uint64]*pending    // sent on the current channel and not confirmed, by delivery tag
	ret    map[string]amqp.Return // messages the broker returned, by message id, until their confirm
	closed bool
	conn   *amqp.Connection // of the current session, nil between sessions
	wake   chan struct{}

	connected atomic.Bool
	stop      context.CancelFunc
	done      chan struct{}
}

type pending struct {
	m    *relay.Message
	key  string
	pub  amqp.Publishing
	done func(error)
	tag  uint64
}

var _ relay.Sink = (*Publisher)(nil)

// NewPublisher validates cfg and starts the publisher's connection loop in the background. It
// does not wait for the broker: call Ping to check it. log may be nil.
func NewPublisher(cfg Config, log *slog.Logger) (*Publisher, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ctx, stop := context.WithCancel(context.Background())
	p := &Publisher{cfg: cfg, log: log, sent: map[uint64]*pending{}, ret: map[string]amqp.Return{},
		wake: make(chan struct{}, 1), stop: stop, done: make(chan struct{})}
	go p.run(ctx)
	return p, nil
}

// RoutingKey returns the routing key of m.
func (p *Publisher) RoutingKey(m *relay.Message) string {
	return strings.NewReplacer("{aggregate_type}", m.AggregateType, "{event_type}", m.EventType,
		"{aggregate_id}", m.AggregateID).Replace(p.cfg.RoutingKeyTemplate)
}

// Message builds the routing key and the AMQP message of m, or returns an error wrapping
// relay.ErrInvalidMessage that says why m cannot be published.
func (p *Publisher) Message(m *relay.Message) (string, amqp.Publishing, error) {
	key := p.RoutingKey(m)
	if len(key) > 255 {
		return "", amqp.Publishing{}, fmt.Errorf("%w: routing key of %d bytes exceeds AMQP's 255", relay.ErrInvalidMessage, len(key))
	}
	if err := m.Check(); err != nil { // the key and occurred_at
		return "", amqp.Publishing{}, err
	}
	if m.Payload == nil {
		return "", amqp.Publishing{}, fmt.Errorf("%w: payload is NULL (RabbitMQ has no tombstones)", relay.ErrInvalidMessage)
	}
	if len(m.Payload) > p.cfg.MaxMessageBytes {
		return "", amqp.Publishing{}, fmt.Errorf("%w: body of %d bytes exceeds rabbitmq.max_message_bytes (%d)", relay.ErrInvalidMessage, len(m.Payload), p.cfg.MaxMessageBytes)
	}
	headers := amqp.Table{
		HeaderEventID:       m.EventID,
		HeaderEventType:     m.EventType,
		HeaderAggregateType: m.AggregateType,
		HeaderAggregateID:   m.AggregateID,
		HeaderOccurredAt:    m.OccurredAt.UTC().Format(time.RFC3339Nano),
	}
	contentType := ""
	if m.Headers != nil {
		var hs map[string]any
		if err := json.Unmarshal(m.Headers, &hs); err != nil {
			return "", amqp.Publishing{}, fmt.Errorf("%w: headers is not a JSON object: %v", relay.ErrInvalidMessage, err)
		}
		for k, v := range hs {
			if err := relay.CheckHeader(k); err != nil {
				return "", amqp.Publishing{}, err
			}
			s, ok := v.(string)
			if !ok {
				return "", amqp.Publishing{}, fmt.Errorf("%w: header %q is not a string", relay.ErrInvalidMessage, k)
			}
			if len(k) > 255 {
				return "", amqp.Publishing{}, fmt.Errorf("%w: header name of %d bytes exceeds AMQP's 255", relay.ErrInvalidMessage, len(k))
			}
			headers[k] = s
			if strings.EqualFold(k, "content-type") {
				contentType = s
			}
		}
	}
	return key, amqp.Publishing{
		Headers:      headers,
		ContentType:  contentType,
		DeliveryMode: amqp.Persistent,
		MessageId:    m.EventID,
		Timestamp:    m.OccurredAt,
		Type:         m.EventType,
		AppId:        "outbox-relay",
		Body:         m.Payload,
	}, nil
}

// Publish implements relay.Sink. It never blocks on the broker: the message is queued and sent by
// the publisher's loop; done is called once the broker confirmed it, or with the broker's
// refusal (a nack, or an unroutable message returned), or by Abort or Close.
func (p *Publisher) Publish(_ context.Context, m *relay.Message, done func(error)) error {
	key, pub, err := p.Message(m)
	if err != nil {
		return err
	}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		go done(ErrClosed)
		return nil
	}
	p.queue = append(p.queue, &pending{m: m, key: key, pub: pub, done: done})
	p.mu.Unlock()
	p.signal()
	return nil
}

// Abort implements relay.Sink: every message not yet confirmed fails with ErrAborted, and Abort
// returns once their done calls ran. A message already written to the socket may still reach
// the broker: it is reported failed, and the relay publishes it again later.
func (p *Publisher) Abort(context.Context) error {
	p.mu.Lock()
	failed := p.queue
	p.queue = nil
	failed = append(failed, p.sortedSent()...)
	clear(p.sent)
	p.mu.Unlock()
	for _, pd := range failed {
		pd.done(ErrAborted)
	}
	return nil
}

// Connected reports whether the publisher has a channel in confirm mode right now.
func (p *Publisher) Connected() bool { return p.connected.Load() }

// Ping checks that the broker answers: true at once while the publisher's own connection is up
// (its heartbeats watch it), else checked on a connection of its own, which reports why the
// broker is unreachable, refuses the credentials or the exchange.
func (p *Publisher) Ping(ctx context.Context) error {
	if p.connected.Load() {
		return nil
	}
	conn, ch, err := p.dial(ctx)
	if err != nil {
		return err
	}
	_ = ch.Close()
	_ = conn.CloseDeadline(time.Now().Add(time.Second))
	return nil
}

// Close stops the publisher: messages not yet confirmed fail with ErrClosed.
func (p *Publisher) Close() {
	p.mu.Lock()
	p.closed = true
	conn := p.conn
	p.mu.Unlock()
	p.stop()
	if conn != nil {
		// Unblocks a publish stuck on a broker that stopped reading (a resource alarm).
		_ = conn.CloseDeadline(time.Now().Add(time.Second))
	}
	<-p.done
	p.mu.Lock()
	failed := p.queue
	p.queue = nil
	failed = append(failed, p.sortedSent()...)
	clear(p.sent)
	p.mu.Unlock()
	for _, pd := range failed {
		pd.done(ErrClosed)
	}
}

func (p *Publisher) signal() {
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// sortedSent returns the sent messages in delivery-tag order. p.mu is held.
func (p *Publisher) sortedSent() []*pending {
	out := make([]*pending, 0, len(p.sent))
	for _, pd := range p.sent {
		out = append(out, pd)
	}
	slices.SortFunc(out, func(a, b *pending) int { return cmp.Compare(a.tag, b.tag) })
	return out
}

// run connects, publishes, and reconnects until ctx ends.
func (p *Publisher) run(ctx context.Context) {
	defer close(p.done)
	delay := p.cfg.ReconnectBackoffMin
	for ctx.Err() == nil {
		conn, ch, err := p.dial(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			p.log.Warn("rabbitmq unreachable, retrying", "broker", p.cfg.host(), "err", err, "retry_in", delay)
			if !backoff.Sleep(ctx, backoff.Jitter(delay)) {
				return
			}
			delay = backoff.Double(delay, p.cfg.ReconnectBackoffMax)
			continue
		}
		delay = p.cfg.ReconnectBackoffMin
		p.log.Info("rabbitmq connected", "broker", p.cfg.host(), "exchange", p.cfg.Exchange)
		p.mu.Lock()
		p.conn = conn
		p.mu.Unlock()
		p.connected.Store(true)
		err = p.session(ctx, conn, ch)
		p.connected.Store(false)
		p.mu.Lock()
		p.conn = nil
		p.mu.Unlock()
		p.requeue()
		if ctx.Err() != nil {
			return
		}
		p.log.Warn("rabbitmq connection lost, reconnecting; unconfirmed messages will be published again",
			"broker", p.cfg.host(), "err", err, "retry_in", delay)
		if !backoff.Sleep(ctx, backoff.Jitter(delay)) {
			return
		}
	}
}

// dial connects, opens a channel in confirm mode and declares (or checks) the exchange.
func (p *Publisher) dial(ctx context.Context) (*amqp.Connection, *amqp.Channel, error) {
	timeout := p.cfg.DialTimeout
	if dl, ok := ctx.Deadline(); ok {
		timeout = min(timeout, max(time.Until(dl), time.Millisecond))
	}
	props := amqp.NewConnectionProperties()
	props.SetClientConnectionName("outbox-relay")
	conn, err := amqp.DialConfig(p.cfg.URL, amqp.Config{
		Heartbeat:  p.cfg.Heartbeat,
		Properties: props,
		Dial: func(network, addr string) (net.Conn, error) {
			d := net.Dialer{Timeout: timeout}
			c, err := d.DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			// Bound the TLS and AMQP handshakes; amqp091 clears the deadline once open.
			if err := c.SetDeadline(time.Now().Add(timeout)); err != nil {
				_ = c.Close()
				return nil, err
			}
			return c, nil
		},
	})
	if err != nil {
		return nil, nil, fmt.Errorf("rabbitmq %s: connect: %w", p.cfg.host(), err)
	}
	ch, err := conn.Channel()
	if err != nil {
		_ = conn.CloseDeadline(time.Now().Add(time.Second))
		return nil, nil, fmt.Errorf("rabbitmq %s: open channel: %w", p.cfg.host(), err)
	}
	if p.cfg.Exchange != "" {
		if p.cfg.NoDeclare {
			err = ch.ExchangeDeclarePassive(p.cfg.Exchange, p.cfg.ExchangeType, true, false, false, false, nil)
		} else {
			err = ch.ExchangeDeclare(p.cfg.Exchange, p.cfg.ExchangeType, true, false, false, false, nil)
		}
		if err != nil {
			_ = conn.CloseDeadline(time.Now().Add(time.Second))
			return nil, nil, fmt.Errorf("rabbitmq %s: exchange %q (rabbitmq.exchange): %w", p.cfg.host(), p.cfg.Exchange, err)
		}
	}
	if err := ch.Confirm(false); err != nil {
		_ = conn.CloseDeadline(time.Now().Add(time.Second))
		return nil, nil, fmt.Errorf("rabbitmq %s: enable publisher confirms: %w", p.cfg.host(), err)
	}
	return conn, ch, nil
}

// session publishes on ch until it or its connection fails, or ctx ends.
func (p *Publisher) session(ctx context.Context, conn *amqp.Connection, ch *amqp.Channel) error {
	// The broker's confirms arrive in delivery-tag order (amqp091 resequences them). A return
	// always precedes the confirm of its message, and the returns channel is unbuffered, so
	// the receiver has seen the return when the confirm comes.
	confirms := ch.NotifyPublish(make(chan amqp.Confirmation, 1024))
	returns := ch.NotifyReturn(make(chan amqp.Return))
	chClosed := ch.NotifyClose(make(chan *amqp.Error, 1))
	connClosed := conn.NotifyClose(make(chan *amqp.Error, 1))
	p.mu.Lock()
	clear(p.ret)
	p.mu.Unlock()

	recvDone := make(chan struct{})
	go func() {
		defer close(recvDone)
		for {
			select {
			case c, ok := <-confirms:
				if !ok {
					return
				}
				p.confirmed(c)
			case r, ok := <-returns:
				if !ok {
					returns = nil
					continue
				}
				p.mu.Lock()
				p.ret[r.MessageId] = r
				p.mu.Unlock()
			}
		}
	}()
	defer func() {
		// Closing the connection closes the channel and the notification channels, which ends
		// the receiver. The deadline bounds the handshake with a broker that does not answer.
		_ = conn.CloseDeadline(time.Now().Add(time.Second))
		<-recvDone
	}()

	var tag uint64
	for {
		for {
			p.mu.Lock()
			if len(p.queue) == 0 {
				p.mu.Unlock()
				break
			}
			pd := p.queue[0]
			p.queue = p.queue[1:]
			tag++
			pd.tag = tag
			p.sent[tag] = pd
			p.mu.Unlock()
			err := ch.PublishWithContext(ctx, p.cfg.Exchange, pd.key, !p.cfg.DropUnroutable, false, pd.pub)
			if err != nil {
				p.mu.Lock()
				if p.sent[tag] == pd { // not aborted meanwhile: publish it again after reconnecting
					delete(p.sent, tag)
					p.queue = append([]*pending{pd}, p.queue...)
				}
				p.mu.Unlock()
				return fmt.Errorf("publish: %w", err)
			}
		}
		select {
		case <-p.wake:
		case err := <-chClosed:
			return fmt.Errorf("channel closed: %w", amqpErr(err))
		case err := <-connClosed:
			return fmt.Errorf("connection closed: %w", amqpErr(err))
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// confirmed settles the message of one confirmation.
func (p *Publisher) confirmed(c amqp.Confirmation) {
	p.mu.Lock()
	pd, ok := p.sent[c.DeliveryTag]
	if !ok {
		p.mu.Unlock()
		return // aborted meanwhile
	}
	delete(p.sent, c.DeliveryTag)
	r, returned := p.ret[pd.pub.MessageId]
	if returned {
		delete(p.ret, pd.pub.MessageId)
	}
	p.mu.Unlock()
	switch {
	case returned:
		pd.done(fmt.Errorf("%w: %d %s (no queue bound to exchange %q for routing key %q)",
			ErrUnroutable, r.ReplyCode, r.ReplyText, p.cfg.Exchange, pd.key))
	case !c.Ack:
		pd.done(fmt.Errorf("%w (exchange %q, routing key %q)", ErrNacked, p.cfg.Exchange, pd.key))
	default:
		pd.done(nil)
	}
}

// requeue puts the sent but unconfirmed messages back at the head of the queue, in their order.
func (p *Publisher) requeue() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.sent) == 0 {
		return
	}
	p.queue = append(p.sortedSent(), p.queue...)
	clear(p.sent)
}

func amqpErr(err *amqp.Error) error {
	if err == nil {
		return errors.New("closed")
	}
	return err
}
