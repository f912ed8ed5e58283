package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/plugin/kprom"

	"github.com/outbox-relay/outbox-relay/adapters/kafka"
	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/adapters/prometheus"
	"github.com/outbox-relay/outbox-relay/app"
)

// consumeCmd runs the example consumer: another input adapter of the example service, driving
// the SendWelcome use case with the UserCreated events the relay published.
func consumeCmd(ctx context.Context, args []string, _, stderr io.Writer) error {
	fs := newFlagSet("consume", "Run the example consumer: read UserCreated events from Kafka in a consumer group and welcome each\n"+
		"new user exactly once (the welcome is recorded in PostgreSQL with the event id, in one transaction),\n"+
		"until SIGTERM or SIGINT. Create its tables first with 'outbox-relay migrate --example'.", stderr)
	addFlags(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg, v, err := loadConfig(fs)
	if cfg != nil {
		err = joinNew(err, cfg.requireDatabase())
	}
	if err != nil {
		return err
	}
	ccfg, httpAddr := cfg.Consumer, cfg.ConsumerHTTPAddr
	log := newLogger(stderr, cfg.LogLevel, cfg.LogFormat, secretsOf(cfg)...)
	log.Info("config loaded", "version", version, "config", redacted(v))
	tp, stopTracing, err := setupTracing(ctx, os.Getenv, log, "outbox-relay-consume", nil)
	if err != nil {
		return err
	}
	defer stopTracing()
	cfg.Kafka.Tracing = tp

	sctx, cancel := context.WithTimeout(ctx, cfg.StartupTimeout)
	defer cancel()
	pool, err := openPool(sctx, cfg)
	if err != nil {
		return err
	}
	defer pool.Close()
	inbox, err := postgres.NewInbox(pool, cfg.Store.Table)
	if err != nil {
		return err
	}
	if err := inbox.Check(sctx); err != nil {
		return fmt.Errorf("inbox: %s", postgres.Redact(err.Error(), pool.Config().ConnConfig.Password))
	}
	uc, err := app.NewSendWelcome(inbox, ccfg.Group)
	if err != nil {
		return err
	}

	metrics := prometheus.NewConsumerMetrics(version, revision)
	kp := kprom.NewMetrics("outbox_consumer_kafka", kprom.Registerer(metrics.Registry), kprom.Gatherer(metrics.Registry))
	consumer, err := kafka.NewConsumer(cfg.Kafka, ccfg, kafka.WelcomeHandler(uc), metrics, log, kgo.WithHooks(kp))
	if err != nil {
		return err
	}
	defer consumer.Close()
	if err := consumer.Ping(sctx); err != nil {
		return fmt.Errorf("%w (within relay.startup_timeout %s)", err, cfg.StartupTimeout)
	}

	if httpAddr != "" {
		ln, err := net.Listen("tcp", httpAddr)
		if err != nil {
			return fmt.Errorf("consumer.http_addr: %w", err)
		}
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", metrics.Handler())
		mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "ok\n") })
		srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		go func() {
			if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("http server stopped", "err", err)
			}
		}()
		defer func() {
			sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			_ = srv.Shutdown(sctx)
			cancel()
		}()
		log.Info("http listening", "addr", ln.Addr().String())
	}
	log.Info("consuming", "group", ccfg.Group, "topics", ccfg.Topics, "dead_letter_topic", ccfg.DeadLetterTopic)
	err = consumer.Run(ctx)
	log.Info("consumer stopped")
	return err
}
