// Package faults_test injects the faults of RELIABILITY.md's catalog into a running relay and
// proves, with the oracle, that no committed event is lost, no rolled-back event is published,
// per-key order holds and duplicates stay within their bound.
package faults_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/adapters/kafka"
	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/internal/dbtest"
	"github.com/outbox-relay/outbox-relay/internal/kafkatest"
	"github.com/outbox-relay/outbox-relay/internal/oracle"
	"github.com/outbox-relay/outbox-relay/internal/pgcluster"
	"github.com/outbox-relay/outbox-relay/internal/tcpproxy"
)

var topicSeq atomic.Int64

// relayBin is the outbox-relay binary the process-level tests run.
var relayBin string

func TestMain(m *testing.M) {
	relayBin = os.Getenv("OUTBOX_RELAY_BIN")
	var tmp string
	if relayBin == "" {
		var err error
		tmp, err = os.MkdirTemp("", "faults-bin-")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		relayBin = filepath.Join(tmp, "outbox-relay")
		cmd := exec.Command("go", "build", "-o", relayBin, "./cmd/outbox-relay")
		cmd.Dir = ".."
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "build outbox-relay: %v\n%s", err, out)
			os.Exit(1)
		}
	}
	code := m.Run()
	if tmp != "" {
		_ = os.RemoveAll(tmp)
	}
	os.Exit(code)
}

// options shape one test's environment.
type options struct {
	cluster    *pgcluster.Cluster // the test's own PostgreSQL; nil uses the shared test server
	brokerGate bool               // put the broker's connections behind a tcpproxy.Listener
	kfake      []kfake.Opt
	partitions int32
	topics     int
	topicConf  map[string]*string // configuration of the env's topics
	load       oracle.Config
	// layout is the outbox table's: "" (the relay's own) or layoutDebezium, Debezium's outbox
	// table adopted with 'migrate --adopt' (one topic then: the aggregate type names it).
	layout string
}

// layoutDebezium is options.layout for Debezium's outbox table.
const layoutDebezium = "debezium"

// env is one fault test's world: an outbox, a broker, topics and a loader.
type env struct {
	t      *testing.T
	ctx    context.Context
	url    string // the outbox database
	pool   *pgxpool.Pool
	table  postgres.Table
	broker *kafkatest.Broker
	gate   *tcpproxy.Listener // nil unless options.brokerGate
	topics []string
	loader *oracle.Loader
	seq    atomic.Int64
	layout string // options.layout
}

func setup(t *testing.T, o options) *env {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	e := &env{t: t, ctx: ctx, layout: o.layout}
	if o.cluster == nil {
		e.pool, e.table = dbtest.Schema(t)
		e.url = dbtest.URL()
		if o.layout == layoutDebezium {
			e.table = adoptDebezium(t, e.pool, e.table.Schema)
			o.topics = 1
		}
	} else {
		e.url = o.cluster.URL()
		pool, err := pgxpool.New(ctx, e.url)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(pool.Close)
		e.pool, e.table = pool, postgres.Table{Schema: "faults", Name: "outbox"}
		if _, err := postgres.Migrate(ctx, pool, e.table, nil); err != nil {
			t.Fatalf("migrate: %v", err)
		}
	}
	if o.brokerGate {
		var mu sync.Mutex
		o.kfake = append(o.kfake, kfake.ListenFn(func(network, addr string) (net.Listener, error) {
			ln, err := net.Listen(network, addr)
			if err != nil {
				return nil, err
			}
			mu.Lock()
			defer mu.Unlock()
			e.gate = tcpproxy.Wrap(ln)
			return e.gate, nil
		}))
	}
	if (o.brokerGate || len(o.kfake) > 0) && kafkatest.Real() {
		t.Skip("injects faults into kfake: KAFKA_BROKERS is set")
	}
	e.broker = kafkatest.Start(t, o.kfake...)
	if o.partitions == 0 {
		o.partitions = 3
	}
	if o.topics == 0 {
		o.topics = 2
	}
	for range o.topics {
		if o.topicConf == nil {
			e.topics = append(e.topics, e.broker.Topic(t, "faults", o.partitions))
			continue
		}
		name := fmt.Sprintf("faults-conf-%d-%d", os.Getpid(), topicSeq.Add(1))
		cl, err := kgo.NewClient(kgo.SeedBrokers(e.broker.Addrs...))
		if err != nil {
			t.Fatal(err)
		}
		resp, err := kadm.NewClient(cl).CreateTopic(ctx, o.partitions, 1, o.topicConf, name)
		cl.Close()
		if err == nil {
			err = resp.Err
		}
		if err != nil {
			t.Fatalf("create topic %s: %v", name, err)
		}
		e.topics = append(e.topics, name)
	}
	o.load.Topics = e.topics
	if o.layout == layoutDebezium {
		o.load.AggregateType = e.topics[0] // the relay's topic template is {aggregate_type}
	}
	l, err := oracle.New(ctx, e.pool, e.table, o.load)
	if err != nil {
		t.Fatal(err)
	}
	e.loader = l
	return e
}

// check waits until the outbox is drained, then runs the oracle and asserts its report.
func (e *env) check(maxDuplicates int) oracle.Report {
	e.t.Helper()
	rep, err := oracle.Check(e.ctx, e.broker.Addrs, e.loader, 90*time.Second)
	if err != nil {
		e.t.Fatalf("oracle: %v", err)
	}
	rep.Assert(e.t, maxDuplicates)
	return rep
}

// pending returns the rows not published yet.
func (e *env) pending() (int, error) {
	ctx, cancel := context.WithTimeout(e.ctx, 10*time.Second)
	defer cancel()
	var n int
	err := e.pool.QueryRow(ctx, `SELECT count(*) FROM `+pgx.Identifier{e.table.Schema, e.table.Name}.Sanitize()+
		` WHERE dispatched_at IS NULL`).Scan(&n)
	return n, err
}

// waitDrained waits until every outbox row was published.
func (e *env) waitDrained(timeout time.Duration) {
	e.t.Helper()
	e.eventually(timeout, "outbox drained", func() (bool, string) {
		n, err := e.pending()
		if err != nil {
			return false, err.Error()
		}
		return n == 0, fmt.Sprintf("%d rows pending", n)
	})
}

// eventually polls cond until it holds or timeout passes.
func (e *env) eventually(timeout time.Duration, what string, cond func() (bool, string)) {
	e.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, state := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("timed out after %s waiting for %s: %s", timeout, what, state)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// exec runs sql on the outbox database; {outbox} and {parked} name the outbox tables.
func (e *env) exec(sql string, args ...any) {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(e.ctx, 30*time.Second)
	defer cancel()
	if _, err := e.pool.Exec(ctx, e.sql(sql), args...); err != nil {
		e.t.Fatalf("%s: %v", sql, err)
	}
}

func (e *env) sql(s string) string {
	return strings.NewReplacer(
		"{outbox}", pgx.Identifier{e.table.Schema, e.table.Name}.Sanitize(),
		"{parked}", pgx.Identifier{e.table.Schema, e.table.Name + "_parked"}.Sanitize(),
		"{schema}", pgx.Identifier{e.table.Schema}.Sanitize(),
	).Replace(s)
}

// relayConfig is the relay configuration of the tests: short intervals so faults heal quickly.
func relayConfig() relay.Config {
	return relay.Config{
		BatchSize:           200,
		MaxInFlight:         1000,
		PollInterval:        100 * time.Millisecond,
		LeaderRetryInterval: 100 * time.Millisecond,
		RetryBackoffMin:     50 * time.Millisecond,
		RetryBackoffMax:     time.Second,
		ShutdownTimeout:     20 * time.Second,
		ReconnectBackoffMax: 500 * time.Millisecond,
	}
}

// relayOpts shape one in-process relay.
type relayOpts struct {
	name     string              // application_name of its database session
	url      string              // database URL; the env's when empty
	cfg      relay.Config        // zero: relayConfig()
	kafka    func(*kafka.Config) // adjusts the publisher's configuration
	kgoOpts  []kgo.Opt
	observer relay.Observer                // called besides the relay's probe
	store    func(relay.Store) relay.Store // decorates the relay's store
	timeout  time.Duration                 // the store's query timeout; 10s when zero
	repl     string                        // the store's WaitForReplication
	pins     bool                          // pin partition counts in the env's database, as 'run' does
}

// inRelay is an in-process relay: the same wiring as 'outbox-relay run', with probes.
type inRelay struct {
	*relay.Relay
	name   string
	probe  *probe
	sink   *recSink
	logs   *logBuffer
	cancel context.CancelFunc
	done   chan error
}

func (e *env) startRelay(o relayOpts) *inRelay {
	e.t.Helper()
	if o.name == "" {
		o.name = fmt.Sprintf("relay-%d", e.seq.Add(1))
	}
	if o.url == "" {
		o.url = e.url
	}
	if o.cfg == (relay.Config{}) {
		o.cfg = relayConfig()
	}
	conn, err := postgres.ParseURL(o.url)
	if err != nil {
		e.t.Fatal(err)
	}
	conn.ConnectTimeout = 5 * time.Second
	conn.RuntimeParams["application_name"] = o.name
	if o.timeout == 0 {
		o.timeout = 10 * time.Second
	}
	store, err := postgres.NewStore(conn, postgres.StoreConfig{Table: e.table, QueryTimeout: o.timeout,
		WaitForReplication: o.repl})
	if err != nil {
		e.t.Fatal(err)
	}
	logs := &logBuffer{}
	log := slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	kc := kafka.Config{Brokers: e.broker.Addrs, DialTimeout: 3 * time.Second, Log: log}
	if e.layout == layoutDebezium {
		kc.TopicTemplate, kc.IDHeader = "{aggregate_type}", "id" // as 'run' with database.layout debezium
	}
	if o.kafka != nil {
		o.kafka(&kc)
	}
	deps := kafka.PublisherDeps{Log: log}
	if o.pins {
		deps.Pins = postgres.NewPartitionPins(e.pool, e.table)
	}
	pub, err := kafka.NewPublisherWith(kc, deps, append([]kgo.Opt{kgo.MetadataMinAge(200 * time.Millisecond),
		kgo.RetryBackoffFn(func(int) time.Duration { return 100 * time.Millisecond })}, o.kgoOpts...)...)
	if err != nil {
		e.t.Fatal(err)
	}
	r := &inRelay{name: o.name, probe: &probe{next: o.observer}, sink: &recSink{Sink: pub}, logs: logs}
	var st relay.Store = store
	if o.store != nil {
		st = o.store(st)
	}
	r.Relay, err = relay.New(o.cfg, st, r.sink, r.probe, log)
	if err != nil {
		e.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(e.ctx)
	r.cancel = cancel
	r.done = make(chan error, 1)
	go func() {
		err := r.Run(ctx)
		pub.Close()
		r.done <- err
	}()
	e.t.Cleanup(func() {
		r.stop(e.t)
		if e.t.Failed() || os.Getenv("FAULTS_LOGS") != "" {
			e.t.Logf("logs of %s:\n%s", r.name, r.logs.tail(60))
		}
	})
	return r
}

// stop stops the relay gracefully and waits for it.
func (r *inRelay) stop(t *testing.T) {
	t.Helper()
	r.cancel()
	select {
	case err, ok := <-r.done:
		if ok && err != nil {
			t.Errorf("relay %s: %v", r.name, err)
		}
		if ok {
			close(r.done)
		}
	case <-time.After(90 * time.Second):
		t.Errorf("relay %s did not stop", r.name)
	}
}

// waitLeader waits until r leads.
func (e *env) waitLeader(r *inRelay) {
	e.t.Helper()
	e.eventually(60*time.Second, r.name+" leads", func() (bool, string) { return r.Leader(), "standby" })
}

// probe is the relay's observer in tests: it counts what the relay reports.
type probe struct {
	next                                           relay.Observer
	acked, marked, failed, parked, connects, leads atomic.Int64
	mu                                             sync.Mutex
	ackTimes                                       []time.Time
}

func (p *probe) Claimed(n int, took time.Duration) {
	if p.next != nil {
		p.next.Claimed(n, took)
	}
}

func (p *probe) Acked(m *relay.Message, at time.Time) {
	p.acked.Add(1)
	p.mu.Lock()
	p.ackTimes = append(p.ackTimes, at)
	p.mu.Unlock()
	if p.next != nil {
		p.next.Acked(m, at)
	}
}

func (p *probe) Marked(n int, took time.Duration) {
	p.marked.Add(int64(n))
	if p.next != nil {
		p.next.Marked(n, took)
	}
}

func (p *probe) Failed(m *relay.Message, err error) {
	p.failed.Add(1)
	if p.next != nil {
		p.next.Failed(m, err)
	}
}

func (p *probe) Parked(m *relay.Message, reason string) {
	p.parked.Add(1)
	if p.next != nil {
		p.next.Parked(m, reason)
	}
}

func (p *probe) Leading(leader bool) {
	if leader {
		p.leads.Add(1)
	}
	if p.next != nil {
		p.next.Leading(leader)
	}
}

func (p *probe) Connected(up bool) {
	if up {
		p.connects.Add(1)
	}
	if p.next != nil {
		p.next.Connected(up)
	}
}

// acksBetween counts acknowledgements that arrived in (from, to).
func (p *probe) acksBetween(from, to time.Time) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, at := range p.ackTimes {
		if at.After(from) && at.Before(to) {
			n++
		}
	}
	return n
}

// recSink decorates the relay's sink: it records when messages are handed over and the bytes
// in flight.
type recSink struct {
	relay.Sink
	mu              sync.Mutex
	calls           int
	first, last     time.Time
	bytes, maxBytes int
}

func (s *recSink) Publish(ctx context.Context, m *relay.Message, done func(error)) error {
	size := m.Size()
	s.mu.Lock()
	now := time.Now()
	if s.calls == 0 {
		s.first = now
	}
	s.calls++
	s.last = now
	s.bytes += size
	s.maxBytes = max(s.maxBytes, s.bytes)
	s.mu.Unlock()
	err := s.Sink.Publish(ctx, m, func(err error) {
		s.mu.Lock()
		s.bytes -= size
		s.mu.Unlock()
		done(err)
	})
	if err != nil {
		s.mu.Lock()
		s.bytes -= size
		s.mu.Unlock()
	}
	return err
}

// span returns the number of messages handed over and when the first and last were.
func (s *recSink) span() (int, time.Time, time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.calls, s.first, s.last
}

// logBuffer keeps a relay's log lines.
type logBuffer struct {
	mu    sync.Mutex
	lines []string
	part  bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.part.Write(p)
	for {
		line, err := b.part.ReadString('\n')
		if err != nil {
			b.part.Reset()
			b.part.WriteString(line)
			break
		}
		b.lines = append(b.lines, strings.TrimRight(line, "\n"))
	}
	return len(p), nil
}

// count returns how many lines contain s.
func (b *logBuffer) count(s string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := 0
	for _, l := range b.lines {
		if strings.Contains(l, s) {
			n++
		}
	}
	return n
}

func (b *logBuffer) tail(n int) string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return strings.Join(b.lines[max(0, len(b.lines)-n):], "\n")
}

// proc is a relay running as its own process, the built binary.
type proc struct {
	cmd    *exec.Cmd
	logs   *logBuffer
	exited chan struct{}
	err    error
}

// startProcess runs 'outbox-relay run' against the env's outbox; extra are environment variables.
func (e *env) startProcess(name string, extra ...string) *proc {
	e.t.Helper()
	cmd := exec.Command(relayBin, "run")
	cmd.Env = append(os.Environ(),
		"OUTBOX_DATABASE_URL="+withAppName(e.url, name),
		"OUTBOX_DATABASE_SCHEMA="+e.table.Schema,
		"OUTBOX_DATABASE_TABLE="+e.table.Name,
		"OUTBOX_KAFKA_BROKERS="+strings.Join(e.broker.Addrs, ","),
		"OUTBOX_HTTP_ADDR=127.0.0.1:0",
		"OUTBOX_LOG_FORMAT=text",
		"OUTBOX_RELAY_POLL_INTERVAL=100ms",
		"OUTBOX_RELAY_LEADER_RETRY_INTERVAL=100ms",
		"OUTBOX_RELAY_RETRY_BACKOFF_MIN=50ms",
		"OUTBOX_RELAY_RETRY_BACKOFF_MAX=1s",
		"OUTBOX_RELAY_BATCH_SIZE=200",
		"OUTBOX_RELAY_MAX_IN_FLIGHT=1000",
	)
	if e.layout == layoutDebezium {
		cmd.Env = append(cmd.Env, "OUTBOX_DATABASE_LAYOUT=debezium", "OUTBOX_KAFKA_TOPIC_TEMPLATE={aggregate_type}")
	}
	cmd.Env = append(cmd.Env, extra...)
	return runProc(e.t, name, cmd)
}

// runProc starts cmd (an 'outbox-relay' command) with its output in the returned proc's logs,
// killed when t ends if it still runs; the tail of its logs is printed when t failed.
func runProc(t *testing.T, name string, cmd *exec.Cmd) *proc {
	t.Helper()
	p := &proc{cmd: cmd, logs: &logBuffer{}, exited: make(chan struct{})}
	cmd.Stdout = p.logs
	cmd.Stderr = p.logs
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", cmd.Path, err)
	}
	go func() {
		p.err = cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-p.exited:
		default:
			_ = cmd.Process.Kill()
			<-p.exited
		}
		if t.Failed() {
			t.Logf("logs of process %s:\n%s", name, p.logs.tail(60))
		}
	})
	return p
}

// signal sends sig to the process.
func (p *proc) signal(t *testing.T, sig syscall.Signal) {
	t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatalf("signal %v: %v", sig, err)
	}
}

// wait waits for the process to exit and returns its exit code.
func (p *proc) wait(t *testing.T, timeout time.Duration) int {
	t.Helper()
	select {
	case <-p.exited:
	case <-time.After(timeout):
		t.Fatalf("relay process did not exit within %s", timeout)
	}
	if p.err == nil {
		return 0
	}
	if ee := (*exec.ExitError)(nil); errors.As(p.err, &ee) {
		return ee.ExitCode()
	}
	t.Fatalf("relay process: %v", p.err)
	return -1
}

func withAppName(url, name string) string {
	sep := "?"
	if strings.Contains(url, "?") {
		sep = "&"
	}
	return url + sep + "application_name=" + name
}

// backendPID returns the pid of the database session named name.
func (e *env) backendPIDs(name string) []int {
	e.t.Helper()
	rows, err := e.pool.Query(e.ctx, `SELECT pid FROM pg_stat_activity WHERE application_name = $1`, name)
	if err != nil {
		e.t.Fatal(err)
	}
	pids, err := pgx.CollectRows(rows, pgx.RowTo[int])
	if err != nil {
		e.t.Fatal(err)
	}
	return pids
}

// terminate ends the database sessions named name with pg_terminate_backend and waits for them
// to exit; it returns how many it ended.
func (e *env) terminate(name string) int {
	e.t.Helper()
	var n int
	// OFFSET 0 keeps the filter below the call: only the named sessions are terminated.
	err := e.pool.QueryRow(e.ctx, `SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 10000)) FROM (
		SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND pid <> pg_backend_pid() OFFSET 0) s`, name).Scan(&n)
	if err != nil {
		e.t.Fatal(err)
	}
	return n
}

// result logs a catalog entry's outcome on one line, for README.md's table.
func result(t *testing.T, entry int, rep oracle.Report, note string) {
	t.Logf("FAULT %02d: lost %d, phantoms %d, duplicates %d, reorders %d, committed %d, rolled back %d; %s",
		entry, len(rep.Lost), len(rep.Phantoms), rep.Duplicates, len(rep.Reorders), rep.Committed, rep.RolledBack, note)
}

// records returns how many records the env's topics hold.
func (e *env) records() int64 {
	e.t.Helper()
	var n int64
	for _, parts := range e.endOffsets() {
		for _, end := range parts {
			n += end
		}
	}
	return n
}

// holdRows locks every outbox row present now FOR SHARE in a transaction of its own, so the
// relay can read and publish them but its marking statement waits. It returns how many rows it
// holds and the function that releases them.
func (e *env) holdRows() (int, func()) {
	e.t.Helper()
	tx, err := e.pool.Begin(e.ctx)
	if err != nil {
		e.t.Fatal(err)
	}
	var once sync.Once
	release := func() { once.Do(func() { _ = tx.Rollback(context.Background()) }) }
	e.t.Cleanup(release)
	var n int
	// Counted in the database: the id column is the event's uuid in some layouts.
	if err := tx.QueryRow(e.ctx, e.sql(`SELECT count(*) FROM (SELECT 1 FROM {outbox} FOR SHARE) s`)).Scan(&n); err != nil {
		e.t.Fatal(err)
	}
	return n, release
}

// adoptDebezium creates Debezium's outbox table in schema, adopts it as 'outbox-relay migrate
// --adopt --yes' does, and returns it.
func adoptDebezium(t *testing.T, pool *pgxpool.Pool, schema string) postgres.Table {
	t.Helper()
	ctx := context.Background()
	table := postgres.Table{Schema: schema, Name: "outboxevent", Columns: postgres.DebeziumColumns}
	if _, err := pool.Exec(ctx, `CREATE TABLE `+pgx.Identifier{schema, table.Name}.Sanitize()+` (id uuid NOT NULL PRIMARY KEY,
		aggregatetype varchar(255) NOT NULL, aggregateid varchar(255) NOT NULL, type varchar(255) NOT NULL, payload jsonb)`); err != nil {
		t.Fatal(err)
	}
	plan, err := postgres.PlanAdopt(ctx, pool, table)
	if err != nil {
		t.Fatalf("plan adopt: %v", err)
	}
	if err := postgres.Adopt(ctx, pool, plan, "10s"); err != nil {
		t.Fatalf("adopt: %v", err)
	}
	return table
}

// forLayouts runs f as a parallel subtest with the relay's own table and with an adopted
// Debezium table: every guarantee holds on both.
func forLayouts(t *testing.T, f func(t *testing.T, layout string)) {
	for _, layout := range []string{"relay", layoutDebezium} {
		t.Run(layout, func(t *testing.T) {
			t.Parallel()
			if layout == "relay" {
				layout = ""
			}
			f(t, layout)
		})
	}
}
