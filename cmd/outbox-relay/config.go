package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/pflag"
	"github.com/spf13/viper"

	"github.com/outbox-relay/outbox-relay/adapters/kafka"
	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/adapters/rabbitmq"
	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/internal/bounds"
)

// setting is one configuration key: its default, its help, and whether it is a secret (secrets
// come from the environment or a file, never from a flag, and are never printed).
type setting struct {
	key    string
	def    string
	help   string
	secret bool
	// emptyIsValue: an empty value means something ("empty disables it"), so an environment
	// variable set empty is that value, where viper would skip it as unset.
	emptyIsValue bool
}

// envName returns the environment variable of a key: OUTBOX_<SECTION>_<KEY>.
func envName(key string) string {
	return "OUTBOX_" + strings.ToUpper(strings.NewReplacer(".", "_", "-", "_").Replace(key))
}

// flagName returns the flag of a key: --section-key.
func flagName(key string) string { return strings.NewReplacer(".", "-", "_", "-").Replace(key) }

// settings lists every configuration key. configs/outbox-relay.yaml documents the same keys.
var settings = []setting{
	{key: "database.url", def: "", help: "PostgreSQL connection string (URL or key=value)", secret: true},
	{key: "database.url_file", def: "", help: "file holding database.url (for example a mounted secret)"},
	{key: "database.schema", def: postgres.SchemaDefault, help: "schema of the outbox tables"},
	{key: "database.table", def: postgres.TableDefault, help: "outbox table name; the parked table adds _parked"},
	{key: "database.layout", def: layoutRelay, help: "relay (the relay's own table) or debezium (Debezium's outbox table: columns, topic and record shape preset)"},
	{key: "database.columns.id", def: "", help: "an adopted table's ordering column, a bigint identity or serial (added by migrate --adopt); empty: from database.layout"},
	{key: "database.columns.event_id", def: "", help: "column of the event id, uuid or text; empty: from database.layout"},
	{key: "database.columns.key", def: "", help: "column of the record key, text or varchar; empty: from database.layout"},
	{key: "database.columns.event_type", def: "", help: "column of the event type, text or varchar; empty: from database.layout"},
	{key: "database.columns.aggregate_type", def: "", help: "column of the aggregate type, text or varchar; empty: from database.layout"},
	{key: "database.columns.payload", def: "", help: "column of the record value: bytea, jsonb, json or text; empty: from database.layout"},
	{key: "database.columns.topic", def: "", help: "column overriding the topic, or none; empty: from database.layout"},
	{key: "database.columns.headers", def: "", help: "jsonb column of headers, or none; empty: from database.layout"},
	{key: "database.columns.occurred_at", def: "", help: "timestamptz column of occurred_at, or none (then the row's insert time); empty: from database.layout"},
	{key: "database.connect_timeout", def: "10s", help: "bound on connecting to PostgreSQL"},
	{key: "database.query_timeout", def: postgres.QueryTimeoutDefault.String(), help: "bound on each relay query"},
	{key: "database.wait_for_replication", def: postgres.ReplicationOff, help: "off, sync or all: publish a row only once the synchronous (sync) or every connected (all) standby has flushed it, so a failover loses nothing published; needs pg_read_all_stats"},

	{key: "sink", def: "kafka", help: "where events go: kafka or rabbitmq"},

	{key: "kafka.brokers", def: "", help: "comma-separated seed brokers host:port"},
	{key: "kafka.client_id", def: kafka.ClientIDDefault, help: "client id sent to the brokers"},
	{key: "kafka.topic_template", def: kafka.TopicTemplateDefault, help: "topic of rows without one; {aggregate_type} and {event_type} are replaced"},
	{key: "kafka.max_record_bytes", def: strconv.Itoa(kafka.MaxRecordBytesDefault), help: "largest record in bytes; larger rows are parked (a topic whose max.message.bytes is lower caps its own)"},
	{key: "kafka.id_header", def: "", help: "one more header holding the event id; empty: id with database.layout debezium, none otherwise; none: no such header"},
	{key: "kafka.tombstones", def: "false", help: "publish a NULL payload as a tombstone instead of parking it"},
	{key: "kafka.linger", def: "0s", help: "time the producer waits to fill a batch"},
	{key: "kafka.compression", def: kafka.CompressionDefault, help: "none, gzip, snappy, lz4 or zstd"},
	{key: "kafka.auto_create_topics", def: "false", help: "let the brokers create missing topics"},
	{key: "kafka.client_metrics", def: "false", help: "send the Kafka client's metrics to brokers that subscribe to them (KIP-714)"},
	{key: "kafka.dial_timeout", def: kafka.DialTimeoutDefault.String(), help: "bound on connecting to a broker"},
	{key: "kafka.format", def: kafka.FormatDefault, help: "record shape: native, or cloudevents (CloudEvents Kafka binding, binary mode, beside the native headers)"},
	{key: "kafka.cloudevents.source", def: kafka.CloudEventsSourceDefault, help: "with kafka.format=cloudevents, the ce_source; {aggregate_type} and {event_type} are replaced"},
	{key: "kafka.record_timestamp", def: kafka.RecordTimestampDefault, help: "record timestamp: produce (send time) or occurred_at (the event's time)"},
	{key: "kafka.delivery", def: deliveryAtLeastOnce, help: "at_least_once, or exactly_once (Kafka transactions: a database transaction's rows are committed together, and a crash duplicates nothing)"},
	{key: "kafka.transactional_id", def: "", help: "with exactly_once, the producer's transactional id, the same on every replica; empty: outbox-relay-<database>.<schema>.<table>"},
	{key: "kafka.progress_topic", def: kafka.ProgressTopicDefault, help: "with exactly_once, the compacted topic (one partition) of the relay's progress records; created when missing"},
	{key: "kafka.transaction_timeout", def: kafka.TransactionTimeoutDefault.String(), help: "with exactly_once, the producer's transaction.timeout.ms: a dead leader's open transaction is aborted after it, and a streamed database transaction must be published within three quarters of it"},
	{key: "kafka.transaction_linger", def: kafka.TxLingerDefault.String(), help: "with exactly_once, how long a Kafka transaction stays open for more rows after its first (it ends at the end of a claim, or at relay.batch_size rows): longer makes fewer transactions and commit markers, later visibility at read_committed"},
	{key: "kafka.tls.enabled", def: "false", help: "connect to the brokers with TLS"},
	{key: "kafka.tls.ca_file", def: "", help: "PEM file of the CAs to trust (system pool when empty)"},
	{key: "kafka.tls.cert_file", def: "", help: "client certificate PEM file, for mutual TLS"},
	{key: "kafka.tls.key_file", def: "", help: "client key PEM file, for mutual TLS"},
	{key: "kafka.tls.server_name", def: "", help: "name checked in the brokers' certificates"},
	{key: "kafka.sasl.mechanism", def: "", help: "PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER or AWS_MSK_IAM; empty disables SASL"},
	{key: "kafka.sasl.username", def: "", help: "SASL user"},
	{key: "kafka.sasl.password", def: "", help: "SASL password", secret: true},
	{key: "kafka.sasl.password_file", def: "", help: "file holding kafka.sasl.password"},
	{key: "kafka.sasl.oauth.token_file", def: "", help: "OAUTHBEARER: file holding the token, read at each authentication"},
	{key: "kafka.sasl.oauth.token_url", def: "", help: "OAUTHBEARER: token endpoint of the OAuth 2.0 client-credentials grant"},
	{key: "kafka.sasl.oauth.client_id", def: "", help: "OAUTHBEARER with token_url: client id"},
	{key: "kafka.sasl.oauth.client_secret", def: "", help: "OAUTHBEARER with token_url: client secret", secret: true},
	{key: "kafka.sasl.oauth.client_secret_file", def: "", help: "file holding kafka.sasl.oauth.client_secret"},
	{key: "kafka.sasl.oauth.scope", def: "", help: "OAUTHBEARER with token_url: space-separated scope asked for"},
	{key: "kafka.sasl.oauth.extensions", def: "", help: "OAUTHBEARER: comma-separated SASL extensions key=value (Confluent Cloud: logicalCluster=...,identityPoolId=...)"},

	{key: "rabbitmq.url", def: "", help: "with sink rabbitmq: amqp://user:password@host:5672/vhost (amqps:// for TLS)", secret: true},
	{key: "rabbitmq.url_file", def: "", help: "file holding rabbitmq.url"},
	{key: "rabbitmq.exchange", def: rabbitmq.ExchangeDefault, help: "exchange events are published to; empty is the default exchange"},
	{key: "rabbitmq.exchange_type", def: rabbitmq.ExchangeTypeDefault, help: "type the exchange is declared with: direct, fanout, topic or headers"},
	{key: "rabbitmq.declare_exchange", def: "true", help: "declare the exchange (durable) at each connection; false: it must exist"},
	{key: "rabbitmq.routing_key_template", def: rabbitmq.RoutingKeyTemplateDefault, help: "routing key; {aggregate_type}, {event_type} and {aggregate_id} are replaced"},
	{key: "rabbitmq.drop_unroutable", def: "false", help: "let the broker drop messages no queue is bound for (default: they fail, are retried, then parked)"},
	{key: "rabbitmq.max_message_bytes", def: strconv.Itoa(rabbitmq.MaxMessageBytesDefault), help: "largest message body in bytes; larger rows are parked"},
	{key: "rabbitmq.dial_timeout", def: rabbitmq.DialTimeoutDefault.String(), help: "bound on connecting to the broker"},
	{key: "rabbitmq.heartbeat", def: rabbitmq.HeartbeatDefault.String(), help: "AMQP heartbeat interval: how fast a dead connection is noticed"},
	{key: "rabbitmq.reconnect_backoff_max", def: rabbitmq.ReconnectBackoffMaxDefault.String(), help: "largest delay between reconnections to the broker"},

	{key: "consumer.group", def: "outbox-welcome", help: "'consume': Kafka consumer group, also the consumer's name in the inbox"},
	{key: "consumer.topics", def: "outbox.event.user", help: "'consume': comma-separated topics read"},
	{key: "consumer.dead_letter_topic", def: "outbox.dead-letter.welcome", help: "'consume': topic receiving events that cannot be processed, reason in the dead-letter-reason header"},
	{key: "consumer.max_attempts", def: strconv.Itoa(kafka.ConsumerMaxAttemptsDefault), help: "'consume': attempts at a failing event before it is dead-lettered"},
	{key: "consumer.retry_backoff", def: kafka.ConsumerRetryBackoffDefault.String(), help: "'consume': first delay before retrying a failing event (doubles)"},
	{key: "consumer.retry_backoff_max", def: kafka.ConsumerRetryBackoffMaxDefault.String(), help: "'consume': largest delay before retrying a failing event"},
	{key: "consumer.isolation_level", def: "", help: "'consume': read_committed or read_uncommitted; empty: read_committed when kafka.delivery is exactly_once"},
	{key: "consumer.max_poll_records", def: strconv.Itoa(kafka.ConsumerMaxPollRecordsDefault), help: "'consume': most records handled between two offset commits"},
	{key: "consumer.session_timeout", def: kafka.ConsumerSessionTimeoutDefault.String(), help: "'consume': how long the group waits for a crashed member before reassigning its partitions"},
	{key: "consumer.http_addr", def: ":9091", help: "'consume': listener for /metrics and /healthz; empty disables it", emptyIsValue: true},

	{key: "relay.batch_size", def: strconv.Itoa(relay.BatchSizeDefault), help: "most rows per claim query (1-10000)"},
	{key: "relay.max_in_flight", def: strconv.Itoa(relay.MaxInFlightDefault), help: "most rows published but not yet marked; bounds duplicates after a crash"},
	{key: "relay.max_in_flight_bytes", def: strconv.Itoa(relay.MaxInFlightBytesDefault), help: "bound in bytes on the rows claimed and not yet acknowledged (held in memory)"},
	{key: "relay.poll_interval", def: relay.PollIntervalDefault.String(), help: "read the outbox at least this often without a wake-up"},
	{key: "relay.linger", def: postgres.LingerDefault.String(), help: "while rows keep coming, how long the relay gathers commits between two claims (1ms-20ms): latency for CPU"},
	{key: "relay.leader_retry_interval", def: relay.LeaderRetryIntervalDefault.String(), help: "how often a standby tries to take the leadership"},
	{key: "relay.leader_lease", def: postgres.LeaderLeaseDefault.String(), help: "a leader publishes only within this long of confirming its leadership; a standby takes over a leader silent this long while rows wait"},
	{key: "relay.max_attempts", def: strconv.Itoa(relay.MaxAttemptsDefault), help: "failed publishes before a row is parked"},
	{key: "relay.retry_backoff_min", def: relay.RetryBackoffMinDefault.String(), help: "first delay before retrying a failed row"},
	{key: "relay.retry_backoff_max", def: relay.RetryBackoffMaxDefault.String(), help: "largest delay before retrying a failed row"},
	{key: "relay.order_policy", def: relay.OrderPolicyDefault, help: "when a row is parked, its key's later rows: wait or skip"},
	{key: "relay.shutdown_timeout", def: relay.ShutdownTimeoutDefault.String(), help: "on SIGTERM, how long to wait for in-flight acknowledgements"},
	{key: "relay.mark", def: postgres.MarkDelete, help: "what to do with published rows: delete or retain"},
	{key: "relay.retention", def: "24h", help: "with relay.mark=retain, how long published rows are kept"},
	{key: "relay.purge_interval", def: "1m", help: "with relay.mark=retain, how often old rows are purged"},
	{key: "relay.purge_batch", def: "5000", help: "with relay.mark=retain, rows deleted per purge statement"},
	{key: "relay.startup_timeout", def: "15s", help: "bound on reaching the database and the broker at start"},

	{key: "http.addr", def: ":9090", help: "listener for /metrics, /healthz and /readyz; empty disables it", emptyIsValue: true},
	{key: "http.stall_timeout", def: "60s", help: "not ready when rows are pending and nothing was published for this long"},
	{key: "http.backlog_scan_rows", def: strconv.Itoa(postgres.BacklogScanRowsDefault), help: "pending rows read per scrape for the per-topic gauges; counts beyond are extrapolated"},

	{key: "log.level", def: "info", help: "debug, info, warn or error"},
	{key: "log.format", def: "json", help: "json or text"},
}

// fixedKeys are producer settings that would weaken the delivery guarantees. They are refused
// with the reason, rather than as unknown keys: the producer is always idempotent with acks=all.
var fixedKeys = map[string]string{
	"kafka.acks":                     "the producer always waits for every in-sync replica (acks=all); fewer acks lose acknowledged events",
	"kafka.idempotent":               "the producer is always idempotent; without it a retried batch is duplicated or reordered",
	"kafka.enable_idempotence":       "the producer is always idempotent; without it a retried batch is duplicated or reordered",
	"kafka.max_in_flight_requests":   "the idempotent producer keeps order with up to 5 requests in flight per broker; not idempotent, more than 1 reorders",
	"kafka.max_in_flight_per_broker": "the idempotent producer keeps order with up to 5 requests in flight per broker; not idempotent, more than 1 reorders",
}

// Config is the whole configuration, typed and validated.
type Config struct {
	DatabaseURL    string
	ConnectTimeout time.Duration
	Store          postgres.StoreConfig
	Sink           string
	Kafka          kafka.Config
	// Delivery is kafka.delivery; Tx the exactly-once settings.
	Delivery string
	Tx       kafka.TxConfig
	RabbitMQ rabbitmq.Config
	// Consumer and ConsumerHTTPAddr configure the 'consume' command.
	Consumer         kafka.ConsumerConfig
	ConsumerHTTPAddr string
	Relay            relay.Config
	Retention        time.Duration
	PurgeInterval    time.Duration
	PurgeBatch       int
	StartupTimeout   time.Duration
	HTTPAddr         string
	StallTimeout     time.Duration
	// BacklogScanRows bounds the pending rows read per scrape of the backlog gauges.
	BacklogScanRows int
	LogLevel        string
	LogFormat       string
	// tracingSpans counts the relay's spans; nil when tracing is off. Set by 'run' from
	// setupTracing, not a configuration key.
	tracingSpans *spanCounts
	// Name names the outbox in metrics (the outbox label), logs, /readyz and the commands'
	// --outbox: an entry's name under outboxes:, else the table (schema.table).
	Name string
	// Outboxes are the outboxes the relay serves, each a whole configuration: the entries of
	// outboxes: (the top-level settings with the entry's on top), else this configuration alone.
	Outboxes []*Config
	// Multi is true when the configuration file lists outboxes:.
	Multi bool
}

// newViper returns a viper with every key's default and the environment bound.
func newViper() *viper.Viper {
	v := viper.New()
	for _, s := range settings {
		v.SetDefault(s.key, s.def)
		_ = v.BindEnv(s.key, envName(s.key))
	}
	return v
}

// addFlags adds a flag for every non-secret key to fs, and --config.
func addFlags(fs *pflag.FlagSet) {
	fs.String("config", "", "YAML configuration file (env OUTBOX_CONFIG); configs/outbox-relay.yaml documents every key")
	for _, s := range settings {
		if s.secret {
			continue
		}
		fs.String(flagName(s.key), s.def, fmt.Sprintf("%s (env %s)", s.help, envName(s.key)))
	}
}

// loadConfig reads the file (if any), the environment and the flags, in increasing precedence.
// Its error joins every problem found: unknown flags, unknown or refused keys in the file
// (secrets among them), refused variables, and every invalid value. The configuration is
// returned with the error when it could be read, so callers can add their own checks to the
// same report. Unknown OUTBOX_* variables are not errors: each is logged as a warning, to
// fs.Output(), naming the closest variable that exists.
func loadConfig(fs *pflag.FlagSet) (*Config, *viper.Viper, error) {
	v := newViper()
	errs := unknownFlags(fs)
	for _, s := range settings {
		if f := fs.Lookup(flagName(s.key)); f != nil && !s.secret {
			if err := v.BindPFlag(s.key, f); err != nil {
				return nil, nil, err
			}
		}
	}
	for _, s := range settings {
		// OUTBOX_HTTP_ADDR= disables the listener, as http.addr: "" in the file does; a flag
		// given still wins.
		if val, ok := os.LookupEnv(envName(s.key)); s.emptyIsValue && ok && val == "" {
			if f := fs.Lookup(flagName(s.key)); f == nil || !f.Changed {
				v.Set(s.key, "")
			}
		}
	}
	file, _ := fs.GetString("config")
	if file == "" {
		file = os.Getenv("OUTBOX_CONFIG")
	}
	if file != "" {
		v.SetConfigFile(file)
		if err := v.ReadInConfig(); err != nil {
			return nil, nil, errors.Join(append(errs, fmt.Errorf("config file %s: %w", file, err))...)
		}
		errs = append(errs, fileKeyErrors(file)...)
	}
	for _, k := range sortedKeys(fixedKeys) {
		if os.Getenv(envName(k)) != "" {
			errs = append(errs, fmt.Errorf("%s (%s): not configurable: %s", k, envName(k), fixedKeys[k]))
		}
	}
	cfg, err := parseConfig(v)
	processSecrets.AddConnString(cfg.DatabaseURL, cfg.RabbitMQ.URL)
	processSecrets.Add(cfg.Kafka.SASL.Password)
	processSecrets.Add(cfg.Kafka.SASL.OAuth.ClientSecret)
	errs = append(errs, err)
	cfg.Name = cfg.Store.Table.WithDefaults().String()
	cfg.Outboxes = []*Config{cfg}
	if file != "" && v.IsSet("outboxes") {
		outboxes, err := parseOutboxes(v, file, v.Get("outboxes"))
		for _, o := range outboxes {
			o.Multi = true
			processSecrets.AddConnString(o.DatabaseURL, o.RabbitMQ.URL)
			processSecrets.Add(o.Kafka.SASL.Password, o.Kafka.SASL.OAuth.ClientSecret)
		}
		errs = append(errs, err)
		cfg.Outboxes, cfg.Multi = outboxes, true
	}
	if warnings := unknownEnv(); len(warnings) > 0 {
		log := newLogger(fs.Output(), cfg.LogLevel, cfg.LogFormat)
		for _, w := range warnings {
			log.Warn("unknown environment variable ignored", "name", w[0], "did_you_mean", w[1])
		}
	}
	return cfg, v, errors.Join(errs...)
}

// unknownFlags reports the flags fs does not define (pflag passed them on as arguments), each
// with the closest flag that exists.
func unknownFlags(fs *pflag.FlagSet) []error {
	var names []string
	fs.VisitAll(func(f *pflag.Flag) { names = append(names, f.Name) })
	var errs []error
	for _, a := range fs.Args() {
		if a == "-" || !strings.HasPrefix(a, "-") {
			continue
		}
		name, _, _ := strings.Cut(strings.TrimLeft(a, "-"), "=")
		hint := "--help lists the flags"
		if c := closest(name, names); near(name, c) {
			hint = "did you mean --" + c + "?"
		}
		errs = append(errs, fmt.Errorf("unknown flag %s (%s)", a, hint))
	}
	return errs
}

// fileKeyErrors reports every key of the YAML file that is unknown, not configurable, or a
// secret with a value: secrets are read only from the environment or from their *_file key.
func fileKeyErrors(file string) []error {
	fv := viper.New()
	fv.SetConfigFile(file)
	if err := fv.ReadInConfig(); err != nil {
		return []error{fmt.Errorf("config file %s: %w", file, err)}
	}
	known := map[string]setting{}
	var keys []string
	for _, s := range settings {
		known[s.key] = s
		keys = append(keys, s.key)
	}
	var errs []error
	for _, k := range fv.AllKeys() { // sorted
		if k == "outboxes" {
			continue // checked entry by entry by parseOutboxes
		}
		s, ok := known[k]
		switch why, fixed := fixedKeys[k]; {
		case fixed:
			errs = append(errs, fmt.Errorf("config file %s: %s: not configurable: %s", file, k, why))
		case !ok:
			hint := "'outbox-relay run --help' lists the keys"
			if c := closest(k, keys); near(k, c) {
				hint = "did you mean " + c + "?"
			}
			errs = append(errs, fmt.Errorf("config file %s: unknown key %q (%s)", file, k, hint))
		case s.secret && strings.TrimSpace(fv.GetString(k)) != "":
			errs = append(errs, fmt.Errorf("config file %s: %s: a secret is not read from the config file (files like it are "+
				"committed and shared); leave it empty there and set %s, or %s_file to a file holding it", file, k, envName(k), k))
		}
	}
	return errs
}

// envExempt are OUTBOX_* variables that are not settings but are read by the tests and the
// benchmarks; they draw no warning.
var envExempt = []string{"OUTBOX_TEST_", "OUTBOX_BENCH_", "OUTBOX_RELAY_BIN=", "OUTBOX_REQUIRE_TOOLS="}

// unknownEnv returns, for every non-empty OUTBOX_* variable that names no setting, its name and
// the closest variable that does, sorted by name.
func unknownEnv() [][2]string {
	known := map[string]bool{"OUTBOX_CONFIG": true}
	for k := range fixedKeys {
		known[envName(k)] = true // refused with the reason, not unknown
	}
	names := []string{"OUTBOX_CONFIG"}
	for _, s := range settings {
		known[envName(s.key)] = true
		names = append(names, envName(s.key))
	}
	var out [][2]string
	for _, kv := range os.Environ() {
		name, val, _ := strings.Cut(kv, "=")
		if !strings.HasPrefix(name, "OUTBOX_") || val == "" || known[name] {
			continue
		}
		exempt := false
		for _, e := range envExempt {
			exempt = exempt || strings.HasPrefix(name+"=", e)
		}
		if !exempt {
			out = append(out, [2]string{name, closest(name, names)})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i][0] < out[j][0] })
	return out
}

// closest returns the candidate nearest to name by edit distance (the first one on a tie).
func closest(name string, candidates []string) string {
	best, bestDist := "", -1
	for _, c := range candidates {
		if d := editDistance(name, c); bestDist < 0 || d < bestDist {
			best, bestDist = c, d
		}
	}
	return best
}

// near reports whether candidate is close enough to name to be suggested for it: a typo, not
// another word.
func near(name, candidate string) bool {
	return editDistance(name, candidate) <= max(2, len(name)/3)
}

// editDistance is the Levenshtein distance between a and b, in bytes.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// joinNew joins to first the errors of more that name a key first does not already name, so a
// value refused by parseConfig is not reported a second time by a component's Validate.
func joinNew(first, more error) error {
	named := map[string]bool{}
	for _, e := range leaves(first) {
		for _, k := range errKeys(e) {
			named[k] = true
		}
	}
	out := leaves(first)
	for _, e := range leaves(more) {
		dup := false
		for _, k := range errKeys(e) {
			dup = dup || named[k] || named[k+"_file"] // "database.url: required" after "database.url_file: ..."
		}
		if !dup {
			out = append(out, e)
		}
	}
	return errors.Join(out...)
}

// leaves flattens joined errors.
func leaves(err error) []error {
	if err == nil {
		return nil
	}
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		var out []error
		for _, e := range j.Unwrap() {
			out = append(out, leaves(e)...)
		}
		return out
	}
	return []error{err}
}

// errKeys returns the keys an error message starts with ("kafka.tls.cert_file, kafka.tls.key_file:
// ..."), or none.
func errKeys(err error) []string {
	head, _, ok := strings.Cut(err.Error(), ": ")
	if !ok {
		return nil
	}
	var keys []string
	for _, k := range strings.Split(head, ", ") {
		if k = strings.TrimSpace(k); k != "" && !strings.ContainsAny(k, " \t") {
			keys = append(keys, k)
		}
	}
	return keys
}

// reader converts raw values, collecting errors that name the key.
type reader struct {
	v    *viper.Viper
	errs []error
}

func (r *reader) str(key string) string { return strings.TrimSpace(r.v.GetString(key)) }

// pairs reads a comma-separated list of key=value; nil when empty.
func (r *reader) pairs(key string) map[string]string {
	s := r.str(key)
	if s == "" {
		return nil
	}
	out := map[string]string{}
	for _, kv := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(kv), "=")
		if !ok || k == "" {
			r.errs = append(r.errs, fmt.Errorf("%s: %q is not key=value", key, kv))
			continue
		}
		out[k] = v
	}
	return out
}

func (r *reader) secret(key, fileKey string) string {
	if f := r.str(fileKey); f != "" {
		b, err := os.ReadFile(f)
		if err != nil {
			r.errs = append(r.errs, fmt.Errorf("%s: %w", fileKey, err))
			return ""
		}
		return strings.TrimSpace(string(b))
	}
	return r.str(key)
}

// int reads key as an integer within rng, the range the key's owner defines.
func (r *reader) int(key string, rng bounds.Int) int {
	n, err := rng.Parse(key, r.str(key))
	if err != nil {
		r.errs = append(r.errs, err)
	}
	return n
}

// dur reads key as a duration within rng, the range the key's owner defines.
func (r *reader) dur(key string, rng bounds.Duration) time.Duration {
	d, err := rng.Parse(key, r.str(key))
	if err != nil {
		r.errs = append(r.errs, err)
	}
	return d
}

func (r *reader) bool(key string) bool {
	s := r.str(key)
	b, err := strconv.ParseBool(s)
	if err != nil {
		r.errs = append(r.errs, fmt.Errorf("%s: must be true or false, got %q", key, s))
	}
	return b
}

func (r *reader) oneOf(key string, allowed ...string) string {
	s := r.str(key)
	for _, a := range allowed {
		if s == a {
			return s
		}
	}
	r.errs = append(r.errs, fmt.Errorf("%s: must be one of %s, got %q", key, strings.Join(allowed, ", "), s))
	return s
}

// Ranges of the keys cmd alone uses; the other keys' ranges are defined by the package that
// uses them (relay.BatchSizeRange, kafka.LingerRange...), which checks them in its Validate.
var (
	connectTimeoutRange = bounds.Duration{Min: 100 * time.Millisecond, Max: 10 * time.Minute}
	retentionRange      = bounds.Duration{Min: time.Second, Max: 365 * 24 * time.Hour}
	purgeIntervalRange  = bounds.Duration{Min: time.Second, Max: 24 * time.Hour}
	purgeBatchRange     = bounds.Int{Min: 1, Max: 1000000}
	startupTimeoutRange = bounds.Duration{Min: 100 * time.Millisecond, Max: 10 * time.Minute}
	stallTimeoutRange   = bounds.Duration{Min: time.Second, Max: 24 * time.Hour}
)

// The values of database.layout.
const (
	layoutRelay    = "relay"
	layoutDebezium = "debezium"
)

// columns returns the column mapping of database.columns: each key set, else the layout's column.
func (r *reader) columns(layout string) postgres.Columns {
	c := postgres.RelayColumns
	if layout == layoutDebezium {
		c = postgres.DebeziumColumns
	}
	for key, v := range map[string]*string{"id": &c.ID, "event_id": &c.EventID, "key": &c.Key, "event_type": &c.EventType,
		"aggregate_type": &c.AggregateType, "payload": &c.Payload, "topic": &c.Topic, "headers": &c.Headers,
		"occurred_at": &c.OccurredAt} {
		if s := r.str("database.columns." + key); s != "" {
			*v = s
		}
	}
	return c
}

// idHeader returns kafka.id_header's header: "id" by default with the Debezium layout, which
// Debezium's outbox event router puts the event id in.
func idHeader(v, layout string) string {
	switch {
	case v == postgres.Absent:
		return ""
	case v == "" && layout == layoutDebezium:
		return "id"
	}
	return v
}

func parseConfig(v *viper.Viper) (*Config, error) {
	r := &reader{v: v}
	c := &Config{}
	c.DatabaseURL = r.secret("database.url", "database.url_file")
	c.ConnectTimeout = r.dur("database.connect_timeout", connectTimeoutRange)
	layout := r.oneOf("database.layout", layoutRelay, layoutDebezium)
	c.Store = postgres.StoreConfig{
		Table:        postgres.Table{Schema: r.str("database.schema"), Name: r.str("database.table"), Columns: r.columns(layout)},
		Mark:         r.oneOf("relay.mark", postgres.MarkDelete, postgres.MarkRetain),
		QueryTimeout: r.dur("database.query_timeout", postgres.QueryTimeoutRange),
		LeaderLease:  r.dur("relay.leader_lease", postgres.LeaderLeaseRange),
		Linger:       r.dur("relay.linger", postgres.LingerRange),
		WaitForReplication: r.oneOf("database.wait_for_replication",
			postgres.ReplicationOff, postgres.ReplicationSync, postgres.ReplicationAll),
	}
	if err := c.Store.Table.Validate(); err != nil {
		r.errs = append(r.errs, err)
	}
	c.Sink = r.oneOf("sink", "kafka", "rabbitmq")
	var brokers []string
	for _, b := range strings.Split(r.str("kafka.brokers"), ",") {
		if b = strings.TrimSpace(b); b != "" {
			brokers = append(brokers, b)
		}
	}
	c.Kafka = kafka.Config{
		Brokers:           brokers,
		ClientID:          r.str("kafka.client_id"),
		TopicTemplate:     r.str("kafka.topic_template"),
		IDHeader:          idHeader(r.str("kafka.id_header"), layout),
		MaxRecordBytes:    r.int("kafka.max_record_bytes", kafka.MaxRecordBytesRange),
		Tombstones:        r.bool("kafka.tombstones"),
		Linger:            r.dur("kafka.linger", kafka.LingerRange),
		Compression:       r.str("kafka.compression"),
		AutoCreateTopics:  r.bool("kafka.auto_create_topics"),
		ClientMetrics:     r.bool("kafka.client_metrics"),
		DialTimeout:       r.dur("kafka.dial_timeout", kafka.DialTimeoutRange),
		RecordTimestamp:   r.oneOf("kafka.record_timestamp", kafka.TimestampProduce, kafka.TimestampOccurredAt),
		Format:            r.oneOf("kafka.format", kafka.FormatNative, kafka.FormatCloudEvents),
		CloudEventsSource: r.str("kafka.cloudevents.source"),
		TLS: kafka.TLSConfig{
			Enabled:    r.bool("kafka.tls.enabled"),
			CAFile:     r.str("kafka.tls.ca_file"),
			CertFile:   r.str("kafka.tls.cert_file"),
			KeyFile:    r.str("kafka.tls.key_file"),
			ServerName: r.str("kafka.tls.server_name"),
		},
		SASL: kafka.SASLConfig{
			Mechanism: r.str("kafka.sasl.mechanism"),
			Username:  r.str("kafka.sasl.username"),
			Password:  r.secret("kafka.sasl.password", "kafka.sasl.password_file"),
			OAuth: kafka.OAuthConfig{
				TokenFile:    r.str("kafka.sasl.oauth.token_file"),
				TokenURL:     r.str("kafka.sasl.oauth.token_url"),
				ClientID:     r.str("kafka.sasl.oauth.client_id"),
				ClientSecret: r.secret("kafka.sasl.oauth.client_secret", "kafka.sasl.oauth.client_secret_file"),
				Scope:        r.str("kafka.sasl.oauth.scope"),
				Extensions:   r.pairs("kafka.sasl.oauth.extensions"),
			},
		},
	}
	c.Delivery = r.oneOf("kafka.delivery", deliveryAtLeastOnce, deliveryExactlyOnce)
	c.Store.Transactions = c.Delivery == deliveryExactlyOnce
	table := c.Store.Table.WithDefaults()
	identity := databaseName(c.DatabaseURL) + "." + table.Schema + "." + table.Name
	c.Tx = kafka.TxConfig{
		TransactionalID:    r.str("kafka.transactional_id"),
		ProgressTopic:      r.str("kafka.progress_topic"),
		Identity:           identity,
		TransactionTimeout: r.dur("kafka.transaction_timeout", kafka.TransactionTimeoutRange),
		Linger:             r.dur("kafka.transaction_linger", kafka.TxLingerRange),
	}
	if c.Tx.TransactionalID == "" {
		c.Tx.TransactionalID = "outbox-relay-" + strings.Map(func(r rune) rune {
			if r < 128 && (r == '.' || r == '_' || r == '-' || 'a' <= r && r <= 'z' || 'A' <= r && r <= 'Z' || '0' <= r && r <= '9') {
				return r
			}
			return '_'
		}, identity)
	} else if !validTransactionalID(c.Tx.TransactionalID) {
		r.errs = append(r.errs, fmt.Errorf("kafka.transactional_id: must be 1 to 249 characters of [a-zA-Z0-9._-], got %q", c.Tx.TransactionalID))
	}
	if c.Delivery == deliveryExactlyOnce && c.Sink == "rabbitmq" {
		r.errs = append(r.errs, errors.New("kafka.delivery: exactly_once needs sink kafka (RabbitMQ has no transactions that span a broker's queues and the relay's progress): use at_least_once with sink rabbitmq"))
	}
	c.RabbitMQ = rabbitmq.Config{
		URL:                 r.secret("rabbitmq.url", "rabbitmq.url_file"),
		Exchange:            r.str("rabbitmq.exchange"),
		ExchangeType:        r.str("rabbitmq.exchange_type"),
		NoDeclare:           !r.bool("rabbitmq.declare_exchange"),
		RoutingKeyTemplate:  r.str("rabbitmq.routing_key_template"),
		DropUnroutable:      r.bool("rabbitmq.drop_unroutable"),
		MaxMessageBytes:     r.int("rabbitmq.max_message_bytes", rabbitmq.MaxMessageBytesRange),
		DialTimeout:         r.dur("rabbitmq.dial_timeout", rabbitmq.DialTimeoutRange),
		Heartbeat:           r.dur("rabbitmq.heartbeat", rabbitmq.HeartbeatRange),
		ReconnectBackoffMax: r.dur("rabbitmq.reconnect_backoff_max", rabbitmq.ReconnectBackoffMaxRange),
	}
	rc := c.RabbitMQ.WithDefaults()
	if rc.URL == "" && c.Sink != "rabbitmq" {
		rc.URL = "amqp://localhost/" // only required with sink rabbitmq; check the other keys anyway
	}
	own := []error{rc.Validate(), c.Tx.WithDefaults().Validate()} // the components' own checks, joined below without repeats
	var topics []string
	for _, t := range strings.Split(r.str("consumer.topics"), ",") {
		if t = strings.TrimSpace(t); t != "" {
			topics = append(topics, t)
		}
	}
	c.Consumer = kafka.ConsumerConfig{
		Group:           r.str("consumer.group"),
		Topics:          topics,
		DeadLetterTopic: r.str("consumer.dead_letter_topic"),
		MaxAttempts:     r.int("consumer.max_attempts", kafka.ConsumerMaxAttemptsRange),
		RetryBackoff:    r.dur("consumer.retry_backoff", kafka.ConsumerRetryBackoffRange),
		RetryBackoffMax: r.dur("consumer.retry_backoff_max", kafka.ConsumerRetryBackoffMaxRange),
		MaxPollRecords:  r.int("consumer.max_poll_records", kafka.ConsumerMaxPollRecordsRange),
		SessionTimeout:  r.dur("consumer.session_timeout", kafka.ConsumerSessionTimeoutRange),
	}
	switch r.str("consumer.isolation_level") {
	case "":
		c.Consumer.ReadCommitted = c.Delivery == deliveryExactlyOnce
	case "read_committed":
		c.Consumer.ReadCommitted = true
	case "read_uncommitted":
	default:
		r.errs = append(r.errs, fmt.Errorf("consumer.isolation_level: must be one of read_committed, read_uncommitted, got %q", r.str("consumer.isolation_level")))
	}
	own = append(own, c.Consumer.WithDefaults().Validate())
	c.ConsumerHTTPAddr = r.str("consumer.http_addr")
	if _, _, err := net.SplitHostPort(c.ConsumerHTTPAddr); c.ConsumerHTTPAddr != "" && err != nil {
		r.errs = append(r.errs, fmt.Errorf("consumer.http_addr: must be host:port or :port (empty disables the listener), got %q", c.ConsumerHTTPAddr))
	}
	c.Relay = relay.Config{
		BatchSize:           r.int("relay.batch_size", relay.BatchSizeRange),
		MaxInFlight:         r.int("relay.max_in_flight", relay.MaxInFlightRange),
		MaxInFlightBytes:    r.int("relay.max_in_flight_bytes", relay.MaxInFlightBytesRange),
		PollInterval:        r.dur("relay.poll_interval", relay.PollIntervalRange),
		LeaderRetryInterval: r.dur("relay.leader_retry_interval", relay.LeaderRetryIntervalRange),
		MaxAttempts:         r.int("relay.max_attempts", relay.MaxAttemptsRange),
		RetryBackoffMin:     r.dur("relay.retry_backoff_min", relay.RetryBackoffMinRange),
		RetryBackoffMax:     r.dur("relay.retry_backoff_max", relay.RetryBackoffMaxRange),
		OrderPolicy:         r.oneOf("relay.order_policy", relay.OrderPolicyWait, relay.OrderPolicySkip),
		ShutdownTimeout:     r.dur("relay.shutdown_timeout", relay.ShutdownTimeoutRange),
		ReconnectBackoffMax: relay.ReconnectBackoffMaxDefault, // not a key
	}
	// Validated as read, not WithDefaults: a value refused above stays refused, and the checks
	// across keys (relay.max_in_flight at least relay.batch_size) run even beside other errors.
	own = append(own, c.Relay.Validate())
	c.Retention = r.dur("relay.retention", retentionRange)
	c.PurgeInterval = r.dur("relay.purge_interval", purgeIntervalRange)
	c.PurgeBatch = r.int("relay.purge_batch", purgeBatchRange)
	c.StartupTimeout = r.dur("relay.startup_timeout", startupTimeoutRange)
	c.HTTPAddr = r.str("http.addr")
	if _, _, err := net.SplitHostPort(c.HTTPAddr); c.HTTPAddr != "" && err != nil {
		r.errs = append(r.errs, fmt.Errorf("http.addr: must be host:port or :port (empty disables the listener), got %q", c.HTTPAddr))
	}
	c.StallTimeout = r.dur("http.stall_timeout", stallTimeoutRange)
	c.BacklogScanRows = r.int("http.backlog_scan_rows", postgres.BacklogScanRowsRange)
	c.LogLevel = r.oneOf("log.level", "debug", "info", "warn", "error")
	c.LogFormat = r.oneOf("log.format", "json", "text")
	return c, joinNew(errors.Join(r.errs...), errors.Join(own...))
}

// requireDatabase checks what connecting to the database needs: a connection string the
// driver reads as written.
func (c *Config) requireDatabase() error {
	if c.DatabaseURL == "" {
		return errors.New("database.url: required (set OUTBOX_DATABASE_URL or database.url_file)")
	}
	if _, err := postgres.ParseURL(c.DatabaseURL); err != nil {
		return err // names database.url, without the string
	}
	return nil
}

// requireRelay checks what running the relay needs beyond parsing.
func (c *Config) requireRelay() error {
	var errs []error
	if err := c.requireDatabase(); err != nil {
		errs = append(errs, err)
	}
	if c.Sink == "rabbitmq" {
		return errors.Join(errs...) // rabbitmq.* was validated by parseConfig
	}
	if err := c.Kafka.WithDefaults().Validate(); err != nil {
		errs = append(errs, err)
	}
	for key, file := range map[string]string{"kafka.tls.ca_file": c.Kafka.TLS.CAFile,
		"kafka.tls.cert_file": c.Kafka.TLS.CertFile, "kafka.tls.key_file": c.Kafka.TLS.KeyFile} {
		if file == "" {
			continue
		}
		if f, err := os.Open(file); err != nil {
			errs = append(errs, fmt.Errorf("%s: must be a readable PEM file: %w", key, err))
		} else {
			_ = f.Close()
		}
	}
	if c.Kafka.SASL.Mechanism == "" && (c.Kafka.SASL.Username != "" || c.Kafka.SASL.Password != "") {
		errs = append(errs, errors.New("kafka.sasl.mechanism: must be PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 when kafka.sasl.username or a password is set"))
	}
	if f := c.Kafka.SASL.OAuth.TokenFile; f != "" && strings.EqualFold(c.Kafka.SASL.Mechanism, kafka.MechanismOAuthBearer) {
		if _, err := os.Stat(f); err != nil {
			errs = append(errs, fmt.Errorf("kafka.sasl.oauth.token_file: must be a readable file: %w", err))
		}
	}
	return errors.Join(errs...)
}

// redacted returns every key and its effective value, secrets replaced, for the start-up log.
func redacted(v *viper.Viper) map[string]string {
	out := map[string]string{}
	for _, s := range settings {
		val := v.GetString(s.key)
		if s.secret && val != "" {
			val = "xxxxx"
		}
		out[s.key] = val
	}
	return out
}

// transactionalIDRE is the characters kafka.transactional_id may hold; validTransactionalID
// checks its length apart (a bounded repetition compiles to 100 kB of program).
var transactionalIDRE = regexp.MustCompile(`^[a-zA-Z0-9._-]+$`)

// validTransactionalID reports whether id is 1 to 249 characters of [a-zA-Z0-9._-].
func validTransactionalID(id string) bool { return len(id) <= 249 && transactionalIDRE.MatchString(id) }

// Values of kafka.delivery.
const (
	deliveryAtLeastOnce = "at_least_once"
	deliveryExactlyOnce = "exactly_once"
)

// databaseName returns the database a connection string names, for the outbox's identity in
// exactly-once delivery; "" when it cannot be parsed (requireDatabase says why).
func databaseName(url string) string {
	if url == "" {
		return ""
	}
	cfg, err := postgres.ParseURL(url)
	if err != nil {
		return ""
	}
	return cfg.Database
}
