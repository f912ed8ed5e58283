// Command bench measures outbox-relay on this machine, with its baselines in the same run, and
// writes results.json and PNG charts.
//
// Every measured party runs in a process of its own, started from this binary: the broker (a kfake
// cluster), the relay (relay.Relay with postgres.Store and kafka.Publisher, wired as 'outbox-relay
// run' wires it) and each baseline. CPU time and memory are read from the measured process only
// (getrusage, /proc/self). The writers and the coordinator run in this process.
//
//	go run ./bench -scale 1 -out bench/results
//
// -scale smoke runs every section at a tiny size in well under a minute; -scale 1 is the full
// size (1M-event drains); fractions such as 0.25 shrink every section proportionally.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
)

// databaseURLDefault is the database used when neither -db nor OUTBOX_BENCH_DATABASE_URL is set.
const databaseURLDefault = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"

func main() {
	if cfg := os.Getenv(childEnv); cfg != "" {
		if err := runChild(cfg); err != nil {
			fmt.Fprintln(os.Stderr, "bench child:", err)
			os.Exit(1)
		}
		return
	}
	opts, err := parseFlags(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	if opts.Replot {
		if err := replot(opts); err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
			os.Exit(1)
		}
		return
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if _, err := run(ctx, opts, log.New(os.Stderr, "", log.Ltime)); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// options are the command line of the benchmark.
type options struct {
	// RelayBin is the outbox-relay binary of the outboxes section.
	RelayBin    string
	ScaleName   string
	Scale       scale
	DatabaseURL string
	Out         string
	Sections    []string
	Partitions  int
	Profile     bool
	NoSettle    bool
	// LatencyOnly makes the steady section measure only the latency with the wake-up at
	// 1,000 events/s, LatencyRepeats times, with the notifications per commit (quick A/B runs).
	LatencyOnly    bool
	LatencyRepeats int
	// LatencyRates are the offered rates (events/s) of the latency-only runs; each repeat runs
	// every one, in order. Default 1,000.
	LatencyRates []float64
	// ProduceFloor are the cadences of the produce-floor runs beside each latency-only run: a
	// bare producer publishing at the same rate, the records due handed over once per cadence.
	ProduceFloor []time.Duration
	// Tail makes the steady section run only the tail runs (bench/tail.go), this many times.
	Tail     int
	Replot   bool
	Repeat   int      // runs of every drain variant but produce-only, per case
	Variants []string // the drain variants to run; all when empty
	ChildExe string   // the binary of the measured children; this one when empty
	// WatermillExe is the binary of the Watermill baseline (bench/watermill, a module of its
	// own); the variant is skipped when it is missing.
	WatermillExe string
	// MaxInFlightBytes is the relay's relay.max_in_flight_bytes in the drains; 0: its default.
	MaxInFlightBytes int
	// Linger is every relay child's relay.linger; 0: its default.
	Linger time.Duration
	// BrokerLog is where the broker keeps its log: brokerLogMemory, or a directory its segment
	// files go to (by default brokerLogTmpfs where it exists).
	BrokerLog string
	// DrainMark is how the relay and the SQL-only baseline mark rows in the drains:
	// postgres.MarkDelete (the default) or postgres.MarkRetain. The naive loop always deletes.
	DrainMark string
}

// The broker's log. kfake keeps it in memory by default, growing each partition's segment by
// doubling a byte slice: every doubling copies what the partition holds, and in a 16 KB drain
// those copies were most of the broker's CPU, all of it on the path of every variant's produce
// requests (one kfake goroutine handles them), where a Kafka broker appends to a file through
// the page cache. In files on a tmpfs, kfake appends as Kafka does, without disk writes.
const (
	brokerLogMemory = "memory"
	brokerLogTmpfs  = "/dev/shm"
)

// sections, in the order they run.
var allSections = []string{"drain", "steady", "sidecar", "peers", "features", "write", "health", "memory", "outboxes", "live"}

func parseFlags(args []string) (options, error) {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	scaleFlag := fs.String("scale", "smoke", "smoke (under a minute), or a factor of the full size: 1 = 1M-event drains (about 20 minutes here)")
	db := fs.String("db", "", "PostgreSQL URL (default $OUTBOX_BENCH_DATABASE_URL, else "+databaseURLDefault+")")
	out := fs.String("out", "bench/results", "directory for results.json and the PNG charts")
	only := fs.String("only", strings.Join(allSections, ","), "sections to run, comma-separated: "+strings.Join(allSections, ","))
	partitions := fs.Int("partitions", 6, "partitions of the bench topic")
	cases := fs.String("cases", "", "drain cases to run, as payload/keys pairs (e.g. 256/100,16384/1); default every case of the scale")
	replot := fs.Bool("replot", false, "measure nothing: redraw the charts and tables.md from the results.json in -out")
	writeRepeats := fs.Int("write-repeats", 0, "rounds of the write-cost section's modes (0: the scale's, 2 at any factor, 1 for smoke)")
	latencyOnly := fs.Int("latency-only", 0, "steady section: skip the rate search and the polling modes; measure the latency with the wake-up at 1,000 events/s this many times, with the notifications per commit and the load average (quick A/B runs; 0: the whole section)")
	produceFloor := fs.String("produce-floor", "", "with -latency-only: after each run, a bare franz-go producer publishes at the same rate for as long, the records due handed over once per each of these comma-separated cadences (e.g. 1ms,3ms); its CPU is the floor of any relay on this producer, however it reads the outbox")
	latencyRates := fs.String("latency-rates", "1000", "with -latency-only: the offered rates of its runs, events/s, comma-separated (each repeat runs every one, in order), to read what the relay costs at each")
	tail := fs.Int("tail", 0, "steady section: run only the tail runs this many times: commit-to-ack and commit-to-consume (a consumer process of its own) at 1,000 events/s one per transaction and 5,000 events/s ten per transaction, the relay as deployed, pinned to one CPU and with GOMAXPROCS=1, with the other processes' CPU share during each run (0: off)")
	noSettle := fs.Bool("no-settle", false, "start each section at once, without waiting for checkpoints, autovacuum and dirty pages (quick A/B runs)")
	profile := fs.Bool("profile", false, "write a CPU profile of the relay during the 256 B, 100-key drain (relay-cpu.pprof), and what it allocated (relay-allocs.pprof)")
	repeat := fs.Int("repeat", 1, "runs of the sql-only, naive and relay drains per case, in alternating order; tables and targets take the median")
	childExe := fs.String("child-exe", "", "binary of the measured children (the relay and the baselines), built with -tags benchchild; default this binary")
	maxBytes := fs.Int("max-in-flight-bytes", 0, "the relay's relay.max_in_flight_bytes in the drains (default the relay's own)")
	linger := fs.Duration("linger", 0, "the relay's relay.linger in every section (default the relay's own)")
	watermillExe := fs.String("watermill-exe", watermillExeDefault, "binary of the Watermill baseline, built from its own module: go build -C bench/watermill -o \"$PWD/bin/bench-watermill\" . (the watermill variant is skipped when it is missing)")
	variants := fs.String("variants", "", "drain variants to run, comma-separated: "+strings.Join(drainVariants, ",")+" (default all)")
	drainMark := fs.String("drain-mark", postgres.MarkDelete, "how the relay and the SQL-only baseline mark rows in the drains: "+postgres.MarkDelete+" (the default) or "+postgres.MarkRetain+" (rows kept with dispatched_at set; no purge runs during a drain; the naive loop always deletes)")
	brokerLog := fs.String("broker-log", "", "where the broker (kfake) keeps its log: a directory for its segment files (a fresh one inside it per broker), or "+brokerLogMemory+" for kfake's in-memory log (default "+brokerLogTmpfs+" where it exists, else "+brokerLogMemory+")")
	liveRepeats := fs.Int("live-repeats", 0, "rounds of the live section's two modes (0: the scale's, 3 at any factor, 1 for smoke)")
	sidecarRuns := fs.Int("sidecar-runs", 0, "runs of the sidecar section at 1,000 events/s, each followed by a bare producer at the relay's cadence (0: the scale's, 5 at any factor, 1 for smoke)")
	relayBin := fs.String("relay-bin", "bin/outbox-relay", "the outbox-relay binary the outboxes section runs, and the sidecar section idle (make build writes it)")
	if err := fs.Parse(args); err != nil {
		return options{}, err
	}
	o := options{RelayBin: *relayBin, ScaleName: *scaleFlag, DatabaseURL: *db, Out: *out, Partitions: *partitions, Profile: *profile, NoSettle: *noSettle, Replot: *replot,
		LatencyOnly: *latencyOnly > 0, LatencyRepeats: *latencyOnly, Tail: *tail,
		Repeat: *repeat, ChildExe: *childExe, WatermillExe: *watermillExe, MaxInFlightBytes: *maxBytes, Linger: *linger, BrokerLog: *brokerLog, DrainMark: *drainMark}
	for _, f := range strings.Split(*latencyRates, ",") {
		r, err := strconv.ParseFloat(strings.TrimSpace(f), 64)
		if err != nil || r < 1 || r > 100000 {
			return o, fmt.Errorf("-latency-rates: each rate must be a number of events/s between 1 and 100000, got %q", f)
		}
		o.LatencyRates = append(o.LatencyRates, r)
	}
	if *produceFloor != "" {
		for _, f := range strings.Split(*produceFloor, ",") {
			d, err := time.ParseDuration(strings.TrimSpace(f))
			if err != nil || d < time.Millisecond || d > time.Second {
				return o, fmt.Errorf("-produce-floor: each cadence must be a duration between 1ms and 1s, got %q", f)
			}
			o.ProduceFloor = append(o.ProduceFloor, d)
		}
	}
	if o.Repeat < 1 || o.Repeat > 20 {
		return o, fmt.Errorf("-repeat: must be between 1 and 20, got %d", o.Repeat)
	}
	if o.BrokerLog == "" {
		o.BrokerLog = brokerLogMemory
		if st, err := os.Stat(brokerLogTmpfs); err == nil && st.IsDir() {
			o.BrokerLog = brokerLogTmpfs
		}
	}
	if o.BrokerLog != brokerLogMemory {
		if st, err := os.Stat(o.BrokerLog); err != nil || !st.IsDir() {
			return o, fmt.Errorf("-broker-log: %q is not a directory (or %q)", o.BrokerLog, brokerLogMemory)
		}
	}
	if o.DrainMark != postgres.MarkDelete && o.DrainMark != postgres.MarkRetain {
		return o, fmt.Errorf("-drain-mark: must be %s or %s, got %q", postgres.MarkDelete, postgres.MarkRetain, o.DrainMark)
	}
	if o.Linger != 0 {
		if err := postgres.LingerRange.Check("-linger", o.Linger); err != nil {
			return o, err
		}
	}
	if o.MaxInFlightBytes < 0 {
		return o, fmt.Errorf("-max-in-flight-bytes: must not be negative, got %d", o.MaxInFlightBytes)
	}
	if *variants != "" {
		for _, v := range strings.Split(*variants, ",") {
			v = strings.TrimSpace(v)
			if !slices.Contains(drainVariants, v) {
				return o, fmt.Errorf("-variants: unknown variant %q (allowed: %s)", v, strings.Join(drainVariants, ","))
			}
			o.Variants = append(o.Variants, v)
		}
	}
	if o.DatabaseURL == "" {
		o.DatabaseURL = os.Getenv("OUTBOX_BENCH_DATABASE_URL")
	}
	if o.DatabaseURL == "" {
		o.DatabaseURL = databaseURLDefault
	}
	sc, err := parseScale(*scaleFlag)
	if err != nil {
		return o, err
	}
	if *cases != "" {
		var keep []drainCase
		for _, c := range strings.Split(*cases, ",") {
			var p, k int
			if _, err := fmt.Sscanf(strings.TrimSpace(c), "%d/%d", &p, &k); err != nil {
				return o, fmt.Errorf("-cases: %q is not payload/keys", c)
			}
			n := sc.DrainSmall
			if p > 1<<10 {
				n = sc.DrainLarge
			}
			keep = append(keep, drainCase{Payload: p, Keys: k, Events: n})
		}
		sc.Matrix = keep
	}
	o.Scale = sc
	if *sidecarRuns > 0 {
		o.Scale.SidecarRuns = *sidecarRuns
	}
	if *liveRepeats > 0 {
		o.Scale.LiveRepeats = *liveRepeats
	}
	if *writeRepeats > 0 {
		o.Scale.WriteRepeats = *writeRepeats
	}
	for _, s := range strings.Split(*only, ",") {
		s = strings.TrimSpace(s)
		if !slices.Contains(allSections, s) {
			return o, fmt.Errorf("-only: unknown section %q (allowed: %s)", s, strings.Join(allSections, ","))
		}
		o.Sections = append(o.Sections, s)
	}
	if o.Partitions < 1 || o.Partitions > 1000 {
		return o, fmt.Errorf("-partitions: must be between 1 and 1000, got %d", o.Partitions)
	}
	return o, nil
}

// scale sizes every section.
type scale struct {
	Factor       float64       `json:"factor"`
	DrainSmall   int64         `json:"drain_events_small"` // events in the 256 B and 1 KB drains (1M at full size)
	DrainLarge   int64         `json:"drain_events_large"` // events in the 16 KB drains (100k at full size)
	Matrix       []drainCase   `json:"-"`
	Step         time.Duration `json:"steady_step"`     // duration of one offered rate in the search
	LatencyRun   time.Duration `json:"latency_run"`     // duration of one latency measurement
	WriteRun     time.Duration `json:"write_run"`       // duration of one write-cost measurement
	WriteRepeats int           `json:"write_repeats"`   // alternations of trigger on and off
	HealthEvents int64         `json:"health_events"`   // events through the relay per mark mode (1M at full size)
	Backlog      int64         `json:"memory_backlog"`  // rows preloaded for the memory run (5M at full size)
	MaxRate      int           `json:"steady_max_rate"` // the search stops here
	LiveBacklog  int64         `json:"live_backlog"`    // rows of the live-backlog section's backlog (200k at full size)
	LiveRepeats  int           `json:"live_repeats"`    // rounds of its two modes
	SidecarRuns  int           `json:"sidecar_runs"`    // runs at 1,000 events/s in the sidecar section
	IdleWarm     time.Duration `json:"idle_warm"`       // the idle relay's start-up, not measured
	IdleRun      time.Duration `json:"idle_run"`        // how long the idle relay is measured
}

// drainCase is one payload size and key count of the drain matrix.
type drainCase struct {
	Payload int   `json:"payload_bytes"`
	Keys    int   `json:"keys"`
	Events  int64 `json:"events"`
}

func parseScale(s string) (scale, error) {
	if s == "smoke" {
		sc := scale{Factor: 0, DrainSmall: 2000, DrainLarge: 500, Step: time.Second,
			LatencyRun: time.Second, WriteRun: time.Second, WriteRepeats: 1, HealthEvents: 2000,
			Backlog: 4000, MaxRate: 1000, LiveBacklog: 2000, LiveRepeats: 1,
			SidecarRuns: 1, IdleWarm: time.Second, IdleRun: 2 * time.Second}
		sc.Matrix = []drainCase{{256, 100, sc.DrainSmall}, {16 << 10, 1, sc.DrainLarge}}
		return sc, nil
	}
	f, err := strconv.ParseFloat(s, 64)
	if err != nil || f <= 0 || f > 10 {
		return scale{}, fmt.Errorf("-scale: must be smoke or a factor in (0, 10], got %q", s)
	}
	sc := scale{
		Factor:       f,
		DrainSmall:   max(int64(1e6*f), 1000),
		DrainLarge:   max(int64(1e5*f), 100),
		Step:         max(time.Duration(float64(12*time.Second)*f), 3*time.Second),
		LatencyRun:   max(time.Duration(float64(20*time.Second)*f), 4*time.Second),
		WriteRun:     max(time.Duration(float64(10*time.Second)*f), 3*time.Second),
		WriteRepeats: 2,
		HealthEvents: max(int64(1e6*f), 1000),
		Backlog:      max(int64(5e6*f), 1000),
		MaxRate:      64000,
		LiveBacklog:  max(int64(2e5*f), 1000),
		LiveRepeats:  3,
		SidecarRuns:  5,
		IdleWarm:     10 * time.Second,
		IdleRun:      max(time.Duration(float64(2*time.Minute)*f), 20*time.Second),
	}
	for _, p := range []int{256, 1 << 10, 16 << 10} {
		for _, k := range []int{1, 100, 10000} {
			n := sc.DrainSmall
			if p == 16<<10 {
				n = sc.DrainLarge
			}
			sc.Matrix = append(sc.Matrix, drainCase{p, k, n})
		}
	}
	return sc, nil
}

// bench is one run of the benchmark.
type bench struct {
	opts options
	log  *log.Logger
	pool *pgxpool.Pool
	res  *results
	exe  string
	watermillState
	coll *collector // the OTLP receiver of the tracing variants, started at the first
}

// run runs the sections of opts and writes results.json and the charts into opts.Out.
func run(ctx context.Context, opts options, lg *log.Logger) (*results, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	pool, err := newPool(ctx, opts.DatabaseURL, 16)
	if err != nil {
		return nil, err
	}
	defer pool.Close()
	if err := os.MkdirAll(opts.Out, 0o755); err != nil {
		return nil, err
	}
	b := &bench{opts: opts, log: lg, pool: pool, exe: exe, res: &results{Scale: opts.ScaleName, Sizes: opts.Scale,
		Started: time.Now().UTC(), Partitions: opts.Partitions, RelayMaxInFlightBytes: opts.MaxInFlightBytes, BrokerLog: opts.BrokerLog, DrainMark: opts.DrainMark}}
	b.res.Machine = machineInfo(ctx, pool)
	defer func() { b.coll.close() }()
	sections := map[string]func(context.Context) error{
		"drain": b.drain, "steady": b.steady, "sidecar": b.sidecar, "peers": b.peers, "features": b.features, "write": b.writeCost, "health": b.health, "memory": b.memory, "outboxes": b.outboxes, "live": b.live,
	}
	var errs []error
	for _, s := range allSections {
		if !slices.Contains(opts.Sections, s) || ctx.Err() != nil {
			continue
		}
		if !opts.NoSettle {
			b.settle(ctx)
		}
		start := time.Now()
		lg.Printf("section %s", s)
		if err := sections[s](ctx); err != nil {
			errs = append(errs, fmt.Errorf("section %s: %w", s, err))
			lg.Printf("section %s failed: %v", s, err)
		}
		lg.Printf("section %s done in %s", s, time.Since(start).Round(time.Second))
		if err := b.save(); err != nil {
			return b.res, err
		}
	}
	b.res.Finished = time.Now().UTC()
	b.res.Targets = b.targets()
	if err := b.save(); err != nil {
		return b.res, err
	}
	if err := b.charts(); err != nil {
		errs = append(errs, fmt.Errorf("charts: %w", err))
	}
	if err := b.writeTables(); err != nil {
		errs = append(errs, fmt.Errorf("tables: %w", err))
	}
	b.summary(os.Stdout)
	return b.res, errors.Join(errs...)
}

// replot redraws the charts and tables of a results.json.
func replot(opts options) error {
	data, err := os.ReadFile(filepath.Join(opts.Out, "results.json"))
	if err != nil {
		return err
	}
	b := &bench{opts: opts, res: &results{}}
	if err := json.Unmarshal(data, b.res); err != nil {
		return fmt.Errorf("results.json: %w", err)
	}
	b.opts.ScaleName = b.res.Scale
	b.opts.Scale.Matrix = nil
	for _, d := range b.res.Drain {
		if !slices.Contains(b.opts.Scale.Matrix, d.drainCase) {
			b.opts.Scale.Matrix = append(b.opts.Scale.Matrix, d.drainCase)
		}
	}
	if err := b.charts(); err != nil {
		return err
	}
	return b.writeTables()
}

// save writes results.json.
func (b *bench) save() error {
	data, err := json.MarshalIndent(b.res, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(b.opts.Out, "results.json"), append(data, '\n'), 0o644)
}

// newPool opens a pool of at most size connections.
func newPool(ctx context.Context, url string, size int32) (*pgxpool.Pool, error) {
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, errors.New("database url: invalid connection string")
	}
	cfg.MaxConns = size
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, err
	}
	pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := pool.Ping(pctx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("database unreachable: %w", err)
	}
	return pool, nil
}
