package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/adapters/kafka"
	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/adapters/prometheus"
	"github.com/outbox-relay/outbox-relay/app/relay"
)

func runCmd(ctx context.Context, args []string, _, stderr io.Writer) error {
	fs := newFlagSet("run", "Run the relay: publish committed outbox rows to Kafka until SIGTERM or SIGINT.", stderr)
	addFlags(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg, v, err := loadConfig(fs)
	if cfg != nil {
		err = joinNew(err, cfg.requireRelay()) // every mistake in one report
	}
	if err != nil {
		return err
	}
	log := newLogger(stderr, cfg.LogLevel, cfg.LogFormat, secretsOf(cfg)...)
	log.Info("config loaded", "version", version, "config", redacted(v))
	tp, stopTracing, err := setupTracing(ctx, os.Getenv, log, "outbox-relay")
	if err != nil {
		return err
	}
	defer stopTracing()
	cfg.Kafka.Tracing = tp
	return serve(ctx, cfg, log, nil)
}

// daemon is a running relay with its dependencies, as wired by start.
type daemon struct {
	cfg       *Config
	log       *slog.Logger
	pool      *pgxpool.Pool
	publisher relaySink
	relay     *relay.Relay
	metrics   *prometheus.Metrics
	broker    *brokerCheck
	leading   *leaderClock
	server    *http.Server
	listener  net.Listener
}

// serve starts the relay and blocks until ctx ends and the relay has flushed. started, when not
// nil, is called once everything is up.
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
	if cfg.Store.Mark == postgres.MarkRetain {
		wg.Go(func() { d.purge(ctx) })
	}
	wg.Go(func() { d.broker.watch(ctx) })
	err = d.relay.Run(ctx)
	stop() // Run returns early only on a fatal error: end the helpers with it
	if d.server != nil {
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_ = d.server.Shutdown(sctx)
		cancel()
	}
	wg.Wait()
	log.Info("relay stopped")
	return err
}

// start checks the database and the broker within the startup timeout and wires the relay.
func start(ctx context.Context, cfg *Config, log *slog.Logger) (*daemon, error) {
	connCfg, err := postgres.ParseURL(cfg.DatabaseURL)
	if err != nil {
		return nil, err
	}
	connCfg.ConnectTimeout = cfg.ConnectTimeout
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
	poolCfg.MaxConns = 3
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
	metrics := prometheus.New(version, revision)
	metrics.WatchBacklog(backlogOf(cfg, pool), prometheus.BacklogOptions{Log: log})
	publisher, err := newRelaySink(cfg, log, kafka.PublisherDeps{Pins: pins, Observer: metrics, Tx: metrics,
		Log: log.With("outbox", cfg.Store.Table.WithDefaults().String())}, kgo.WithHooks(metrics.RelayKafkaHooks()))
	if err != nil {
		pool.Close()
		return nil, err
	}
	if kp, ok := publisher.(*kafka.Publisher); ok {
		metrics.WatchMissingTopics(kp.MissingTopics)
	}
	if err := publisher.Ping(sctx); err != nil {
		pool.Close()
		publisher.Close()
		return nil, fmt.Errorf("%w (within relay.startup_timeout %s)", err, cfg.StartupTimeout)
	}
	storeCfg := cfg.Store
	storeCfg.OnReplicationWait = metrics.ReplicationWaited
	store, err := postgres.NewStore(connCfg, storeCfg)
	if err != nil {
		pool.Close()
		publisher.Close()
		return nil, err
	}
	// Every line of the relay names its outbox: one process may serve several in a fleet.
	leading := &leaderClock{Observer: metrics}
	relay, err := relay.New(cfg.Relay, store, publisher, leading, log.With("outbox", cfg.Store.Table.WithDefaults().String()))
	if err != nil {
		pool.Close()
		publisher.Close()
		return nil, err
	}
	d := &daemon{cfg: cfg, log: log, pool: pool, publisher: publisher, relay: relay, metrics: metrics,
		broker: newBrokerCheck(cfg.Sink, publisher.Ping, log), leading: leading}
	if cfg.HTTPAddr != "" {
		ln, err := net.Listen("tcp", cfg.HTTPAddr)
		if err != nil {
			d.close()
			return nil, fmt.Errorf("http.addr: %w", err)
		}
		d.listener = ln
		d.server = &http.Server{Handler: d.routes(), ReadHeaderTimeout: 5 * time.Second}
		log.Info("http listening", "addr", ln.Addr().String())
	}
	return d, nil
}

func (d *daemon) close() {
	d.publisher.Close()
	d.pool.Close()
}

// routes serves /metrics, /healthz and /readyz.
func (d *daemon) routes() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", d.metrics.Handler())
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = io.WriteString(w, "ok\n")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		if err := d.ready(r.Context()); err != nil {
			w.WriteHeader(http.StatusServiceUnavailable)
			_, _ = fmt.Fprintf(w, "not ready: %v\n", err)
			return
		}
		_, _ = io.WriteString(w, "ready\n")
	})
	return mux
}

// purge deletes rows kept past the retention period, in batches, while this replica leads.
func (d *daemon) purge(ctx context.Context) {
	t := time.NewTicker(d.cfg.PurgeInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if !d.relay.Leader() {
			continue
		}
		n, err := postgres.Purge(ctx, d.pool, d.cfg.Store.Table, d.cfg.Retention, d.cfg.PurgeBatch)
		if err != nil && ctx.Err() == nil {
			d.log.Warn("purge failed", "err", err)
		} else if n > 0 {
			d.log.Info("purged published rows", "rows", n)
		}
	}
}
