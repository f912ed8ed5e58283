package main

import (
	"bytes"
	"context"
	"encoding/json"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
)

// configEnv clears the OUTBOX_ environment of the test process and sets env. Tests using it
// cannot run in parallel (t.Setenv).
func configEnv(t *testing.T, env map[string]string) {
	t.Helper()
	for _, kv := range os.Environ() {
		if name, _, _ := strings.Cut(kv, "="); strings.HasPrefix(name, "OUTBOX_") {
			t.Setenv(name, "") // restored when the test ends
			_ = os.Unsetenv(name)
		}
	}
	for k, v := range env {
		t.Setenv(k, v)
	}
}

// loadFor loads the configuration the run command would, from yaml (if not empty), the
// environment and flags, and checks what running needs.
func loadFor(t *testing.T, yaml string, flags ...string) (*Config, error) {
	t.Helper()
	cfg, _, err := loadLogged(t, yaml, flags...)
	return cfg, err
}

// loadLogged is loadFor, also returning what loading wrote to stderr (the warnings).
func loadLogged(t *testing.T, yaml string, flags ...string) (*Config, string, error) {
	t.Helper()
	var stderr bytes.Buffer
	fs := newFlagSet("run", "test", &stderr)
	addFlags(fs)
	if yaml != "" {
		file := filepath.Join(t.TempDir(), "outbox-relay.yaml")
		if err := os.WriteFile(file, []byte(yaml), 0o600); err != nil {
			t.Fatal(err)
		}
		flags = append(flags, "--config", file)
	}
	if err := fs.Parse(flags); err != nil {
		return nil, stderr.String(), err
	}
	cfg, _, err := loadConfig(fs)
	if cfg != nil {
		err = joinNew(err, cfg.requireOutboxes()) // as runCmd does
	}
	return cfg, stderr.String(), err
}

// validEnv is a minimal valid configuration of the relay.
var validEnv = map[string]string{
	"OUTBOX_DATABASE_URL":  "postgres://relay:s3cret@127.0.0.1:5432/app",
	"OUTBOX_KAFKA_BROKERS": "127.0.0.1:9092",
}

func TestConfigValidMinimal(t *testing.T) {
	configEnv(t, validEnv)
	cfg, err := loadFor(t, "")
	if err != nil {
		t.Fatalf("minimal configuration refused: %v", err)
	}
	if cfg.Relay.BatchSize != 1000 || cfg.Relay.OrderPolicy != "wait" || cfg.Kafka.Brokers[0] != "127.0.0.1:9092" {
		t.Errorf("defaults not applied: %+v", cfg.Relay)
	}
}

// TestConfigEveryKeyValidated sets each key, in turn, to a value no key accepts and checks that
// the error names that key. Only free-text keys are exempt.
func TestConfigEveryKeyValidated(t *testing.T) {
	freeText := map[string]bool{
		"kafka.client_id": true, "kafka.tls.server_name": true, "kafka.sasl.username": true,
		"kafka.sasl.password": true, "kafka.sasl.oauth.client_id": true, "kafka.sasl.oauth.client_secret": true,
		"kafka.sasl.oauth.scope": true,
	}
	for _, s := range settings {
		if freeText[s.key] {
			continue
		}
		t.Run(s.key, func(t *testing.T) {
			env := map[string]string{}
			for k, v := range validEnv {
				env[k] = v
			}
			env[envName(s.key)] = "no such value!"
			configEnv(t, env)
			_, err := loadFor(t, "")
			if err == nil {
				t.Fatalf("%s=%q accepted", envName(s.key), "no such value!")
			}
			if !strings.Contains(err.Error(), s.key) {
				t.Errorf("error does not name %s: %v", s.key, err)
			}
		})
	}
}

// TestConfigBadValues: each kind of bad value gets a message naming the key and what is allowed.
func TestConfigBadValues(t *testing.T) {
	dir := t.TempDir()
	cert := filepath.Join(dir, "cert.pem")
	if err := os.WriteFile(cert, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		env  map[string]string
		want string
	}{
		{"integer not a number", map[string]string{"OUTBOX_RELAY_BATCH_SIZE": "ten"}, `relay.batch_size: must be an integer between 1 and 10000, got "ten"`},
		{"integer too small", map[string]string{"OUTBOX_RELAY_BATCH_SIZE": "0"}, "relay.batch_size: must be an integer between 1 and 10000"},
		{"integer too large", map[string]string{"OUTBOX_KAFKA_MAX_RECORD_BYTES": "999999999"}, "kafka.max_record_bytes: must be an integer between 1024 and 104857600"},
		{"duration without unit", map[string]string{"OUTBOX_RELAY_POLL_INTERVAL": "500"}, `relay.poll_interval: must be a duration between 10ms and 1m0s (like 500ms, 10s, 2m), got "500"`},
		{"duration too long", map[string]string{"OUTBOX_RELAY_STARTUP_TIMEOUT": "1h"}, "relay.startup_timeout: must be a duration between 100ms and 10m0s"},
		{"negative duration", map[string]string{"OUTBOX_KAFKA_LINGER": "-1s"}, "kafka.linger: must be a duration between 0s and 10s"},
		{"bool", map[string]string{"OUTBOX_KAFKA_TOMBSTONES": "yes please"}, `kafka.tombstones: must be true or false, got "yes please"`},
		{"enum", map[string]string{"OUTBOX_RELAY_ORDER_POLICY": "drop"}, `relay.order_policy: must be one of wait, skip, got "drop"`},
		{"enum mark", map[string]string{"OUTBOX_RELAY_MARK": "archive"}, `relay.mark: must be one of delete, retain, got "archive"`},
		{"log level", map[string]string{"OUTBOX_LOG_LEVEL": "verbose"}, "log.level: must be one of debug, info, warn, error"},
		{"compression", map[string]string{"OUTBOX_KAFKA_COMPRESSION": "brotli"}, `kafka.compression: must be none, gzip, snappy, lz4 or zstd, got "brotli"`},
		{"identifier", map[string]string{"OUTBOX_DATABASE_TABLE": "Outbox; DROP"}, "database.table: must match"},
		{"topic placeholder", map[string]string{"OUTBOX_KAFKA_TOPIC_TEMPLATE": "events.{tenant}"}, "kafka.topic_template: unknown placeholder {tenant} (allowed: {aggregate_type}, {event_type})"},
		{"broker without port", map[string]string{"OUTBOX_KAFKA_BROKERS": "kafka1"}, `kafka.brokers: "kafka1" is not host:port`},
		{"no broker", map[string]string{"OUTBOX_KAFKA_BROKERS": ""}, "kafka.brokers: at least one broker host:port is required"},
		{"no database", map[string]string{"OUTBOX_DATABASE_URL": ""}, "database.url: required"},
		{"bad database url", map[string]string{"OUTBOX_DATABASE_URL": "postgres://u:hunter2@[::1"}, "database.url:"},
		{"missing url file", map[string]string{"OUTBOX_DATABASE_URL_FILE": filepath.Join(dir, "nope")}, "database.url_file:"},
		{"missing password file", map[string]string{"OUTBOX_KAFKA_SASL_PASSWORD_FILE": filepath.Join(dir, "nope")}, "kafka.sasl.password_file:"},
		{"sasl mechanism", map[string]string{"OUTBOX_KAFKA_SASL_MECHANISM": "GSSAPI"}, `kafka.sasl.mechanism: must be PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER or AWS_MSK_IAM, got "GSSAPI"`},
		{"sasl without user", map[string]string{"OUTBOX_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512"}, "kafka.sasl.username, kafka.sasl.password: both are required"},
		{"sasl plain without tls", map[string]string{"OUTBOX_KAFKA_SASL_MECHANISM": "PLAIN", "OUTBOX_KAFKA_SASL_USERNAME": "u", "OUTBOX_KAFKA_SASL_PASSWORD": "p"}, "PLAIN sends the password in clear text; enable kafka.tls.enabled"},
		{"sasl password without mechanism", map[string]string{"OUTBOX_KAFKA_SASL_PASSWORD": "p"}, "kafka.sasl.mechanism: must be PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 when"},
		{"cert without key", map[string]string{"OUTBOX_KAFKA_TLS_CERT_FILE": cert}, "kafka.tls.cert_file, kafka.tls.key_file: set both or neither"},
		{"missing ca file", map[string]string{"OUTBOX_KAFKA_TLS_CA_FILE": filepath.Join(dir, "nope.pem")}, "kafka.tls.ca_file: must be a readable PEM file"},
		{"backoff max below min", map[string]string{"OUTBOX_RELAY_RETRY_BACKOFF_MIN": "1m", "OUTBOX_RELAY_RETRY_BACKOFF_MAX": "1s"}, "relay.retry_backoff_max: must be at least relay.retry_backoff_min (1m0s), got 1s"},
		{"in flight below batch", map[string]string{"OUTBOX_RELAY_BATCH_SIZE": "500", "OUTBOX_RELAY_MAX_IN_FLIGHT": "100"}, "relay.max_in_flight: must be between relay.batch_size (500) and 100000, got 100"},
		{"http addr", map[string]string{"OUTBOX_HTTP_ADDR": "9090"}, `http.addr: must be host:port or :port (empty disables the listener), got "9090"`},
		{"acks refused", map[string]string{"OUTBOX_KAFKA_ACKS": "1"}, "kafka.acks (OUTBOX_KAFKA_ACKS): not configurable: the producer always waits for every in-sync replica (acks=all)"},
		{"transactional id too long", map[string]string{"OUTBOX_KAFKA_TRANSACTIONAL_ID": strings.Repeat("t", 250)}, "kafka.transactional_id: must be 1 to 249 characters"},
		{"idempotence refused", map[string]string{"OUTBOX_KAFKA_IDEMPOTENT": "false"}, "kafka.idempotent (OUTBOX_KAFKA_IDEMPOTENT): not configurable: the producer is always idempotent"},
	} {
		t.Run(c.name, func(t *testing.T) {
			env := map[string]string{}
			for k, v := range validEnv {
				env[k] = v
			}
			for k, v := range c.env {
				env[k] = v
			}
			configEnv(t, env)
			_, err := loadFor(t, "")
			if err == nil {
				t.Fatalf("%v accepted", c.env)
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Errorf("error %q\nwant it to contain %q", err, c.want)
			}
			if strings.Contains(err.Error(), "hunter2") {
				t.Errorf("error shows the password: %v", err)
			}
		})
	}
}

// TestConfigAllErrorsAtOnce: several bad keys are reported together, so one run fixes them all.
func TestConfigAllErrorsAtOnce(t *testing.T) {
	configEnv(t, map[string]string{"OUTBOX_RELAY_BATCH_SIZE": "0", "OUTBOX_LOG_FORMAT": "xml", "OUTBOX_KAFKA_LINGER": "forever"})
	_, err := loadFor(t, "")
	for _, key := range []string{"relay.batch_size", "log.format", "kafka.linger"} {
		if err == nil || !strings.Contains(err.Error(), key) {
			t.Errorf("error does not name %s: %v", key, err)
		}
	}
}

// TestConfigAllErrorsAtOnceAcrossSources: mistakes in flags, in the YAML file and in the
// checks of what running needs come out in one error from 'run', each named once.
func TestConfigAllErrorsAtOnceAcrossSources(t *testing.T) {
	configEnv(t, validEnv)
	for _, c := range []struct {
		name  string
		yaml  string
		flags []string
		want  []string
	}{
		{"two bad flag values", "", []string{"--relay-batch-size", "0", "--kafka-compression", "brotli"},
			[]string{`relay.batch_size: must be an integer between 1 and 10000, got "0"`, `kafka.compression: must be none, gzip, snappy, lz4 or zstd, got "brotli"`}},
		//nolint:misspell // the misspelled flag is the input under test
		{"two unknown flags", "", []string{"--relay-batchsize", "0", "--kafka-compresion=zstd"},
			[]string{"unknown flag --relay-batchsize (did you mean --relay-batch-size?)", "unknown flag --kafka-compresion=zstd (did you mean --kafka-compression?)"}},
		{"two unknown YAML keys", "relay:\n  batchsize: 5\nkafka:\n  brokerz: k:9092\n", nil,
			[]string{`unknown key "kafka.brokerz" (did you mean kafka.brokers?)`, `unknown key "relay.batchsize" (did you mean relay.batch_size?)`}},
		{"unknown flag and key far from any", "zebra: 1\n", []string{"--quux"},
			[]string{"unknown flag --quux (--help lists the flags)", `unknown key "zebra" ('outbox-relay run --help' lists the keys)`}},
		{"flag and YAML", "relay:\n  batchsize: 5\n  poll_interval: 5\nkafka:\n  acks: 1\n",
			[]string{"--kafka-compression", "brotli", "--http-adr", ":1"},
			[]string{`unknown key "relay.batchsize"`, "kafka.acks: not configurable", "relay.poll_interval: must be a duration",
				`kafka.compression: must be none`, "unknown flag --http-adr (did you mean --http-addr?)"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			args := append([]string{"run"}, c.flags...)
			if c.yaml != "" {
				file := filepath.Join(t.TempDir(), "outbox-relay.yaml")
				if err := os.WriteFile(file, []byte(c.yaml), 0o600); err != nil {
					t.Fatal(err)
				}
				args = append(args, "--config", file)
			}
			var stdout, stderr bytes.Buffer
			code := dispatch(context.Background(), args, &stdout, &stderr)
			if code != 1 {
				t.Errorf("exit %d, want 1; stderr:\n%s", code, stderr.String())
			}
			for _, w := range c.want {
				if n := strings.Count(stderr.String(), w); n != 1 {
					t.Errorf("stderr names %q %d times, want once:\n%s", w, n, stderr.String())
				}
			}
		})
	}
	// A value refused while parsing is not reported again by the component's own check.
	_, err := loadFor(t, "", "--kafka-max-record-bytes", "5")
	if err == nil || strings.Count(err.Error(), "kafka.max_record_bytes") != 1 {
		t.Errorf("kafka.max_record_bytes not named exactly once: %v", err)
	}
}

// TestConfigUnknownEnvWarns: every OUTBOX_* variable that names no setting is logged as a
// warning with the closest one; the variables of the tests and benchmarks are not.
func TestConfigUnknownEnvWarns(t *testing.T) {
	env := map[string]string{
		"OUTBOX_RELAY_BATCHSIZE":    "0",
		"OUTBOX_KAFKA_BROKER":       "k:9092",
		"OUTBOX_TEST_DATABASE_URL":  "postgres://x@h/db",
		"OUTBOX_TEST_KEEP_SCHEMA":   "1",
		"OUTBOX_BENCH_CHILD":        "1",
		"OUTBOX_RELAY_BIN":          "/bin/true",
		"OUTBOX_REQUIRE_TOOLS":      "1",
		"OUTBOX_DATABASE_URL_FILE":  "",
		"OUTBOX_HTTP_STALL_TIMEOUT": "30s",
	}
	for k, v := range validEnv {
		env[k] = v
	}
	configEnv(t, env)
	cfg, logs, err := loadLogged(t, "")
	if err != nil {
		t.Fatalf("a misspelled variable is a warning, not an error: %v", err)
	}
	if cfg.Relay.BatchSize != 1000 {
		t.Errorf("relay.batch_size = %d: the misspelled variable was used", cfg.Relay.BatchSize)
	}
	warned := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(logs), "\n") {
		var l struct {
			Level, Msg, Name string
			DidYouMean       string `json:"did_you_mean"`
		}
		if err := json.Unmarshal([]byte(line), &l); err != nil {
			t.Fatalf("not a JSON log line: %q", line)
		}
		if l.Level != "WARN" || l.Msg != "unknown environment variable ignored" {
			t.Errorf("unexpected line %q", line)
		}
		warned[l.Name] = l.DidYouMean
	}
	want := map[string]string{"OUTBOX_RELAY_BATCHSIZE": "OUTBOX_RELAY_BATCH_SIZE", "OUTBOX_KAFKA_BROKER": "OUTBOX_KAFKA_BROKERS"}
	if !maps.Equal(warned, want) {
		t.Errorf("warned %v, want %v", warned, want)
	}
	// In the text format when log.format is text; none at log.level error.
	t.Setenv("OUTBOX_LOG_FORMAT", "text")
	if _, logs, _ = loadLogged(t, ""); !strings.Contains(logs, "level=WARN msg=\"unknown environment variable ignored\" name=OUTBOX_KAFKA_BROKER did_you_mean=OUTBOX_KAFKA_BROKERS") {
		t.Errorf("text warning: %q", logs)
	}
	t.Setenv("OUTBOX_LOG_LEVEL", "error")
	if _, logs, _ = loadLogged(t, ""); logs != "" {
		t.Errorf("warnings at log.level error: %q", logs)
	}
}

func TestConfigFileKeys(t *testing.T) {
	configEnv(t, validEnv)
	if _, err := loadFor(t, "kafka:\n  brokerz: 127.0.0.1:9092\n"); err == nil ||
		!strings.Contains(err.Error(), `unknown key "kafka.brokerz"`) {
		t.Errorf("unknown YAML key: %v", err)
	}
	if _, err := loadFor(t, "kafka:\n  acks: 1\n"); err == nil ||
		!strings.Contains(err.Error(), "kafka.acks: not configurable: the producer always waits for every in-sync replica (acks=all)") {
		t.Errorf("kafka.acks in YAML: %v", err)
	}
	if _, err := loadFor(t, "kafka:\n  max_in_flight_requests: 5\n  idempotent: false\n"); err == nil ||
		!strings.Contains(err.Error(), "not configurable") {
		t.Errorf("idempotence off with requests in flight in YAML: %v", err)
	}
	if _, err := loadFor(t, "relay: [1, 2"); err == nil || !strings.Contains(err.Error(), "config file") {
		t.Errorf("malformed YAML: %v", err)
	}
	// Secrets are refused in the file, without showing them; empty placeholders are accepted.
	for _, secret := range []struct{ yaml, key, env string }{
		{"database:\n  url: postgres://relay:Hunter2@db:5432/app\n", "database.url", "OUTBOX_DATABASE_URL"},
		{"kafka:\n  sasl:\n    password: Hunter2\n", "kafka.sasl.password", "OUTBOX_KAFKA_SASL_PASSWORD"},
		{"rabbitmq:\n  url: amqp://relay:Hunter2@mq:5672/\n", "rabbitmq.url", "OUTBOX_RABBITMQ_URL"},
	} {
		_, err := loadFor(t, secret.yaml)
		if err == nil || !strings.Contains(err.Error(), secret.key+": a secret is not read from the config file") ||
			!strings.Contains(err.Error(), secret.env) || !strings.Contains(err.Error(), secret.key+"_file") {
			t.Errorf("%s in YAML: %v", secret.key, err)
		}
		if err != nil && strings.Contains(err.Error(), "Hunter2") {
			t.Errorf("%s in YAML: the error shows it: %v", secret.key, err)
		}
	}
	if _, err := loadFor(t, "database:\n  url: \"\"\nkafka:\n  sasl:\n    password: \"\"\n"); err != nil {
		t.Errorf("empty secrets in YAML refused: %v", err)
	}
	cfg, err := loadFor(t, "relay:\n  batch_size: 42\n  max_in_flight: 84\nkafka:\n  sasl:\n    mechanism: SCRAM-SHA-256\n    username: relay\n")
	if err == nil {
		t.Errorf("SASL without a password accepted: %+v", cfg.Kafka.SASL)
	}
}

// TestConfigPrecedence: flags override the environment, which overrides the file, which
// overrides the defaults.
func TestConfigPrecedence(t *testing.T) {
	yaml := "relay:\n  batch_size: 10\n  poll_interval: 1s\n"
	check := func(name string, got, want int) {
		t.Helper()
		if got != want {
			t.Errorf("%s: relay.batch_size = %d, want %d", name, got, want)
		}
	}
	configEnv(t, validEnv)
	cfg, err := loadFor(t, "")
	if err != nil {
		t.Fatal(err)
	}
	check("default", cfg.Relay.BatchSize, 1000)
	if cfg, err = loadFor(t, yaml); err != nil {
		t.Fatal(err)
	}
	check("file", cfg.Relay.BatchSize, 10)
	if cfg.Relay.PollInterval != time.Second {
		t.Errorf("file: relay.poll_interval = %s, want 1s", cfg.Relay.PollInterval)
	}
	t.Setenv("OUTBOX_RELAY_BATCH_SIZE", "20")
	if cfg, err = loadFor(t, yaml); err != nil {
		t.Fatal(err)
	}
	check("env over file", cfg.Relay.BatchSize, 20)
	if cfg.Relay.PollInterval != time.Second {
		t.Errorf("env over file: relay.poll_interval = %s, want 1s from the file", cfg.Relay.PollInterval)
	}
	if cfg, err = loadFor(t, yaml, "--relay-batch-size", "30"); err != nil {
		t.Fatal(err)
	}
	check("flag over env", cfg.Relay.BatchSize, 30)
	// The file can come from OUTBOX_CONFIG too.
	file := filepath.Join(t.TempDir(), "c.yaml")
	if err := os.WriteFile(file, []byte("relay:\n  max_attempts: 7\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("OUTBOX_CONFIG", file)
	if cfg, err = loadFor(t, ""); err != nil {
		t.Fatal(err)
	}
	if cfg.Relay.MaxAttempts != 7 {
		t.Errorf("OUTBOX_CONFIG: relay.max_attempts = %d, want 7", cfg.Relay.MaxAttempts)
	}
}

// TestConfigEmptyEnvDisablesTheListener: OUTBOX_HTTP_ADDR set empty disables the listener, as
// the help says ("empty disables it"); viper skips empty variables, and the relay listened on
// :9090 anyway. A flag still wins over it; unset, the default holds.
func TestConfigEmptyEnvDisablesTheListener(t *testing.T) {
	configEnv(t, validEnv)
	cfg, err := loadFor(t, "")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.HTTPAddr != ":9090" {
		t.Errorf("unset: http.addr = %q, want the default :9090", cfg.HTTPAddr)
	}
	t.Setenv("OUTBOX_HTTP_ADDR", "")
	if cfg, err = loadFor(t, "http:\n  addr: 127.0.0.1:9998\n"); err != nil {
		t.Fatal(err)
	}
	if cfg.HTTPAddr != "" {
		t.Errorf("OUTBOX_HTTP_ADDR empty, over the file: http.addr = %q, want empty (listener disabled)", cfg.HTTPAddr)
	}
	if cfg, err = loadFor(t, "", "--http-addr", "127.0.0.1:9999"); err != nil {
		t.Fatal(err)
	}
	if cfg.HTTPAddr != "127.0.0.1:9999" {
		t.Errorf("flag over an empty OUTBOX_HTTP_ADDR: http.addr = %q, want 127.0.0.1:9999", cfg.HTTPAddr)
	}
}

// TestConfigSecretsOnlyFromEnvOrFile: secrets have no flags; files are read and trimmed.
func TestConfigSecretsOnlyFromEnvOrFile(t *testing.T) {
	configEnv(t, validEnv)
	for _, flag := range []string{"--database-url", "--kafka-sasl-password"} {
		if _, err := loadFor(t, "", flag, "postgres://u:p@h/db"); err == nil || !strings.Contains(err.Error(), "unknown flag") {
			t.Errorf("%s accepted as a flag: %v", flag, err)
		}
	}
	dir := t.TempDir()
	urlFile, pwFile := filepath.Join(dir, "url"), filepath.Join(dir, "pw")
	if err := os.WriteFile(urlFile, []byte("postgres://relay:fromfile@db:5432/app\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(pwFile, []byte("sasl-from-file\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("OUTBOX_DATABASE_URL_FILE", urlFile)
	cfg, err := loadFor(t, "", "--kafka-sasl-password-file", pwFile, "--kafka-sasl-mechanism", "SCRAM-SHA-512",
		"--kafka-sasl-username", "relay")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.DatabaseURL != "postgres://relay:fromfile@db:5432/app" {
		t.Errorf("database.url_file: got %q", cfg.DatabaseURL)
	}
	if cfg.Kafka.SASL.Password != "sasl-from-file" {
		t.Errorf("kafka.sasl.password_file: got %q", cfg.Kafka.SASL.Password)
	}
	// The usage lists the secrets' environment variables, never a flag for them.
	var out bytes.Buffer
	if code := dispatch(context.Background(), []string{"run", "--help"}, &out, &out); code != 0 {
		t.Fatalf("run --help: exit %d", code)
	}
	if strings.Contains(out.String(), "--database-url ") || strings.Contains(out.String(), "--kafka-sasl-password ") ||
		!strings.Contains(out.String(), "OUTBOX_DATABASE_URL") || !strings.Contains(out.String(), "OUTBOX_KAFKA_SASL_PASSWORD") {
		t.Errorf("run --help:\n%s", out.String())
	}
}

// TestConfigRefusedExitsNonZero: the run command refuses a bad configuration with exit code 1
// and the key in the message, before connecting to anything.
func TestConfigRefusedExitsNonZero(t *testing.T) {
	configEnv(t, validEnv)
	var stdout, stderr bytes.Buffer
	code := dispatch(context.Background(), []string{"run", "--relay-order-policy", "random"}, &stdout, &stderr)
	if code != 1 || !strings.Contains(stderr.String(), `relay.order_policy: must be one of wait, skip, got "random"`) {
		t.Errorf("exit %d, stderr %q", code, stderr.String())
	}
}

// TestConfigLayout checks database.layout's presets and that database.columns and
// kafka.id_header override them.
func TestConfigLayout(t *testing.T) {
	cases := []struct {
		name    string
		env     map[string]string
		columns postgres.Columns
		header  string
		err     string
	}{
		{name: "default", columns: postgres.RelayColumns},
		{name: "debezium", env: map[string]string{"OUTBOX_DATABASE_LAYOUT": "debezium"}, columns: postgres.DebeziumColumns, header: "id"},
		{name: "debezium overridden", env: map[string]string{"OUTBOX_DATABASE_LAYOUT": "debezium",
			"OUTBOX_DATABASE_COLUMNS_OCCURRED_AT": "created", "OUTBOX_KAFKA_ID_HEADER": "none"},
			columns: func() postgres.Columns { c := postgres.DebeziumColumns; c.OccurredAt = "created"; return c }()},
		{name: "renamed", env: map[string]string{"OUTBOX_DATABASE_COLUMNS_KEY": "entity_id", "OUTBOX_DATABASE_COLUMNS_TOPIC": "none",
			"OUTBOX_KAFKA_ID_HEADER": "x-id"},
			columns: func() postgres.Columns { c := postgres.RelayColumns; c.Key, c.Topic = "entity_id", "none"; return c }(), header: "x-id"},
		{name: "required column absent", env: map[string]string{"OUTBOX_DATABASE_COLUMNS_KEY": "none"}, err: "database.columns.key"},
		{name: "bookkeeping column", env: map[string]string{"OUTBOX_DATABASE_COLUMNS_OCCURRED_AT": "created_at"}, err: "database.columns.occurred_at"},
		{name: "twice", env: map[string]string{"OUTBOX_DATABASE_COLUMNS_KEY": "payload"}, err: "database.columns.payload"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			env := map[string]string{}
			for k, v := range validEnv {
				env[k] = v
			}
			for k, v := range tc.env {
				env[k] = v
			}
			configEnv(t, env)
			cfg, err := loadFor(t, "")
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("got %v, want an error naming %s", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if cfg.Store.Table.Columns != tc.columns {
				t.Errorf("columns %+v, want %+v", cfg.Store.Table.Columns, tc.columns)
			}
			if cfg.Kafka.IDHeader != tc.header {
				t.Errorf("kafka id header %q, want %q", cfg.Kafka.IDHeader, tc.header)
			}
		})
	}
}

// TestConfigKafkaFormats: kafka.record_timestamp, kafka.format and kafka.cloudevents.source reach the publisher's configuration, with
// its default when unset.
func TestConfigKafkaFormats(t *testing.T) {
	configEnv(t, validEnv)
	cfg, err := loadFor(t, "")
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Kafka.RecordTimestamp != "produce" {
		t.Errorf("default kafka.record_timestamp %q, want produce", cfg.Kafka.RecordTimestamp)
	}
	if cfg.Kafka.Format != "native" || cfg.Kafka.CloudEventsSource != "/outbox/{aggregate_type}" {
		t.Errorf("default kafka.format %q, kafka.cloudevents.source %q", cfg.Kafka.Format, cfg.Kafka.CloudEventsSource)
	}
	env := map[string]string{"OUTBOX_KAFKA_RECORD_TIMESTAMP": "occurred_at", "OUTBOX_KAFKA_FORMAT": "cloudevents",
		"OUTBOX_KAFKA_CLOUDEVENTS_SOURCE": "//shop/{event_type}"}
	for k, v := range validEnv {
		env[k] = v
	}
	configEnv(t, env)
	if cfg, err = loadFor(t, ""); err != nil {
		t.Fatal(err)
	}
	if cfg.Kafka.RecordTimestamp != "occurred_at" {
		t.Errorf("kafka.record_timestamp %q, want occurred_at", cfg.Kafka.RecordTimestamp)
	}
	if cfg.Kafka.Format != "cloudevents" || cfg.Kafka.CloudEventsSource != "//shop/{event_type}" {
		t.Errorf("kafka.format %q, kafka.cloudevents.source %q", cfg.Kafka.Format, cfg.Kafka.CloudEventsSource)
	}
}
