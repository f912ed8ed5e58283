package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/adapters/kafka"
	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/app"
	"github.com/outbox-relay/outbox-relay/domain"
)

const (
	demoDatabaseURL = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
	demoSchema      = "outbox_demo"
)

func demoCmd(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("demo", "Run everything on embedded defaults: the local Postgres (or OUTBOX_DATABASE_URL), an embedded\n"+
		"Kafka-protocol broker when no brokers are configured, migrations, the relay, the CreateUser use case\n"+
		"writing users at a steady rate and a consumer printing what arrives. Ctrl-C ends it with a summary.", stderr)
	addFlags(fs)
	rate := fs.Int("rate", 20, "users created per second")
	writers := fs.Int("writers", 4, "concurrent writers")
	duration := fs.Duration("duration", 0, "stop after this long (0: run until Ctrl-C)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *rate < 1 || *writers < 1 {
		return errors.New("--rate and --writers must be at least 1")
	}
	if err := fs.Set("log-format", "text"); err != nil {
		return err
	}
	cfg, v, err := loadConfig(fs)
	if err != nil {
		return err
	}
	if cfg.DatabaseURL == "" {
		cfg.DatabaseURL = demoDatabaseURL
	}
	if !v.IsSet("database.schema") || v.GetString("database.schema") == postgres.SchemaDefault {
		cfg.Store.Table.Schema = demoSchema
	}
	if !fs.Changed("http-addr") && os.Getenv(envName("http.addr")) == "" {
		cfg.HTTPAddr = "127.0.0.1:0"
	}
	if !fs.Changed("log-level") && os.Getenv(envName("log.level")) == "" {
		cfg.LogLevel = "warn" // keep the terminal for the demo's own lines
	}
	log := newLogger(stderr, cfg.LogLevel, "text", secretsOf(cfg)...)
	if *duration > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, *duration)
		defer cancel()
	}

	topic := "outbox.event." + domain.UserAggregateType
	if len(cfg.Kafka.Brokers) == 0 {
		cluster, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(3, topic), kfake.AllowAutoTopicCreation())
		if err != nil {
			return fmt.Errorf("start embedded broker: %w", err)
		}
		defer cluster.Close()
		cfg.Kafka.Brokers = cluster.ListenAddrs()
		cfg.Kafka.AutoCreateTopics = true
		fmt.Fprintf(stdout, "embedded Kafka-protocol broker (kfake) on %s\n", cfg.Kafka.Brokers[0])
	}
	if err := cfg.Kafka.WithDefaults().Validate(); err != nil {
		return err
	}

	pool, err := openPool(ctx, cfg)
	if err != nil {
		return fmt.Errorf("%w\nstart PostgreSQL or set OUTBOX_DATABASE_URL", err)
	}
	defer pool.Close()
	table := cfg.Store.Table.WithDefaults()
	fmt.Fprintf(stdout, "database %s:%d/%s, outbox %s\n", pool.Config().ConnConfig.Host, pool.Config().ConnConfig.Port,
		pool.Config().ConnConfig.Database, table)
	if _, err := postgres.Migrate(ctx, pool, table, func(s postgres.MigrationStep) {
		fmt.Fprintf(stdout, "migration %s: applied=%t\n", s.Name, s.Applied)
	}); err != nil {
		return err
	}
	if err := postgres.MigrateExample(ctx, pool, table); err != nil {
		return err
	}
	if table.Schema == demoSchema {
		if _, err := pool.Exec(ctx, `TRUNCATE outbox_demo.users, outbox_demo.`+table.Name+`, outbox_demo.`+table.Name+`_parked`); err != nil {
			return fmt.Errorf("reset demo tables: %w", err)
		}
	}

	// The relay, exactly as 'outbox-relay run' wires it.
	relayCtx, stopRelay := context.WithCancel(context.WithoutCancel(ctx))
	defer stopRelay()
	ready := make(chan *daemon, 1)
	relayDone := make(chan error, 1)
	go func() { relayDone <- serve(relayCtx, cfg, log, func(d *daemon) { ready <- d }) }()
	var d *daemon
	select {
	case d = <-ready:
	case err := <-relayDone:
		return err
	}
	fmt.Fprintf(stdout, "relay running; metrics on http://%s/metrics\n", d.listener.Addr())

	// The consumer: another client reading the topic from the start.
	consumer, err := kgo.NewClient(kgo.SeedBrokers(cfg.Kafka.Brokers...), kgo.ConsumeTopics(topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	if err != nil {
		return err
	}
	defer consumer.Close()
	var received, duplicates atomic.Int64
	seen := map[string]bool{}
	consumerCtx, stopConsumer := context.WithCancel(context.WithoutCancel(ctx))
	defer stopConsumer()
	clearLine := ""
	if isTerminal(stdout) {
		clearLine = "\r\033[K"
	}
	var consumerWG sync.WaitGroup
	lastPrint := time.Time{}
	var printMu sync.Mutex
	consumerWG.Go(func() {
		for consumerCtx.Err() == nil {
			fetches := consumer.PollFetches(consumerCtx)
			fetches.EachRecord(func(r *kgo.Record) {
				id := header(r, kafka.HeaderEventID)
				if seen[id] {
					duplicates.Add(1)
					return
				}
				seen[id] = true
				received.Add(1)
				if time.Since(lastPrint) > 500*time.Millisecond {
					lastPrint = time.Now()
					ev, _ := domain.UnmarshalUserCreated(r.Value)
					printMu.Lock()
					fmt.Fprintf(stdout, "%sreceived %s user=%s email=%s partition=%d offset=%d\n",
						clearLine, header(r, kafka.HeaderEventType), ev.UserID(), ev.Email(), r.Partition, r.Offset)
					printMu.Unlock()
				}
			})
		}
	})

	// The writers: the CreateUser use case through the Postgres unit of work.
	uow, err := postgres.NewUnitOfWork(pool, table)
	if err != nil {
		return err
	}
	createUser := app.NewCreateUser(uow, nil)
	var written, failed atomic.Int64
	writeCtx, stopWriters := context.WithCancel(ctx)
	defer stopWriters()
	var writersWG sync.WaitGroup
	per := time.Duration(float64(time.Second) * float64(*writers) / float64(*rate))
	for w := range *writers {
		writersWG.Go(func() {
			t := time.NewTicker(per)
			defer t.Stop()
			for n := 0; ; n++ {
				select {
				case <-writeCtx.Done():
					return
				case <-t.C:
				}
				// Not cancelled mid-transaction: a user whose COMMIT went out is counted as written.
				_, err := createUser.Execute(context.WithoutCancel(writeCtx), app.CreateUserCommand{
					Name: fmt.Sprintf("User %d-%d", w, n), Email: fmt.Sprintf("user-%d-%d-%s@example.com", w, n, domain.NewID()[:8])})
				if err != nil {
					if writeCtx.Err() == nil {
						failed.Add(1)
					}
					continue
				}
				written.Add(1)
			}
		})
	}

	tty := isTerminal(stdout)
	start := time.Now()
	var maxLag int64
	status := func(final bool) {
		var pending int64
		qctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
		_ = pool.QueryRow(qctx, `SELECT count(*) FROM `+table.Schema+`.`+table.Name+` WHERE dispatched_at IS NULL`).Scan(&pending)
		cancel()
		maxLag = max(maxLag, pending)
		w := written.Load()
		line := fmt.Sprintf("[%5.0fs] written %d  published %d  received %d  lag %d rows",
			time.Since(start).Seconds(), w, max(w-pending, 0), received.Load(), pending)
		printMu.Lock()
		defer printMu.Unlock()
		if tty && !final {
			fmt.Fprintf(stdout, "\r\033[K%s", line)
		} else {
			fmt.Fprintln(stdout, line)
		}
	}
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
loop:
	for {
		select {
		case <-ctx.Done():
			break loop
		case <-tick.C:
			status(false)
		}
	}
	stopWriters()
	writersWG.Wait()
	if tty {
		fmt.Fprintln(stdout)
	}
	fmt.Fprintln(stdout, "stopping: writers stopped, waiting for the relay and the consumer to catch up")
	deadline := time.Now().Add(15 * time.Second)
	for received.Load() < written.Load() && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	stopRelay()
	if err := <-relayDone; err != nil {
		return err
	}
	stopConsumer()
	consumerWG.Wait()
	status(true)
	w, r := written.Load(), received.Load()
	fmt.Fprintf(stdout, "summary: %d users written (%d failed), %d events received, %d missing, %d duplicates, max lag %d rows, %.1fs\n",
		w, failed.Load(), r, max(w-r, 0), duplicates.Load(), maxLag, time.Since(start).Seconds())
	if r < w {
		return fmt.Errorf("%d committed events did not arrive", w-r)
	}
	return nil
}

func header(r *kgo.Record, key string) string {
	for _, h := range r.Headers {
		if h.Key == key {
			return string(h.Value)
		}
	}
	return ""
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}
