package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/outbox-relay/outbox-relay/adapters/kafka"
	"github.com/outbox-relay/outbox-relay/adapters/postgres"
)

const partitionsUsage = `Usage: outbox-relay partitions <list|repin> [flags] [topic...]

The relay hashes each topic's keys with the partition count pinned for the topic the first time
it published to it (kept in the <table>_topics table), so partitions added to a topic later
move no key, and no consumer sees a key's events out of order. The new partitions stay unused
until the topic is repinned.

  list   print each pinned topic with its pinned and live (broker) partition counts
  repin  pin the given topics to their live partition count: their keys move to the partitions
         of the new count once the relay restarts

Safe procedure to grow a topic: stop every relay replica (the outbox keeps the new events), wait
until the topic's consumer groups have caught up, add the partitions, run 'partitions repin
<topic>', start the relay. repin refuses while a relay leads the outbox (--force overrides), and
inserts or updates pins: run it with the tables' owner, not the relay's role.`

// partitionsRow is one topic of 'partitions list' and 'partitions repin'.
type partitionsRow struct {
	Topic    string    `json:"topic"`
	Pinned   int       `json:"pinned"`
	Previous *int      `json:"previous,omitempty"` // repin: the count pinned before, if any
	Live     *int      `json:"live"`               // null when the brokers could not be asked
	PinnedAt time.Time `json:"pinned_at"`
}

func partitionsCmd(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	sub, err := subcommand(args, partitionsUsage, stderr, "list", "repin")
	if sub == "" {
		return err
	}
	fs := newFlagSet("partitions "+sub, strings.SplitN(partitionsUsage, "\n\n", 2)[1], stderr)
	addFlags(fs)
	addOutboxFlag(fs, "whose pins to list or change")
	force := fs.Bool("force", false, "repin even while a relay leads the outbox")
	asJSON := fs.Bool("json", false, "print the topics as a JSON array")
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	var topics []string
	for _, a := range fs.Args() {
		if !strings.HasPrefix(a, "-") {
			topics = append(topics, a)
		}
	}
	if sub == "repin" && len(topics) == 0 {
		return errors.New("repin needs the topics to repin")
	}
	if sub == "list" && len(topics) > 0 {
		return fmt.Errorf("unexpected arguments %q", topics)
	}
	cfg, pool, err := loadDatabase(ctx, fs)
	if err != nil {
		return err
	}
	defer pool.Close()
	secret := pool.Config().ConnConfig.Password
	t := cfg.Store.Table.WithDefaults()
	if err := cfg.Kafka.WithDefaults().Validate(); err != nil {
		return err
	}
	pub, err := kafka.NewPublisher(cfg.Kafka)
	if err != nil {
		return err
	}
	defer pub.Close()
	live := func(topic string) (int, error) {
		kctx, cancel := context.WithTimeout(ctx, cfg.StartupTimeout)
		defer cancel()
		return pub.PartitionCount(kctx, topic)
	}

	var rows []partitionsRow
	switch sub {
	case "list":
		pins, err := postgres.ListPins(ctx, pool, t)
		if err != nil {
			return errors.New(postgres.Redact(err.Error(), secret))
		}
		for _, p := range pins {
			row := partitionsRow{Topic: p.Topic, Pinned: p.Partitions, PinnedAt: p.PinnedAt.UTC()}
			if n, err := live(p.Topic); err != nil {
				fmt.Fprintf(stderr, "topic %s: %v\n", p.Topic, err)
			} else {
				row.Live = &n
			}
			rows = append(rows, row)
		}
	case "repin":
		leader, err := postgres.LeaderOf(ctx, pool, t)
		if err != nil {
			return errors.New(postgres.Redact(err.Error(), secret))
		}
		if leader != nil && !*force {
			return fmt.Errorf("a relay leads %s (pid %d, application %q): stop every replica and let the topics' consumers catch up first, or pass --force",
				t, leader.PID, leader.ApplicationName)
		}
		for _, topic := range topics {
			n, err := live(topic)
			if err != nil {
				return err
			}
			old, err := postgres.Repin(ctx, pool, t, topic, n)
			if err != nil {
				return errors.New(postgres.Redact(err.Error(), secret))
			}
			row := partitionsRow{Topic: topic, Pinned: n, Live: &n, PinnedAt: time.Now().UTC()}
			if old > 0 {
				row.Previous = &old
			}
			rows = append(rows, row)
		}
	}
	if *asJSON {
		if rows == nil {
			rows = []partitionsRow{}
		}
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(rows)
	}
	if sub == "repin" {
		for _, r := range rows {
			before := "none"
			if r.Previous != nil {
				before = strconv.Itoa(*r.Previous)
			}
			fmt.Fprintf(stdout, "topic %s: pinned to %d partitions (was %s); relays use it from their next start\n", r.Topic, r.Pinned, before)
		}
		return nil
	}
	if len(rows) == 0 {
		fmt.Fprintf(stdout, "no topic pinned in %s_topics: the relay pins a topic when it first publishes to it\n", t)
		return nil
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "TOPIC\tPINNED\tLIVE\tPINNED_AT\tNOTE")
	for _, r := range rows {
		liveText, note := "?", ""
		if r.Live != nil {
			liveText = strconv.Itoa(*r.Live)
			if *r.Live != r.Pinned {
				note = "partitions added: the new ones stay unused until repinned"
			}
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\n", r.Topic, r.Pinned, liveText, r.PinnedAt.Format(time.RFC3339), note)
	}
	return tw.Flush()
}
