package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
)

// watermillExeDefault is where bench/run.sh builds the Watermill baseline.
const watermillExeDefault = "bin/bench-watermill"

// watermillBuild is how to build the Watermill baseline, from the repository's root.
const watermillBuild = `go build -C bench/watermill -o "$PWD/bin/bench-watermill" .`

// watermillReady reports whether the Watermill baseline's binary is there; the first time it is
// not, it says so in the log, with how to build it.
func (b *bench) watermillReady() bool {
	b.watermillOnce.Do(func() {
		st, err := os.Stat(b.opts.WatermillExe)
		b.watermillOK = err == nil && !st.IsDir() && st.Mode()&0o111 != 0
		if !b.watermillOK {
			b.log.Printf("watermill: skipped, no binary at %q (-watermill-exe); build it with %s", b.opts.WatermillExe, watermillBuild)
		}
	})
	return b.watermillOK
}

// peerRate is the offered rate of the peers section: a sidecar's typical low rate.
const peerRate = 1000

// peerVariants are the variants the peers section compares, in their first round's order.
var peerVariants = []string{variantRelay, variantNaive, variantSQLOnly, variantWatermill}

// peers measures commit-to-ack latency and CPU at peerRate events/s, one event per transaction,
// for the relay and its baselines, each on a fresh schema and broker, in -repeat rounds of
// alternating order. The naive loop's acknowledgement is its ProduceSync returning, SQL-only's
// (no broker) its mark, Watermill's its Kafka publisher returning.
func (b *bench) peers(ctx context.Context) error {
	var variants []string
	for _, v := range peerVariants {
		if v == variantWatermill && !b.watermillReady() {
			continue
		}
		if len(b.opts.Variants) == 0 || slices.Contains(b.opts.Variants, v) {
			variants = append(variants, v)
		}
	}
	for run := 1; run <= max(1, b.opts.Repeat); run++ {
		order := slices.Clone(variants)
		if run%2 == 0 {
			slices.Reverse(order)
		}
		for _, v := range order {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			lr, err := b.peerRun(ctx, v)
			if err != nil {
				return fmt.Errorf("peers %s, run %d: %w", v, run, err)
			}
			lr.Run = run
			b.res.Peers = append(b.res.Peers, lr)
			b.log.Printf("peers %-9s run %d at %d/s (written %.0f/s): commit-to-ack p50 %.2f ms p99 %.2f ms p99.9 %.2f ms max %.2f ms; cpu ms/10k: own %.0f db %.0f (%d events)",
				v, run, peerRate, lr.WrittenPerSec, lr.P50, lr.P99, lr.P999, lr.Max, lr.CPUMsPer10k, lr.DBCPUMsPer10k, lr.Events)
		}
	}
	return nil
}

// peerRun measures one variant once.
func (b *bench) peerRun(ctx context.Context, variant string) (latencyResult, error) {
	schema, err := b.schema(ctx, "peers")
	if err != nil {
		return latencyResult{}, err
	}
	defer b.dropSchema(schema)
	cfg := childConfig{DatabaseURL: b.opts.DatabaseURL, Schema: schema, Mark: postgres.MarkDelete, Latency: true}
	switch variant {
	case variantRelay:
		cfg.Role = roleRelay
	case variantNaive:
		cfg.Role = roleNaive
	case variantSQLOnly:
		cfg.Role = roleSQLOnly
	case variantWatermill:
		cfg.Role = roleWatermill
	default:
		return latencyResult{}, fmt.Errorf("unknown variant %q", variant)
	}
	if variant != variantSQLOnly {
		br, err := b.startBroker(ctx)
		if err != nil {
			return latencyResult{}, err
		}
		defer br.close()
		cfg.Brokers = br.addrs
	}
	if variant == variantNaive || variant == variantSQLOnly {
		// They poll and LISTEN to nothing: their writers do not pay for a NOTIFY, as Watermill's
		// do not (its table has no trigger), and the relay's do (its wake-up).
		if err := b.setTrigger(ctx, schema, false); err != nil {
			return latencyResult{}, err
		}
	}
	p, err := b.start(ctx, cfg)
	if err != nil {
		return latencyResult{}, err
	}
	defer func() { _ = p.stop() }()
	var w *writers
	if variant == variantWatermill {
		w, err = b.newWatermillWriters(ctx, p.info) // the child names its table when ready
	} else {
		w, err = b.newWriters(ctx, schema)
	}
	if err != nil {
		return latencyResult{}, err
	}
	defer w.close()
	if err := p.send("go"); err != nil {
		return latencyResult{}, err
	}
	lr, err := b.latencyRun(ctx, w, p, variant, peerRate)
	if err != nil {
		return lr, err
	}
	return lr, p.stop()
}

// watermillEnvelope is the JSON Watermill's forwarder publisher stores for each message
// (forwarder.messageEnvelope, field for field and in the same order).
type watermillEnvelope struct {
	DestinationTopic string            `json:"destination_topic"`
	UUID             string            `json:"uuid"`
	Payload          []byte            `json:"payload"`
	Metadata         map[string]string `json:"metadata"`
}

// newWatermillWriters returns writers that append to the Watermill forwarder's table (its queue
// schema: uuid, payload, metadata) the rows Watermill's forwarder publisher over its SQL
// publisher writes: one multi-row INSERT per transaction, each row an envelope naming the
// destination topic and carrying the event (its id as the message UUID, the aggregate id and
// event type as metadata), under a fresh UUID with empty metadata. The forwarder unwraps every
// row, so a row in any other layout would never be acknowledged and the run would fail.
func (b *bench) newWatermillWriters(ctx context.Context, table string) (*writers, error) {
	if table == "" || strings.ContainsAny(table, ";\n") {
		return nil, fmt.Errorf("watermill: the child named no usable table (%q)", table)
	}
	w, err := b.newWriters(ctx, "")
	if err != nil {
		return nil, err
	}
	now := time.Now().UTC().Format(time.RFC3339Nano)
	w.appendFn = func(ctx context.Context, tx pgx.Tx, msgs []postgres.Message) error {
		var sb strings.Builder
		sb.WriteString(`INSERT INTO ` + table + ` (uuid, payload, metadata) VALUES `)
		args := make([]any, 0, 3*len(msgs))
		for i, m := range msgs {
			env, err := json.Marshal(watermillEnvelope{DestinationTopic: topic, UUID: m.EventID, Payload: m.Payload,
				Metadata: map[string]string{"aggregate_type": m.AggregateType, "aggregate_id": m.AggregateID,
					"event_type": m.EventType, "occurred_at": now}})
			if err != nil {
				return err
			}
			if i > 0 {
				sb.WriteString(",")
			}
			fmt.Fprintf(&sb, "($%d,$%d,$%d)", 3*i+1, 3*i+2, 3*i+3)
			args = append(args, newUUID(), env, []byte("{}"))
		}
		_, err := tx.Exec(ctx, sb.String(), args...)
		return err
	}
	return w, nil
}

// peerSummary is one variant of the peers section over its runs: medians, and the range of p99.
type peerSummary struct {
	Variant                          string
	Runs                             int
	P50, P99, P999, Max              float64
	MinP99, MaxP99                   float64
	CPUMsPer10k, DBCPUMsPer10k, Rate float64
}

// peerSummaries summarizes the peers section by variant, in peerVariants' order.
func peerSummaries(all []latencyResult) []peerSummary {
	var out []peerSummary
	for _, v := range peerVariants {
		var runs []latencyResult
		for _, l := range all {
			if l.Mode == v {
				runs = append(runs, l)
			}
		}
		if len(runs) == 0 {
			continue
		}
		col := func(f func(l latencyResult) float64) []float64 {
			s := make([]float64, len(runs))
			for i, l := range runs {
				s[i] = f(l)
			}
			return s
		}
		p99 := col(func(l latencyResult) float64 { return l.P99 })
		out = append(out, peerSummary{Variant: v, Runs: len(runs),
			P50: median(col(func(l latencyResult) float64 { return l.P50 })),
			P99: median(p99), MinP99: slices.Min(p99), MaxP99: slices.Max(p99),
			P999:          median(col(func(l latencyResult) float64 { return l.P999 })),
			Max:           median(col(func(l latencyResult) float64 { return l.Max })),
			CPUMsPer10k:   median(col(func(l latencyResult) float64 { return l.CPUMsPer10k })),
			DBCPUMsPer10k: median(col(func(l latencyResult) float64 { return l.DBCPUMsPer10k })),
			Rate:          median(col(func(l latencyResult) float64 { return l.WrittenPerSec })),
		})
	}
	return out
}

// watermillState is the bench's memory of whether the Watermill binary is there.
type watermillState struct {
	watermillOnce sync.Once
	watermillOK   bool
}
