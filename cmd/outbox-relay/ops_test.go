package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/internal/dbtest"
	"github.com/outbox-relay/outbox-relay/internal/kafkatest"
	"github.com/outbox-relay/outbox-relay/internal/logbuf"
	"github.com/outbox-relay/outbox-relay/internal/tcpproxy"
)

// opsRelay is a relay daemon running in the test process, as 'outbox-relay run' wires it.
type opsRelay struct {
	d    *daemon
	base string // http://host:port
	logs *logbuf.Buffer
}

// startOpsRelay starts serve() on the outbox table with the broker addrs; extra are config keys,
// mods change the parsed configuration (what no key sets, such as tracing).
func startOpsRelay(t *testing.T, table postgres.Table, brokers []string, extra map[string]string, mods ...func(*Config)) *opsRelay {
	t.Helper()
	v := newViper()
	v.Set("database.url", dbtest.URL())
	v.Set("database.schema", table.Schema)
	v.Set("database.table", table.Name)
	v.Set("kafka.brokers", strings.Join(brokers, ","))
	v.Set("http.addr", "127.0.0.1:0")
	v.Set("relay.poll_interval", "100ms")
	v.Set("relay.leader_retry_interval", "100ms")
	v.Set("log.level", "debug")
	for k, val := range extra {
		v.Set(k, val)
	}
	cfg, err := parseConfig(v)
	if err != nil {
		t.Fatalf("config: %v", err)
	}
	for _, mod := range mods {
		mod(cfg)
	}
	logs := &logbuf.Buffer{}
	log := newLogger(logs, cfg.LogLevel, "json")
	ctx, cancel := context.WithCancel(context.Background())
	started := make(chan *daemon, 1)
	done := make(chan error, 1)
	go func() { done <- serve(ctx, cfg, log, func(d *daemon) { started <- d }) }()
	var d *daemon
	select {
	case d = <-started:
	case err := <-done:
		cancel()
		t.Fatalf("relay did not start: %v", err)
	case <-time.After(60 * time.Second):
		cancel()
		t.Fatal("relay did not start within 60s")
	}
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("relay: %v", err)
			}
		case <-time.After(60 * time.Second):
			t.Error("relay did not stop within 60s")
		}
		if t.Failed() {
			t.Logf("relay log:\n%s", logs.String())
		}
	})
	return &opsRelay{d: d, base: "http://" + d.listener.Addr().String(), logs: logs}
}

// scrape reads /metrics and returns the families by name.
func (r *opsRelay) scrape(t *testing.T) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get(r.base + "/metrics")
	if err != nil {
		t.Fatalf("scrape: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("scrape: status %d", resp.StatusCode)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("parse /metrics: %v", err)
	}
	return mfs
}

// readyz returns the status code and body of /readyz.
func (r *opsRelay) readyz(t *testing.T) (int, string) {
	t.Helper()
	resp, err := http.Get(r.base + "/readyz")
	if err != nil {
		t.Fatalf("readyz: %v", err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// value returns the value of the sample of family name whose labels include want, and whether
// it exists. Counters, gauges and untyped samples give their value; histograms their count.
func value(mfs map[string]*dto.MetricFamily, name string, want map[string]string) (float64, bool) {
	mf := mfs[name]
	if mf == nil {
		return 0, false
	}
next:
	for _, m := range mf.GetMetric() {
		have := map[string]string{}
		for _, l := range m.GetLabel() {
			have[l.GetName()] = l.GetValue()
		}
		for k, v := range want {
			if have[k] != v {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.GetCounter().GetValue(), true
		case m.Gauge != nil:
			return m.GetGauge().GetValue(), true
		case m.Histogram != nil:
			return float64(m.GetHistogram().GetSampleCount()), true
		case m.Untyped != nil:
			return m.GetUntyped().GetValue(), true
		}
	}
	return 0, false
}

// eventually polls cond every 100ms until it returns "" or the deadline passes.
func eventually(t *testing.T, within time.Duration, what string, cond func() string) {
	t.Helper()
	deadline := time.Now().Add(within)
	last := ""
	for time.Now().Before(deadline) {
		if last = cond(); last == "" {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("%s: not within %s: %s", what, within, last)
}

// insertRows writes n pending rows of topic, one key per row, and returns their ids.
func insertRows(t *testing.T, pool *pgxpool.Pool, table postgres.Table, topic string, n int) {
	t.Helper()
	_, err := pool.Exec(context.Background(), `INSERT INTO `+pgx.Identifier{table.Schema, table.Name}.Sanitize()+`
		(aggregate_type, aggregate_id, event_type, payload, topic)
		SELECT 'order', 'k-' || gen_random_uuid(), 'OrderPlaced', '{}'::bytea, $1 FROM generate_series(1, $2)`, topic, n)
	if err != nil {
		t.Fatalf("insert rows: %v", err)
	}
}

// holdLeadership takes the outbox's leadership lock on a connection of the test, so that a relay
// started now is a standby; release ends it.
func holdLeadership(t *testing.T, table postgres.Table) (release func()) {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, dbtest.URL())
	if err != nil {
		t.Fatal(err)
	}
	var ok bool
	if err := conn.QueryRow(ctx, `SELECT pg_try_advisory_lock(hashtextextended($1, 0))`,
		"outbox-relay:"+table.String()).Scan(&ok); err != nil || !ok {
		t.Fatalf("take the leadership lock: %v %v", ok, err)
	}
	var once sync.Once
	release = func() { once.Do(func() { _ = conn.Close(ctx) }) }
	t.Cleanup(release)
	return release
}

// TestMetricsEndToEnd scrapes /metrics while a backlog builds up behind a standby relay, drains
// when it takes the leadership, and while the broker rejects some produce requests.
func TestMetricsEndToEnd(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	broker := kafkatest.Start(t)
	topic := broker.Topic(t, "ops-metrics", 3)
	release := holdLeadership(t, table)
	r := startOpsRelay(t, table, broker.Addrs, nil)
	topicL := map[string]string{"topic": topic}

	// A standby: ready, not leading, and the backlog it cannot publish shows in the gauges.
	eventually(t, 30*time.Second, "standby ready", func() string {
		if code, body := r.readyz(t); code != http.StatusOK {
			return body
		}
		return ""
	})
	const n = 300
	insertRows(t, pool, table, topic, n)
	var maxAge float64
	eventually(t, 30*time.Second, "pending and oldest age rise", func() string {
		mfs := r.scrape(t)
		p, _ := value(mfs, "outbox_relay_pending_rows", topicL)
		age, _ := value(mfs, "outbox_relay_oldest_pending_age_seconds", topicL)
		leader, _ := value(mfs, "outbox_relay_leader", nil)
		maxAge = max(maxAge, age)
		if p != n || age <= 0 || leader != 0 {
			return fmt.Sprintf("pending %v, oldest age %v, leader %v", p, age, leader)
		}
		return ""
	})
	eventually(t, 30*time.Second, "oldest age keeps rising while nothing is published", func() string {
		age, _ := value(r.scrape(t), "outbox_relay_oldest_pending_age_seconds", topicL)
		if age <= maxAge {
			return fmt.Sprintf("age %v, was %v", age, maxAge)
		}
		return ""
	})

	// The standby takes over and drains: the gauges return to zero.
	release()
	eventually(t, 60*time.Second, "drained", func() string {
		mfs := r.scrape(t)
		p, okP := value(mfs, "outbox_relay_pending_rows", topicL)
		age, okA := value(mfs, "outbox_relay_oldest_pending_age_seconds", topicL)
		leader, _ := value(mfs, "outbox_relay_leader", nil)
		if !okP || !okA || p != 0 || age != 0 || leader != 1 {
			return fmt.Sprintf("pending %v (%v), oldest age %v (%v), leader %v", p, okP, age, okA, leader)
		}
		return ""
	})
	mfs := r.scrape(t)
	if got := len(broker.ReadAll(t, topic, n, time.Minute)); got != n {
		t.Fatalf("topic holds %d records, want %d", got, n)
	}
	for name, want := range map[string]float64{
		"outbox_relay_events_published_total": n,
		"outbox_relay_commit_to_ack_seconds":  n, // the histogram counts every event published
	} {
		if got, _ := value(mfs, name, nil); got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
	if ts, _ := value(mfs, "outbox_relay_last_publish_timestamp_seconds", nil); ts < float64(time.Now().Add(-time.Hour).Unix()) {
		t.Errorf("outbox_relay_last_publish_timestamp_seconds = %v, want a recent time", ts)
	}
	if bs, _ := value(mfs, "outbox_relay_batch_size_rows", nil); bs == 0 {
		t.Error("outbox_relay_batch_size_rows observed no claim")
	}
	if bi, ok := value(mfs, "outbox_relay_build_info", map[string]string{"version": version}); !ok || bi != 1 {
		t.Errorf("outbox_relay_build_info = %v (%v), want 1", bi, ok)
	}
	if _, ok := value(mfs, "outbox_relay_kafka_produce_records_total", nil); !ok {
		t.Error("franz-go client metrics (kprom) missing")
	}
	checkStateChangeLogs(t, r.logs.String(), n)
	if t.Failed() {
		return
	}
	if broker.Fake == nil {
		checkQueriedMetrics(t, r.scrape(t))
		checkMetricsDocumented(t, r.scrape(t))
		t.Log("KAFKA_BROKERS set: injected produce failures skipped")
		return
	}

	// Injected failures: the broker rejects some produce requests with a non-retriable error
	// (the client does not retry it; the relay decides).
	// Rows are written one at a time so that each failed request holds exactly the records the
	// control function counts.
	var failRequests, failedRecords atomic.Int64
	failRequests.Store(3)
	broker.Fake.ControlKey(int16(kmsg.Produce), func(req kmsg.Request) (kmsg.Response, error, bool) {
		broker.Fake.KeepControl()
		if failRequests.Load() == 0 {
			return nil, nil, false
		}
		failRequests.Add(-1)
		preq := req.(*kmsg.ProduceRequest)
		resp := preq.ResponseKind().(*kmsg.ProduceResponse)
		resp.Version = preq.Version
		for _, rt := range preq.Topics {
			st := kmsg.NewProduceResponseTopic()
			st.Topic, st.TopicID = rt.Topic, rt.TopicID
			for _, rp := range rt.Partitions {
				sp := kmsg.NewProduceResponseTopicPartition()
				sp.Partition = rp.Partition
				sp.ErrorCode = kerr.InvalidRecord.Code
				st.Partitions = append(st.Partitions, sp)
				var batch kmsg.RecordBatch
				if err := batch.ReadFrom(rp.Records); err == nil {
					failedRecords.Add(int64(batch.NumRecords))
				}
			}
			resp.Topics = append(resp.Topics, st)
		}
		return resp, nil, true
	})
	const m = 5
	for i := range m {
		insertRows(t, pool, table, topic, 1)
		eventually(t, 30*time.Second, fmt.Sprintf("row %d published or parked", i), func() string {
			var pending int
			_ = pool.QueryRow(context.Background(), `SELECT count(*) FROM `+
				pgx.Identifier{table.Schema, table.Name}.Sanitize()).Scan(&pending)
			if pending != 0 {
				return fmt.Sprintf("%d pending", pending)
			}
			return ""
		})
	}
	injected := failedRecords.Load()
	if injected != 3 {
		t.Fatalf("the broker failed %d records, want 3 (one per failed request)", injected)
	}
	eventually(t, 30*time.Second, "errors counted", func() string {
		mfs := r.scrape(t)
		errs, _ := value(mfs, "outbox_relay_publish_errors_total", map[string]string{"reason": kerr.InvalidRecord.Message})
		parkedTotal, _ := value(mfs, "outbox_relay_events_parked_total", nil)
		parked, _ := value(mfs, "outbox_relay_parked_rows", topicL)
		published, _ := value(mfs, "outbox_relay_events_published_total", nil)
		latency, _ := value(mfs, "outbox_relay_commit_to_ack_seconds", nil)
		// Whether a rejected row is retried or parked at once is the relay's policy; either way
		// every failure is counted, and every row is either published or parked.
		if errs != float64(injected) || parked != parkedTotal ||
			published+parkedTotal != float64(n+m) || latency != published {
			return fmt.Sprintf("errors %v, parked total %v, parked rows %v, published %v, latency count %v; injected %d",
				errs, parkedTotal, parked, published, latency, injected)
		}
		return ""
	})
	checkQueriedMetrics(t, r.scrape(t))
	checkMetricsDocumented(t, r.scrape(t))
}

// checkStateChangeLogs checks that the relay logged its changes of state at info level and
// nothing per event: after publishing events, few info lines, none about one row.
func checkStateChangeLogs(t *testing.T, logs string, events int) {
	t.Helper()
	info := 0
	for line := range strings.Lines(logs) {
		var rec map[string]any
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Errorf("log line is not JSON: %q", line)
			continue
		}
		if rec["level"] != "INFO" {
			continue
		}
		info++
		if _, ok := rec["row_id"]; ok {
			t.Errorf("info line about one row: %s", line)
		}
	}
	if info > 20 {
		t.Errorf("%d info lines for %d events: want one per change of state", info, events)
	}
	for _, msg := range []string{"standby: another replica leads", "leadership gained", "database connected"} {
		if !strings.Contains(logs, `"msg":"`+msg+`"`) {
			t.Errorf("no %q line", msg)
		}
	}
	if !strings.Contains(logs, `"outbox":"`) {
		t.Error("relay lines do not name their outbox")
	}
}

// TestReadyzBrokerCut cuts every connection to the broker: /readyz turns not ready, and ready
// again when the broker answers.
func TestReadyzBrokerCut(t *testing.T) {
	t.Parallel()
	if kafkatest.Real() {
		t.Skip("KAFKA_BROKERS set: the broker cannot be cut from the test")
	}
	_, table := dbtest.Schema(t)
	gate := &cutListeners{}
	broker := kafkatest.Start(t, kfake.ListenFn(gate.listen))
	r := startOpsRelay(t, table, broker.Addrs, nil)
	waitReady := func(what string) {
		eventually(t, 30*time.Second, what, func() string {
			if code, body := r.readyz(t); code != http.StatusOK {
				return fmt.Sprintf("%d %s", code, body)
			}
			return ""
		})
	}
	waitReady("ready at start")
	gate.cut(true)
	eventually(t, 30*time.Second, "not ready while the broker is cut", func() string {
		code, body := r.readyz(t)
		if code != http.StatusServiceUnavailable || !strings.Contains(body, "kafka unreachable") {
			return fmt.Sprintf("%d %s", code, body)
		}
		return ""
	})
	resp, err := http.Get(r.base + "/healthz")
	if err == nil {
		_ = resp.Body.Close()
	}
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Errorf("/healthz while the broker is cut: %v %v, want 200: the process is alive", resp, err)
	}
	gate.cut(false)
	waitReady("ready again once the broker answers")
	eventually(t, 30*time.Second, "broker state changes logged", func() string {
		if !strings.Contains(r.logs.String(), `"msg":"kafka unreachable"`) ||
			!strings.Contains(r.logs.String(), `"msg":"kafka reachable again"`) {
			return "no kafka unreachable / reachable again lines"
		}
		return ""
	})
}

// TestReadyzHeldRowsAreNoStall holds a pending row behind a parked row of its key (order policy
// wait): past http.stall_timeout the relay stays ready, and the row shows as held in the gauges
// and in 'status', with the parked row it waits for. A row that could go but gets no answer from
// the broker is a stall: /readyz says so, and ready again once it is published. When the parked
// row is dropped the held row is published.
func TestReadyzHeldRowsAreNoStall(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	broker := kafkatest.Start(t)
	if broker.Fake == nil {
		t.Skip("holds produce requests in kfake: KAFKA_BROKERS is set")
	}
	topic := broker.Topic(t, "ops-stall", 1)
	const stallTimeout = 2 * time.Second
	// A parked row the relay did not park itself, there before it starts: the relay reads the
	// parked keys when its term begins, so the key's later row is held from its first claim (a
	// row parked while it runs is learnt only at a later reload, which a test cannot wait for).
	if _, err := pool.Exec(context.Background(), `INSERT INTO `+pgx.Identifier{table.Schema, table.Name + "_parked"}.Sanitize()+`
		(id, event_id, aggregate_type, aggregate_id, event_type, payload, topic, occurred_at, created_at, attempts, reason)
		VALUES (-1, gen_random_uuid(), 'order', 'stuck', 'OrderPlaced', '{}', $1, now(), now(), 1, 'test')`, topic); err != nil {
		t.Fatal(err)
	}
	r := startOpsRelay(t, table, broker.Addrs, map[string]string{"http.stall_timeout": stallTimeout.String()})
	ctx := context.Background()
	eventually(t, 30*time.Second, "leader and ready", func() string {
		code, body := r.readyz(t)
		if code != http.StatusOK || !r.d.outboxes[0].relay().Leader() {
			return fmt.Sprintf("%d %s leader=%v", code, body, r.d.outboxes[0].relay().Leader())
		}
		return ""
	})
	// status names the relay's own session as the leader.
	var st statusReport
	if err := json.Unmarshal([]byte(runStatus(t, table.Schema, "--json")), &st); err != nil {
		t.Fatal(err)
	}
	host, _ := os.Hostname()
	if st.Leader == nil || !strings.HasPrefix(st.Leader.ApplicationName, "outbox-relay ") ||
		!strings.HasPrefix("outbox-relay "+host, st.Leader.ApplicationName) { // truncated to 63 bytes
		t.Errorf("status leader %+v, want the relay's session named %q", st.Leader, "outbox-relay "+host)
	}
	outbox := pgx.Identifier{table.Schema, table.Name}.Sanitize()
	var heldID int64
	err := pool.QueryRow(ctx, `INSERT INTO `+outbox+` (aggregate_type, aggregate_id, event_type, payload, topic)
		VALUES ('order', 'stuck', 'OrderPlaced', '{}', $1) RETURNING id`, topic).Scan(&heldID)
	if err != nil {
		t.Fatal(err)
	}
	// Once the held row is older than the stall timeout, with nothing published meanwhile, the
	// relay is still ready: the row waits on purpose.
	eventually(t, 30*time.Second, "held row older than http.stall_timeout", func() string {
		var old bool
		if err := pool.QueryRow(ctx, `SELECT created_at < now() - $2::interval FROM `+outbox+` WHERE id = $1`,
			heldID, stallTimeout+time.Second).Scan(&old); err != nil || !old {
			return fmt.Sprintf("not yet (%v)", err)
		}
		return ""
	})
	if code, body := r.readyz(t); code != http.StatusOK {
		t.Errorf("readyz with only a held row pending: %d %s, want 200", code, body)
	}
	eventually(t, 30*time.Second, "the held row in the gauges", func() string {
		mfs := r.scrape(t)
		held, _ := value(mfs, "outbox_relay_held_rows", map[string]string{"topic": topic})
		pending, _ := value(mfs, "outbox_relay_pending_rows", map[string]string{"topic": topic})
		age, _ := value(mfs, "outbox_relay_oldest_pending_age_seconds", map[string]string{"topic": topic})
		if held != 1 || pending != 1 || age != 0 {
			return fmt.Sprintf("held %v pending %v oldest age %v, want 1, 1 and 0 (held rows are no lag)", held, pending, age)
		}
		return ""
	})
	st = statusReport{}
	if err := json.Unmarshal([]byte(runStatus(t, table.Schema, "--json")), &st); err != nil {
		t.Fatal(err)
	}
	if st.Held != 1 || len(st.HeldKeys) != 1 || st.HeldKeys[0] != (postgres.HeldKey{AggregateType: "order", Key: "stuck", ParkedID: -1, Parked: 1, Held: 1}) {
		t.Errorf("status --json: held %d, held keys %+v; want 1 row held behind parked row -1 of key stuck", st.Held, st.HeldKeys)
	}
	if text := runStatus(t, table.Schema); !strings.Contains(text, "1 row held behind parked row -1 of key stuck (order)") {
		t.Errorf("status does not say why the row waits:\n%s", text)
	}

	// A row of another key that the broker does not answer for: a stall.
	release := make(chan struct{})
	var once sync.Once
	broker.Fake.ControlKey(int16(kmsg.Produce), func(kmsg.Request) (kmsg.Response, error, bool) {
		first := false
		once.Do(func() { first = true })
		if first {
			broker.Fake.SleepControl(func() { <-release })
		}
		return nil, nil, false
	})
	_, err = pool.Exec(ctx, `INSERT INTO `+outbox+` (aggregate_type, aggregate_id, event_type, payload, topic)
		VALUES ('order', 'free', 'OrderPlaced', '{}', $1)`, topic)
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, "stalled", func() string {
		code, body := r.readyz(t)
		if code != http.StatusServiceUnavailable || !strings.Contains(body, "stalled") {
			return fmt.Sprintf("%d %s", code, body)
		}
		return ""
	})
	close(release)
	eventually(t, 30*time.Second, "ready after the row was published", func() string {
		code, body := r.readyz(t)
		if code != http.StatusOK {
			return fmt.Sprintf("%d %s", code, body)
		}
		return ""
	})
	if _, err := pool.Exec(ctx, `DELETE FROM `+pgx.Identifier{table.Schema, table.Name + "_parked"}.Sanitize()); err != nil {
		t.Fatal(err)
	}
	if got := len(broker.ReadAll(t, topic, 2, 10*time.Second)); got != 2 {
		t.Fatalf("topic holds %d records, want 2: the free row, and the held one once released", got)
	}
	eventually(t, 30*time.Second, "no held row left", func() string {
		if held, _ := value(r.scrape(t), "outbox_relay_held_rows", map[string]string{"topic": topic}); held != 0 {
			return fmt.Sprintf("held %v", held)
		}
		return ""
	})
}

// TestReadyzDatabaseDown cuts the relay's connections to PostgreSQL (through a proxy) and
// refuses new ones: /readyz turns not ready, and ready again once the database is reachable.
func TestReadyzDatabaseDown(t *testing.T) {
	t.Parallel()
	_, table := dbtest.Schema(t)
	broker := kafkatest.Start(t)
	u, err := url.Parse(dbtest.URL())
	if err != nil {
		t.Fatal(err)
	}
	proxy, err := tcpproxy.New(u.Host)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = proxy.Close() })
	u.Host = proxy.Addr()
	r := startOpsRelay(t, table, broker.Addrs, map[string]string{"database.url": u.String()})
	readyz := func(want int, body string) func() string {
		return func() string {
			if code, b := r.readyz(t); code != want || !strings.Contains(b, body) {
				return fmt.Sprintf("%d %s", code, b)
			}
			return ""
		}
	}
	eventually(t, 30*time.Second, "ready at start", readyz(http.StatusOK, "ready"))
	proxy.Down()
	eventually(t, 30*time.Second, "not ready while the database is unreachable", readyz(http.StatusServiceUnavailable, "database"))
	proxy.Up()
	eventually(t, 60*time.Second, "ready again once the database answers", readyz(http.StatusOK, "ready"))
	if !strings.Contains(r.logs.String(), `"msg":"database session ended, reconnecting"`) {
		t.Errorf("no log line for the lost database session")
	}
}

// cutListeners wraps kfake's listeners so a test can cut every connection to the broker and
// refuse new ones (the broker stops answering), then let them through again.
type cutListeners struct {
	mu    sync.Mutex
	down  bool
	conns map[net.Conn]bool
}

func (c *cutListeners) listen(network, addr string) (net.Listener, error) {
	ln, err := net.Listen(network, addr)
	if err != nil {
		return nil, err
	}
	return &cutListener{Listener: ln, c: c}, nil
}

// cut closes every open connection and refuses new ones while down.
func (c *cutListeners) cut(down bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.down = down
	if down {
		for conn := range c.conns {
			_ = conn.Close()
		}
		c.conns = nil
	}
}

type cutListener struct {
	net.Listener
	c *cutListeners
}

func (l *cutListener) Accept() (net.Conn, error) {
	for {
		conn, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		l.c.mu.Lock()
		if l.c.down {
			l.c.mu.Unlock()
			_ = conn.Close()
			continue
		}
		if l.c.conns == nil {
			l.c.conns = map[net.Conn]bool{}
		}
		l.c.conns[conn] = true
		l.c.mu.Unlock()
		return conn, nil
	}
}

// TestMissingTopicIsSaidAtOnce: rows for a topic that does not exist (kafka.auto_create_topics
// false, the default) give one error line naming the topic and the fix, a gauge for the topic and
// a line in 'status', within seconds; nothing is parked and the relay is stalled (503), as it is:
// nothing can be published. Once the topic is created the rows go out, the gauge drops to 0 and
// the relay is ready.
func TestMissingTopicIsSaidAtOnce(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	broker := kafkatest.Start(t)
	if broker.Fake == nil {
		t.Skip("a real cluster may create topics (KAFKA_BROKERS is set)")
	}
	topic := kafkatest.Name("ops-missing")
	r := startOpsRelay(t, table, broker.Addrs, map[string]string{"http.stall_timeout": "2s", "kafka.topic_template": topic})
	ctx := context.Background()
	_, err := pool.Exec(ctx, `INSERT INTO `+pgx.Identifier{table.Schema, table.Name}.Sanitize()+`
		(aggregate_type, aggregate_id, event_type, payload) VALUES ('order', 'a', 'OrderPlaced', '1'), ('order', 'b', 'OrderPlaced', '2')`)
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, "one error line naming the topic and the fix", func() string {
		logs := r.logs.String()
		for _, line := range strings.Split(logs, "\n") {
			if strings.Contains(line, `"msg":"kafka topic does not exist`) && strings.Contains(line, `"level":"ERROR"`) &&
				strings.Contains(line, `"topic":"`+topic+`"`) && strings.Contains(line, "kafka.auto_create_topics=true") {
				return ""
			}
		}
		return "no such line"
	})
	eventually(t, 30*time.Second, "the topic's gauge", func() string {
		mfs := r.scrape(t)
		if v, ok := value(mfs, "outbox_relay_topic_missing", map[string]string{"topic": topic}); !ok || v != 1 {
			return fmt.Sprintf("outbox_relay_topic_missing %v (present %v), want 1", v, ok)
		}
		if v, _ := value(mfs, "outbox_relay_missing_topics", nil); v != 1 {
			return fmt.Sprintf("outbox_relay_missing_topics %v, want 1", v)
		}
		return ""
	})
	urlFile := filepath.Join(t.TempDir(), "url")
	if err := os.WriteFile(urlFile, []byte(dbtest.URL()), 0o600); err != nil {
		t.Fatal(err)
	}
	status := func(args ...string) string {
		t.Helper()
		var stdout, stderr bytes.Buffer
		args = append([]string{"status", "--database-url-file", urlFile, "--database-schema", table.Schema,
			"--kafka-brokers", strings.Join(broker.Addrs, ","), "--kafka-topic-template", topic}, args...)
		if code := dispatch(ctx, args, &stdout, &stderr); code != 0 {
			t.Fatalf("status exited %d: %s", code, stderr.String())
		}
		return stdout.String()
	}
	var st statusReport
	if err := json.Unmarshal([]byte(status("--json")), &st); err != nil {
		t.Fatal(err)
	}
	if !st.TopicsChecked || len(st.MissingTopics) != 1 || st.MissingTopics[0].Topic != topic || st.MissingTopics[0].Pending != 2 {
		t.Errorf("status --json: topics checked %v (%s), missing %+v; want %s with 2 rows", st.TopicsChecked,
			st.TopicsCheckError, st.MissingTopics, topic)
	}
	if text := status(); !strings.Contains(text, "missing  kafka topic "+topic+" does not exist, 2 rows wait for it: create it") {
		t.Errorf("status does not say the topic is missing:\n%s", text)
	}
	eventually(t, 30*time.Second, "stalled", func() string {
		if code, body := r.readyz(t); code != http.StatusServiceUnavailable || !strings.Contains(body, "stalled") {
			return fmt.Sprintf("%d %s", code, body)
		}
		return ""
	})
	var parked int
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM `+pgx.Identifier{table.Schema, table.Name + "_parked"}.Sanitize()).Scan(&parked); err != nil || parked != 0 {
		t.Errorf("%d rows parked (%v), want none for a missing topic", parked, err)
	}

	broker.Create(t, topic, 1)
	if got := len(broker.ReadAll(t, topic, 2, 30*time.Second)); got != 2 {
		t.Fatalf("topic holds %d records once created, want 2", got)
	}
	eventually(t, 30*time.Second, "ready, the gauge at 0", func() string {
		mfs := r.scrape(t)
		v, _ := value(mfs, "outbox_relay_topic_missing", map[string]string{"topic": topic})
		n, _ := value(mfs, "outbox_relay_missing_topics", nil)
		if code, body := r.readyz(t); code != http.StatusOK || v != 0 || n != 0 {
			return fmt.Sprintf("readyz %d %s, outbox_relay_topic_missing %v, outbox_relay_missing_topics %v", code, body, v, n)
		}
		return ""
	})
	if err := json.Unmarshal([]byte(status("--json")), &st); err != nil || len(st.MissingTopics) != 0 {
		t.Errorf("status once the topic exists: missing %+v (%v), want none", st.MissingTopics, err)
	}
}

// TestReadyzStandbyShowsASilentLeader: a session holds the leadership lock and says nothing (a
// frozen leader), as a role the relay may see (pg_read_all_stats) but not end (a superuser),
// while a row waits. The relay,
// under its least-privilege role, cannot take over: it stays standby, says why once, and its
// /readyz shows the stall. Once the silent session goes, the relay leads and publishes the row.
func TestReadyzStandbyShowsASilentLeader(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	broker := kafkatest.Start(t)
	topic := broker.Topic(t, "ops-silent", 1)
	ctx := context.Background()
	role := fmt.Sprintf("relay_silent_%d_%d", os.Getpid(), time.Now().UnixNano()%1000000)
	password := "Silent-Pw-" + strconv.Itoa(os.Getpid())
	dbtest.RelayRole(t, dbtest.URL(), role, password, table.Schema)
	t.Cleanup(func() {
		_, _ = pool.Exec(context.Background(), `REVOKE pg_read_all_stats FROM `+role)
		_, _ = pool.Exec(context.Background(), `DROP OWNED BY `+role)
		_, _ = pool.Exec(context.Background(), `DROP ROLE `+role)
	})
	// The relay sees another role's sessions' activity only with pg_read_all_stats (replicas
	// sharing one role need nothing); it may still not end a superuser's session.
	if _, err := pool.Exec(ctx, `GRANT pg_read_all_stats TO `+role); err != nil {
		t.Fatal(err)
	}
	frozen, err := pgx.Connect(ctx, dbtest.URL())
	if err != nil {
		t.Fatal(err)
	}
	defer frozen.Close(ctx)
	var frozenPID int
	if err := frozen.QueryRow(ctx, `SELECT pg_backend_pid() FROM pg_advisory_lock(hashtextextended($1, 0))`,
		"outbox-relay:"+table.String()).Scan(&frozenPID); err != nil {
		t.Fatal(err)
	}
	if h, err := postgres.LeaderOf(ctx, pool, table); err != nil || h == nil || h.PID != frozenPID {
		t.Fatalf("the silent session is not seen as the leader: %+v, %v", h, err)
	}
	if _, err := pool.Exec(ctx, `INSERT INTO `+pgx.Identifier{table.Schema, table.Name}.Sanitize()+`
		(aggregate_type, aggregate_id, event_type, payload, topic) VALUES ('order', 'o-1', 'OrderPlaced', '{}', $1)`, topic); err != nil {
		t.Fatal(err)
	}
	r := startOpsRelay(t, table, broker.Addrs, map[string]string{
		"database.url":       dbtest.RoleURL(dbtest.URL(), role, password),
		"relay.leader_lease": "1s",
		"http.stall_timeout": "1s",
	})
	eventually(t, 60*time.Second, "standby not ready, naming the silent leader", func() string {
		code, body := r.readyz(t)
		if code != http.StatusServiceUnavailable || !strings.Contains(body, fmt.Sprintf("leader (backend pid %d) gave no sign of life", frozenPID)) {
			return fmt.Sprintf("%d %s", code, body)
		}
		return ""
	})
	if r.d.outboxes[0].relay().Leader() {
		t.Fatal("the relay leads while the silent session holds the lock")
	}
	eventually(t, 30*time.Second, "the refused takeover logged", func() string {
		if !strings.Contains(r.logs.String(), "cannot be taken over") {
			return "no line yet"
		}
		return ""
	})
	if n := strings.Count(r.logs.String(), "cannot be taken over"); n != 1 {
		t.Errorf("the refused takeover logged %d times, want once", n)
	}
	_ = frozen.Close(ctx)
	if got := len(broker.ReadAll(t, topic, 1, time.Minute)); got != 1 {
		t.Fatalf("topic holds %d records once the silent session went, want 1", got)
	}
	eventually(t, 60*time.Second, "ready as the leader", func() string {
		code, body := r.readyz(t)
		if code != http.StatusOK || !r.d.outboxes[0].relay().Leader() {
			return fmt.Sprintf("%d %s leader=%v", code, body, r.d.outboxes[0].relay().Leader())
		}
		return ""
	})
}
