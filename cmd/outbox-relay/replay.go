package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"github.com/outbox-relay/outbox-relay/adapters/kafka"
	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/app/relay"
)

const replaySummary = `Publish retained events again, byte for byte: the same key, value and headers (event-id
among them) as the relay sent, plus a replayed-at header, in id order (so in order per key), to
the topic each went to or to --to-topic. Retained events are the rows the relay published with
relay.mark=retain and has not purged yet (relay.retention). --since and --until select by the
time an event was published (dispatched_at), as RFC 3339 or as a duration ago (2h); --key,
--aggregate-type and --event-type narrow the selection. --dry-run counts the events and sends
nothing. Progress goes to stderr every --progress.`

// replayReadBatch is how many retained rows one query reads.
const replayReadBatch = 1000

// replayInFlight bounds the records handed to the producer and not yet acknowledged.
const replayInFlight = 10000

func replayCmd(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("replay", replaySummary, stderr)
	addFlags(fs)
	addOutboxFlag(fs, "to replay")
	since := fs.String("since", "", "select events published at or after this time: RFC 3339 (2026-01-02T15:04:05Z) or a duration ago (90m)")
	until := fs.String("until", "", "select events published before this time: RFC 3339 or a duration ago")
	key := fs.String("key", "", "select the events with this aggregate_id (the record key)")
	aggType := fs.String("aggregate-type", "", "select the events with this aggregate_type")
	eventType := fs.String("event-type", "", "select the events with this event_type")
	toTopic := fs.String("to-topic", "", "send every selected event to this topic instead of its own")
	rate := fs.Float64("rate", 1000, "most events sent per second; 0 is unlimited")
	dryRun := fs.Bool("dry-run", false, "count the selected events and send nothing")
	progress := fs.Duration("progress", 5*time.Second, "interval of the progress lines on stderr; 0 disables them")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	now := time.Now()
	var errs []error
	f := postgres.RetainedFilter{Key: *key, AggregateType: *aggType, EventType: *eventType}
	var err error
	if f.Since, err = replayTime(*since, now); err != nil {
		errs = append(errs, fmt.Errorf("--since: %w", err))
	}
	if f.Until, err = replayTime(*until, now); err != nil {
		errs = append(errs, fmt.Errorf("--until: %w", err))
	}
	if !f.Since.IsZero() && !f.Until.IsZero() && !f.Since.Before(f.Until) {
		errs = append(errs, fmt.Errorf("--until: must be after --since (%s), got %s", f.Since.Format(time.RFC3339), f.Until.Format(time.RFC3339)))
	}
	if *rate < 0 {
		errs = append(errs, fmt.Errorf("--rate: must be 0 (unlimited) or positive, got %g", *rate))
	}
	if *progress < 0 {
		errs = append(errs, fmt.Errorf("--progress: must be 0 (off) or positive, got %s", *progress))
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	cfg, pool, err := loadDatabase(ctx, fs)
	if err != nil {
		return err
	}
	defer pool.Close()
	secret := pool.Config().ConnConfig.Password
	t := cfg.Store.Table.WithDefaults()
	if cfg.Sink != "kafka" {
		return fmt.Errorf("sink: replay republishes to Kafka only, got %q", cfg.Sink)
	}
	total, err := postgres.CountRetained(ctx, pool, t, f)
	if err != nil {
		return errors.New(postgres.Redact(err.Error(), secret))
	}
	if total == 0 {
		fmt.Fprintf(stdout, "no retained event in %s matches the selection\n", t)
		if cfg.Store.Mark != postgres.MarkRetain {
			fmt.Fprintln(stdout, "relay.mark is delete here: the relay deletes what it published, and only relay.mark=retain keeps events to replay")
		}
		return nil
	}
	if *dryRun {
		fmt.Fprintf(stdout, "dry run: %d retained event(s) in %s match; nothing sent\n", total, t)
		return nil
	}
	log := newLogger(stderr, cfg.LogLevel, cfg.LogFormat, secretsOf(cfg)...)
	kc := cfg.Kafka
	kc.Log = log.With("sink", "kafka")
	pub, err := kafka.NewPublisherWith(kc, kafka.PublisherDeps{Pins: postgres.NewPartitionPins(pool, t), Log: kc.Log})
	if err != nil {
		return err
	}
	defer pub.Close()
	r := &replayer{pub: pub, toTopic: *toTopic, at: now, sem: make(chan struct{}, replayInFlight)}
	if *rate > 0 {
		r.interval = time.Duration(float64(time.Second) / *rate)
	}
	start, lastReport := time.Now(), time.Now()
	report := func() {
		sent := r.sent()
		fmt.Fprintf(stderr, "replay: %d/%d event(s) acknowledged (%.0f%%), %.0f/s\n", sent, total,
			100*float64(sent)/float64(total), float64(sent)/time.Since(start).Seconds())
	}
	var after int64
	for {
		rows, err := postgres.ReadRetained(ctx, pool, t, f, after, replayReadBatch)
		if err != nil {
			err = errors.New(postgres.Redact(err.Error(), secret))
			return r.stop(ctx, err)
		}
		for i := range rows {
			if err := r.send(ctx, &rows[i]); err != nil {
				return r.stop(ctx, err)
			}
			after = rows[i].ID
			if *progress > 0 && time.Since(lastReport) >= *progress {
				report()
				lastReport = time.Now()
			}
		}
		if len(rows) < replayReadBatch {
			break
		}
	}
	if err := r.stop(ctx, nil); err != nil {
		return err
	}
	if *progress > 0 {
		report()
	}
	dest := "their original topics"
	if *toTopic != "" {
		dest = "topic " + *toTopic
	}
	fmt.Fprintf(stdout, "replayed %d event(s) from %s to %s, replayed-at %s\n", r.sent(), t, dest, now.UTC().Format(time.RFC3339Nano))
	return nil
}

// replayTime parses a --since or --until value: "" (no bound), RFC 3339, or a duration before now.
func replayTime(s string, now time.Time) (time.Time, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return time.Time{}, nil
	}
	if t, err := time.Parse(time.RFC3339Nano, s); err == nil {
		return t, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || d < 0 {
		return time.Time{}, fmt.Errorf("must be an RFC 3339 time (2026-01-02T15:04:05Z) or a positive duration ago (90m, 24h), got %q", s)
	}
	return now.Add(-d), nil
}

// replayer sends retained events again, at most one per interval, and keeps at most cap(sem)
// unacknowledged.
type replayer struct {
	pub      *kafka.Publisher
	toTopic  string
	at       time.Time
	interval time.Duration // 0: unlimited
	next     time.Time     // when the next event may go
	sem      chan struct{}

	mu    sync.Mutex
	acked int64
	err   error // the first failure
}

// send hands m to the producer, once the rate allows and a slot is free; it returns the first
// failure of an earlier event, if any, so that nothing is sent after a failed event.
func (r *replayer) send(ctx context.Context, m *relay.Message) error {
	if r.interval > 0 {
		now := time.Now()
		if r.next.Before(now.Add(-time.Second)) {
			r.next = now // no burst after a slow stretch: at most a second's worth is made up
		}
		if d := r.next.Sub(now); d > 0 {
			select {
			case <-time.After(d):
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		r.next = r.next.Add(r.interval)
	}
	select {
	case r.sem <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	if err := r.failed(); err != nil {
		return err
	}
	id := m.ID
	err := r.pub.Replay(ctx, m, r.toTopic, r.at, func(err error) {
		<-r.sem
		r.mu.Lock()
		defer r.mu.Unlock()
		if err == nil {
			r.acked++
		} else if r.err == nil {
			r.err = fmt.Errorf("event of row %d: %w", id, err)
		}
	})
	if err != nil {
		<-r.sem
		return fmt.Errorf("event of row %d: %w", id, err)
	}
	return nil
}

func (r *replayer) failed() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.err
}

func (r *replayer) sent() int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.acked
}

// stop waits for every event handed over to be acknowledged, and returns cause, or the first
// failure, saying how many events went out.
func (r *replayer) stop(ctx context.Context, cause error) error {
	flushCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
	defer cancel()
	flushErr := r.pub.Flush(flushCtx)
	if cause == nil {
		cause = r.failed()
	}
	if cause == nil && flushErr != nil {
		cause = fmt.Errorf("wait for acknowledgements: %w", flushErr)
	}
	if cause != nil {
		return fmt.Errorf("replay stopped after %d event(s) acknowledged: %w", r.sent(), cause)
	}
	return nil
}
