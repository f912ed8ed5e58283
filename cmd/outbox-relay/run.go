package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	prom "github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/adapters/kafka"
	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/adapters/prometheus"
	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/internal/backoff"
	"github.com/outbox-relay/outbox-relay/internal/hrtimer"
	"github.com/outbox-relay/outbox-relay/internal/procs"
	"github.com/outbox-relay/outbox-relay/internal/rawconn"
)

func runCmd(ctx context.Context, args []string, _, stderr io.Writer) error {
	fs := newFlagSet("run", "Run the relay: publish committed outbox rows to Kafka until SIGTERM or SIGINT.", stderr)
	addFlags(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg, v, err := loadConfig(fs)
	if cfg != nil {
		err = joinNew(err, cfg.requireOutboxes()) // every mistake in one report
	}
	if err != nil {
		return err
	}
	log := newLogger(stderr, cfg.LogLevel, cfg.LogFormat, secretsOf(cfg)...)
	log.Info("config loaded", "version", version, "config", redacted(v))
	spans := &spanCounts{}
	tp, stopTracing, err := setupTracing(ctx, os.Getenv, log, "outbox-relay", spans)
	if err != nil {
		return err
	}
	defer stopTracing()
	cfg.Kafka.Tracing = tp
	for _, oc := range cfg.Outboxes { // every outbox's publisher traces with the process's provider
		oc.Kafka.Tracing = tp
	}
	if tp != nil {
		cfg.tracingSpans = spans
	}
	setMemoryLimit(cfg, tp != nil, os.Getenv, log)
	// Off is the exception an operator chose (or a platform without raw calls): say it at info.
	level := slog.LevelDebug
	if !rawconn.Enabled() {
		level = slog.LevelInfo
	}
	log.Log(ctx, level, "socket reads and writes", "raw", rawconn.Enabled(), "linger_timerfd", hrtimer.Enabled(), "switch", rawconn.EnvVar)
	stopProcs := procs.Start(ctx, log) // one P while the relay uses little CPU (internal/procs)
	defer stopProcs()
	// Started: what start-up touched of the binary is no longer needed resident.
	return serve(ctx, cfg, log, func(*daemon) {
		n, err := releaseStartupPages()
		if err != nil {
			log.Warn("could not release the start-up pages of the binary", "err", err)
			return
		}
		log.Debug("released the start-up pages of the binary", "bytes", n)
	})
}

// daemon is a running relay process: the relays of its outboxes and the HTTP listener.
type daemon struct {
	cfg      *Config
	log      *slog.Logger
	reg      *prom.Registry
	balance  *balancer // nil unless the configuration lists outboxes
	server   *http.Server
	listener net.Listener

	mu       sync.Mutex
	outboxes []*served        // the outboxes whose relay is wired (guarded by mu once serving)
	waiting  map[string]error // outboxes: listed but not started yet, with the reason (guarded by mu)
}

// started returns the outboxes whose relay is wired.
func (d *daemon) started() []*served {
	d.mu.Lock()
	defer d.mu.Unlock()
	return slices.Clone(d.outboxes)
}

// served is one outbox's relay with its dependencies, as wired by startOutbox.
type served struct {
	cfg       *Config
	log       *slog.Logger
	pool      *pgxpool.Pool
	publisher relaySink
	store     relay.Store
	metrics   *prometheus.Metrics
	broker    *brokerCheck
	leading   *leaderClock
	rel       atomic.Pointer[relay.Relay]
	yieldMu   sync.Mutex
	yieldFn   context.CancelFunc // ends the current relay's run, so it gives up its leadership
}

// relay returns the outbox's current relay (a new one replaces it after it yielded).
func (o *served) relay() *relay.Relay { return o.rel.Load() }

// yield makes the outbox's relay give up its leadership: it stops as on SIGTERM (in-flight
// acknowledgements are waited for and marked) and a new relay stands by in its place.
func (o *served) yield() {
	o.yieldMu.Lock()
	defer o.yieldMu.Unlock()
	if o.yieldFn != nil {
		o.yieldFn()
	}
}

// run runs the outbox's relay until ctx ends, and a new one each time the balancer made the
// current one yield.
func (o *served) run(ctx context.Context) error {
	for {
		rctx, cancel := context.WithCancel(ctx)
		o.yieldMu.Lock()
		o.yieldFn = cancel
		o.yieldMu.Unlock()
		err := o.relay().Run(rctx)
		cancel()
		if err != nil || ctx.Err() != nil {
			return err
		}
		o.log.Info("leadership given up to balance the outboxes over the replicas")
		r, err := relay.New(o.cfg.Relay, o.store, o.publisher, o.leading, o.log)
		if err != nil {
			return err
		}
		o.rel.Store(r)
	}
}

// serve starts the relays and blocks until ctx ends and every relay has flushed. started, when
// not nil, is called once everything is up.
func serve(ctx context.Context, cfg *Config, log *slog.Logger, started func(*daemon)) error {
	ctx, stop := context.WithCancel(ctx)
	defer stop()
	d, err := start(ctx, cfg, log)
	if err != nil {
		return err
	}
	defer d.close()
	if started != nil {
		started(d)
	}
	var wg sync.WaitGroup
	if d.server != nil {
		wg.Go(func() {
			if err := d.server.Serve(d.listener); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("http server stopped", "err", err)
			}
		})
	}
	if d.balance != nil {
		wg.Go(func() { d.balance.watch(ctx) })
	}
	errs := make(chan error, len(cfg.Outboxes))
	var relays sync.WaitGroup
	launch := func(o *served) {
		if o.cfg.Store.Mark == postgres.MarkRetain {
			wg.Go(func() { o.purge(ctx) })
		}
		wg.Go(func() { o.broker.watch(ctx) })
		relays.Go(func() {
			if err := o.run(ctx); err != nil {
				if cfg.Multi {
					err = fmt.Errorf("outbox %s: %w", o.cfg.Name, err)
				}
				errs <- err
				stop() // a relay returns early only on a fatal error: end the process with it
			}
		})
	}
	for _, o := range d.started() {
		launch(o)
	}
	// An outbox that could not start (its database or broker unreachable) is tried again in
	// the background: the others serve meanwhile.
	d.mu.Lock()
	for _, oc := range cfg.Outboxes {
		if _, ok := d.waiting[oc.Name]; ok {
			relays.Go(func() { d.retryStart(ctx, oc, launch) })
		}
	}
	d.mu.Unlock()
	relays.Wait()
	stop()
	if d.server != nil {
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_ = d.server.Shutdown(sctx)
		cancel()
	}
	wg.Wait()
	close(errs)
	var all []error
	for e := range errs {
		all = append(all, e)
	}
	log.Info("relay stopped")
	return errors.Join(all...)
}

// start checks every outbox's database and broker within the startup timeout, wires a relay for
// each, and listens.
func start(ctx context.Context, cfg *Config, log *slog.Logger) (*daemon, error) {
	if len(cfg.Outboxes) == 0 { // a configuration built by hand (the tests, the demo)
		if cfg.Name == "" {
			cfg.Name = cfg.Store.Table.WithDefaults().String()
		}
		cfg.Outboxes = []*Config{cfg}
	}
	reg := prometheus.NewRegistry(version, revision)
	d := &daemon{cfg: cfg, log: log, reg: reg, waiting: map[string]error{}}
	var spans func() prometheus.TracingSpans
	if cfg.tracingSpans != nil {
		spans = cfg.tracingSpans.read
	}
	prometheus.WatchTracing(reg, spans)
	if cfg.Multi {
		d.balance = newBalancer(cfg, log)
		log.Info("serving outboxes", "outboxes", cfg.names(), "replica", d.balance.self)
	}
	for _, oc := range cfg.Outboxes {
		o, err := startOutbox(ctx, oc, reg, log, d.balance)
		if err != nil && cfg.Multi && ctx.Err() == nil {
			// One outbox's database or broker being down must not keep the others from
			// serving: serve tries it again in the background (retryStart).
			log.Error("outbox not started: trying again in the background", "outbox", oc.Name, "err", err)
			d.waiting[oc.Name] = err
			continue
		}
		if err != nil {
			d.close()
			return nil, err
		}
		d.outboxes = append(d.outboxes, o)
		if d.balance != nil {
			d.balance.add(o)
		}
	}
	if cfg.HTTPAddr != "" {
		ln, err := net.Listen("tcp", cfg.HTTPAddr)
		if err != nil {
			d.close()
			return nil, fmt.Errorf("http.addr: %w", err)
		}
		d.listener = ln
		d.server = &http.Server{Handler: d.routes(reg), ReadHeaderTimeout: 5 * time.Second}
		log.Info("http listening", "addr", ln.Addr().String())
	}
	return d, nil
}

// startOutbox checks one outbox's database and broker within the startup timeout and wires its
// relay, with metrics labelled with its name in reg.
func startOutbox(ctx context.Context, cfg *Config, reg *prom.Registry, log *slog.Logger, bal *balancer) (*served, error) {
	connCfg, err := postgres.ParseURL(cfg.DatabaseURL)
	if err != nil {
		return nil, err
	}
	connCfg.ConnectTimeout = cfg.ConnectTimeout
	if bal != nil {
		// The balancer tells the replicas and the outboxes apart by their sessions' names.
		connCfg.RuntimeParams["application_name"] = bal.applicationName(cfg.Name)
	}
	secret := connCfg.Password
	sctx, cancel := context.WithTimeout(ctx, cfg.StartupTimeout)
	defer cancel()
	// A pooler that cannot keep the relay's session is refused first, in one line: no retry can
	// fix it, and the pool's prepared statements would fail on it with a less helpful error.
	// Other errors (the database not up yet) are left to the checks below.
	if err := postgres.CheckSession(sctx, connCfg); errors.Is(err, relay.ErrSessionUnsupported) {
		return nil, err
	}

	poolCfg, err := pgxpool.ParseConfig(cfg.DatabaseURL)
	if err != nil {
		return nil, fmt.Errorf("database.url: invalid connection string")
	}
	poolCfg.ConnConfig.ConnectTimeout = cfg.ConnectTimeout
	poolCfg.ConnConfig.DialFunc = connCfg.DialFunc // raw reads and writes, as the relay's sessions (postgres.ParseURL)
	poolCfg.MaxConns = 3
	if bal != nil {
		poolCfg.ConnConfig.RuntimeParams["application_name"] = bal.applicationName(cfg.Name) + " pool"
	}
	postgres.SetApplicationName(poolCfg.ConnConfig)
	pool, err := pgxpool.NewWithConfig(ctx, poolCfg)
	if err != nil {
		return nil, fmt.Errorf("database: %s", postgres.Redact(err.Error(), secret))
	}
	if err := postgres.CheckOutbox(sctx, pool, cfg.Store.Table); err != nil {
		pool.Close()
		return nil, fmt.Errorf("database %s:%d/%s (within relay.startup_timeout %s): %s", connCfg.Host, connCfg.Port,
			connCfg.Database, cfg.StartupTimeout, postgres.Redact(err.Error(), secret))
	}

	// Each topic's partition count is pinned in the database, so no restart or failover moves a
	// key to another partition after partitions were added (README: Adding partitions).
	pins := postgres.NewPartitionPins(pool, cfg.Store.Table)
	if cfg.Sink != "rabbitmq" {
		if err := pins.Check(sctx); err != nil {
			pool.Close()
			return nil, errors.New(postgres.Redact(err.Error(), secret))
		}
	}
	// Every line of the relay names its outbox: one process may serve several.
	olog := log.With("outbox", cfg.Name)
	metrics := prometheus.ForOutbox(reg, cfg.Name)
	metrics.WatchBacklog(backlogOf(cfg, pool), prometheus.BacklogOptions{Log: olog})
	cfg.Kafka.SASL.OnTokenError = metrics.SASLTokenFailed
	publisher, err := newRelaySink(cfg, olog, kafka.PublisherDeps{Pins: pins, Observer: metrics, Tx: metrics, Log: olog},
		kgo.WithHooks(metrics.RelayKafkaHooks()))
	if err != nil {
		metrics.Unregister() // a later try registers the outbox's metrics again
		pool.Close()
		return nil, err
	}
	if kp, ok := publisher.(*kafka.Publisher); ok {
		metrics.WatchMissingTopics(kp.MissingTopics)
	}
	if err := publisher.Ping(sctx); err != nil {
		metrics.Unregister() // a later try registers the outbox's metrics again
		pool.Close()
		publisher.Close()
		return nil, fmt.Errorf("%w (within relay.startup_timeout %s)", err, cfg.StartupTimeout)
	}
	storeCfg := cfg.Store
	storeCfg.OnReplicationWait = metrics.ReplicationWaited
	pgStore, err := postgres.NewStore(connCfg, storeCfg)
	if err != nil {
		metrics.Unregister() // a later try registers the outbox's metrics again
		pool.Close()
		publisher.Close()
		return nil, err
	}
	var store relay.Store = pgStore
	if bal != nil {
		store = bal.wrap(cfg.Name, pgStore)
	}
	leading := &leaderClock{Observer: metrics}
	r, err := relay.New(cfg.Relay, store, publisher, leading, olog)
	if err != nil {
		metrics.Unregister() // a later try registers the outbox's metrics again
		pool.Close()
		publisher.Close()
		return nil, err
	}
	o := &served{cfg: cfg, log: olog, pool: pool, publisher: publisher, store: store, metrics: metrics,
		broker: newBrokerCheck(cfg.Sink, publisher.Ping, olog), leading: leading}
	o.rel.Store(r)
	return o, nil
}

func (d *daemon) close() {
	for _, o := range d.started() {
		o.publisher.Close()
		o.pool.Close()
	}
}

// startRetryMin and startRetryMax bound the backoff between two tries to start an outbox that
// could not start (retryStart).
const (
	startRetryMin = time.Second
	startRetryMax = 30 * time.Second
)

// retryStart tries to start the outbox of oc until it starts or ctx ends, and hands it to launch.
// Meanwhile /readyz reports it not ready, with the last reason.
func (d *daemon) retryStart(ctx context.Context, oc *Config, launch func(*served)) {
	for wait := startRetryMin; ; wait = backoff.Double(wait, startRetryMax) {
		if !backoff.Sleep(ctx, wait) {
			return
		}
		o, err := startOutbox(ctx, oc, d.reg, d.log, d.balance)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			d.log.Warn("outbox still not started", "outbox", oc.Name, "err", err)
			d.mu.Lock()
			d.waiting[oc.Name] = err
			d.mu.Unlock()
			continue
		}
		d.mu.Lock()
		d.outboxes = append(d.outboxes, o)
		delete(d.waiting, oc.Name)
		d.mu.Unlock()
		if d.balance != nil {
			d.balance.add(o)
		}
		d.log.Info("outbox started", "outbox", oc.Name)
		launch(o)
		return
	}
}

// outbox returns the served outbox named name, or nil.
func (d *daemon) outbox(name string) *served {
	for _, o := range d.started() {
		if o.cfg.Name == name {
			return o
		}
	}
	return nil
}

// routes serves /metrics, /healthz and /readyz (/readyz?outbox=NAME for one outbox).
func (d *daemon) routes(reg *prom.Registry) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = io.WriteString(w, "ok\n")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		outboxes := d.started()
		d.mu.Lock()
		waiting := maps.Clone(d.waiting)
		d.mu.Unlock()
		if name := r.URL.Query().Get("outbox"); name != "" {
			if err, ok := waiting[name]; ok {
				w.WriteHeader(http.StatusServiceUnavailable)
				_, _ = fmt.Fprintf(w, "not ready: outbox %s: not started: %v\n", name, err)
				return
			}
			waiting = nil
			o := d.outbox(name)
			if o == nil {
				w.WriteHeader(http.StatusNotFound)
				_, _ = fmt.Fprintf(w, "no outbox named %q\n", name)
				return
			}
			outboxes = []*served{o}
		}
		var why []string
		for _, name := range slices.Sorted(maps.Keys(waiting)) {
			why = append(why, fmt.Sprintf("outbox %s: not started: %v", name, waiting[name]))
		}
		for _, o := range outboxes {
			if err := o.ready(r.Context()); err != nil {
				if d.cfg.Multi {
					why = append(why, fmt.Sprintf("outbox %s: %v", o.cfg.Name, err))
				} else {
					why = append(why, err.Error())
				}
			}
		}
		if len(why) > 0 {
			w.WriteHeader(http.StatusServiceUnavailable)
			_, _ = fmt.Fprintf(w, "not ready: %s\n", strings.Join(why, "; "))
			return
		}
		_, _ = io.WriteString(w, "ready\n")
	})
	return mux
}

// purge deletes rows kept past the retention period, in batches, while this replica leads.
func (o *served) purge(ctx context.Context) {
	t := time.NewTicker(o.cfg.PurgeInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if !o.relay().Leader() {
			continue
		}
		n, err := postgres.Purge(ctx, o.pool, o.cfg.Store.Table, o.cfg.Retention, o.cfg.PurgeBatch)
		if err != nil && ctx.Err() == nil {
			o.log.Warn("purge failed", "err", err)
		} else if n > 0 {
			o.log.Info("purged published rows", "rows", n)
		}
	}
}
