package postgres

import (
	"encoding/binary"
	"fmt"
	"math"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/outbox-relay/outbox-relay/app/relay"
)

// The claim reads a batch of rows on every wake-up and up to a hundred thousand rows a second
// while draining a backlog, and reading them was the largest share of the relay's CPU: pgx's Scan
// allocates every string and byte slice of every row, and the garbage collector then pays for
// each. The claim therefore asks for the binary format and decodes the raw rows itself, into a
// few allocations per batch: the text columns of all rows become one string that each row's
// fields slice, payloads and headers are copied into shared chunks, and the values few rows
// differ in (aggregate type, event type, topic) are interned for the session.

// claimColumns is the number of columns of the claim query, in this order: id, event_id,
// aggregate_type, aggregate_id, event_type, payload, topic, headers, occurred_at, created_at,
// attempts, tx (the writing transaction, 0 unless StoreConfig.Transactions).
const claimColumns = 12

// claimFormats asks for every column of the claim in the binary format (for text columns the
// bytes are the same in either format).
var claimFormats = func() pgx.QueryResultFormats {
	f := make(pgx.QueryResultFormats, claimColumns)
	for i := range f {
		f[i] = pgx.BinaryFormatCode
	}
	return f
}()

// claimOIDs are the types the decoder expects, column by column. A row description that differs
// (a connection in the simple protocol, say, which returns text) is read with Scan instead.
var claimOIDs = [claimColumns]uint32{
	pgtype.Int8OID, pgtype.TextOID, pgtype.TextOID, pgtype.TextOID, pgtype.TextOID, pgtype.ByteaOID,
	pgtype.TextOID, pgtype.TextOID, pgtype.TimestamptzOID, pgtype.TimestamptzOID, pgtype.Int4OID, pgtype.Int8OID,
}

// txCol is the position of the writing transaction in the claim.
const txCol = 11

// payloadCol is the position of the payload in the claim.
const payloadCol = 5

// decodable reports whether rows of fields can be decoded by claimDecoder. The payload may be
// bytea, jsonb, json or text (an adopted table's, see Columns): all are published as their bytes,
// the JSON and text ones as their UTF-8 text. jsonb's binary form is a version byte, 1, then the
// text; json's and text's are the text. decodable sets d.jsonb for decode.
func (d *claimDecoder) decodable(fields []pgconn.FieldDescription) bool {
	if len(fields) != claimColumns {
		return false
	}
	for i, f := range fields {
		if f.Format != pgx.BinaryFormatCode {
			return false
		}
		if i == payloadCol {
			switch f.DataTypeOID {
			case pgtype.ByteaOID, pgtype.JSONOID, pgtype.TextOID, pgtype.JSONBOID:
				d.jsonb = f.DataTypeOID == pgtype.JSONBOID
				continue
			}
			return false
		}
		if f.DataTypeOID != claimOIDs[i] {
			return false
		}
	}
	return true
}

// internMax bounds the interned values of a session; the table is emptied when full.
const internMax = 1024

// chunkSize is the size of the shared chunks payloads and headers are copied into. A payload
// larger than a quarter of it gets an allocation of its own.
const chunkSize = 256 << 10

// claimDecoder decodes the raw rows of one claim. The strings of its messages are set by finish.
type claimDecoder struct {
	intern map[string]string // the session's interned values
	text   []byte            // the text columns of every row of the batch, end to end
	spans  []textSpans       // where each message's text columns are in text
	chunk  []byte            // the free end of the current chunk for payloads and headers
	cur    *chunk            // the current chunk, as handed out by pool
	pieces int               // pieces copied into cur so far
	pool   chunks            // hands out the chunks, and takes them back (chunks.go)
	jsonb  bool              // the claim's payload is jsonb: its version byte is left out
}

// pendingText returns the bytes of text columns decoded but not yet set by finish for the last
// message: its Size grows by that much once finished.
func (d *claimDecoder) pendingText() int {
	if len(d.spans) == 0 {
		return 0
	}
	sp := d.spans[len(d.spans)-1]
	return int(sp.eventID[1]-sp.eventID[0]) + int(sp.aggregateID[1]-sp.aggregateID[0])
}

// textSpans locates the event id and aggregate id of one message in claimDecoder.text.
type textSpans struct{ eventID, aggregateID [2]int32 }

// decode appends the message of one raw row to out. Until finish, its Size misses pendingText.
func (d *claimDecoder) decode(out []relay.Message, vals [][]byte) ([]relay.Message, error) {
	var m relay.Message
	if len(vals) != claimColumns || len(vals[0]) != 8 || len(vals[10]) != 4 || len(vals[txCol]) != 8 {
		return out, fmt.Errorf("claim: unexpected row of %d columns", len(vals))
	}
	m.ID = int64(binary.BigEndian.Uint64(vals[0]))
	m.Attempts = int(int32(binary.BigEndian.Uint32(vals[10])))
	m.TxID = int64(binary.BigEndian.Uint64(vals[txCol]))
	var sp textSpans
	sp.eventID = d.appendText(vals[1])
	sp.aggregateID = d.appendText(vals[3])
	m.AggregateIDNull = vals[3] == nil
	m.AggregateType = d.interned(vals[2])
	m.EventType = d.interned(vals[4])
	m.Topic = d.interned(vals[6])
	payload := vals[payloadCol]
	if d.jsonb && payload != nil {
		if len(payload) == 0 || payload[0] != 1 {
			return out, fmt.Errorf("claim: row %d: payload: unknown jsonb format version", m.ID)
		}
		payload = payload[1:]
	}
	m.Payload = d.bytes(payload)
	m.Headers = d.bytes(vals[7])
	var err error
	if m.OccurredAt, m.OccurredAtInfinite, err = timestamptz(vals[8]); err != nil {
		return out, fmt.Errorf("claim: row %d: occurred_at: %w", m.ID, err)
	}
	if m.CreatedAt, _, err = timestamptz(vals[9]); err != nil {
		return out, fmt.Errorf("claim: row %d: created_at: %w", m.ID, err)
	}
	d.spans = append(d.spans, sp)
	return append(out, m), nil
}

// finish sets the strings of the messages decoded since the last finish, which are the last
// len(d.spans) messages of out, from one allocation.
func (d *claimDecoder) finish(out []relay.Message) {
	text := string(d.text)
	first := len(out) - len(d.spans)
	for i, sp := range d.spans {
		m := &out[first+i]
		m.EventID = text[sp.eventID[0]:sp.eventID[1]]
		m.AggregateID = text[sp.aggregateID[0]:sp.aggregateID[1]]
	}
	d.text, d.spans = d.text[:0], d.spans[:0]
}

func (d *claimDecoder) appendText(b []byte) [2]int32 {
	start := len(d.text)
	d.text = append(d.text, b...)
	return [2]int32{int32(start), int32(len(d.text))}
}

// interned returns b as a string shared by every row with the same value.
func (d *claimDecoder) interned(b []byte) string {
	if len(b) == 0 {
		return ""
	}
	if s, ok := d.intern[string(b)]; ok { // the conversion in a map index does not allocate
		return s
	}
	if len(d.intern) >= internMax {
		clear(d.intern)
	}
	s := string(b)
	d.intern[s] = s
	return s
}

// bytes copies b into the current chunk; a NULL column (nil) stays nil.
func (d *claimDecoder) bytes(b []byte) []byte {
	if b == nil {
		return nil
	}
	if len(b) == 0 {
		return []byte{} // empty, not NULL: a tombstone only when NULL
	}
	if len(b) > chunkSize/4 {
		return append(make([]byte, 0, len(b)), b...)
	}
	if len(b) > cap(d.chunk)-len(d.chunk) {
		d.cur = d.pool.next(d.cur, d.pieces)
		d.chunk, d.pieces = d.cur.buf, 0
	}
	start := len(d.chunk)
	d.chunk = append(d.chunk, b...)
	d.pieces++
	return d.chunk[start:len(d.chunk):len(d.chunk)] // full slice: an append by a reader copies
}

// Microseconds from the Unix epoch to PostgreSQL's, 2000-01-01.
const pgEpochMicros = 946684800 * 1_000_000

// timestamptz decodes a binary timestamptz. 'infinity' and '-infinity' become the zero time with
// infinite set, which sinks refuse as invalid (relay.Message.OccurredAtInfinite): the row is parked,
// not the claim failed. The zero time alone is 0001-01-01T00:00:00Z, a valid occurred_at.
func timestamptz(b []byte) (t time.Time, infinite bool, err error) {
	if len(b) != 8 {
		return time.Time{}, false, fmt.Errorf("timestamptz of %d bytes", len(b))
	}
	us := int64(binary.BigEndian.Uint64(b))
	if us == math.MaxInt64 || us == math.MinInt64 {
		return time.Time{}, true, nil
	}
	us += pgEpochMicros
	return time.Unix(us/1_000_000, (us%1_000_000)*1000), false, nil
}

// reset drops what a failed claim decoded.
func (d *claimDecoder) reset() { d.text, d.spans = d.text[:0], d.spans[:0] }
