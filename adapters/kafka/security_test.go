package kafka_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/adapters/kafka"
	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/internal/tlstest"
)

// publishOne publishes one message through a publisher built from cfg and returns the broker's
// verdict, or the error of the connection check.
func publishOne(t *testing.T, cfg kafka.Config) error {
	t.Helper()
	cfg.DialTimeout = 5 * time.Second
	p, err := kafka.NewPublisher(cfg)
	if err != nil {
		t.Fatalf("new publisher: %v", err)
	}
	defer p.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if err := p.Ping(ctx); err != nil {
		return err
	}
	done := make(chan error, 1)
	m := &relay.Message{ID: 1, EventID: "0b0c6a53-5d5e-4c9f-9a0e-2f7f5f0c9d11", AggregateType: "user",
		AggregateID: "u1", EventType: "UserCreated", Payload: []byte(`{}`), OccurredAt: time.Now()}
	if err := p.Publish(ctx, m, func(err error) { done <- err }); err != nil {
		t.Fatalf("publish: %v", err)
	}
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		_ = p.Abort(context.Background())
		return <-done
	}
}

// readOne reads the first record of topic through a client built from cfg, and returns its key.
func readOne(t *testing.T, cfg kafka.Config, topic string) string {
	t.Helper()
	p, err := kafka.NewPublisher(cfg, kgo.ConsumeTopics(topic), kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	for ctx.Err() == nil {
		fetches := p.Client().PollFetches(ctx)
		if recs := fetches.Records(); len(recs) > 0 {
			return string(recs[0].Key)
		}
	}
	return ""
}

// TestTLSAndSASL connects to kfake over TLS and with each SASL mechanism, through Config as the
// relay does, and checks that a wrong password or an untrusted certificate is refused without the
// password showing in the error.
func TestTLSAndSASL(t *testing.T) {
	t.Parallel() // an in-process kfake of its own, KAFKA_BROKERS or not: the test sets its TLS and users
	certs := tlstest.New(t)
	const topic = "secure"
	const password = "Kafka-pa55word-xyz"
	for _, c := range []struct {
		name      string
		mechanism string // "" for no SASL
		tls       bool
	}{
		{"TLS", "", true},
		{"SASL PLAIN over TLS", "PLAIN", true},
		{"SASL SCRAM-SHA-256", "SCRAM-SHA-256", false},
		{"SASL SCRAM-SHA-512 over TLS", "SCRAM-SHA-512", true},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			opts := []kfake.Opt{kfake.SeedTopics(1, topic)}
			if c.tls {
				opts = append(opts, kfake.TLS(certs.Server))
			}
			if c.mechanism != "" {
				opts = append(opts, kfake.EnableSASL(), kfake.Superuser(c.mechanism, "relay", password))
			}
			cluster, err := kfake.NewCluster(append(opts, kfake.NumBrokers(1))...)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(cluster.Close)
			cfg := kafka.Config{Brokers: cluster.ListenAddrs(), TopicTemplate: topic}
			if c.tls {
				cfg.TLS = kafka.TLSConfig{Enabled: true, CAFile: certs.CAFile}
			}
			if c.mechanism != "" {
				cfg.SASL = kafka.SASLConfig{Mechanism: c.mechanism, Username: "relay", Password: password}
			}
			if err := publishOne(t, cfg); err != nil {
				t.Fatalf("publish over %s: %v", c.name, err)
			}
			if key := readOne(t, cfg, topic); key != "u1" {
				t.Errorf("read back key %q, want the record published (u1)", key)
			}

			if c.mechanism != "" {
				bad := cfg
				bad.SASL.Password = "Wrong-pa55word-xyz"
				err := publishOne(t, bad)
				if err == nil {
					t.Fatal("wrong SASL password accepted")
				}
				t.Logf("wrong password refused: %v", err)
				if strings.Contains(err.Error(), bad.SASL.Password) || strings.Contains(err.Error(), password) {
					t.Errorf("error shows a password: %v", err)
				}
			}
			if c.tls {
				untrusted := cfg
				untrusted.TLS.CAFile = "" // the system pool does not know the test CA
				if err := publishOne(t, untrusted); err == nil {
					t.Error("server certificate from an unknown CA accepted")
				} else {
					t.Logf("unknown CA refused: %v", err)
				}
				plain := cfg
				plain.TLS = kafka.TLSConfig{}
				if c.mechanism == "PLAIN" {
					plain.SASL = kafka.SASLConfig{}
				}
				if err := publishOne(t, plain); err == nil {
					t.Error("plaintext connection to a TLS listener succeeded")
				}
			}
		})
	}
}
