package postgres

import (
	"context"
	"encoding/binary"
	"fmt"
	"slices"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/app/relay"
)

// Claims of whole transactions too large for memory (relay.TxStreamer). With
// StoreConfig.Transactions a claim returns every row of each transaction it reaches; once the
// relay allows it (CutClaims), a claim that decoded streamCut times its byte bound stops
// decoding, and reads the rest of its result only for what the relay needs to stream it: each
// row's id, transaction, key, and whether it may go now. The rows themselves are then read a page
// at a time (ClaimRest), in id order: the rows of the same transactions, which are committed, so
// no row of them can appear or change meanwhile but by the relay's own marks.

// streamCut is how many times its byte bound a claim of whole transactions decodes before it
// stops, leaving the rest to stream: a claim's transactions often run a little past the bound,
// and a stream holds the claims up until its rows are marked.
const streamCut = 2

// restWindowMin is the fewest ids a page of ClaimRest reads past the last (twice its row limit,
// at least twice this).
const restWindowMin = 256

var _ relay.TxStreamer = (*session)(nil)

// CutClaims implements relay.TxStreamer.
func (s *session) CutClaims() { s.cuts = true }

// ClaimedRest implements relay.TxStreamer.
func (s *session) ClaimedRest() *relay.TxRest { return s.txRest }

// restOf reads the rows of a claim's result left in rows, past the row after (the last one
// decoded), without decoding their payloads, into what relay.TxRest says of them; nil when no row
// is left. The rows are in id order; a negative tx is a row that may not go now (wholeTxs).
func restOf(rows pgx.Rows, scan bool, after int64) (*relay.TxRest, error) {
	r := &relay.TxRest{After: after}
	txs := make(map[int64]struct{})
	keys := make(map[uint64]struct{})
	for rows.Next() {
		var id, tx int64
		if scan {
			vals, err := rows.Values()
			if err != nil {
				return nil, err
			}
			id, _ = vals[0].(int64)
			tx, _ = vals[txCol].(int64)
			at, _ := vals[2].(string)
			aid, _ := vals[3].(string)
			keys[relay.KeyHash(at, aid)] = struct{}{}
		} else {
			vals := rows.RawValues()
			if len(vals) != claimColumns || len(vals[0]) != 8 || len(vals[txCol]) != 8 {
				return nil, fmt.Errorf("claim: unexpected row of %d columns", len(vals))
			}
			id = int64(binary.BigEndian.Uint64(vals[0]))
			tx = int64(binary.BigEndian.Uint64(vals[txCol]))
			keys[relay.KeyHash(vals[2], vals[3])] = struct{}{}
		}
		if tx < 0 {
			r.Held, tx = true, -tx
		}
		if tx == 0 {
			r.IDs = append(r.IDs, id)
		} else {
			txs[tx] = struct{}{}
		}
		r.End = max(r.End, id)
		r.Rows++
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	if r.Rows == 0 {
		return nil, nil
	}
	for tx := range txs {
		r.Txs = append(r.Txs, tx)
	}
	slices.Sort(r.Txs)
	for k := range keys {
		r.Keys = append(r.Keys, k)
	}
	slices.Sort(r.Keys)
	return r, nil
}

// restQuery returns the query of ClaimRest: the pending rows with ids in ($1, $2] of the
// transactions $3 (as text) or with the ids $4, in id order, at most $5. ($1, $2] is a window
// past the last page: a page costs its window, not the transaction.
func (s *Store) restQuery() string {
	t := s.table
	return `SELECT ` + claimCols(t, true) + ` FROM ` + t.outbox() + `
		WHERE dispatched_at IS NULL AND ` + t.id("") + ` > $1 AND ` + t.id("") + ` <= $2
			AND (tx = ANY($3::text[]::xid8[]) OR ` + t.id("") + ` = ANY($4::bigint[]))
		ORDER BY ` + t.id("") + ` LIMIT $5`
}

// ClaimRest implements relay.TxStreamer.
func (s *session) ClaimRest(ctx context.Context, rest *relay.TxRest, limit, maxBytes int) ([]relay.Message, *relay.TxRest, error) {
	s.dropPrefetched()
	ctx, cancel := s.op(ctx)
	defer cancel()
	sent := time.Now()
	txs := make([]string, len(rest.Txs))
	for i, tx := range rest.Txs {
		txs[i] = strconv.FormatInt(tx, 10)
	}
	ids := rest.IDs
	if ids == nil {
		ids = []int64{}
	}
	s.dec.pool.budget(maxBytes)
	// A window of ids past After bounds what the page reads, whatever plan the database picks
	// (without fresh statistics it scanned every id up to End for each page).
	limit = max(limit, 1)
	hi := min(rest.End, rest.After+int64(max(limit, restWindowMin)*2))
	rows, err := s.conn.Query(ctx, s.store.restQuery(), claimFormats, rest.After, hi, txs, ids, limit)
	if err != nil {
		return nil, nil, s.wrap(err)
	}
	defer rows.Close()
	out := make([]relay.Message, 0, min(limit, 256))
	scan := !s.dec.decodable(rows.FieldDescriptions())
	if s.dec.intern == nil {
		s.dec.intern = make(map[string]string)
	}
	s.dec.reset()
	size, full := 0, false
	for rows.Next() {
		if scan {
			out, err = scanClaimed(out, rows)
		} else {
			out, err = s.dec.decode(out, rows.RawValues())
		}
		if err != nil {
			return nil, nil, s.wrap(err)
		}
		size += out[len(out)-1].Size()
		if !scan {
			size += s.dec.pendingText()
		}
		if size >= maxBytes || len(out) >= limit {
			full = true
			break
		}
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, nil, s.wrap(err)
	}
	if !scan {
		s.dec.finish(out)
	}
	if s.term != nil {
		s.term.confirm(sent, s.store.lease) // answered by the session's own backend, as Claim
	}
	next := *rest
	next.After = hi // the window was read whole
	if full {
		next.After = out[len(out)-1].ID
	}
	if next.After >= rest.End {
		return out, nil, nil
	}
	next.Rows = max(rest.Rows-len(out), 1)
	i, _ := slices.BinarySearch(rest.IDs, next.After+1)
	next.IDs = rest.IDs[i:]
	return out, &next, nil
}
