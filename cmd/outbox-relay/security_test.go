package main_test

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/sasl/scram"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/internal/dbtest"
	"github.com/outbox-relay/outbox-relay/internal/kafkatest"
	"github.com/outbox-relay/outbox-relay/internal/logbuf"
	"github.com/outbox-relay/outbox-relay/internal/pgcluster"
	"github.com/outbox-relay/outbox-relay/internal/testenv"
	"github.com/outbox-relay/outbox-relay/internal/tlstest"
)

// relayProc is a running outbox-relay process.
type relayProc struct {
	cmd  *exec.Cmd
	out  *logbuf.Buffer // stdout and stderr
	done chan struct{}
	err  error
}

// startProc starts the binary with args and env (the test's OUTBOX_ variables left out); it is
// killed when t ends if still running.
func startProc(t *testing.T, env []string, args ...string) *relayProc {
	t.Helper()
	p := &relayProc{cmd: exec.Command(relayBin(t), args...), out: &logbuf.Buffer{}, done: make(chan struct{})}
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "OUTBOX_") {
			p.cmd.Env = append(p.cmd.Env, kv)
		}
	}
	p.cmd.Env = append(p.cmd.Env, env...)
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			_ = p.cmd.Process.Kill()
			<-p.done
		}
	})
	return p
}

// stop sends SIGTERM and returns the exit code.
func (p *relayProc) stop(t *testing.T) int {
	t.Helper()
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(90 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
		t.Fatalf("relay did not stop within 90s of SIGTERM; output:\n%s", p.out.String())
	}
	var exit *exec.ExitError
	if errors.As(p.err, &exit) {
		return exit.ExitCode()
	}
	return 0
}

// waitFor polls cond until it holds, failing t after a generous deadline.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// applyRole runs sql/roles/relay_role.sql with psql against dbURL, as the tables' owner.
func applyRole(t *testing.T, dbURL, role, password, schema string) {
	t.Helper()
	dbtest.RelayRole(t, dbURL, role, password, schema)
}

func roleURL(base, role, password string) string { return dbtest.RoleURL(base, role, password) }

func countRows(t *testing.T, pool *pgxpool.Pool, sql string) int {
	t.Helper()
	var n int
	if err := pool.QueryRow(context.Background(), sql).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

func insertEvents(t *testing.T, pool *pgxpool.Pool, table string, n int, prefix string) {
	t.Helper()
	_, err := pool.Exec(context.Background(), `INSERT INTO `+table+` (aggregate_type, aggregate_id, event_type, payload)
		SELECT 'user', $2 || (i % 5), 'UserCreated', convert_to('{}', 'UTF8') FROM generate_series(1, $1) i`, n, prefix)
	if err != nil {
		t.Fatal(err)
	}
}

// TestRelayUnderLeastPrivilegeRole: the relay publishes, marks (retain mode: UPDATE) and parks
// under the role sql/roles/relay_role.sql creates, and that role can change no table definition
// nor write events.
func TestRelayUnderLeastPrivilegeRole(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	ctx := context.Background()
	b := kafkatest.Start(t)
	topic := b.Topic(t, "role", 1)
	role := fmt.Sprintf("relay_%d_%d", os.Getpid(), time.Now().UnixNano()%1000000)
	password := "Role-Pw-" + strconv.Itoa(os.Getpid())
	applyRole(t, dbtest.URL(), role, password, table.Schema)
	t.Cleanup(func() {
		_, _ = pool.Exec(context.Background(), `DROP OWNED BY `+role)
		_, _ = pool.Exec(context.Background(), `DROP ROLE `+role)
	})
	outbox := pgx.Identifier{table.Schema, table.Name}.Sanitize()
	parked := pgx.Identifier{table.Schema, table.Name + "_parked"}.Sanitize()
	insertEvents(t, pool, outbox, 20, "u")
	if _, err := pool.Exec(ctx, `INSERT INTO `+outbox+` (aggregate_type, aggregate_id, event_type, payload, topic)
		VALUES ('user', 'poison', 'UserCreated', '\x00', 'not a topic')`); err != nil {
		t.Fatal(err)
	}

	asRole := roleURL(dbtest.URL(), role, password)
	p := startProc(t, []string{
		"OUTBOX_DATABASE_URL=" + asRole,
		"OUTBOX_DATABASE_SCHEMA=" + table.Schema,
		"OUTBOX_KAFKA_BROKERS=" + strings.Join(b.Addrs, ","),
		"OUTBOX_KAFKA_TOPIC_TEMPLATE=" + topic,
		"OUTBOX_RELAY_MARK=retain",
		"OUTBOX_RELAY_POLL_INTERVAL=100ms",
	}, "run", "--http-addr=")
	if recs := b.ReadAll(t, topic, 20, time.Minute); len(recs) != 20 {
		t.Fatalf("published %d events under the role, want 20; output:\n%s", len(recs), p.out.String())
	}
	waitFor(t, "every row marked and the poison row parked", func() bool {
		return countRows(t, pool, `SELECT count(*) FROM `+outbox+` WHERE dispatched_at IS NULL`) == 0 &&
			countRows(t, pool, `SELECT count(*) FROM `+parked) == 1
	})
	if code := p.stop(t); code != 0 {
		t.Errorf("relay exited %d; output:\n%s", code, p.out.String())
	}
	if out := p.out.String(); strings.Contains(out, "permission denied") || strings.Contains(out, password) {
		t.Errorf("relay output shows a permission error or the password:\n%s", out)
	}
	topics := pgx.Identifier{table.Schema, table.Name + "_topics"}.Sanitize()
	if n := countRows(t, pool, `SELECT count(*) FROM `+topics+` WHERE topic = '`+topic+`' AND partitions = 1`); n != 1 {
		t.Errorf("the relay's role pinned %d partition counts of %s, want 1", n, topic)
	}

	conn, err := pgx.Connect(ctx, asRole)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var version int
	if err := conn.QueryRow(ctx, `SELECT current_setting('server_version_num')::int`).Scan(&version); err != nil {
		t.Fatal(err)
	}
	denied := []string{
		`CREATE TABLE ` + pgx.Identifier{table.Schema, "intruder"}.Sanitize() + ` (id int)`,
		`DROP TABLE ` + outbox,
		`DROP TABLE ` + parked,
		`ALTER TABLE ` + outbox + ` ADD COLUMN intruder int`,
		`CREATE INDEX ON ` + outbox + ` (event_type)`,
		`TRUNCATE ` + outbox,
		`INSERT INTO ` + outbox + ` (aggregate_type, event_type) VALUES ('user', 'Forged')`,
		`UPDATE ` + outbox + ` SET payload = NULL`,
		`DELETE FROM ` + parked,
		`UPDATE ` + pgx.Identifier{table.Schema, table.Name + "_topics"}.Sanitize() + ` SET partitions = 2`,
		`CREATE SCHEMA intruder`,
	}
	if version >= 150000 { // before 15 every role may create in public unless the DBA revoked it
		denied = append(denied, `CREATE TABLE public.intruder (id int)`)
	}
	for _, stmt := range denied {
		_, err := conn.Exec(ctx, stmt)
		var pgErr *pgconn.PgError
		if !errors.As(err, &pgErr) || pgErr.Code != "42501" { // insufficient_privilege
			t.Errorf("%s as the relay role: %v, want permission denied", stmt, err)
		}
	}
}

// tlsCluster is a throwaway PostgreSQL with ssl on, the outbox migrated, and a relay role with a
// password that may only connect over TLS with scram-sha-256.
type tlsCluster struct {
	cluster  *pgcluster.Cluster
	certs    *tlstest.Certs
	pool     *pgxpool.Pool // as the owner, without TLS
	password string
}

func startTLSCluster(t *testing.T, password string) *tlsCluster {
	t.Helper()
	certs := tlstest.New(t)
	hba := filepath.Join(certs.Dir, "pg_hba.conf")
	if err := os.WriteFile(hba, []byte("local all all trust\n"+
		"host all postgres 127.0.0.1/32 trust\n"+
		"hostssl all all 127.0.0.1/32 scram-sha-256\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			testenv.Missing(t, "running as root without a postgres user: %v", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		if err := certs.Chown(uid, gid); err != nil {
			t.Fatal(err)
		}
	}
	c := pgcluster.Start(t, "ssl = on",
		"ssl_cert_file = '"+certs.CertFile+"'",
		"ssl_key_file = '"+certs.KeyFile+"'",
		"hba_file = '"+hba+"'",
		"password_encryption = 'scram-sha-256'")
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, c.URL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	if _, err := postgres.Migrate(ctx, pool, postgres.Table{}, nil); err != nil {
		t.Fatal(err)
	}
	applyRole(t, c.URL(), "relay", password, "public")
	return &tlsCluster{cluster: c, certs: certs, pool: pool, password: password}
}

// url returns the relay role's connection string with the given password and TLS parameters.
func (c *tlsCluster) url(password, query string) string {
	u := url.URL{Scheme: "postgres", User: url.UserPassword("relay", password),
		Host: fmt.Sprintf("localhost:%d", c.cluster.Port), Path: "/postgres", RawQuery: query}
	return u.String()
}

// TestPostgresTLSAndSecrets runs the relay over TLS to PostgreSQL (sslmode=verify-full with a CA
// file) and SASL SCRAM to Kafka, provokes the errors a mistyped or leaked secret produces, and
// checks that no password ever shows in what the binary printed.
func TestPostgresTLSAndSecrets(t *testing.T) {
	t.Parallel()
	const dbPassword = "Db-Secret#8c1f/x" // needs escaping in a URL: its escaped form must not leak either
	const saslPassword = "Sasl-Secret-77ab"
	c := startTLSCluster(t, dbPassword)
	const topic = "secure-events"
	kc, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(1, topic), kfake.EnableSASL(),
		kfake.Superuser("SCRAM-SHA-256", "relay", saslPassword))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(kc.Close)
	broker := kc.ListenAddrs()[0]
	verify := "sslmode=verify-full&sslrootcert=" + url.QueryEscape(c.certs.CAFile)
	base := []string{
		"OUTBOX_KAFKA_BROKERS=" + broker,
		"OUTBOX_KAFKA_TOPIC_TEMPLATE=" + topic,
		"OUTBOX_KAFKA_SASL_MECHANISM=SCRAM-SHA-256",
		"OUTBOX_KAFKA_SASL_USERNAME=relay",
		"OUTBOX_RELAY_POLL_INTERVAL=100ms",
		// Generous: a TLS handshake and SCRAM on a loaded machine. The refusals below come at
		// once; only the cases that wait for an unreachable broker set a short startup timeout.
		"OUTBOX_RELAY_STARTUP_TIMEOUT=60s",
		"OUTBOX_DATABASE_CONNECT_TIMEOUT=60s",
		"OUTBOX_LOG_LEVEL=debug",
	}
	with := func(extra ...string) []string { return append(append([]string{}, base...), extra...) }
	var all strings.Builder // everything the binary printed
	record := func(name, out string) {
		fmt.Fprintf(&all, "=== %s\n%s\n", name, out)
	}

	// Files for the secrets, as a mounted secret would be.
	dir := t.TempDir()
	dbURLFile, saslFile := filepath.Join(dir, "db-url"), filepath.Join(dir, "sasl-password")
	if err := os.WriteFile(dbURLFile, []byte(c.url(dbPassword, verify)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(saslFile, []byte(saslPassword+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	t.Run("verify-full", func(t *testing.T) {
		insertEvents(t, c.pool, "public.outbox", 10, "tls")
		p := startProc(t, with("OUTBOX_DATABASE_URL_FILE="+dbURLFile, "OUTBOX_KAFKA_SASL_PASSWORD_FILE="+saslFile),
			"run", "--http-addr=")
		waitFor(t, "the events published over TLS", func() bool {
			return countRows(t, c.pool, `SELECT count(*) FROM public.outbox`) == 0
		})
		if n := countRows(t, c.pool, `SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
			WHERE a.usename = 'relay' AND s.ssl`); n == 0 {
			t.Error("no TLS connection of the relay role in pg_stat_ssl")
		}
		// A run-time failure: the relay's database sessions are killed; it reconnects and goes on.
		if _, err := c.pool.Exec(context.Background(),
			`SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'relay'`); err != nil {
			t.Fatal(err)
		}
		insertEvents(t, c.pool, "public.outbox", 5, "after")
		waitFor(t, "the events published after reconnecting", func() bool {
			return countRows(t, c.pool, `SELECT count(*) FROM public.outbox`) == 0
		})
		code := p.stop(t)
		record("run over TLS", p.out.String())
		if code != 0 {
			t.Errorf("relay exited %d:\n%s", code, p.out.String())
		}
		recs := readSASL(t, broker, saslPassword, topic, 15)
		if recs != 15 {
			t.Errorf("read %d records with SASL, want 15", recs)
		}
	})

	t.Run("refused connections", func(t *testing.T) {
		other := tlstest.New(t) // a CA that did not sign the server's certificate
		for _, r := range []struct {
			name string
			env  []string
			want string
		}{
			{"sslmode=disable refused by pg_hba", with("OUTBOX_DATABASE_URL="+c.url(dbPassword, "sslmode=disable"),
				"OUTBOX_KAFKA_SASL_PASSWORD="+saslPassword), "pg_hba.conf"},
			{"server certificate from another CA", with("OUTBOX_DATABASE_URL="+c.url(dbPassword,
				"sslmode=verify-full&sslrootcert="+url.QueryEscape(other.CAFile)), "OUTBOX_KAFKA_SASL_PASSWORD="+saslPassword),
				"certificate signed by unknown authority"},
			{"wrong database password", with("OUTBOX_DATABASE_URL="+c.url("Db-Secret-wrong#1", verify),
				"OUTBOX_KAFKA_SASL_PASSWORD="+saslPassword), "password authentication failed"},
			{"wrong database password, key=value form", with(fmt.Sprintf("OUTBOX_DATABASE_URL=host=localhost port=%d user=relay "+
				"password='Db-Secret-kv#2' dbname=postgres sslmode=verify-full sslrootcert=%s", c.cluster.Port, c.certs.CAFile),
				"OUTBOX_KAFKA_SASL_PASSWORD="+saslPassword), "password authentication failed"},
			{"wrong SASL password", with("OUTBOX_DATABASE_URL="+c.url(dbPassword, verify),
				"OUTBOX_KAFKA_SASL_PASSWORD=Sasl-Secret-wrong", "OUTBOX_RELAY_STARTUP_TIMEOUT=5s"), "kafka brokers " + broker + " unreachable"},
			{"wrong broker", with("OUTBOX_DATABASE_URL="+c.url(dbPassword, verify), "OUTBOX_KAFKA_SASL_PASSWORD="+saslPassword,
				"OUTBOX_KAFKA_BROKERS="+closedPort(t), "OUTBOX_RELAY_STARTUP_TIMEOUT=5s"), "unreachable"},
			{"malformed database URL", with("OUTBOX_DATABASE_URL=postgres://relay:Db-Secret-bad@[::1:5432/x",
				"OUTBOX_KAFKA_SASL_PASSWORD="+saslPassword), "database.url"},
		} {
			_, stderr, code := runBin(t, 90*time.Second, r.env, "run", "--http-addr=")
			record(r.name, stderr)
			if code == 0 || !strings.Contains(stderr, r.want) {
				t.Errorf("%s: exit %d, want non-zero with %q:\n%s", r.name, code, r.want, stderr)
			}
		}
		// The other commands that connect to the database, with a wrong password.
		env := with("OUTBOX_DATABASE_URL=" + c.url("Db-Secret-wrong#1", verify))
		for _, args := range [][]string{{"migrate"}, {"parked", "list"}, {"status"}} {
			stdout, stderr, code := runBin(t, 90*time.Second, env, args...)
			record(strings.Join(args, " "), stdout+stderr)
			if code == 0 {
				t.Errorf("%v with a wrong password: exit 0", args)
			}
		}
	})

	out := all.String()
	for _, secret := range []string{"Db-Secret", url.QueryEscape(dbPassword), "Sasl-Secret"} {
		if strings.Contains(out, secret) {
			for _, line := range strings.Split(out, "\n") {
				if strings.Contains(line, secret) {
					t.Errorf("output shows a password (%q): %s", secret, line)
				}
			}
		}
	}
	if !strings.Contains(out, "leadership gained") || !strings.Contains(out, "database session ended") {
		t.Errorf("the runs did not log what the test provoked; output:\n%s", out)
	}
}

// readSASL counts the records of topic, reading with SCRAM-SHA-256 until want arrived or a minute
// passed.
func readSASL(t *testing.T, broker, password, topic string, want int) int {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(broker), kgo.ConsumeTopics(topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
		kgo.SASL(scram.Auth{User: "relay", Pass: password}.AsSha256Mechanism()))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	n := 0
	for n < want && ctx.Err() == nil {
		n += len(cl.PollFetches(ctx).Records())
	}
	return n
}

// TestMalformedConnStringsNeverShown runs run, status, migrate, parked list and consume with
// malformed connection strings, the most common mistakes first (an unescaped '@' in the password,
// an unterminated quote), with passwords holding @ : / % ' " and spaces, and checks that nothing
// the binary prints holds the password or a piece of it. The old redaction printed "lookup
// Tail99@127.0.0.1: no such host", "password=xxxxx Tail99" and, for p@ss, "user=xxxxxostgres".
func TestMalformedConnStringsNeverShown(t *testing.T) {
	t.Parallel()
	broker := closedPort(t)
	for _, c := range []struct {
		name     string
		env      []string
		password string
		want     string // in stderr: the key or endpoint at fault
	}{
		{"url, unescaped @", []string{"OUTBOX_DATABASE_URL=postgres://relay:Hunter2@Tail99@127.0.0.1:5432/outbox_nodb"},
			"Hunter2@Tail99", "database.url: the user:password part of the URL (before its last at sign) contains an at sign"},
		{"url, p@ss", []string{"OUTBOX_DATABASE_URL=postgres://postgres:p@ss@127.0.0.1:5432/outbox_nodb"},
			"p@ss", "percent-encode it there"},
		{"url, slash", []string{"OUTBOX_DATABASE_URL=postgres://relay:Hunter2/Tail99@127.0.0.1:5432/outbox_nodb"},
			"Hunter2/Tail99", "contains a slash"},
		{"url, percent", []string{"OUTBOX_DATABASE_URL=postgres://relay:Hunter2%Tail99@127.0.0.1:5432/outbox_nodb"},
			"Hunter2%Tail99", "percent sign not followed by two hex digits"},
		{"url, space and quotes", []string{`OUTBOX_DATABASE_URL=postgres://relay:Hunter2 'Tail99" Mike@127.0.0.1:5432/outbox_nodb`},
			`Hunter2 'Tail99" Mike`, "a space or a control character"},
		{"url, colon, escaped", []string{"OUTBOX_DATABASE_URL=postgres://relay:Hunter2:Tail99%40Mike@127.0.0.1:5432/outbox_nodb"},
			"Hunter2:Tail99@Mike", "database 127.0.0.1:5432/outbox_nodb"},
		{"key=value, unterminated quote", []string{"OUTBOX_DATABASE_URL=host=127.0.0.1 user=relay password='Hunter2 Tail99 dbname=outbox_nodb"},
			"Hunter2 Tail99", "unterminated quoted string"},
		{"key=value, unquoted space", []string{"OUTBOX_DATABASE_URL=host=127.0.0.1 user=relay password=Hunter2 Tail99 dbname=outbox_nodb"},
			"Hunter2 Tail99", "database.url: cannot parse the connection string"},
		{"key=value, p@ss", []string{"OUTBOX_DATABASE_URL=host=127.0.0.1 user=postgres password=p@ss dbname=outbox_nodb"},
			"p@ss", `database "outbox_nodb" does not exist`},
		{"key=value, @ : / % and quotes", []string{`OUTBOX_DATABASE_URL=host=127.0.0.1 user=relay password='Hunter2@Tail99:Mike/Oscar%zz \'Papa"' dbname=outbox_nodb`},
			`Hunter2@Tail99:Mike/Oscar%zz 'Papa"`, "database 127.0.0.1:5432/outbox_nodb"},
		{"rabbitmq url, unescaped @", []string{"OUTBOX_DATABASE_URL=" + dbtest.URL(), "OUTBOX_SINK=rabbitmq",
			"OUTBOX_RABBITMQ_URL=amqp://relay:Hunter2@Tail99@" + broker + "/"}, "Hunter2@Tail99", "rabbitmq.url"},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			env := append([]string{"OUTBOX_KAFKA_BROKERS=" + broker, "OUTBOX_HTTP_ADDR=", "OUTBOX_CONSUMER_HTTP_ADDR=",
				"OUTBOX_RELAY_STARTUP_TIMEOUT=3s", "OUTBOX_DATABASE_CONNECT_TIMEOUT=3s", "OUTBOX_LOG_LEVEL=debug"}, c.env...)
			secret := []string{c.password}
			if at := strings.IndexByte(c.password, '@'); at >= 0 {
				secret = append(secret, c.password[at+1:]+"@") // a host made of the password's end: "lookup ss@127.0.0.1"
			}
			for _, p := range strings.FieldsFunc(c.password, func(r rune) bool { return strings.ContainsRune("@:/%'\" ", r) }) {
				if len(p) >= 3 {
					secret = append(secret, p)
				}
			}
			commands := [][]string{{"run"}, {"status"}, {"migrate"}, {"parked", "list"}, {"consume"}}
			if strings.HasPrefix(c.name, "rabbitmq") {
				commands = commands[:1]
			}
			for _, args := range commands {
				stdout, stderr, code := runBin(t, 90*time.Second, env, args...)
				if code == 0 {
					t.Errorf("%v: exit 0", args)
				}
				if args[0] == "run" && !strings.Contains(stderr, c.want) {
					t.Errorf("%v: stderr does not say %q:\n%s", args, c.want, stderr)
				}
				for _, s := range secret {
					if strings.Contains(stdout+stderr, s) {
						t.Errorf("%v prints %q:\n%s%s", args, s, stdout, stderr)
					}
				}
				if strings.Contains(stderr, "xxxxxostgres") {
					t.Errorf("%v: a short password masked every letter like it:\n%s", args, stderr)
				}
			}
		})
	}
}
