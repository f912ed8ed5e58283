// Package rabbitmq publishes outbox rows to a RabbitMQ exchange (AMQP 0-9-1) with publisher
// confirms: the relay's relay.Sink for RabbitMQ.
package rabbitmq

import (
	"errors"
	"fmt"
	"net/url"
	"regexp"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"github.com/outbox-relay/outbox-relay/internal/bounds"
)

// Defaults of Config.
const (
	ExchangeDefault            = "outbox"
	ExchangeTypeDefault        = "topic"
	RoutingKeyTemplateDefault  = "{aggregate_type}.{event_type}"
	MaxMessageBytesDefault     = 16 << 20
	DialTimeoutDefault         = 10 * time.Second
	HeartbeatDefault           = 10 * time.Second
	ReconnectBackoffMinDefault = 100 * time.Millisecond
	ReconnectBackoffMaxDefault = 10 * time.Second
)

// Ranges of Config's fields: Validate checks them, and cmd parses the rabbitmq.* keys with them.
var (
	MaxMessageBytesRange     = bounds.Int{Min: 1024, Max: 512 << 20}
	DialTimeoutRange         = bounds.Duration{Min: 100 * time.Millisecond, Max: 10 * time.Minute}
	HeartbeatRange           = bounds.Duration{Min: time.Second, Max: 10 * time.Minute}
	ReconnectBackoffMaxRange = bounds.Duration{Min: 100 * time.Millisecond, Max: 10 * time.Minute} // and at least ReconnectBackoffMin
)

// Config configures the RabbitMQ publisher.
type Config struct {
	// URL is the broker's address, amqp://user:password@host:5672/vhost (amqps:// for TLS, with
	// the system's CAs). Required. A secret: never logged.
	URL string
	// Exchange receives the messages. Default "outbox". "" is the broker's default exchange,
	// which routes a message to the queue named by its routing key.
	Exchange string
	// ExchangeType is the type the exchange is declared with: direct, fanout, topic or headers.
	// Default "topic".
	ExchangeType string
	// NoDeclare skips declaring the exchange (durable, of ExchangeType) at each connection; it
	// must then exist, which is checked. Default false: the exchange is declared.
	NoDeclare bool
	// RoutingKeyTemplate makes each message's routing key; {aggregate_type}, {event_type} and
	// {aggregate_id} are replaced with the row's values. Default "{aggregate_type}.{event_type}".
	RoutingKeyTemplate string
	// DropUnroutable lets the broker drop a message no queue is bound for. Default false: messages
	// are published mandatory, and one the broker returns as unroutable fails (the relay retries
	// it, then parks it with the broker's reason).
	DropUnroutable bool
	// MaxMessageBytes is the largest body sent; larger rows are parked. Keep it at or below the
	// broker's max_message_size. Default 16 MiB.
	MaxMessageBytes int
	// DialTimeout bounds connecting to the broker, TLS and AMQP handshakes included. Default 10s.
	DialTimeout time.Duration
	// Heartbeat is the AMQP heartbeat interval, which notices a dead connection. Default 10s.
	Heartbeat time.Duration
	// ReconnectBackoffMin and ReconnectBackoffMax bound the exponential delay between
	// reconnection attempts. Defaults 100ms and 10s.
	ReconnectBackoffMin, ReconnectBackoffMax time.Duration
}

var (
	placeholderRE = regexp.MustCompile(`\{[^}]*\}`)
	// exchangeRE and templateRE are the characters of an exchange name and of a routing key
	// template; their length (at most 255) is checked apart: a bounded repetition such as
	// {0,255} compiles to a program of 255 copies of the class, about 100 kB of heap held for the
	// life of the process, even where RabbitMQ is not used.
	exchangeRE = regexp.MustCompile(`^[a-zA-Z0-9._:-]*$`)
	templateRE = regexp.MustCompile(`^[a-zA-Z0-9._:/{}-]+$`)
)

// exchangePattern and templatePattern say in messages what exchangeRE and templateRE check,
// with the length.
const (
	exchangePattern = `^[a-zA-Z0-9._:-]{0,255}$`
	templatePattern = `^[a-zA-Z0-9._:/{}-]{1,255}$`
)

// WithDefaults returns c with zero fields set to their defaults. Exchange is left alone: its
// zero value is the default exchange, and the default of the configuration key is "outbox".
func (c Config) WithDefaults() Config {
	if c.ExchangeType == "" {
		c.ExchangeType = ExchangeTypeDefault
	}
	if c.RoutingKeyTemplate == "" {
		c.RoutingKeyTemplate = RoutingKeyTemplateDefault
	}
	if c.MaxMessageBytes == 0 {
		c.MaxMessageBytes = MaxMessageBytesDefault
	}
	if c.DialTimeout == 0 {
		c.DialTimeout = DialTimeoutDefault
	}
	if c.Heartbeat == 0 {
		c.Heartbeat = HeartbeatDefault
	}
	if c.ReconnectBackoffMin == 0 {
		c.ReconnectBackoffMin = ReconnectBackoffMinDefault
	}
	if c.ReconnectBackoffMax == 0 {
		c.ReconnectBackoffMax = ReconnectBackoffMaxDefault
	}
	return c
}

// Validate reports every invalid field, naming its configuration key. It never prints the URL.
func (c Config) Validate() error {
	var errs []error
	if c.URL == "" {
		errs = append(errs, errors.New("rabbitmq.url: required with sink rabbitmq (set OUTBOX_RABBITMQ_URL or rabbitmq.url_file)"))
	} else if _, err := amqp.ParseURI(c.URL); err != nil {
		errs = append(errs, errors.New("rabbitmq.url: not an amqp:// or amqps:// URL"))
	}
	switch c.ExchangeType {
	case "direct", "fanout", "topic", "headers":
	default:
		errs = append(errs, fmt.Errorf("rabbitmq.exchange_type: must be one of direct, fanout, topic, headers, got %q", c.ExchangeType))
	}
	if len(c.Exchange) > 255 || !exchangeRE.MatchString(c.Exchange) {
		errs = append(errs, fmt.Errorf("rabbitmq.exchange: must match %s (empty: the default exchange), got %q", exchangePattern, c.Exchange))
	}
	if len(c.RoutingKeyTemplate) > 255 || !templateRE.MatchString(c.RoutingKeyTemplate) {
		errs = append(errs, fmt.Errorf("rabbitmq.routing_key_template: must match %s, got %q", templatePattern, c.RoutingKeyTemplate))
	}
	for _, p := range placeholderRE.FindAllString(c.RoutingKeyTemplate, -1) {
		if p != "{aggregate_type}" && p != "{event_type}" && p != "{aggregate_id}" {
			errs = append(errs, fmt.Errorf("rabbitmq.routing_key_template: unknown placeholder %s (allowed: {aggregate_type}, {event_type}, {aggregate_id})", p))
		}
	}
	backoffMax := ReconnectBackoffMaxRange.Check("rabbitmq.reconnect_backoff_max", c.ReconnectBackoffMax)
	errs = append(errs, MaxMessageBytesRange.Check("rabbitmq.max_message_bytes", c.MaxMessageBytes),
		DialTimeoutRange.Check("rabbitmq.dial_timeout", c.DialTimeout), HeartbeatRange.Check("rabbitmq.heartbeat", c.Heartbeat), backoffMax)
	if c.ReconnectBackoffMin <= 0 || (backoffMax == nil && c.ReconnectBackoffMax < c.ReconnectBackoffMin) {
		errs = append(errs, fmt.Errorf("rabbitmq.reconnect_backoff_max: must be at least the first delay (%s), got %s", c.ReconnectBackoffMin, c.ReconnectBackoffMax))
	}
	return errors.Join(errs...)
}

// Password returns the password in URL, to keep it out of logs; "" when there is none.
func (c Config) Password() string {
	u, err := url.Parse(c.URL)
	if err != nil || u.User == nil {
		return ""
	}
	p, _ := u.User.Password()
	return p
}

// host returns the host, port and vhost of URL, safe to log.
func (c Config) host() string {
	uri, err := amqp.ParseURI(c.URL)
	if err != nil {
		return "(invalid url)"
	}
	return fmt.Sprintf("%s:%d (vhost %s)", uri.Host, uri.Port, uri.Vhost)
}
