package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/outbox-relay/outbox-relay/adapters/kafka"
	"github.com/outbox-relay/outbox-relay/adapters/postgres"
)

// statusReport is what 'outbox-relay status --json' prints.
type statusReport struct {
	Outbox string `json:"outbox"`
	// Name is the outbox's name: its entry's under outboxes:, else its table (Outbox).
	Name string `json:"name"`
	// Pending counts rows not yet published, Held included; extrapolated when PendingEstimated.
	Pending          int64 `json:"pending"`
	PendingEstimated bool  `json:"pending_estimated"`
	// Held counts the pending rows held behind a parked row of their key (relay.order_policy
	// wait); OldestAgeSeconds leaves them out.
	Held             int64         `json:"held"`
	OldestAgeSeconds float64       `json:"oldest_pending_age_seconds"`
	Parked           int64         `json:"parked"`
	ParkedEstimated  bool          `json:"parked_estimated"`
	Topics           []statusTopic `json:"topics"`
	// HeldKeys says why rows are held: per key, its first parked row and the rows behind it.
	HeldKeys []postgres.HeldKey `json:"held_keys"`
	// MissingTopics are the topics of pending rows that do not exist in Kafka, with the fix.
	MissingTopics []statusMissing `json:"missing_topics"`
	// TopicsChecked is false when Kafka was not asked (another sink, no brokers configured, or
	// the brokers did not answer: TopicsCheckError says why).
	TopicsChecked    bool   `json:"topics_checked"`
	TopicsCheckError string `json:"topics_check_error,omitempty"`
	// Leader is the session holding the leadership lock; null when no relay leads.
	Leader *postgres.Holder `json:"leader"`
}

type statusTopic struct {
	Topic            string  `json:"topic"`
	Pending          int64   `json:"pending"`
	Held             int64   `json:"held"`
	OldestAgeSeconds float64 `json:"oldest_pending_age_seconds"`
	Parked           int64   `json:"parked"`
}

// statusMissing is a topic that does not exist while rows wait for it.
type statusMissing struct {
	Topic   string `json:"topic"`
	Pending int64  `json:"pending"`
	Fix     string `json:"fix"`
}

// topicCheckTimeout bounds status's metadata request to Kafka.
const topicCheckTimeout = 5 * time.Second

// The held keys status reads (those with the most held rows first), and prints in its table.
const (
	heldKeysRead  = 100
	heldKeysShown = 20
)

func statusCmd(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("status", "Show the outbox's backlog per topic (pending rows, rows held behind parked rows, age of\n"+
		"the oldest, parked rows), why rows are held, the topics of pending rows that do not exist in\n"+
		"Kafka, and which relay holds the leadership. A readable table by default, --json for scripts.", stderr)
	addFlags(fs)
	addOutboxFlag(fs, "to show (default: every outbox)")
	asJSON := fs.Bool("json", false, "print JSON instead of a table")
	scanRows := fs.Int("scan-rows", 100000, "pending rows read at most; beyond, counts are extrapolated and marked estimated")
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfgs, err := loadOutboxes(fs, true)
	if err != nil {
		return err
	}
	// Every outbox of the file is shown, each in its order, unless --outbox picks one; one that
	// cannot be read is reported after the others.
	list := cfgs[0].Multi && fs.Lookup("outbox").Value.String() == ""
	var reps []statusReport
	var errs []error
	for _, cfg := range cfgs {
		rep, err := statusOf(ctx, cfg, *scanRows)
		if err != nil {
			if list {
				err = fmt.Errorf("outbox %s: %w", cfg.Name, err)
			}
			errs = append(errs, err)
			continue
		}
		reps = append(reps, rep)
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if list {
			if err := enc.Encode(reps); err != nil {
				return err
			}
		} else if len(reps) == 1 {
			if err := enc.Encode(reps[0]); err != nil {
				return err
			}
		}
		return errors.Join(errs...)
	}
	for i, rep := range reps {
		if i > 0 {
			fmt.Fprintln(stdout)
		}
		printStatus(stdout, rep)
	}
	return errors.Join(errs...)
}

// statusOf reads the status of one outbox.
func statusOf(ctx context.Context, cfg *Config, scanRows int) (statusReport, error) {
	pool, err := openPool(ctx, cfg)
	if err != nil {
		return statusReport{}, err
	}
	defer pool.Close()
	table := cfg.Store.Table.WithDefaults()
	qctx, cancel := context.WithTimeout(ctx, cfg.Store.QueryTimeout)
	defer cancel()
	if err := postgres.CheckOutbox(qctx, pool, table); err != nil {
		return statusReport{}, err
	}
	template := cfg.Kafka.TopicTemplate
	if cfg.Sink != "kafka" {
		template = "{aggregate_type}" // as the metrics label it: see backlogOf
	}
	held := holdsParked(cfg)
	b, err := postgres.BacklogOf(qctx, pool, table, template, scanRows, held)
	if err != nil {
		return statusReport{}, err
	}
	heldKeys := []postgres.HeldKey{}
	if held && b.Held > 0 {
		if heldKeys, err = postgres.HeldKeys(qctx, pool, table, scanRows, heldKeysRead); err != nil {
			return statusReport{}, err
		}
	}
	leader, err := postgres.LeaderOf(qctx, pool, table)
	if err != nil {
		return statusReport{}, err
	}
	rep := statusReport{
		Outbox:           table.String(),
		Name:             cfg.Name,
		Pending:          int64(math.Round(b.Pending)),
		PendingEstimated: b.Estimated,
		Held:             int64(math.Round(b.Held)),
		OldestAgeSeconds: b.OldestAge.Seconds(),
		Parked:           int64(math.Round(b.Parked)),
		ParkedEstimated:  b.ParkedEstimated,
		Topics:           []statusTopic{},
		HeldKeys:         heldKeys,
		MissingTopics:    []statusMissing{},
		Leader:           leader,
	}
	for _, t := range b.Topics {
		rep.Topics = append(rep.Topics, statusTopic{Topic: t.Topic, Pending: int64(math.Round(t.Pending)),
			Held: int64(math.Round(t.Held)), OldestAgeSeconds: t.OldestAge.Seconds(), Parked: int64(math.Round(t.Parked))})
	}
	if cfg.Sink == "kafka" && len(cfg.Kafka.Brokers) > 0 {
		checkTopics(ctx, cfg, &rep)
	}
	return rep, nil
}

// checkTopics asks Kafka whether the topics of the pending rows exist, and puts those that do
// not in r. A broker that does not answer is said in r, not an error: the rest of the status
// holds.
func checkTopics(ctx context.Context, cfg *Config, r *statusReport) {
	var topics []string
	pending := map[string]int64{}
	for _, t := range r.Topics {
		if t.Pending > 0 {
			topics = append(topics, t.Topic)
			pending[t.Topic] = t.Pending
		}
	}
	if len(topics) == 0 {
		r.TopicsChecked = true
		return
	}
	ctx, cancel := context.WithTimeout(ctx, topicCheckTimeout)
	defer cancel()
	missing, err := kafka.MissingTopics(ctx, cfg.Kafka, topics)
	if err != nil {
		r.TopicsCheckError = err.Error()
		return
	}
	r.TopicsChecked = true
	fix := "create it, or set kafka.auto_create_topics=true to let the brokers create it"
	if cfg.Kafka.AutoCreateTopics {
		fix = "the brokers create it at its first publish, unless they refuse to (auto.create.topics.enable=false): then create it"
	}
	for _, t := range missing {
		r.MissingTopics = append(r.MissingTopics, statusMissing{Topic: t, Pending: pending[t], Fix: fix})
	}
}

func printStatus(w io.Writer, r statusReport) {
	approx, approxParked := "", ""
	if r.PendingEstimated {
		approx = "~"
	}
	if r.ParkedEstimated {
		approxParked = "~"
	}
	if r.Name != r.Outbox {
		fmt.Fprintf(w, "outbox   %s (%s)\n", r.Name, r.Outbox)
	} else {
		fmt.Fprintf(w, "outbox   %s\n", r.Outbox)
	}
	if h := r.Leader; h != nil {
		parts := []string{fmt.Sprintf("pid %d", h.PID)}
		if h.ApplicationName != "" {
			parts = append(parts, fmt.Sprintf("application %q", h.ApplicationName))
		}
		if h.ClientAddr != "" {
			parts = append(parts, "client "+h.ClientAddr)
		}
		if h.BackendStart != nil {
			parts = append(parts, fmt.Sprintf("connected %s (%s ago)", h.BackendStart.UTC().Format(time.RFC3339),
				time.Since(*h.BackendStart).Round(time.Second)))
		}
		if h.LastActive != nil {
			parts = append(parts, fmt.Sprintf("last active %s ago", time.Since(*h.LastActive).Round(time.Second)))
		}
		fmt.Fprintf(w, "leader   %s\n", strings.Join(parts, ", "))
	} else {
		fmt.Fprintln(w, "leader   none: no relay holds the leadership")
	}
	fmt.Fprintf(w, "pending  %s%d", approx, r.Pending)
	if r.Pending > r.Held {
		fmt.Fprintf(w, " (oldest %s)", age(r.OldestAgeSeconds))
	}
	fmt.Fprintf(w, "\nheld     %s%d", approx, r.Held)
	if r.Held > 0 {
		fmt.Fprint(w, " behind parked rows of their keys (relay.order_policy wait)")
	}
	fmt.Fprintf(w, "\nparked   %s%d\n", approxParked, r.Parked)
	for _, m := range r.MissingTopics {
		fmt.Fprintf(w, "missing  kafka topic %s does not exist, %s%d rows wait for it: %s\n", m.Topic, approx, m.Pending, m.Fix)
	}
	if r.TopicsCheckError != "" {
		fmt.Fprintf(w, "kafka    topics not checked: %s\n", r.TopicsCheckError)
	}
	if r.PendingEstimated || r.ParkedEstimated {
		fmt.Fprintln(w, "(~ counts extrapolated from the oldest rows read; raise --scan-rows for exact counts)")
	}
	if len(r.Topics) == 0 {
		return
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "TOPIC\tPENDING\tHELD\tOLDEST\tPARKED\t")
	for _, t := range r.Topics {
		oldest := "-"
		if t.Pending > t.Held {
			oldest = age(t.OldestAgeSeconds)
		}
		fmt.Fprintf(tw, "%s\t%s%d\t%s%d\t%s\t%s%d\t\n", t.Topic, approx, t.Pending, approx, t.Held, oldest, approxParked, t.Parked)
	}
	_ = tw.Flush()
	printHeld(w, r)
}

// printHeld says why rows are held: per key, the parked row they wait for, and what to do.
func printHeld(w io.Writer, r statusReport) {
	if len(r.HeldKeys) == 0 {
		return
	}
	fmt.Fprintln(w)
	for i, k := range r.HeldKeys {
		if i == heldKeysShown {
			fmt.Fprintf(w, "... and %d more keys ('status --json' lists up to %d)\n", len(r.HeldKeys)-i, heldKeysRead)
			break
		}
		rows, key := "rows", fmt.Sprintf("key %s", k.Key)
		if k.Held == 1 {
			rows = "row"
		}
		if k.Key == "" {
			key = "the empty key"
		}
		more := ""
		if k.Parked > 1 {
			more = fmt.Sprintf(" (and %d more)", k.Parked-1)
		}
		fmt.Fprintf(w, "%d %s held behind parked row %d%s of %s (%s)\n", k.Held, rows, k.ParkedID, more, key, k.AggregateType)
	}
	if r.PendingEstimated {
		fmt.Fprintln(w, "(held rows counted among the oldest rows read; raise --scan-rows for all)")
	}
	fmt.Fprintln(w, "Fix the cause, then 'outbox-relay parked retry --id ID' (or drop it) to release them; 'parked list' shows the reasons.")
}

// age renders seconds for a person: 850ms, 12.3s, 4m10s, 2h5m0s.
func age(s float64) string {
	d := time.Duration(s * float64(time.Second))
	switch {
	case d < time.Second:
		return d.Round(time.Millisecond).String()
	case d < time.Minute:
		return d.Round(100 * time.Millisecond).String()
	default:
		return d.Round(time.Second).String()
	}
}
