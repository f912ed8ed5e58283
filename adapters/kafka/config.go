package kafka

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"regexp"
	"strings"
	"time"

	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/internal/bounds"
	"github.com/twmb/franz-go/pkg/kgo"
	"go.opentelemetry.io/otel/trace"
)

// Defaults of Config.
const (
	ClientIDDefault        = "outbox-relay"
	TopicTemplateDefault   = "outbox.event.{aggregate_type}"
	MaxRecordBytesDefault  = 1000000
	CompressionDefault     = "none"
	DialTimeoutDefault     = 10 * time.Second
	RecordTimestampDefault = TimestampProduce
	FormatDefault          = FormatNative
	// CloudEventsSourceDefault is the default of Config.CloudEventsSource.
	CloudEventsSourceDefault = "/outbox/{aggregate_type}"
)

// Ranges of Config's fields: Validate checks them, and cmd parses the kafka.* keys with them.
var (
	MaxRecordBytesRange = bounds.Int{Min: 1024, Max: 100 << 20}
	LingerRange         = bounds.Duration{Min: 0, Max: 10 * time.Second}
	DialTimeoutRange    = bounds.Duration{Min: 100 * time.Millisecond, Max: 10 * time.Minute}
)

// Values of Config.Format.
const (
	// FormatNative sends the relay's own headers (event-id, event-type, aggregate-type,
	// occurred-at) and the row's headers.
	FormatNative = "native"
	// FormatCloudEvents sends, in addition, the CloudEvents attributes of the Kafka protocol
	// binding in binary mode: ce_specversion, ce_id, ce_type, ce_source, ce_subject and ce_time;
	// the row's content-type header is the event's datacontenttype.
	FormatCloudEvents = "cloudevents"
)

// Values of Config.RecordTimestamp.
const (
	// TimestampProduce stamps each record with the time the producer handed it to a batch.
	TimestampProduce = "produce"
	// TimestampOccurredAt stamps each record with its row's occurred_at, the event's time.
	TimestampOccurredAt = "occurred_at"
)

// Config configures the Kafka publisher.
type Config struct {
	// Brokers are the seed brokers, host:port. Required.
	Brokers []string
	// ClientID is sent to the brokers. Default "outbox-relay".
	ClientID string
	// TopicTemplate names the topic of rows without a topic of their own; {aggregate_type} and
	// {event_type} are replaced with the row's values. Default "outbox.event.{aggregate_type}".
	TopicTemplate string
	// MaxRecordBytes is the largest record (key, value and headers) sent; larger rows are parked.
	// Keep it at or below the broker's message.max.bytes. Default 1000000.
	MaxRecordBytes int
	// Tombstones lets a NULL payload be published as a tombstone (a record with a null value).
	// Default false: such rows are parked.
	Tombstones bool
	// Linger is how long the producer waits to fill a batch. Default 0.
	Linger time.Duration
	// Compression is none, gzip, snappy, lz4 or zstd. Default none.
	Compression string
	// AutoCreateTopics asks the brokers to create missing topics. Default false.
	AutoCreateTopics bool
	// ClientMetrics sends the Kafka client's metrics to the brokers that subscribe to them
	// (KIP-714: a cluster with client-metrics subscriptions, or kfake). Default false: the relay
	// serves its metrics on /metrics, and franz-go compresses each push with a fresh lz4 writer
	// whose two 4 MiB blocks were the largest objects in the relay's heap when a drain starts.
	ClientMetrics bool
	// DialTimeout bounds a connection attempt to a broker. Default 10s.
	DialTimeout time.Duration
	// IDHeader, when set, is the name of one more header carrying the event id, besides
	// event-id: "id" gives the record shape of Debezium's outbox event router. Default "": none.
	IDHeader string
	// RecordTimestamp is the timestamp of each record: "produce" (the time the producer batched
	// it) or "occurred_at" (the row's occurred_at, which must then be in 1970 or later, else the
	// row is parked). Topics with message.timestamp.type=LogAppendTime overwrite either with the
	// broker's append time. Default "produce".
	RecordTimestamp string
	// Format is the shape of each record: "native" or "cloudevents" (the CloudEvents Kafka
	// protocol binding, binary mode, beside the native headers). Default "native".
	Format string
	// CloudEventsSource is the ce_source of each record with Format "cloudevents";
	// {aggregate_type} and {event_type} are replaced with the row's values, percent-encoded as
	// URI path segments. Default "/outbox/{aggregate_type}".
	CloudEventsSource string
	// TLS configures TLS to the brokers.
	TLS TLSConfig
	// SASL configures authentication.
	SASL SASLConfig
	// Log receives the publisher's own lines (a topic missing, then found), not one per record;
	// nil discards them. Not a configuration key.
	Log *slog.Logger
	// Tracing, when not nil, makes the publisher start a span per record (a child of the trace
	// context in the row's traceparent header, whose traceparent the record carries instead) and
	// the consumer a span per record it handles. nil traces nothing. Not a configuration key: the
	// OTEL_* environment variables configure it (see the README).
	Tracing trace.TracerProvider
}

// TLSConfig configures TLS to the brokers.
type TLSConfig struct {
	Enabled  bool   // use TLS. Default false.
	CAFile   string // PEM file of the CAs to trust; the system pool when empty
	CertFile string // client certificate (PEM), for mutual TLS
	KeyFile  string // client key (PEM), for mutual TLS
	// ServerName overrides the name checked in the brokers' certificates.
	ServerName string
}

// SASLConfig configures SASL authentication.
type SASLConfig struct {
	// Mechanism is "" (none), PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 (with Username and
	// Password), OAUTHBEARER (with OAuth) or AWS_MSK_IAM (credentials from the standard AWS
	// chain; the region from the broker's MSK host name, else AWS_REGION).
	Mechanism string
	Username  string
	Password  string // a secret: never logged
	// OAuth says where OAUTHBEARER gets its token.
	OAuth OAuthConfig
	// OnTokenError, when not nil, is called each time OAUTHBEARER could not get a token (the
	// file unreadable or empty, the endpoint unreachable or refusing) or AWS_MSK_IAM could not
	// get credentials: the connection being authenticated fails, and is tried again. Not a
	// configuration key: the daemon counts these in its metrics.
	OnTokenError func(error)
}

var placeholderRE = regexp.MustCompile(`\{[^}]*\}`)

// WithDefaults returns c with zero fields set to their defaults.
func (c Config) WithDefaults() Config {
	if c.ClientID == "" {
		c.ClientID = ClientIDDefault
	}
	if c.TopicTemplate == "" {
		c.TopicTemplate = TopicTemplateDefault
	}
	if c.MaxRecordBytes == 0 {
		c.MaxRecordBytes = MaxRecordBytesDefault
	}
	if c.Compression == "" {
		c.Compression = CompressionDefault
	}
	if c.DialTimeout == 0 {
		c.DialTimeout = DialTimeoutDefault
	}
	if c.RecordTimestamp == "" {
		c.RecordTimestamp = RecordTimestampDefault
	}
	if c.Format == "" {
		c.Format = FormatDefault
	}
	if c.CloudEventsSource == "" {
		c.CloudEventsSource = CloudEventsSourceDefault
	}
	return c
}

// Validate reports every invalid field, naming its configuration key.
func (c Config) Validate() error {
	var errs []error
	if len(c.Brokers) == 0 {
		errs = append(errs, errors.New("kafka.brokers: at least one broker host:port is required"))
	}
	for _, b := range c.Brokers {
		if !strings.Contains(b, ":") {
			errs = append(errs, fmt.Errorf("kafka.brokers: %q is not host:port", b))
		}
	}
	for _, p := range placeholderRE.FindAllString(c.TopicTemplate, -1) {
		if p != "{aggregate_type}" && p != "{event_type}" {
			errs = append(errs, fmt.Errorf("kafka.topic_template: unknown placeholder %s (allowed: {aggregate_type}, {event_type})", p))
		}
	}
	if rest := placeholderRE.ReplaceAllString(c.TopicTemplate, "x"); !validName(rest, topicMaxLen) {
		errs = append(errs, fmt.Errorf("kafka.topic_template: %q does not make a valid topic name ([a-zA-Z0-9._-], at most 249 characters)", c.TopicTemplate))
	}
	if c.IDHeader != "" && (relay.IsReservedHeader(c.IDHeader) || !validName(c.IDHeader, 100)) {
		errs = append(errs, fmt.Errorf("kafka.id_header: must be letters, digits, '.', '_' or '-', and none of the relay's own headers (%s), got %q",
			strings.Join(relay.ReservedHeaders(), ", "), c.IDHeader))
	}
	errs = append(errs, MaxRecordBytesRange.Check("kafka.max_record_bytes", c.MaxRecordBytes),
		LingerRange.Check("kafka.linger", c.Linger), DialTimeoutRange.Check("kafka.dial_timeout", c.DialTimeout))
	if _, err := codec(c.Compression); err != nil {
		errs = append(errs, err)
	}
	if c.RecordTimestamp != TimestampProduce && c.RecordTimestamp != TimestampOccurredAt {
		errs = append(errs, fmt.Errorf("kafka.record_timestamp: must be one of %s, %s, got %q", TimestampProduce, TimestampOccurredAt, c.RecordTimestamp))
	}
	if c.Format != FormatNative && c.Format != FormatCloudEvents {
		errs = append(errs, fmt.Errorf("kafka.format: must be one of %s, %s, got %q", FormatNative, FormatCloudEvents, c.Format))
	}
	for _, p := range placeholderRE.FindAllString(c.CloudEventsSource, -1) {
		if p != "{aggregate_type}" && p != "{event_type}" {
			errs = append(errs, fmt.Errorf("kafka.cloudevents.source: unknown placeholder %s (allowed: {aggregate_type}, {event_type})", p))
		}
	}
	if rest := placeholderRE.ReplaceAllString(c.CloudEventsSource, "x"); rest != "" {
		if _, err := url.Parse(rest); err != nil || strings.ContainsAny(rest, " \t\n") {
			errs = append(errs, fmt.Errorf("kafka.cloudevents.source: %q is not a URI reference", c.CloudEventsSource))
		}
	}
	mech := strings.ToUpper(c.SASL.Mechanism)
	switch mech {
	case "":
	case MechanismPlain, MechanismScram256, MechanismScram512:
		if c.SASL.Username == "" || c.SASL.Password == "" {
			errs = append(errs, errors.New("kafka.sasl.username, kafka.sasl.password: both are required with kafka.sasl.mechanism"))
		}
		if !c.TLS.Enabled && mech == MechanismPlain {
			errs = append(errs, errors.New("kafka.sasl.mechanism: PLAIN sends the password in clear text; enable kafka.tls.enabled"))
		}
	case MechanismOAuthBearer, MechanismAWSMSKIAM:
		if c.SASL.Username != "" || c.SASL.Password != "" {
			errs = append(errs, fmt.Errorf("kafka.sasl.username, kafka.sasl.password: not used by %s; remove them", mech))
		}
		if !c.TLS.Enabled {
			errs = append(errs, fmt.Errorf("kafka.sasl.mechanism: %s sends a bearer credential; enable kafka.tls.enabled", mech))
		}
		if mech == MechanismOAuthBearer {
			errs = append(errs, c.SASL.OAuth.validate()...)
		}
	default:
		errs = append(errs, fmt.Errorf("kafka.sasl.mechanism: must be PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER or AWS_MSK_IAM, got %q", c.SASL.Mechanism))
	}
	if mech != MechanismOAuthBearer && (c.SASL.OAuth.TokenFile != "" || c.SASL.OAuth.TokenURL != "") {
		errs = append(errs, errors.New("kafka.sasl.oauth.token_file, kafka.sasl.oauth.token_url: used only with kafka.sasl.mechanism=OAUTHBEARER"))
	}
	if (c.TLS.CertFile == "") != (c.TLS.KeyFile == "") {
		errs = append(errs, errors.New("kafka.tls.cert_file, kafka.tls.key_file: set both or neither"))
	}
	return errors.Join(errs...)
}

func codec(name string) (kgo.CompressionCodec, error) {
	switch name {
	case "none":
		return kgo.NoCompression(), nil
	case "gzip":
		return kgo.GzipCompression(), nil
	case "snappy":
		return kgo.SnappyCompression(), nil
	case "lz4":
		return kgo.Lz4Compression(), nil
	case "zstd":
		return kgo.ZstdCompression(), nil
	}
	return kgo.NoCompression(), fmt.Errorf("kafka.compression: must be none, gzip, snappy, lz4 or zstd, got %q", name)
}

// clientOpts returns the franz-go options of c common to producers and consumers.
func (c Config) clientOpts() ([]kgo.Opt, error) { return c.clientOptsFenced(nil) }

// clientOptsFenced is clientOpts with the brokers' connections behind f (the publisher's), when
// not nil.
func (c Config) clientOptsFenced(f *fence) ([]kgo.Opt, error) {
	opts := []kgo.Opt{
		kgo.SeedBrokers(c.Brokers...),
		kgo.ClientID(c.ClientID),
		kgo.DialTimeout(c.DialTimeout),
	}
	if !c.ClientMetrics {
		opts = append(opts, kgo.DisableClientMetrics())
	}
	var tc *tls.Config
	if c.TLS.Enabled {
		var err error
		if tc, err = c.TLS.build(); err != nil {
			return nil, err
		}
	}
	opts = append(opts, dialer(c, tc, f))
	m, err := c.SASL.mechanism()
	if err != nil {
		return nil, err
	}
	if m != nil {
		opts = append(opts, kgo.SASL(m))
	}
	return opts, nil
}

func (t TLSConfig) build() (*tls.Config, error) {
	tc := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: t.ServerName}
	if t.CAFile != "" {
		pem, err := os.ReadFile(t.CAFile)
		if err != nil {
			return nil, fmt.Errorf("kafka.tls.ca_file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("kafka.tls.ca_file: no PEM certificate in %s", t.CAFile)
		}
		tc.RootCAs = pool
	}
	if t.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(t.CertFile, t.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("kafka.tls.cert_file: %w", err)
		}
		tc.Certificates = []tls.Certificate{cert}
	}
	return tc, nil
}
