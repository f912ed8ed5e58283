// Command bench-watermill is the Watermill baseline of outbox-relay's benchmark: Watermill's SQL
// outbox (watermill-sql, its PostgreSQL queue schema) drained to Kafka by its forwarder
// (watermill/components/forwarder, publishing with watermill-kafka). It is a module of its own,
// so the relay's go.mod never lists Watermill; the benchmark (bench/) starts it as one of its
// measured children and talks to it as to the others: a JSON configuration in
// $OUTBOX_BENCH_CHILD, commands on stdin ("go", "reset", "report", "stop"), lines on stdout
// ("ready TABLE", "progress N", "report {json}").
//
// The settings are those Watermill documents for an outbox that is drained by one forwarder:
//   - the queue schema and its offsets adapter (sql.PostgreSQLQueueSchema,
//     sql.PostgreSQLQueueOffsetsAdapter), which the documentation recommends when transactions may
//     be long, and whose DeleteOnAck keeps the table from growing, as the relay's delete mode does;
//   - the payload column as BYTEA (the documented alternative to JSON; the envelope is not
//     re-parsed by the database);
//   - the pgx adapter (sql.BeginnerFromPgx) rather than database/sql;
//   - a SELECT batch of 1000 rows (SubscribeBatchSize; the default is 100) and a poll interval
//     of 10 ms (the default is 1 s; Watermill has no wake-up, so this bounds its latency);
//   - watermill-kafka's synchronous publisher with its default Sarama configuration, acks from
//     all in-sync replicas (as the relay asks for), and the partitioning marshaler keyed by the
//     aggregate id (the documented way to keep a key's events in order).
//
// Run alone it does nothing useful; see bench/README or `go run ./bench -h` in the main module.
package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/IBM/sarama"
	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill-kafka/v3/pkg/kafka"
	wsql "github.com/ThreeDotsLabs/watermill-sql/v4/pkg/sql"
	"github.com/ThreeDotsLabs/watermill/components/forwarder"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// childEnv names the environment variable holding the child's JSON configuration, as in bench/.
const childEnv = "OUTBOX_BENCH_CHILD"

// forwarderTopic is the SQL topic the forwarder reads; its table is watermill_<topic>.
const forwarderTopic = "outbox_forwarder"

// topic is the Kafka topic every bench event goes to, as for the relay.
const topic = "outbox.event.bench"

// Watermill's settings (see the package comment).
const (
	batchSize    = 1000
	pollInterval = 10 * time.Millisecond
)

// config is the part of bench's childConfig this child reads (the same JSON names).
type config struct {
	Role        string   `json:"role"`
	DatabaseURL string   `json:"database_url"`
	Schema      string   `json:"schema"`
	Brokers     []string `json:"brokers"`
	Expect      int64    `json:"expect"`  // stop once this many events are on the topic and the table is empty
	Latency     bool     `json:"latency"` // record when each event was acknowledged
	AppName     string   `json:"app_name"`
	// What to preload before "ready", through Watermill's own publisher; none when Events is 0.
	Events      int64 `json:"events"`
	PayloadSize int   `json:"payload_size"`
	Keys        int   `json:"keys"`
	Relay       struct {
		BatchSize    int           `json:"batch_size"`
		PollInterval time.Duration `json:"poll_interval"`
	} `json:"relay"`
}

// report is bench's childReport, field for field.
type report struct {
	Events     int64   `json:"events"`
	WallSec    float64 `json:"wall_sec"`
	CPUUserSec float64 `json:"cpu_user_sec"`
	CPUSysSec  float64 `json:"cpu_sys_sec"`
	DBCPUSec   float64 `json:"db_cpu_sec"`
	PeakRSS    int64   `json:"peak_rss_bytes"`
	HWM        int64   `json:"vm_hwm_bytes"`
	Acks       []ack   `json:"acks,omitempty"`
}

// ack is when the broker acknowledged one event (bench's ack).
type ack struct {
	EventID   string `json:"e"`
	At        int64  `json:"t"`
	Published int64  `json:"p"`
}

func main() {
	raw := os.Getenv(childEnv)
	if raw == "" {
		fmt.Fprintln(os.Stderr, "bench-watermill: a child of the benchmark (go run ./bench); $"+childEnv+" is not set")
		os.Exit(2)
	}
	var cfg config
	if err := json.Unmarshal([]byte(raw), &cfg); err != nil {
		fmt.Fprintln(os.Stderr, "bench-watermill: child config:", err)
		os.Exit(2)
	}
	signal.Ignore(syscall.SIGINT) // the parent decides when children end
	c := &child{cfg: cfg, out: bufio.NewWriter(os.Stdout)}
	if err := c.run(context.Background()); err != nil {
		fmt.Fprintln(os.Stderr, "bench-watermill:", err)
		os.Exit(1)
	}
}

type child struct {
	cfg    config
	outMu  sync.Mutex
	out    *bufio.Writer
	events atomic.Int64 // events the broker acknowledged

	mu        sync.Mutex
	frozen    bool
	acks      []ack
	peak      int64
	base      syscall.Rusage
	baseAt    time.Time
	baseCount int64
	dbBase    float64
	monMu     sync.Mutex
	monitor   *pgx.Conn
}

func (c *child) println(format string, args ...any) {
	c.outMu.Lock()
	defer c.outMu.Unlock()
	fmt.Fprintf(c.out, format+"\n", args...)
	_ = c.out.Flush()
}

// table is the forwarder's table, schema-qualified and quoted.
func (c *child) table(string) string {
	return pgx.Identifier{c.cfg.Schema, "watermill_" + forwarderTopic}.Sanitize()
}

func (c *child) run(ctx context.Context) error {
	if c.cfg.Role != "watermill" {
		return fmt.Errorf("unknown role %q", c.cfg.Role)
	}
	if c.cfg.Schema == "" || c.cfg.DatabaseURL == "" {
		return errors.New("child config: schema and database_url are required")
	}
	batch, poll := batchSize, pollInterval
	if c.cfg.Relay.BatchSize > 0 {
		batch = c.cfg.Relay.BatchSize
	}
	if c.cfg.Relay.PollInterval > 0 {
		poll = c.cfg.Relay.PollInterval
	}
	schema := wsql.PostgreSQLQueueSchema{
		GeneratePayloadType:       func(string) string { return "BYTEA" },
		GenerateMessagesTableName: c.table,
		SubscribeBatchSize:        batch,
	}
	offsets := wsql.PostgreSQLQueueOffsetsAdapter{DeleteOnAck: true, GenerateMessagesTableName: c.table}
	logger := watermill.NewSlogLogger(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))

	// The table, by Watermill's own DDL, then the preload through its publisher.
	setup, err := pgx.Connect(ctx, c.cfg.DatabaseURL)
	if err != nil {
		return err
	}
	qs, err := schema.SchemaInitializingQueries(wsql.SchemaInitializingQueriesParams{Topic: forwarderTopic})
	if err != nil {
		return err
	}
	for _, q := range qs {
		if _, err := setup.Exec(ctx, q.Query, q.Args...); err != nil {
			return fmt.Errorf("create the table: %w", err)
		}
	}
	if c.cfg.Events > 0 {
		if err := c.preload(ctx, setup, schema, logger); err != nil {
			return err
		}
	}
	_ = setup.Close(ctx)

	pcfg, err := pgxpool.ParseConfig(c.cfg.DatabaseURL)
	if err != nil {
		return errors.New("database url: invalid connection string")
	}
	pcfg.MaxConns = 2
	if c.cfg.AppName != "" {
		pcfg.ConnConfig.RuntimeParams["application_name"] = c.cfg.AppName
	}
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		return err
	}
	defer pool.Close()
	sub, err := wsql.NewSubscriber(wsql.BeginnerFromPgx(pool), wsql.SubscriberConfig{
		SchemaAdapter: schema, OffsetsAdapter: offsets, PollInterval: poll,
	}, logger)
	if err != nil {
		return err
	}
	sc := kafka.DefaultSaramaSyncPublisherConfig()
	sc.Producer.RequiredAcks = sarama.WaitForAll
	kpub, err := kafka.NewPublisher(kafka.PublisherConfig{
		Brokers: c.cfg.Brokers,
		Marshaler: kafka.NewWithPartitioningMarshaler(func(_ string, m *message.Message) (string, error) {
			return m.Metadata.Get("aggregate_id"), nil
		}),
		OverwriteSaramaConfig: sc,
	}, logger)
	if err != nil {
		return err
	}
	fwd, err := forwarder.NewForwarder(sub, &countingPublisher{Publisher: kpub, c: c}, logger,
		forwarder.Config{ForwarderTopic: forwarderTopic})
	if err != nil {
		return err
	}
	if c.cfg.AppName != "" {
		if c.monitor, err = pgx.Connect(ctx, c.cfg.DatabaseURL); err != nil {
			return err
		}
		defer c.monitor.Close(context.Background())
	}
	c.println("ready %s", c.table(""))

	cmds := make(chan string)
	go func() {
		sc := bufio.NewScanner(os.Stdin)
		for sc.Scan() {
			cmds <- strings.TrimSpace(sc.Text())
		}
		close(cmds)
	}()
	if cmd := <-cmds; cmd != "go" {
		return fmt.Errorf("expected go, got %q", cmd)
	}
	c.reset()
	wctx, stop := context.WithCancel(ctx)
	defer stop()
	fwdErr := make(chan error, 1)
	go func() { fwdErr <- fwd.Run(wctx) }()
	go c.sample(wctx)
	if c.cfg.Expect > 0 {
		go c.awaitDrained(wctx, pool)
	}
	for {
		select {
		case cmd, ok := <-cmds:
			switch {
			case !ok || cmd == "stop":
				stop()
				_ = fwd.Close()
				c.mu.Lock()
				frozen := c.frozen
				c.mu.Unlock()
				if !frozen {
					c.report()
				}
				return kpub.Close()
			case cmd == "reset":
				c.reset()
			case cmd == "report":
				c.report()
			}
		case err := <-fwdErr:
			if err != nil && wctx.Err() == nil {
				return fmt.Errorf("forwarder: %w", err)
			}
			fwdErr = nil
		}
	}
}

// awaitDrained reports once Expect events are on the topic and the table is empty: every row
// published and deleted, as a relay's drain ends when its last row is marked.
func (c *child) awaitDrained(ctx context.Context, pool *pgxpool.Pool) {
	t := time.NewTicker(2 * time.Millisecond)
	defer t.Stop()
	for c.events.Load() < c.cfg.Expect {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
	for ctx.Err() == nil {
		var left bool
		if err := pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM `+c.table("")+`)`).Scan(&left); err == nil && !left {
			break
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
	c.report()
	c.mu.Lock()
	c.frozen = true
	c.mu.Unlock()
}

// preload writes Events events through Watermill's forwarder publisher over its SQL publisher,
// 1000 to a transaction, as a service's transactions would (many at once), then vacuums and
// checkpoints as the benchmark's own preload does.
func (c *child) preload(ctx context.Context, conn *pgx.Conn, schema wsql.SchemaAdapter, logger watermill.LoggerAdapter) error {
	slab := make([]byte, 1<<20)
	_, _ = rand.Read(slab)
	keys := max(c.cfg.Keys, 1)
	size := c.cfg.PayloadSize
	now := time.Now().UTC().Format(time.RFC3339Nano)
	const perTx = 1000
	for from := int64(1); from <= c.cfg.Events; from += perTx {
		to := min(from+perTx-1, c.cfg.Events)
		msgs := make([]*message.Message, 0, to-from+1)
		for i := from; i <= to; i++ {
			off := (i * 7919) % int64(len(slab)-size)
			m := message.NewMessage(newUUID(), slab[off:off+int64(size)])
			m.Metadata.Set("aggregate_type", "bench")
			m.Metadata.Set("aggregate_id", strconv.FormatInt(i%int64(keys), 10))
			m.Metadata.Set("event_type", "bench.created")
			m.Metadata.Set("occurred_at", now)
			msgs = append(msgs, m)
		}
		err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			pub, err := wsql.NewPublisher(wsql.TxFromPgx(tx), wsql.PublisherConfig{SchemaAdapter: schema}, logger)
			if err != nil {
				return err
			}
			return forwarder.NewPublisher(pub, forwarder.PublisherConfig{ForwarderTopic: forwarderTopic}).Publish(topic, msgs...)
		})
		if err != nil {
			return fmt.Errorf("preload: %w", err)
		}
	}
	if _, err := conn.Exec(ctx, `VACUUM (ANALYZE) `+c.table("")); err != nil {
		return fmt.Errorf("vacuum after preload: %w", err)
	}
	if _, err := conn.Exec(ctx, `CHECKPOINT`); err != nil {
		return fmt.Errorf("checkpoint after preload: %w", err)
	}
	return nil
}

// countingPublisher counts the events the broker acknowledged (watermill-kafka's Publish returns
// once it has) and, for latency runs, records when.
type countingPublisher struct {
	message.Publisher
	c *child
}

func (p *countingPublisher) Publish(topic string, msgs ...*message.Message) error {
	at := time.Now().UnixNano()
	if err := p.Publisher.Publish(topic, msgs...); err != nil {
		return err
	}
	if p.c.cfg.Latency {
		now := time.Now().UnixNano()
		p.c.mu.Lock()
		for _, m := range msgs {
			p.c.acks = append(p.c.acks, ack{EventID: m.UUID, At: now, Published: at})
		}
		p.c.mu.Unlock()
	}
	p.c.events.Add(int64(len(msgs)))
	return nil
}

func (c *child) reset() {
	c.mu.Lock()
	defer c.mu.Unlock()
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &c.base)
	c.dbBase = c.dbCPU()
	c.baseAt = time.Now()
	c.baseCount = c.events.Load()
	c.acks = nil
	c.peak = rss()
}

func (c *child) report() {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	db := c.dbCPU()
	c.mu.Lock()
	r := report{
		Events:     c.events.Load() - c.baseCount,
		WallSec:    time.Since(c.baseAt).Seconds(),
		CPUUserSec: tv(ru.Utime) - tv(c.base.Utime),
		CPUSysSec:  tv(ru.Stime) - tv(c.base.Stime),
		DBCPUSec:   db - c.dbBase,
		PeakRSS:    max(c.peak, rss()),
		HWM:        procKB("/proc/self/status", "VmHWM"),
		Acks:       c.acks,
	}
	c.acks = nil
	c.mu.Unlock()
	sort.Slice(r.Acks, func(i, j int) bool { return r.Acks[i].At < r.Acks[j].At })
	b, _ := json.Marshal(r)
	c.println("report %s", b)
}

// sample records the peak RSS and prints progress until ctx ends.
func (c *child) sample(ctx context.Context) {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for n := 1; ; n++ {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		r := rss()
		c.mu.Lock()
		c.peak = max(c.peak, r)
		c.mu.Unlock()
		if n%5 == 0 {
			c.println("progress %d", c.events.Load())
		}
	}
}

// dbCPU returns the CPU seconds used so far by the child's PostgreSQL backends, found by
// application_name (the server runs on this machine).
func (c *child) dbCPU() float64 {
	c.monMu.Lock()
	defer c.monMu.Unlock()
	if c.monitor == nil {
		return 0
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	rows, err := c.monitor.Query(ctx, `SELECT pid FROM pg_stat_activity WHERE application_name = $1`, c.cfg.AppName)
	if err != nil {
		return 0
	}
	pids, err := pgx.CollectRows(rows, pgx.RowTo[int32])
	if err != nil {
		return 0
	}
	var sum float64
	for _, pid := range pids {
		sum += procCPU(int(pid))
	}
	return sum
}

// procCPU returns the user+system CPU seconds of process pid, from /proc/<pid>/stat.
func procCPU(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return 0
	}
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (ut + st) / 100 // USER_HZ
}

func tv(t syscall.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }

// rss returns the resident set size of this process, from /proc/self/statm.
func rss() int64 {
	b, err := os.ReadFile("/proc/self/statm")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) < 2 {
		return 0
	}
	pages, _ := strconv.ParseInt(f[1], 10, 64)
	return pages * int64(os.Getpagesize())
}

// procKB returns, in bytes, the sum of the fields named keys of a /proc file.
func procKB(path string, keys ...string) int64 {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	var total int64
	for _, line := range strings.Split(string(b), "\n") {
		name, v, ok := strings.Cut(line, ":")
		if ok && slices.Contains(keys, name) {
			kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			total += kb << 10
		}
	}
	return total
}

// newUUID returns a random (version 4) UUID in text form.
func newUUID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}
