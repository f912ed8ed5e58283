package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
)

const parkedUsage = `Usage: outbox-relay parked <list|retry|drop> [flags]

Inspect and act on parked rows: outbox rows the relay gave up on (invalid, or refused by the
broker relay.max_attempts times), kept with the reason in the <table>_parked table.

  list   print the parked rows (every row unless --id, --key or --aggregate-type narrow it)
  retry  move the selected rows back into the outbox with their original ids and attempts reset:
         they go out before their key's later rows, at the relay's next scan
  drop   delete the selected rows for good; with order_policy wait, their key's later rows go on

retry and drop need a selection: --id (repeatable), --key, --aggregate-type, or --all.
retry and drop change the tables (retry inserts into the outbox, drop deletes parked rows): run
them as the tables' owner. The relay's least-privilege role (sql/roles/relay_role.sql) may only list.`

func parkedCmd(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	sub, err := subcommand(args, parkedUsage, stderr, "list", "retry", "drop")
	if sub == "" {
		return err
	}
	fs := newFlagSet("parked "+sub, strings.SplitN(parkedUsage, "\n\n", 2)[1], stderr)
	addFlags(fs)
	addOutboxFlag(fs, "whose parked rows to work on")
	ids := fs.Int64Slice("id", nil, "select the parked row with this id (repeatable, or comma-separated)")
	key := fs.String("key", "", "select the parked rows with this aggregate_id (the record key)")
	aggType := fs.String("aggregate-type", "", "select the parked rows with this aggregate_type")
	all := fs.Bool("all", false, "select every parked row")
	asJSON := fs.Bool("json", false, "print the rows as a JSON array")
	if err := fs.Parse(args[1:]); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	filter := postgres.ParkedFilter{IDs: *ids, Key: *key, AggregateType: *aggType, All: *all}
	if *all && (len(*ids) > 0 || *key != "" || *aggType != "") {
		return errors.New("--all selects every row: do not combine it with --id, --key or --aggregate-type")
	}
	if sub != "list" && len(*ids) == 0 && *key == "" && *aggType == "" && !*all {
		return fmt.Errorf("%s needs a selection: --id, --key, --aggregate-type or --all", sub)
	}
	cfg, pool, err := loadDatabase(ctx, fs)
	if err != nil {
		return err
	}
	defer pool.Close()
	secret := pool.Config().ConnConfig.Password
	t := cfg.Store.Table.WithDefaults()
	var rows []postgres.ParkedRow
	switch sub {
	case "list":
		rows, err = postgres.ListParked(ctx, pool, t, filter)
	case "retry":
		rows, err = postgres.RetryParked(ctx, pool, t, filter)
	case "drop":
		rows, err = postgres.DropParked(ctx, pool, t, filter)
	}
	if err != nil {
		msg := postgres.Redact(err.Error(), secret)
		var pgErr *pgconn.PgError
		if sub != "list" && errors.As(err, &pgErr) && pgErr.Code == "42501" { // insufficient_privilege
			// The relay's least-privilege role (sql/roles/relay_role.sql) may list parked rows but
			// neither delete them nor insert into the outbox: say who may.
			return fmt.Errorf("%s\nrun parked %s as the tables' owner: the relay's least-privilege role may only list parked rows", msg, sub)
		}
		return errors.New(msg)
	}
	topic := func(r postgres.ParkedRow) string {
		if r.Topic != nil && *r.Topic != "" {
			return *r.Topic
		}
		return strings.NewReplacer("{aggregate_type}", r.AggregateType, "{event_type}", r.EventType).
			Replace(cfg.Kafka.WithDefaults().TopicTemplate)
	}
	if *asJSON {
		return writeParkedJSON(stdout, rows, topic)
	}
	switch sub {
	case "list":
		if len(rows) == 0 {
			fmt.Fprintf(stdout, "no parked rows in %s_parked\n", t)
			return nil
		}
		tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "ID\tEVENT_ID\tKEY\tTYPE\tTOPIC\tATTEMPTS\tPARKED_AT\tREASON")
		for _, r := range rows {
			fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%d\t%s\t%s\n", r.ID, r.EventID, keyText(r), r.EventType, topic(r),
				r.Attempts, r.ParkedAt.UTC().Format(time.RFC3339), oneLine(r.Reason))
		}
		return tw.Flush()
	case "retry":
		fmt.Fprintf(stdout, "retried %d parked row(s): moved back into %s with their original ids, attempts reset\n", len(rows), t)
	case "drop":
		fmt.Fprintf(stdout, "dropped %d parked row(s) from %s_parked\n", len(rows), t)
	}
	for _, r := range rows {
		fmt.Fprintf(stdout, "  id=%d event_id=%s key=%s type=%s\n", r.ID, r.EventID, keyText(r), r.EventType)
	}
	return nil
}

// parkedJSON is the --json form of a parked row.
type parkedJSON struct {
	ID            int64     `json:"id"`
	EventID       string    `json:"event_id"`
	AggregateType string    `json:"aggregate_type"`
	Key           *string   `json:"key"`
	Type          string    `json:"type"`
	Topic         string    `json:"topic"`
	Attempts      int       `json:"attempts"`
	Reason        string    `json:"reason"`
	ParkedAt      time.Time `json:"parked_at"`
}

func writeParkedJSON(w io.Writer, rows []postgres.ParkedRow, topic func(postgres.ParkedRow) string) error {
	out := make([]parkedJSON, 0, len(rows))
	for _, r := range rows {
		out = append(out, parkedJSON{ID: r.ID, EventID: r.EventID, AggregateType: r.AggregateType, Key: r.AggregateID,
			Type: r.EventType, Topic: topic(r), Attempts: r.Attempts, Reason: r.Reason, ParkedAt: r.ParkedAt.UTC()})
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(out)
}

func keyText(r postgres.ParkedRow) string {
	if r.AggregateID == nil {
		return "NULL"
	}
	return fmt.Sprintf("%q", *r.AggregateID)
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }
