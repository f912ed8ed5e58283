package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"runtime"
	"runtime/pprof"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/jackc/pgx/v5"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/adapters/kafka"
	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/adapters/prometheus"
	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/internal/hrtimer"
	"github.com/outbox-relay/outbox-relay/internal/procs"
	"github.com/outbox-relay/outbox-relay/internal/rawconn"
)

// childEnv names the environment variable that turns this binary (or the test binary) into a
// child process of the benchmark: its value is a JSON childConfig.
const childEnv = "OUTBOX_BENCH_CHILD"

// Child roles. Every role but kfake is measured: its CPU and memory are its own process's.
const (
	roleKfake   = "kfake"   // the broker: a kfake cluster, in a process of its own
	roleRelay   = "relay"   // relay.Relay with postgres.Store and kafka.Publisher, wired like 'outbox-relay run'
	roleNaive   = "naive"   // SELECT ... FOR UPDATE SKIP LOCKED, ProduceSync, DELETE, COMMIT
	roleSQLOnly = "sqlonly" // the relay's own claim and mark statements, no broker
	roleProduce = "produce" // raw franz-go produce of the same records, no database
	roleConsume = "consume" // a consumer of the bench topic, from its end: when each record arrived
	// roleWatermill is Watermill's forwarder, from the binary of bench/watermill (-watermill-exe).
	roleWatermill = "watermill"
)

// topic is the topic every bench event goes to: the default template with aggregate_type bench.
const topic = "outbox.event.bench"

// childConfig configures one child process.
type childConfig struct {
	Role        string        `json:"role"`
	DatabaseURL string        `json:"database_url,omitempty"`
	Schema      string        `json:"schema,omitempty"`
	Brokers     []string      `json:"brokers,omitempty"`
	Partitions  int           `json:"partitions,omitempty"`
	Mark        string        `json:"mark,omitempty"`
	Expect      int64         `json:"expect,omitempty"` // stop once this many rows are marked; 0: until "stop"
	Relay       relaySettings `json:"relay"`
	Latency     bool          `json:"latency,omitempty"` // record commit-to-ack latencies
	Retention   time.Duration `json:"retention,omitempty"`
	Profile     string        `json:"profile,omitempty"`    // write a CPU profile of the work here
	Allocs      string        `json:"allocs,omitempty"`     // write what the process allocated (pprof allocs) here, when the work is done
	AppName     string        `json:"app_name,omitempty"`   // application_name of its database sessions
	BrokerLog   string        `json:"broker_log,omitempty"` // for the broker: see options.BrokerLog
	// For the produce role: what to produce.
	Events      int64 `json:"events,omitempty"`
	PayloadSize int   `json:"payload_size,omitempty"`
	Keys        int   `json:"keys,omitempty"`
	// For the produce role: when positive, the records go out at Rate a second, those due handed
	// to the producer together once every Every (a millisecond when zero), and the report's
	// latencies are each record's produce-to-ack time; 0: as fast as the producer takes them.
	Rate  float64       `json:"rate,omitempty"`
	Every time.Duration `json:"every,omitempty"`
	// For the relay role: its kafka.format and kafka.record_timestamp; "" is the default.
	KafkaFormat     string `json:"kafka_format,omitempty"`
	RecordTimestamp string `json:"record_timestamp,omitempty"`
	// For the relay role: tracing on, exported to an OTLP/HTTP collector; nil: off.
	Tracing *tracingSettings `json:"tracing,omitempty"`
	// ExactlyOnce runs the relay with kafka.delivery=exactly_once.
	ExactlyOnce bool `json:"exactly_once,omitempty"`
	// Timings records the duration of each claim and mark of the relay (relayStats.ClaimMS, MarkMS).
	Timings bool `json:"timings,omitempty"`
	// GoMaxProcs, when positive, is the child's GOMAXPROCS; 0 leaves a relay child's GOMAXPROCS
	// to internal/procs, as `outbox-relay run` does.
	GoMaxProcs int `json:"gomaxprocs,omitempty"`
}

// relaySettings are the relay settings a run uses; zero means the relay's default.
type relaySettings struct {
	BatchSize        int           `json:"batch_size,omitempty"`
	MaxInFlight      int           `json:"max_in_flight,omitempty"`
	MaxInFlightBytes int           `json:"max_in_flight_bytes,omitempty"`
	PollInterval     time.Duration `json:"poll_interval,omitempty"`
	Linger           time.Duration `json:"linger,omitempty"`
}

// childReport is what a measured child prints: everything since "go" or the last "reset".
type childReport struct {
	Events      int64       `json:"events"`
	WallSec     float64     `json:"wall_sec"`
	CPUUserSec  float64     `json:"cpu_user_sec"`
	CPUSysSec   float64     `json:"cpu_sys_sec"`
	DBCPUSec    float64     `json:"db_cpu_sec"`             // CPU of its PostgreSQL backends (by application_name)
	PeakRSS     int64       `json:"peak_rss_bytes"`         // highest sampled RSS since go/reset (every 20ms)
	HWM         int64       `json:"vm_hwm_bytes"`           // the kernel's high-water mark of RSS for the process
	LatenciesMS []float64   `json:"latencies_ms,omitempty"` // sorted insert-to-ack latencies (created_at to ack)
	Acks        []ack       `json:"acks,omitempty"`         // when each event was acknowledged
	Relay       *relayStats `json:"relay,omitempty"`
	Spans       *spanStats  `json:"spans,omitempty"` // with tracing on: the relay's spans since it started
}

// ack is the broker's acknowledgement of one event, for commit-to-ack latencies.
type ack struct {
	EventID   string `json:"e"`
	At        int64  `json:"t"` // unix nanoseconds
	Published int64  `json:"p"` // when the relay handed the event to the producer, unix nanoseconds
}

// relayStats is what the relay's observer saw: how its time went to claims and marks.
type relayStats struct {
	Claims     int64   `json:"claims"`
	ClaimRows  int64   `json:"claim_rows"`
	ClaimSec   float64 `json:"claim_sec"`
	Marks      int64   `json:"marks"`
	MarkSec    float64 `json:"mark_sec"`
	EmptyClaim int64   `json:"empty_claims"`
	// Kafka transactions committed (exactly-once delivery).
	Transactions int64 `json:"transactions,omitempty"`
	// With childConfig.Timings: each claim's and mark's duration, milliseconds.
	ClaimMS []float64 `json:"claim_ms,omitempty"`
	MarkMS  []float64 `json:"mark_ms,omitempty"`
}

// runChild runs the child role described by the JSON in cfgJSON, talking to the parent over
// stdin (commands) and stdout (lines "ready", "progress N", "report {json}").
func runChild(cfgJSON string) error {
	var cfg childConfig
	if err := json.Unmarshal([]byte(cfgJSON), &cfg); err != nil {
		return fmt.Errorf("child config: %w", err)
	}
	signal.Ignore(syscall.SIGINT) // the parent decides when children end
	// OUTBOX_RAW_IO=off turns the sockets' raw reads and writes and the linger's timerfd off,
	// as for `outbox-relay`.
	if err := rawconn.Configure(os.Getenv); err != nil {
		return err
	}
	ctx := context.Background()
	if cfg.Role == roleKfake {
		return runKfake(cfg)
	}
	if cfg.GoMaxProcs > 0 {
		runtime.GOMAXPROCS(cfg.GoMaxProcs)
	} else if cfg.Role == roleRelay || cfg.Role == roleProduce && cfg.Rate > 0 {
		// As `outbox-relay run` does: one P while the relay uses little CPU. The paced producer
		// is the relay's floor, so it runs as the relay does.
		defer procs.Start(ctx, slog.New(slog.DiscardHandler))()
	}
	c := &child{cfg: cfg, out: bufio.NewWriter(os.Stdout)}
	return c.run(ctx)
}

// child is a measured child process.
type child struct {
	cfg    childConfig
	outMu  sync.Mutex
	out    *bufio.Writer
	events atomic.Int64 // rows marked (or records acknowledged, for produce)

	mu        sync.Mutex
	frozen    bool // the final report was printed when the work completed
	profiling bool
	lat       []float64
	acks      []ack
	published map[int64]int64 // row id -> when handed to the producer (unix ns), until acknowledged
	monMu     sync.Mutex
	monitor   *pgx.Conn // finds this child's backends; under monMu
	dbBase    float64
	stats     *relayStats   // kept by the relay's observer, under mu
	tracing   *childTracing // the relay's tracer provider; nil when tracing is off
	peak      int64
	base      syscall.Rusage
	baseAt    time.Time
	baseCount int64
}

func (c *child) println(format string, args ...any) {
	c.outMu.Lock()
	defer c.outMu.Unlock()
	fmt.Fprintf(c.out, format+"\n", args...)
	_ = c.out.Flush()
}

// work runs one measured role until ctx ends or its work is done.
type work func(ctx context.Context) error

func (c *child) run(ctx context.Context) error {
	var w work
	var err error
	switch c.cfg.Role {
	case roleRelay:
		w, err = c.relay(ctx)
	case roleNaive:
		w, err = c.naive(ctx)
	case roleSQLOnly:
		w, err = c.sqlOnly(ctx)
	case roleProduce:
		w, err = c.produce(ctx)
	case roleConsume:
		w, err = c.consume(ctx)
	default:
		err = fmt.Errorf("unknown role %q", c.cfg.Role)
	}
	if err != nil {
		return err
	}
	if c.cfg.DatabaseURL != "" && c.cfg.AppName != "" {
		mon, err := pgx.Connect(ctx, c.cfg.DatabaseURL)
		if err != nil {
			return err
		}
		defer mon.Close(context.Background())
		c.monitor = mon
	}
	c.println("ready")
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
	if c.cfg.Profile != "" {
		f, err := os.Create(c.cfg.Profile)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		c.profiling = true
		defer c.stopProfile()
	}
	wctx, stop := context.WithCancel(ctx)
	defer stop()
	done := make(chan error, 1)
	go func() { done <- w(wctx) }()
	go c.sample(wctx)
	for {
		select {
		case cmd, ok := <-cmds:
			switch {
			case !ok || cmd == "stop":
				stop()
				if done != nil {
					if err := <-done; err != nil {
						return err
					}
				}
				c.mu.Lock()
				frozen := c.frozen
				c.mu.Unlock()
				if !frozen {
					c.report()
				}
				return nil
			case cmd == "reset":
				c.reset()
			case cmd == "report":
				c.report()
			}
		case err := <-done:
			// The work ended by itself (its expected rows are done, and freeze reported them).
			if err != nil {
				return err
			}
			done = nil
			stop()
		}
	}
}

// reset starts a new measurement window.
func (c *child) reset() {
	c.mu.Lock()
	defer c.mu.Unlock()
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &c.base)
	c.dbBase = c.dbCPU()
	c.baseAt = time.Now()
	c.baseCount = c.events.Load()
	c.lat = c.lat[:0]
	c.acks = nil
	c.peak = rss()
	if c.stats != nil {
		*c.stats = relayStats{}
	}
}

// report prints the measurements of the current window.
func (c *child) report() {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	db := c.dbCPU()
	c.mu.Lock()
	r := childReport{
		Events:     c.events.Load() - c.baseCount,
		WallSec:    time.Since(c.baseAt).Seconds(),
		CPUUserSec: tv(ru.Utime) - tv(c.base.Utime),
		CPUSysSec:  tv(ru.Stime) - tv(c.base.Stime),
		DBCPUSec:   db - c.dbBase,
		PeakRSS:    max(c.peak, rss()),
		HWM:        hwm(),
	}
	r.LatenciesMS = append([]float64(nil), c.lat...)
	r.Acks = c.acks
	c.acks = nil
	if c.stats != nil {
		st := *c.stats
		r.Relay = &st
	}
	r.Spans = c.tracing.stats()
	c.mu.Unlock()
	sort.Float64s(r.LatenciesMS)
	b, _ := json.Marshal(r)
	c.println("report %s", b)
}

// sample records the peak RSS and prints progress until ctx ends.
func (c *child) sample(ctx context.Context) {
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	n := 0
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		r := rss()
		c.mu.Lock()
		c.peak = max(c.peak, r)
		c.mu.Unlock()
		if n++; n%5 == 0 {
			c.println("progress %d", c.events.Load())
		}
	}
}

// connConfig returns the database configuration of the child's sessions, named AppName.
func (c *child) connConfig() (*pgx.ConnConfig, error) {
	cfg, err := postgres.ParseURL(c.cfg.DatabaseURL)
	if err != nil {
		return nil, err
	}
	if c.cfg.AppName != "" {
		cfg.RuntimeParams["application_name"] = c.cfg.AppName
	}
	if c.cfg.Role == roleNaive {
		// The naive loop dials as most programs do, with pgx's own dialer; the relay and the
		// SQL-only reference (the relay's statements) use the relay's (internal/rawconn).
		d := net.Dialer{KeepAlive: 5 * time.Minute}
		cfg.DialFunc = d.DialContext
	}
	return cfg, nil
}

// dbCPU returns the CPU seconds used so far by the child's PostgreSQL backends (the server runs
// on this machine): its sessions are found by application_name, their CPU in /proc.
func (c *child) dbCPU() float64 {
	c.monMu.Lock()
	defer c.monMu.Unlock()
	if c.monitor == nil || c.cfg.AppName == "" {
		return 0
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	rows, err := c.monitor.Query(ctx, `SELECT pid FROM pg_stat_activity WHERE application_name IN ($1, $1 || ' marks')`, c.cfg.AppName)
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

// statm is /proc/self/statm, opened once: rss reads it again from its start (procfs makes the
// text anew at each read from offset 0). Opening, checking and closing it at each of the 50
// samples a second was 250 system calls a second in the measured process, a few per cent of a
// relay's CPU at 30 events a second.
var statm struct {
	sync.Mutex
	f   *os.File
	buf [128]byte
}

// rss returns the resident set size of this process, from /proc/self/statm.
func rss() int64 {
	statm.Lock()
	defer statm.Unlock()
	if statm.f == nil {
		f, err := os.Open("/proc/self/statm")
		if err != nil {
			return 0
		}
		statm.f = f
	}
	// A raw pread(2): the sampler runs 50 times a second in the measured process, and a read
	// through the scheduler (os.File.ReadAt) would wake the runtime's monitor thread each time
	// the process was idle, a cost the relay itself does not have (internal/rawconn).
	r, _, errno := syscall.RawSyscall6(syscall.SYS_PREAD64, statm.f.Fd(), uintptr(unsafe.Pointer(&statm.buf[0])), uintptr(len(statm.buf)), 0, 0, 0)
	n := int(r)
	if errno != 0 || n <= 0 {
		return 0
	}
	f := strings.Fields(string(statm.buf[:n]))
	if len(f) < 2 {
		return 0
	}
	pages, _ := strconv.ParseInt(f[1], 10, 64)
	return pages * int64(os.Getpagesize())
}

// hwm returns the peak resident set size of this process (VmHWM), in bytes.
func hwm() int64 { return procKB("/proc/self/status", "VmHWM") }

// procKB returns, in bytes, the sum of the fields named keys ("Name:  123 kB" lines) of a /proc
// file such as /proc/meminfo or /proc/self/status; 0 for a field or file it cannot read.
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

// relay wires relay.Relay as 'outbox-relay run' does (Prometheus metrics and kprom hooks included,
// no HTTP listener) and runs it until the expected rows are marked.
func (c *child) relay(ctx context.Context) (work, error) {
	connCfg, err := c.connConfig()
	if err != nil {
		return nil, err
	}
	metrics := prometheus.New("bench", "bench")
	kcfg := kafka.Config{Brokers: c.cfg.Brokers, Format: c.cfg.KafkaFormat, RecordTimestamp: c.cfg.RecordTimestamp}
	if c.cfg.Tracing != nil {
		if c.tracing, err = startChildTracing(ctx, *c.cfg.Tracing); err != nil {
			return nil, err
		}
		kcfg.Tracing = c.tracing.tp
	}
	// The daemon's producer metrics; in four runs at 1 KB they cost no CPU the noise shows.
	var sink interface {
		relay.Sink
		Ping(context.Context) error
		Close()
	}
	if c.cfg.ExactlyOnce {
		sink, err = kafka.NewTxPublisher(kcfg,
			kafka.TxConfig{TransactionalID: "bench-" + c.cfg.Schema, ProgressTopic: progressTopic(c.cfg.Schema), Identity: c.cfg.Schema},
			kafka.PublisherDeps{Tx: &txCounter{TxObserver: metrics, c: c}}, kgo.WithHooks(metrics.RelayKafkaHooks()))
	} else {
		sink, err = kafka.NewPublisher(kcfg, kgo.WithHooks(metrics.RelayKafkaHooks()))
	}
	if err != nil {
		return nil, err
	}
	pub := sink
	pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := pub.Ping(pctx); err != nil {
		return nil, err
	}
	table := postgres.Table{Schema: c.cfg.Schema}
	store, err := postgres.NewStore(connCfg, postgres.StoreConfig{Table: table, Mark: c.cfg.Mark, Transactions: c.cfg.ExactlyOnce, Linger: c.cfg.Relay.Linger})
	if err != nil {
		return nil, err
	}
	rcfg := relay.Config{
		BatchSize:        c.cfg.Relay.BatchSize,
		MaxInFlight:      c.cfg.Relay.MaxInFlight,
		MaxInFlightBytes: c.cfg.Relay.MaxInFlightBytes,
		PollInterval:     c.cfg.Relay.PollInterval,
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	c.stats = &relayStats{}
	obs := &countingObserver{Observer: metrics, c: c}
	var rsink relay.Sink = pub
	if c.cfg.Latency {
		rsink = &timingSink{Sink: pub, c: c}
	}
	relay, err := relay.New(rcfg, store, rsink, obs, log)
	if err != nil {
		return nil, err
	}
	return func(ctx context.Context) error {
		if c.tracing != nil {
			defer c.tracing.shutdown() // after the publisher closed: its last spans end as it closes
		}
		defer pub.Close()
		rctx, stop := context.WithCancel(ctx)
		defer stop()
		var wg sync.WaitGroup
		if c.cfg.Mark == postgres.MarkRetain && c.cfg.Retention > 0 {
			wg.Go(func() { c.purge(rctx, table) }) // the purge loop of 'outbox-relay run' in retain mode
		}
		errc := make(chan error, 1)
		go func() { errc <- relay.Run(rctx) }()
		if c.cfg.Expect > 0 {
			go func() {
				t := time.NewTicker(2 * time.Millisecond)
				defer t.Stop()
				for c.events.Load() < c.cfg.Expect && rctx.Err() == nil {
					<-t.C
				}
				c.freeze()
				stop()
			}()
		}
		err := <-errc
		stop()
		wg.Wait()
		return err
	}, nil
}

// purge deletes retained rows older than the retention, every second, as the daemon does.
func (c *child) purge(ctx context.Context, table postgres.Table) {
	pool, err := newPool(ctx, c.cfg.DatabaseURL, 1)
	if err != nil {
		return
	}
	defer pool.Close()
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		_, _ = postgres.Purge(ctx, pool, table, c.cfg.Retention, 5000)
	}
}

// freeze takes the report at the moment the expected work completed, so the shutdown is not
// counted.
func (c *child) freeze() {
	if c.cfg.Allocs != "" {
		if f, err := os.Create(c.cfg.Allocs); err == nil {
			_ = pprof.Lookup("allocs").WriteTo(f, 0)
			_ = f.Close()
		}
	}
	c.stopProfile()
	c.report()
	c.mu.Lock()
	c.frozen = true
	c.mu.Unlock()
}

func (c *child) stopProfile() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.profiling {
		pprof.StopCPUProfile()
		c.profiling = false
	}
}

// timingSink records when the relay hands each event to the producer, to split commit-to-ack
// latency into the relay's wake-up and claim (commit to publish) and the broker (publish to ack).
type timingSink struct {
	relay.Sink
	c *child
}

func (t *timingSink) Publish(ctx context.Context, m *relay.Message, done func(error)) error {
	now := time.Now().UnixNano()
	t.c.mu.Lock()
	if t.c.published == nil {
		t.c.published = make(map[int64]int64)
	}
	t.c.published[m.ID] = now
	t.c.mu.Unlock()
	return t.Sink.Publish(ctx, m, done)
}

// BeginBatch, EndBatch, Recover and Marked pass the optional ports of a transactional sink
// (exactly-once delivery) through; for another sink they do nothing.
func (t *timingSink) BeginBatch() {
	if be, ok := t.Sink.(relay.BatchEnder); ok {
		be.BeginBatch()
	}
}

// EndBatch implements relay.BatchEnder.
func (t *timingSink) EndBatch() {
	if be, ok := t.Sink.(relay.BatchEnder); ok {
		be.EndBatch()
	}
}

// Recover implements relay.Recoverer.
func (t *timingSink) Recover(ctx context.Context) ([]int64, error) {
	if rc, ok := t.Sink.(relay.Recoverer); ok {
		return rc.Recover(ctx)
	}
	return nil, nil
}

// Marked implements relay.MarkNoter.
func (t *timingSink) Marked(ids []int64) {
	if mn, ok := t.Sink.(relay.MarkNoter); ok {
		mn.Marked(ids)
	}
}

// txCounter counts the Kafka transactions committed, then passes every call on.
type txCounter struct {
	kafka.TxObserver
	c *child
}

func (t *txCounter) TxEnded(outcome string, rows int) {
	t.TxObserver.TxEnded(outcome, rows)
	if outcome == kafka.TxCommitted {
		t.c.mu.Lock()
		if t.c.stats != nil {
			t.c.stats.Transactions++
		}
		t.c.mu.Unlock()
	}
}

// countingObserver counts marked rows and records commit-to-ack latencies, then passes every
// call on to the relay's Prometheus metrics.
type countingObserver struct {
	relay.Observer
	c *child
}

func (o *countingObserver) Acked(m *relay.Message, at time.Time) {
	o.Observer.Acked(m, at)
	if o.c.cfg.Latency {
		d := float64(at.Sub(m.CreatedAt)) / float64(time.Millisecond)
		o.c.mu.Lock()
		o.c.lat = append(o.c.lat, d)
		o.c.acks = append(o.c.acks, ack{EventID: m.EventID, At: at.UnixNano(), Published: o.c.published[m.ID]})
		delete(o.c.published, m.ID)
		o.c.mu.Unlock()
	}
}

func (o *countingObserver) Marked(n int, took time.Duration) {
	o.Observer.Marked(n, took)
	o.c.mu.Lock()
	o.c.stats.Marks++
	o.c.stats.MarkSec += took.Seconds()
	if o.c.cfg.Timings {
		o.c.stats.MarkMS = append(o.c.stats.MarkMS, float64(took)/float64(time.Millisecond))
	}
	o.c.mu.Unlock()
	o.c.events.Add(int64(n))
}

func (o *countingObserver) Claimed(n int, took time.Duration) {
	o.Observer.Claimed(n, took)
	o.c.mu.Lock()
	o.c.stats.Claims++
	o.c.stats.ClaimRows += int64(n)
	o.c.stats.ClaimSec += took.Seconds()
	if o.c.cfg.Timings {
		o.c.stats.ClaimMS = append(o.c.stats.ClaimMS, float64(took)/float64(time.Millisecond))
	}
	if n == 0 {
		o.c.stats.EmptyClaim++
	}
	o.c.mu.Unlock()
}

// acked records, in latency runs, that the broker acknowledged events at at, handed to the
// producer at published (zero: not known), for the baselines' commit-to-ack latencies.
func (c *child) acked(events []string, published, at time.Time) {
	if !c.cfg.Latency {
		return
	}
	var pub int64
	if !published.IsZero() {
		pub = published.UnixNano()
	}
	c.mu.Lock()
	for _, e := range events {
		c.acks = append(c.acks, ack{EventID: e, At: at.UnixNano(), Published: pub})
	}
	c.mu.Unlock()
}

// producerOpts are the producer settings of kafka.Publisher, for the baselines.
func producerOpts(brokers []string) []kgo.Opt {
	return []kgo.Opt{
		kgo.SeedBrokers(brokers...),
		kgo.RequiredAcks(kgo.AllISRAcks()),
		kgo.ProducerLinger(0),
		kgo.ProducerBatchCompression(kgo.NoCompression()),
	}
}

// naive is the one-loop relay many projects start with: in one transaction, lock the oldest
// 1000 rows, produce them synchronously, delete them, commit.
func (c *child) naive(ctx context.Context) (work, error) {
	connCfg, err := c.connConfig()
	if err != nil {
		return nil, err
	}
	conn, err := pgx.ConnectConfig(ctx, connCfg)
	if err != nil {
		return nil, err
	}
	cl, err := kgo.NewClient(append(producerOpts(c.cfg.Brokers), kgo.MaxBufferedRecords(1<<20))...)
	if err != nil {
		return nil, err
	}
	t := pgx.Identifier{c.cfg.Schema, "outbox"}.Sanitize()
	sel := `SELECT id, event_id::text, aggregate_type, aggregate_id, event_type, payload, occurred_at
		FROM ` + t + ` ORDER BY id LIMIT 1000 FOR UPDATE SKIP LOCKED`
	del := `DELETE FROM ` + t + ` WHERE id = ANY($1)`
	return func(ctx context.Context) error {
		defer cl.Close()
		defer conn.Close(context.Background())
		for ctx.Err() == nil {
			n, err := c.naiveBatch(ctx, conn, cl, sel, del)
			if err != nil {
				return stopped(ctx, err)
			}
			c.events.Add(int64(n))
			if c.cfg.Expect > 0 && c.events.Load() >= c.cfg.Expect {
				c.freeze()
				return nil
			}
			if n == 0 {
				time.Sleep(10 * time.Millisecond)
			}
		}
		return nil
	}, nil
}

func (c *child) naiveBatch(ctx context.Context, conn *pgx.Conn, cl *kgo.Client, sel, del string) (int, error) {
	tx, err := conn.Begin(ctx)
	if err != nil {
		return 0, err
	}
	defer func() { _ = tx.Rollback(context.Background()) }()
	rows, err := tx.Query(ctx, sel)
	if err != nil {
		return 0, err
	}
	var ids []int64
	var events []string
	var recs []*kgo.Record
	for rows.Next() {
		var id int64
		var eventID, aggType, aggID, evType string
		var payload []byte
		var occurred time.Time
		if err := rows.Scan(&id, &eventID, &aggType, &aggID, &evType, &payload, &occurred); err != nil {
			return 0, err
		}
		ids = append(ids, id)
		events = append(events, eventID)
		recs = append(recs, &kgo.Record{Topic: "outbox.event." + aggType, Key: []byte(aggID), Value: payload,
			Headers: []kgo.RecordHeader{
				{Key: kafka.HeaderEventID, Value: []byte(eventID)},
				{Key: kafka.HeaderEventType, Value: []byte(evType)},
				{Key: kafka.HeaderAggregateType, Value: []byte(aggType)},
				{Key: kafka.HeaderOccurredAt, Value: []byte(occurred.UTC().Format(time.RFC3339Nano))},
			}})
	}
	if err := rows.Err(); err != nil {
		return 0, err
	}
	if len(ids) == 0 {
		return 0, tx.Commit(ctx)
	}
	published := time.Now()
	if err := cl.ProduceSync(ctx, recs...).FirstErr(); err != nil {
		return 0, err
	}
	c.acked(events, published, time.Now())
	if _, err := tx.Exec(ctx, del, ids); err != nil {
		return 0, err
	}
	return len(ids), tx.Commit(ctx)
}

// sqlOnly claims and marks with the relay's own Store, in the relay's batch size, with no broker:
// the database's share of the relay's work, done serially on one connection.
func (c *child) sqlOnly(ctx context.Context) (work, error) {
	connCfg, err := c.connConfig()
	if err != nil {
		return nil, err
	}
	store, err := postgres.NewStore(connCfg, postgres.StoreConfig{Table: postgres.Table{Schema: c.cfg.Schema}, Mark: c.cfg.Mark})
	if err != nil {
		return nil, err
	}
	sess, err := store.Open(ctx)
	if err != nil {
		return nil, err
	}
	// Marks commit only while the session leads, as the relay's do.
	if ok, err := sess.TryLead(ctx); err != nil || !ok {
		return nil, fmt.Errorf("sql-only: take the leadership: %v", err)
	}
	cfg := relay.Config{BatchSize: c.cfg.Relay.BatchSize, MaxInFlightBytes: c.cfg.Relay.MaxInFlightBytes}.WithDefaults()
	return func(ctx context.Context) error {
		defer func() { _ = sess.Close(context.Background()) }()
		ids := make([]int64, 0, cfg.BatchSize)
		rowBytes := 0
		var from int64
		var done []*relay.Message
		for ctx.Err() == nil {
			// Each batch is marked before the next claim: nothing in flight to skip. Like the
			// relay, ask for no more rows than the byte budget takes: the database would read and
			// send the others only for them to be dropped.
			limit := cfg.BatchSize
			if rowBytes > 0 {
				limit = max(1, min(limit, cfg.MaxInFlightBytes/rowBytes+1))
			}
			// Like the relay, start past the rows already marked, but never past the horizon.
			// A stop cancels ctx: whichever statement it lands in, the work ends without error.
			horizon, err := sess.Horizon(ctx)
			if err != nil && !errors.Is(err, relay.ErrNoHorizon) {
				return stopped(ctx, err)
			}
			rows, err := sess.Claim(ctx, from, nil, limit, cfg.MaxInFlightBytes, nil)
			if err != nil {
				return stopped(ctx, err)
			}
			if len(rows) == 0 {
				from = max(from, horizon+1)
				time.Sleep(10 * time.Millisecond)
				continue
			}
			// Every row from from to the last one returned was returned, and is marked below.
			from = max(from, min(horizon+1, rows[len(rows)-1].ID+1))
			ids = ids[:0]
			size := 0
			for i := range rows {
				ids = append(ids, rows[i].ID)
				size += rows[i].Size()
			}
			rowBytes = max(1, size/len(rows))
			if err := sess.Mark(ctx, ids); err != nil {
				return stopped(ctx, err)
			}
			if c.cfg.Latency { // no broker: the mark stands for the acknowledgement
				events := make([]string, len(rows))
				for i := range rows {
					events[i] = rows[i].EventID
				}
				c.acked(events, time.Time{}, time.Now())
			}
			if rel, ok := sess.(relay.Releaser); ok { // as the relay does once rows are marked
				done = done[:0]
				for i := range rows {
					done = append(done, &rows[i])
				}
				rel.Release(done)
			}
			c.events.Add(int64(len(ids)))
			if c.cfg.Expect > 0 && c.events.Load() >= c.cfg.Expect {
				c.freeze()
				return nil
			}
		}
		return nil
	}, nil
}

// stopped returns nil when ctx ended (the child was told to stop: err is that), else err.
func stopped(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return nil
	}
	return err
}

// produce sends Events records shaped like the relay's (key, value, the four headers) with the
// relay's producer settings and at most MaxInFlight records unacknowledged, with no database.
func (c *child) produce(ctx context.Context) (work, error) {
	inflight := relay.Config{MaxInFlight: c.cfg.Relay.MaxInFlight, BatchSize: c.cfg.Relay.BatchSize}.WithDefaults().MaxInFlight
	opts := append(producerOpts(c.cfg.Brokers), kgo.MaxBufferedRecords(inflight))
	if c.cfg.Rate > 0 {
		// The relay's floor: its sockets, as the relay's Kafka adapter dials them.
		var d net.Dialer
		opts = append(opts, kgo.Dialer(rawconn.Dial(d.DialContext)))
	}
	cl, err := kgo.NewClient(opts...)
	if err != nil {
		return nil, err
	}
	pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := cl.Ping(pctx); err != nil {
		return nil, err
	}
	keys := make([][]byte, max(c.cfg.Keys, 1))
	for i := range keys {
		keys[i] = []byte(strconv.Itoa(i))
	}
	now := []byte(time.Now().UTC().Format(time.RFC3339Nano))
	record := func(i int64) *kgo.Record {
		off := payloadOffset(i, c.cfg.PayloadSize)
		return &kgo.Record{Topic: topic, Key: keys[i%int64(len(keys))], Value: slab()[off : off+int64(c.cfg.PayloadSize)],
			Headers: []kgo.RecordHeader{
				{Key: kafka.HeaderEventID, Value: []byte(newUUID())},
				{Key: kafka.HeaderEventType, Value: []byte("bench.created")},
				{Key: kafka.HeaderAggregateType, Value: []byte("bench")},
				{Key: kafka.HeaderOccurredAt, Value: now},
			}}
	}
	if c.cfg.Rate > 0 {
		return c.producePaced(cl, record), nil
	}
	return func(ctx context.Context) error {
		defer cl.Close()
		var failed atomic.Value
		for i := int64(1); i <= c.cfg.Events && ctx.Err() == nil; i++ {
			rec := record(i)
			cl.Produce(ctx, rec, func(_ *kgo.Record, err error) {
				if err != nil {
					failed.CompareAndSwap(nil, err)
					return
				}
				c.events.Add(1)
			})
		}
		return c.endProduce(ctx, cl, &failed)
	}, nil
}

// endProduce ends a produce run: it waits for the acknowledgements of every record handed
// over, returns the first failure, if any, and otherwise prints the final report.
func (c *child) endProduce(ctx context.Context, cl *kgo.Client, failed *atomic.Value) error {
	if err := cl.Flush(ctx); err != nil && ctx.Err() == nil {
		return err
	}
	if err, _ := failed.Load().(error); err != nil {
		return err
	}
	c.freeze()
	return nil
}

// producePaced is the produce role at c.cfg.Rate records a second: once every c.cfg.Every it
// hands the producer the records due by then, as a relay would hand over what one claim (or a
// stream of committed rows) returned, and it records each record's produce-to-ack latency. Its
// CPU is what publishing alone costs at that rate and cadence: the floor of any relay built on
// the same producer, however it reads the outbox.
func (c *child) producePaced(cl *kgo.Client, record func(i int64) *kgo.Record) work {
	every := c.cfg.Every
	if every <= 0 {
		every = time.Millisecond
	}
	return func(ctx context.Context) error {
		defer cl.Close()
		var failed atomic.Value
		// Paced on the timer the relay's linger uses (internal/hrtimer, a timerfd unless
		// OUTBOX_RAW_IO=off), so the floor wakes as the relay does: Go's ticker rounds its
		// sleeps down to whole milliseconds and would add a wake-up per hand-over.
		tm := hrtimer.New()
		defer tm.Close()
		start := time.Now()
		next := start
		for i := int64(0); i < c.cfg.Events && ctx.Err() == nil; {
			next = next.Add(every)
			if err := tm.Sleep(ctx, time.Until(next)); err != nil {
				break
			}
			due := min(c.cfg.Events, int64(time.Since(start).Seconds()*c.cfg.Rate))
			for ; i < due; i++ {
				at := time.Now()
				cl.Produce(ctx, record(i+1), func(_ *kgo.Record, err error) {
					if err != nil {
						failed.CompareAndSwap(nil, err)
						return
					}
					d := float64(time.Since(at).Nanoseconds()) / 1e6
					c.mu.Lock()
					c.lat = append(c.lat, d)
					c.mu.Unlock()
					c.events.Add(1)
				})
			}
		}
		return c.endProduce(ctx, cl, &failed)
	}
}

// newUUID returns a random (version 4) UUID in text form.
func newUUID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:])
}
