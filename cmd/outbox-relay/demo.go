package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/spf13/pflag"
	"github.com/spf13/viper"
	"github.com/twmb/franz-go/pkg/kadm"
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
	demoHTTPAddr    = "127.0.0.1:0"
	demoLogLevel    = "warn" // keep the terminal for the demo's own lines
)

func demoCmd(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("demo", "Run everything on embedded defaults: the local Postgres (or OUTBOX_DATABASE_URL), an embedded\n"+
		"Kafka-protocol broker when no brokers are configured, migrations, the relay, the CreateUser use case\n"+
		"writing users at a steady rate and a consumer printing what arrives. Ctrl-C ends it with a summary.\n\n"+
		"The database is "+demoDatabaseURL+" unless OUTBOX_DATABASE_URL says otherwise.\n"+
		"The defaults below are the demo's: they differ from 'run' for the schema, the listener and the log level.", stderr)
	addFlags(fs)
	// Show the demo's own defaults in --help; demoDefaults applies them.
	for name, def := range map[string]string{"database-schema": demoSchema, "http-addr": demoHTTPAddr, "log-level": demoLogLevel} {
		fs.Lookup(name).DefValue = def
	}
	_ = fs.MarkHidden("log-format") // the demo always logs text
	rate := fs.Int("rate", 20, "users created per second")
	writers := fs.Int("writers", 4, "concurrent writers")
	duration := fs.Duration("duration", 0, "stop after this long (0: run until Ctrl-C)")
	outboxCount := fs.Int("outboxes", 1, "outbox tables served by the one relay process (1 to 8): outbox, outbox2...; the writers take turns")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *rate < 1 || *writers < 1 {
		return errors.New("--rate and --writers must be at least 1")
	}
	if *outboxCount < 1 || *outboxCount > 8 {
		return fmt.Errorf("--outboxes: must be between 1 and 8, got %d", *outboxCount)
	}
	// Under make (or go run) Ctrl-C would also interrupt the parent, which then reports an error
	// however cleanly the demo stops: take the terminal so that Ctrl-C reaches the demo alone.
	defer takeTerminal()()
	if err := fs.Set("log-format", "text"); err != nil {
		return err
	}
	cfg, v, err := loadConfig(fs)
	if err != nil {
		return err
	}
	demoDefaults(fs, v, cfg)
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
	// The consumer: another client reading the topic from the start (records older than this run
	// are skipped); it also lists the topic's offsets for the live line.
	consumerOpts := []kgo.Opt{kgo.SeedBrokers(cfg.Kafka.Brokers...), kgo.ConsumeTopics(topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart())}
	if cfg.Delivery == deliveryExactlyOnce {
		// What a consumer of exactly-once delivery does: it sees committed transactions only.
		consumerOpts = append(consumerOpts, kgo.FetchIsolationLevel(kgo.ReadCommitted()))
		fmt.Fprintf(stdout, "exactly-once delivery: Kafka transactions, progress in %s; the consumer reads at read_committed\n", cfg.Tx.ProgressTopic)
	}
	consumer, err := kgo.NewClient(consumerOpts...)
	if err != nil {
		return err
	}
	defer consumer.Close()
	adm := kadm.NewClient(consumer)

	pool, err := openPool(ctx, cfg)
	if err != nil {
		return fmt.Errorf("%w\nstart PostgreSQL or set OUTBOX_DATABASE_URL", err)
	}
	defer pool.Close()
	table := cfg.Store.Table.WithDefaults()
	fmt.Fprintf(stdout, "database %s:%d/%s\n", pool.Config().ConnConfig.Host, pool.Config().ConnConfig.Port,
		pool.Config().ConnConfig.Database)
	// With --outboxes N the one relay serves N tables, as a configuration file listing N outboxes
	// would: outbox, outbox2...
	var tables []postgres.Table
	var outboxCfgs []*Config
	for i := range *outboxCount {
		t := table
		if i > 0 {
			t.Name = fmt.Sprintf("%s%d", table.Name, i+1)
		}
		tables = append(tables, t)
		c := *cfg
		c.Store.Table, c.Name, c.Outboxes = t, t.Name, nil
		outboxCfgs = append(outboxCfgs, &c)
		fmt.Fprintf(stdout, "outbox %s\n", t)
		if _, err := postgres.Migrate(ctx, pool, t, func(s postgres.MigrationStep) {
			fmt.Fprintf(stdout, "migration %s: applied=%t\n", s.Name, s.Applied)
		}); err != nil {
			return err
		}
		if table.Schema == demoSchema {
			if _, err := pool.Exec(ctx, `TRUNCATE outbox_demo.`+t.Name+`, outbox_demo.`+t.Name+`_parked`); err != nil {
				return fmt.Errorf("reset demo tables: %w", err)
			}
		}
	}
	if *outboxCount > 1 {
		cfg.Outboxes, cfg.Multi = outboxCfgs, true
	}
	if err := postgres.MigrateExample(ctx, pool, table); err != nil {
		return err
	}
	if table.Schema == demoSchema {
		if _, err := pool.Exec(ctx, `TRUNCATE outbox_demo.users`); err != nil {
			return fmt.Errorf("reset demo tables: %w", err)
		}
	}
	// What was there before this run (another run in the same schema, a real broker's topic) is
	// not counted: users, records and received events count from here.
	users := pgx.Identifier{table.Schema, "users"}.Sanitize()
	var usersBefore int64
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM `+users).Scan(&usersBefore); err != nil {
		return fmt.Errorf("count users: %w", err)
	}
	startOffsets := map[int32]int64{}
	if ends, err := adm.ListEndOffsets(ctx, topic); err == nil {
		ends.Each(func(o kadm.ListedOffset) {
			if o.Err == nil {
				startOffsets[o.Partition] = o.Offset
			}
		})
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
				if r.Offset < startOffsets[r.Partition] {
					return
				}
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
	var createUsers []*app.CreateUser
	for _, t := range tables {
		uow, err := postgres.NewUnitOfWork(pool, t)
		if err != nil {
			return err
		}
		createUsers = append(createUsers, app.NewCreateUser(uow, nil))
	}
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
				_, err := createUsers[(w+n)%len(createUsers)].Execute(context.WithoutCancel(writeCtx), app.CreateUserCommand{
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
	var pendingSQL []string
	for _, t := range tables {
		pendingSQL = append(pendingSQL, `(SELECT count(*) FROM `+pgx.Identifier{t.Schema, t.Name}.Sanitize()+` WHERE dispatched_at IS NULL)`)
	}
	status := func(final bool) {
		// The three counts are read in this order so that received <= published <= written on
		// every line: an event the consumer counted was on the topic before, and a topic only
		// grows; a record on the topic came from a row committed with its user before, and the
		// database query comes last. (Counting published as the rows marked instead, as before,
		// showed received ahead of published: the consumer sees a record before the relay's
		// mark commits.)
		r := received.Load()
		qctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Second)
		defer cancel()
		ends, err := adm.ListEndOffsets(qctx, topic)
		if err == nil {
			err = ends.Error()
		}
		if err != nil {
			log.Debug("demo: list the topic's end offsets", "err", err)
			return
		}
		var published int64
		ends.Each(func(o kadm.ListedOffset) { published += o.Offset - startOffsets[o.Partition] })
		if cfg.Delivery == deliveryExactlyOnce {
			// The offsets also count the transactions' markers and aborted records: the rows
			// of committed transactions instead. (A read_committed consumer may see a
			// transaction a moment before the relay counts it.)
			published = 0
			for _, o := range d.started() {
				published += o.metrics.CommittedRows()
			}
		}
		var w, pending int64
		if err := pool.QueryRow(qctx, `SELECT (SELECT count(*) FROM `+users+`) - $1,
			`+strings.Join(pendingSQL, " + "), usersBefore).Scan(&w, &pending); err != nil {
			log.Debug("demo: count users and pending rows", "err", err)
			return
		}
		maxLag = max(maxLag, pending)
		line := fmt.Sprintf("[%5.0fs] written %d  published %d  received %d  lag %d rows",
			time.Since(start).Seconds(), w, published, r, pending)
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

// demoDefaults applies the demo's own defaults to what the user left unset: the local
// PostgreSQL, the outbox_demo schema, a listener on a free loopback port, warn-level logs.
func demoDefaults(fs *pflag.FlagSet, v *viper.Viper, cfg *Config) {
	unset := func(key string) bool {
		return !fs.Changed(flagName(key)) && os.Getenv(envName(key)) == "" && !v.InConfig(key)
	}
	if cfg.DatabaseURL == "" {
		cfg.DatabaseURL = demoDatabaseURL
	}
	if unset("database.schema") {
		cfg.Store.Table.Schema = demoSchema
	}
	if unset("http.addr") {
		cfg.HTTPAddr = demoHTTPAddr
	}
	if unset("log.level") {
		cfg.LogLevel = demoLogLevel
	}
}
