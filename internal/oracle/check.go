package oracle

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/adapters/kafka"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"
)

// HeaderEventID is the record header that carries the event id.
const HeaderEventID = "event-id"

// Report is what Check found on the topics.
type Report struct {
	Committed  int // events whose transaction committed
	RolledBack int // events whose transaction rolled back
	Records    int // records read
	// Lost lists committed event ids with no record (L).
	Lost []string
	// Phantoms lists rolled-back event ids that have a record (P).
	Phantoms []string
	// Duplicates counts records beyond the first of their event id (D).
	Duplicates int
	// Reorders describes records whose key's sequence went backwards, repeats ignored (O).
	Reorders []string
	// NoHeader counts records without the event-id header (H).
	NoHeader int
	// Foreign counts records with an event id the loader never wrote.
	Foreign int
	// Split lists database transactions whose records on one partition are not all in one Kafka
	// transaction (a commit or abort marker between them). Read at read_committed only.
	Split []string
	// Unaccounted counts committed events published but named by no progress record
	// (Options.ProgressTopic): their Kafka transaction wrote no progress, or they have no row id.
	Unaccounted int
	// TxHeaderMismatch counts records whose tx-id header is missing, differs from another record
	// of the same database transaction, or is shared with another one. Checked with
	// Options.TxHeader only.
	TxHeaderMismatch int
}

// Options shape a check.
type Options struct {
	// ReadCommitted reads the topics at read_committed, and checks that each database
	// transaction's records on a partition lie in one Kafka transaction (Report.Split).
	ReadCommitted bool
	// TxHeader checks the tx-id header (Report.TxHeaderMismatch).
	TxHeader bool
	// ProgressTopic, with the loader's Config.RowIDs, checks that each database transaction's
	// records lie in one Kafka transaction across every topic and partition (Report.Split): each
	// Kafka transaction of the relay writes one progress record there, which names its own rows,
	// so a row's Kafka transaction is the first progress record that names it.
	ProgressTopic string
}

// HeaderTxID is the header naming a record's database transaction (exactly-once delivery).
const HeaderTxID = "tx-id"

// String summarizes r on one line.
func (r Report) String() string {
	return fmt.Sprintf("committed=%d rolled_back=%d records=%d lost=%d phantoms=%d duplicates=%d reorders=%d no_header=%d foreign=%d split=%d unaccounted=%d",
		r.Committed, r.RolledBack, r.Records, len(r.Lost), len(r.Phantoms), r.Duplicates, len(r.Reorders), r.NoHeader, r.Foreign, len(r.Split), r.Unaccounted)
}

// Assert fails t unless r shows no loss, no phantom, no reorder, every header present, no
// foreign record, and at most maxDuplicates duplicates.
func (r Report) Assert(t testing.TB, maxDuplicates int) {
	t.Helper()
	t.Logf("oracle: %s (duplicates bound %d)", r, maxDuplicates)
	if len(r.Lost) > 0 {
		t.Errorf("L: %d committed events lost, first: %v", len(r.Lost), r.Lost[:min(5, len(r.Lost))])
	}
	if len(r.Phantoms) > 0 {
		t.Errorf("P: %d rolled-back events published, first: %v", len(r.Phantoms), r.Phantoms[:min(5, len(r.Phantoms))])
	}
	if r.Duplicates > maxDuplicates {
		t.Errorf("D: %d duplicates, bound %d", r.Duplicates, maxDuplicates)
	}
	if len(r.Reorders) > 0 {
		t.Errorf("O: %d reorders, first: %v", len(r.Reorders), r.Reorders[:min(5, len(r.Reorders))])
	}
	if r.NoHeader > 0 {
		t.Errorf("H: %d records without the %s header", r.NoHeader, HeaderEventID)
	}
	if r.Foreign > 0 {
		t.Errorf("%d records with an event id the loader never wrote", r.Foreign)
	}
	if len(r.Split) > 0 {
		t.Errorf("A: %d database transactions split across Kafka transactions, first: %v", len(r.Split), r.Split[:min(5, len(r.Split))])
	}
	if r.Unaccounted > 0 {
		t.Errorf("%d published events named by no progress record", r.Unaccounted)
	}
	if r.TxHeaderMismatch > 0 {
		t.Errorf("%d records whose %s header does not name their database transaction alone", r.TxHeaderMismatch, HeaderTxID)
	}
	if r.Committed == 0 {
		t.Errorf("no event committed: the test proved nothing")
	}
}

// Check reads every topic of l from offset 0 until every committed event arrived or timeout
// passed, then up to the topics' end, and checks the records against what l wrote. Unknown
// outcomes are resolved first. Call it once the relay has nothing left to publish.
func Check(ctx context.Context, brokers []string, l *Loader, timeout time.Duration) (Report, error) {
	return CheckWith(ctx, brokers, l, timeout, Options{})
}

// CheckWith is Check with options.
func CheckWith(ctx context.Context, brokers []string, l *Loader, timeout time.Duration, o Options) (Report, error) {
	if _, err := l.Resolve(ctx); err != nil {
		return Report{}, err
	}
	events, outcomes := l.snapshot()
	var rep Report
	for _, o := range outcomes {
		switch o {
		case Committed:
			rep.Committed++
		case RolledBack:
			rep.RolledBack++
		}
	}
	opts := []kgo.Opt{kgo.SeedBrokers(brokers...), kgo.ConsumeTopics(l.Topics()...),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()), kgo.FetchMaxWait(200 * time.Millisecond)}
	if o.ReadCommitted {
		// The markers too: they say where each Kafka transaction ends.
		opts = append(opts, kgo.FetchIsolationLevel(kgo.ReadCommitted()), kgo.KeepControlRecords())
	}
	cl, err := kgo.NewClient(opts...)
	if err != nil {
		return rep, err
	}
	defer cl.Close()
	adm := kadm.NewClient(cl)

	seen := map[string]int{}
	type pos struct {
		topic string
		part  int32
	}
	next := map[pos]int64{}  // next offset to read per partition
	last := map[string]int{} // highest sequence seen per key
	// markers counts the transaction markers read per partition: records of one Kafka
	// transaction on a partition have the same count.
	markers := map[pos]int{}
	type txPart struct {
		tx string
		p  pos
	}
	txAt := map[txPart]int{}        // markers before the first record of a database transaction on a partition
	txHeader := map[string]string{} // database transaction -> its tx-id header
	headerTx := map[string]string{} // tx-id header -> database transaction
	split := map[string]bool{}
	missing := func() int {
		n := 0
		for id, o := range outcomes {
			if o == Committed && seen[id] == 0 {
				n++
			}
		}
		return n
	}
	caughtUp := func() (bool, error) {
		ectx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		ends, err := adm.ListEndOffsets(ectx, l.Topics()...)
		if err != nil {
			return false, err
		}
		done := true
		ends.Each(func(o kadm.ListedOffset) {
			if o.Err == nil && next[pos{o.Topic, o.Partition}] < o.Offset {
				done = false
			}
		})
		return done, ends.Error()
	}
	deadline := time.Now().Add(timeout)
	for {
		pctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
		fetches := cl.PollFetches(pctx)
		cancel()
		fetches.EachRecord(func(r *kgo.Record) {
			next[pos{r.Topic, r.Partition}] = r.Offset + 1
			if r.Attrs.IsControl() {
				markers[pos{r.Topic, r.Partition}]++
				return
			}
			rep.Records++
			id := ""
			for _, h := range r.Headers {
				if h.Key == HeaderEventID {
					id = string(h.Value)
				}
			}
			if id == "" {
				rep.NoHeader++
				return
			}
			seen[id]++
			if seen[id] > 1 {
				rep.Duplicates++
				return
			}
			ev, known := events[id]
			if !known {
				rep.Foreign++
				return
			}
			if outcomes[id] != Committed {
				rep.Phantoms = append(rep.Phantoms, id)
				return
			}
			tp := txPart{ev.Tx, pos{r.Topic, r.Partition}}
			if m, ok := txAt[tp]; !ok {
				txAt[tp] = markers[tp.p]
			} else if m != markers[tp.p] && !split[ev.Tx] {
				split[ev.Tx] = true
				rep.Split = append(rep.Split, fmt.Sprintf("transaction of event %s on %s[%d]", ev.Tx, r.Topic, r.Partition))
			}
			if o.TxHeader {
				h := ""
				for _, hd := range r.Headers {
					if hd.Key == HeaderTxID {
						h = string(hd.Value)
					}
				}
				prevH, seenTx := txHeader[ev.Tx]
				prevTx, seenH := headerTx[h]
				switch {
				case h == "", seenTx && prevH != h, seenH && prevTx != ev.Tx:
					rep.TxHeaderMismatch++
				default:
					txHeader[ev.Tx], headerTx[h] = h, ev.Tx
				}
			}
			var p Payload
			if err := json.Unmarshal(r.Value, &p); err != nil || p.Key != ev.Key || p.Seq != ev.Seq || string(r.Key) != ev.Key {
				rep.Reorders = append(rep.Reorders, fmt.Sprintf("record of event %s does not match it (key %q)", id, r.Key))
				return
			}
			if prev, ok := last[p.Key]; ok && p.Seq <= prev {
				rep.Reorders = append(rep.Reorders, fmt.Sprintf("key %s: seq %d after %d (%s[%d]@%d)", p.Key, p.Seq, prev, r.Topic, r.Partition, r.Offset))
			}
			last[p.Key] = max(last[p.Key], p.Seq)
		})
		if err := ctx.Err(); err != nil {
			return rep, err
		}
		if fetches.NumRecords() > 0 {
			continue
		}
		if missing() == 0 || time.Now().After(deadline) {
			done, err := caughtUp()
			if err != nil && time.Now().After(deadline.Add(30*time.Second)) {
				return rep, fmt.Errorf("list end offsets: %w", err)
			}
			if done || time.Now().After(deadline.Add(30*time.Second)) {
				break
			}
		}
	}
	for id, o := range outcomes {
		if o == Committed && seen[id] == 0 {
			rep.Lost = append(rep.Lost, fmt.Sprintf("%s(%s#%d)", id, events[id].Key, events[id].Seq))
		}
	}
	slices.Sort(rep.Lost)
	if o.ProgressTopic != "" {
		if err := checkProgress(ctx, brokers, o.ProgressTopic, events, outcomes, seen, &rep); err != nil {
			return rep, err
		}
	}
	return rep, nil
}

// checkProgress reads the progress topic at read_committed and requires every published
// database transaction's rows to be first named by one progress record: one Kafka transaction,
// across all topics and partitions.
func checkProgress(ctx context.Context, brokers []string, topic string, events map[string]Event, outcomes map[string]Outcome, seen map[string]int, rep *Report) error {
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...),
		kgo.ConsumePartitions(map[string]map[int32]kgo.Offset{topic: {0: kgo.NewOffset().AtStart()}}),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()), kgo.KeepControlRecords(), kgo.FetchMaxWait(200*time.Millisecond))
	if err != nil {
		return err
	}
	defer cl.Close()
	ectx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	ends, err := kadm.NewClient(cl).ListEndOffsets(ectx, topic)
	if err == nil {
		err = ends.Error()
	}
	if err != nil {
		return fmt.Errorf("progress topic %q: %w", topic, err)
	}
	end, _ := ends.Lookup(topic, 0)
	first := map[int64]int64{} // row id -> offset of the first progress record naming it
	for next := int64(0); next < end.Offset; {
		fetches := cl.PollFetches(ectx)
		if err := ectx.Err(); err != nil {
			return fmt.Errorf("progress topic %q: read up to %d, at %d: %w", topic, end.Offset, next, err)
		}
		var ferr error
		fetches.EachError(func(_ string, _ int32, err error) { ferr = errors.Join(ferr, err) })
		if ferr != nil {
			return fmt.Errorf("progress topic %q: %w", topic, ferr)
		}
		var derr error
		fetches.EachRecord(func(r *kgo.Record) {
			next = max(next, r.Offset+1)
			if r.Attrs.IsControl() {
				return
			}
			ids, err := kafka.DecodeProgress(r.Value)
			if err != nil {
				derr = fmt.Errorf("progress topic %q, offset %d: %w", topic, r.Offset, err)
				return
			}
			for _, id := range ids {
				if _, ok := first[id]; !ok {
					first[id] = r.Offset
				}
			}
		})
		if derr != nil {
			return derr
		}
	}
	txAt := map[string]int64{}
	for id, ev := range events {
		if outcomes[id] != Committed || seen[id] == 0 {
			continue
		}
		at, ok := first[ev.RowID]
		if ev.RowID == 0 || !ok {
			rep.Unaccounted++
			continue
		}
		if prev, ok := txAt[ev.Tx]; !ok {
			txAt[ev.Tx] = at
		} else if prev != at && !slices.ContainsFunc(rep.Split, func(s string) bool { return strings.HasPrefix(s, "transaction of event "+ev.Tx+" ") }) {
			rep.Split = append(rep.Split, fmt.Sprintf("transaction of event %s across Kafka transactions (progress records at offsets %d and %d)", ev.Tx, prev, at))
		}
	}
	return nil
}
