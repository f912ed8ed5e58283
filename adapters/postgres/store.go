package postgres

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/jackc/pgx/v5/pgtype"

	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/internal/bounds"
	"github.com/outbox-relay/outbox-relay/internal/hrtimer"
	"github.com/outbox-relay/outbox-relay/internal/rawconn"
	"github.com/outbox-relay/outbox-relay/internal/redact"
)

// Mark modes: what happens to a row once the broker acknowledged it.
const (
	// MarkDelete deletes published rows (the default).
	MarkDelete = "delete"
	// MarkRetain stamps published rows with dispatched_at and keeps them until purged.
	MarkRetain = "retain"
)

// Ranges of StoreConfig's durations: NewStore checks them, and cmd parses database.query_timeout,
// relay.leader_lease and relay.linger with them.
var (
	QueryTimeoutRange = bounds.Duration{Min: 100 * time.Millisecond, Max: 10 * time.Minute}
	LeaderLeaseRange  = bounds.Duration{Min: 100 * time.Millisecond, Max: time.Minute}
	// LingerRange: from claiming at once to the busy window (wake.go), whose rows decide whether
	// the relay stays awake.
	LingerRange = bounds.Duration{Min: time.Millisecond, Max: busyWindow}
)

// QueryTimeoutDefault is the default of StoreConfig.QueryTimeout.
const QueryTimeoutDefault = 30 * time.Second

// LingerDefault is the default of StoreConfig.Linger (see wake.go for what it trades). It was
// 2 ms while the linger slept on Go's timers, which fired it 0.1-0.5 ms late; on a timerfd
// (internal/hrtimer) 2.5 ms keeps the claims as often as they were.
const LingerDefault = 2500 * time.Microsecond

// StoreConfig configures a Store.
type StoreConfig struct {
	// Table is the outbox the relay reads.
	Table Table
	// Mark is MarkDelete (default) or MarkRetain.
	Mark string
	// QueryTimeout bounds every query of a session, so a stalled connection is noticed.
	// Default 30s.
	QueryTimeout time.Duration
	// LeaderLease is how long a leader may hand records to the sink after it last confirmed its
	// leadership; a heartbeat confirms it every quarter of the lease, and a replica that took over
	// from another waits one lease before it publishes. It bounds what a frozen leader can still
	// send once it wakes after losing its session (see lease). Default 4s.
	LeaderLease time.Duration
	// WaitForReplication is ReplicationOff (default), ReplicationSync or ReplicationAll: whether
	// a claim's rows wait, at most QueryTimeout, until the standbys have flushed the WAL that made
	// them visible, so that nothing published is lost by a failover (replication.go).
	WaitForReplication string
	// OnReplicationWait, when set, is called with the time each successful wait took.
	OnReplicationWait func(took time.Duration)
	// Transactions makes the claims read the writing transaction of each row (the tx column,
	// sql/migrations/003_tx.sql) into relay.Message.TxID, and never end inside a transaction:
	// a claim also returns the rest of the rows of every transaction it returned a row of (for
	// kafka.delivery=exactly_once). The claim's byte bound then does not apply: its row bound
	// does, plus the rest of those transactions.
	Transactions bool
	// Linger is how long an awake session waits between two claims while rows keep coming, to
	// gather the commits of that time into one claim; a session stays awake (writers do not
	// notify it) while at least one row comes per Linger on average (wake.go). Default
	// LingerDefault.
	Linger time.Duration
}

// Store is the relay's view of one outbox in PostgreSQL: relay.Store.
type Store struct {
	conn    *pgx.ConnConfig
	table   Table
	timeout time.Duration
	lease   time.Duration
	q       queries
	// replMode is StoreConfig.WaitForReplication; onReplWait its hook.
	replMode   string
	onReplWait func(time.Duration)
	// txs is StoreConfig.Transactions.
	txs bool
	// linger is StoreConfig.Linger.
	linger time.Duration
}

var (
	_ relay.Store    = (*Store)(nil)
	_ relay.Releaser = (*session)(nil)
	_ relay.Fenced   = (*session)(nil)
	_ relay.Sleeper  = (*session)(nil)
)

type queries struct {
	claim, claimFew, claimAbove, claimHold, mark, retry, park, failing, blocked, lock, listen, leading, repl string
}

// holdCond leaves out the rows of the held keys, the pairs ($6[i], $7[i]), but for the heads $8.
// The claim leaves them out in the database, so that a batch is never filled with held rows,
// and the held rows a claim passes over are never sent to the relay. Without it, more held rows
// at the front of the outbox than a batch held every claim up, and with them every other key.
func holdCond(t Table) string { return ` AND ` + holdExpr(t) }

// holdExpr is true for a row holdCond keeps: not of a held key, or its head.
func holdExpr(t Table) string {
	return `((` + t.aggType("") + `, coalesce(` + t.key("") + `, '')) NOT IN (SELECT * FROM unnest($6::text[], $7::text[]))
			OR ` + t.id("") + ` = ANY($8::bigint[]))`
}

// claimPart is one ordered range of the claim query, of the columns cols (claimCols, or
// claimIDs for a claim that wholeTxs extends), leaving out the ids in flight $3 as rest says.
func claimPart(t Table, cols, cond string, rest skipRest) string {
	out := t.id("") + ` NOT IN (SELECT unnest($3::bigint[]))`
	if rest == restFew {
		out = t.id("") + ` <> ALL($3::bigint[])`
	}
	return `(SELECT ` + cols + `
		FROM ` + t.outbox() + `
		WHERE dispatched_at IS NULL AND (next_attempt_at IS NULL OR next_attempt_at <= now()) AND ` + cond + `
			AND ` + t.id("") + ` >= $5 AND ` + out + `
		ORDER BY ` + t.id("") + ` LIMIT $4)`
}

// skipRest is how a claim of two ranges leaves out the ids in flight outside their run ($3).
type skipRest int

const (
	// restHashed: NOT IN a subplan, hashed once per range at every execution. Any number of
	// ids.
	restHashed skipRest = iota
	// restFew: <> ALL, a comparison with each of them per row read, and no subplan to set up
	// (an empty array, never NULL, when none is in flight outside the run): for at most
	// aboveMax ids, as in nearly every claim of a caught-up relay.
	restFew
)

// claimAboveQuery is the claim of the rows of the columns cols from id $1, leaving out the ids
// $2 (a few, never NULL), in one ordered range: the claim of a relay that keeps up, with no
// more than a few ids in flight past where it claims from (claimAbove). Its plan is one index
// scan under a limit. The plan of claimQuery, two of them under a merge with a hashed subplan
// each, took as long to set up, at every execution of its generic plan, as to run: a quarter of
// its backend's CPU at 1,000 events a second (perf; BENCHMARKS.md, "The claim of one range").
func claimAboveQuery(t Table, cols string) string {
	return `SELECT ` + cols + `
		FROM ` + t.outbox() + `
		WHERE dispatched_at IS NULL AND (next_attempt_at IS NULL OR next_attempt_at <= now())
			AND ` + t.id("") + ` >= $1 AND ` + t.id("") + ` <> ALL($2::bigint[])
		ORDER BY ` + t.id("") + ` LIMIT $3`
}

// claimQuery is the claim of the rows of the columns cols, in the two ranges around the run of
// ids in flight, each range also under cond (holdCond, or "").
func claimQuery(t Table, cols, cond string, rest skipRest) string {
	return claimPart(t, cols, t.id("")+` < $1`+cond, rest) + ` UNION ALL ` + claimPart(t, cols, t.id("")+` > $2`+cond, rest) + ` ORDER BY id LIMIT $4`
}

// claimCols is the claim's list of columns (claimColumns). The writing transaction is read only
// with txs (the column may not exist otherwise); NULL, for rows written before the column was
// added, is 0: a transaction of its own.
func claimCols(t Table, txs bool) string {
	tx := `0::bigint`
	if txs {
		tx = txCol0
	}
	return claimColsTx(t, tx)
}

// txCol0 is the writing transaction of a row as a bigint, 0 when NULL (claimCols).
const txCol0 = `coalesce(tx::text::bigint, 0)`

// claimIDs is the columns of a claim that wholeTxs extends: the id and the transaction only.
func claimIDs(t Table) string { return t.id("") + ` AS id, ` + txCol0 + ` AS tx` }

// claimColsTx is claimCols with tx as the expression of the column tx.
func claimColsTx(t Table, tx string) string {
	return t.id("") + ` AS id, ` + t.eventID("") + `::text AS event_id, ` + t.aggType("") + ` AS aggregate_type,
			` + t.key("") + ` AS aggregate_id, ` + t.evType("") + ` AS event_type, ` + t.payload("") + ` AS payload,
			coalesce(` + t.topicCol("") + `, '') AS topic, ` + t.headers("") + `::text AS headers,
			` + t.occurred("") + ` AS occurred_at, created_at, attempts, ` + tx + ` AS tx`
}

// wholeTxs extends a claim query of ids and transactions (claimIDs) with the rest of the
// pending rows of each transaction it returned a row of, and returns the rows of both with every
// column (claimCols). Those of the rest that are due, not below the claim's start ($5), not in
// flight ($1..$2 and $3) and not held (held: holdExpr, or "" when the claim holds no key; a row
// of a held key of the same transaction as the key's head is not held) come as any row; every
// other one comes with its tx negated, to say that it may not go now and that its transaction is
// therefore not whole (the session reads it into relay.Message.TxHeld). The claim's own rows pass
// each of those tests, so the test is made of every row alike. One statement, so one snapshot; a
// transaction whose row is visible is committed, so all its rows are visible too.
//
// The rest is found without reading again a row the claim returned (sql/migrations/005_tx_id.sql):
// a row of one of its transactions that it did not return is below its lowest id, above its
// highest, or in a gap between two of its ids. The first two are two range scans of the index
// (tx, id) per transaction; the gaps are scanned by id only when the claim's ids leave one (its
// highest minus its lowest id is at least its number of rows), each gap alone. Reading each
// transaction whole through an index of tx alone read every row of the claim a second time,
// which doubled the database's work per row in a drain (BENCHMARKS.md, exactly-once cost).
//
// The claim and the lookups carry ids and transactions only; the rows are read once, at the end,
// by their ids, in id order (an index scan of the ids, so no sort). The claim with every column,
// which the lookups read several times, was materialized with its payloads and sorted again with
// them: at 1 KB that took most of the statement's time (BENCHMARKS.md, "Exactly-once claims
// without their payloads").
func wholeTxs(t Table, claim, held string) string {
	waits := mayNotGo(t, held)
	// OFFSET 0 keeps each lateral subquery a scan of its own, for one transaction or one gap: a
	// subquery pulled up into a join let the first plans of a prepared statement (planned with
	// the parameters' values, which say nothing of lo and hi) hash the whole outbox above the
	// claim. The gaps' rows are read once (MATERIALIZED), then kept if of the claim's
	// transactions: a join with them could scan each gap once per transaction.
	id := t.id("") + ` AS id`
	return `WITH c AS (` + claim + `),
		s AS (SELECT min(id) AS lo, max(id) AS hi, count(*) AS n FROM c),
		x AS (SELECT DISTINCT tx::text::xid8 AS tx FROM c WHERE tx <> 0),
		gaps AS MATERIALIZED (
			SELECT o.id, o.tx FROM (SELECT id AS a, lead(id) OVER (ORDER BY id) AS b FROM c) g,
				LATERAL (SELECT ` + id + `, tx FROM ` + t.outbox() + `
					WHERE ` + t.id("") + ` > g.a AND ` + t.id("") + ` < g.b AND dispatched_at IS NULL OFFSET 0) o
			WHERE g.b > g.a + 1 AND (SELECT hi - lo + 1 > n FROM s)),
		e AS (
			SELECT o.id FROM x, LATERAL (SELECT ` + id + ` FROM ` + t.outbox() + `
				WHERE tx = x.tx AND dispatched_at IS NULL AND ` + t.id("") + ` < (SELECT lo FROM s) OFFSET 0) o
			UNION ALL
			SELECT o.id FROM x, LATERAL (SELECT ` + id + ` FROM ` + t.outbox() + `
				WHERE tx = x.tx AND dispatched_at IS NULL AND ` + t.id("") + ` > (SELECT hi FROM s) OFFSET 0) o
			UNION ALL
			SELECT id FROM gaps WHERE tx IN (SELECT tx FROM x))
		SELECT ` + claimColsTx(t, `CASE WHEN `+waits+` THEN -`+txCol0+` ELSE `+txCol0+` END`) + `
		FROM ` + t.outbox() + `
		WHERE dispatched_at IS NULL AND ` + t.id("") + ` = ANY(ARRAY(SELECT id FROM c UNION ALL SELECT id FROM e))
		ORDER BY ` + t.id("")
}

// mayNotGo is true for a row of a claim's transactions that may not go now (wholeTxs): not due,
// below the claim's start ($5), in flight ($1..$2 and $3), or held (held: holdExpr, or "" when
// the claim holds no key).
func mayNotGo(t Table, held string) string {
	waits := `NOT (next_attempt_at IS NULL OR next_attempt_at <= now())
				OR ` + t.id("") + ` < $5
				OR ` + t.id("") + ` BETWEEN $1 AND $2 OR ` + t.id("") + ` IN (SELECT unnest($3::bigint[]))`
	if held != "" {
		// A row of a held key may go with its key's head ($8) when both are of one transaction.
		// The head is looked up in the outbox, not in c: it may be a row of the rest of the
		// transaction (past the claim's row bound), which goes with it.
		waits += ` OR NOT (` + held + ` OR (` + t.aggType("") + `, coalesce(` + t.key("") + `, ''), tx) IN
				(SELECT ` + t.aggType("") + `, coalesce(` + t.key("") + `, ''), tx FROM ` + t.outbox() + ` WHERE ` + t.id("") + ` = ANY($8::bigint[])))`
	}
	return waits
}

// ParseURL parses a PostgreSQL connection string, URL or key=value. Its errors never contain
// the string nor any part of the password.
//
// A URL whose user:password part (between "://" and the last '@') holds a character that must be
// percent-encoded there ('@', '/', '%' not followed by two hex digits, a space or a control
// character) is refused before the driver sees it: the driver would end the password at the
// first '@', take the rest as the host, and print it in its errors.
func ParseURL(url string) (*pgx.ConnConfig, error) {
	if err := checkURL(url); err != nil {
		return nil, err
	}
	cfg, err := pgx.ParseConfig(url)
	if err != nil {
		return nil, fmt.Errorf("database.url: cannot parse the connection string (not shown): %s", parseReason(url, err))
	}
	// The sockets read and write without waking the runtime's monitor thread (internal/rawconn);
	// TLS, when the string asks for it, runs on top.
	cfg.DialFunc = pgconn.DialFunc(rawconn.Dial(rawconn.DialFunc(cfg.DialFunc)))
	return cfg, nil
}

// checkURL refuses a postgres:// URL whose credentials a parser could split in another place
// than the last '@'.
func checkURL(url string) error {
	rest, ok := strings.CutPrefix(url, "postgres://")
	if !ok {
		if rest, ok = strings.CutPrefix(url, "postgresql://"); !ok {
			return nil
		}
	}
	at := strings.LastIndexByte(rest, '@')
	if at < 0 {
		return nil
	}
	cred := rest[:at]
	what := ""
	for i := 0; i < len(cred) && what == ""; i++ {
		switch c := cred[i]; {
		case c == '@':
			what = "an at sign"
		case c == '/':
			what = "a slash"
		case c == '%' && (i+2 >= len(cred) || !isHex(cred[i+1]) || !isHex(cred[i+2])):
			what = "a percent sign not followed by two hex digits"
		case c <= ' ' || c == 0x7f:
			what = "a space or a control character"
		}
	}
	if what == "" {
		return nil
	}
	// The message names neither "://" nor an at sign after it: redaction would mask the text between.
	return fmt.Errorf("database.url: the user:password part of the URL (before its last at sign) contains %s; "+
		"percent-encode it there (at sign %%40, slash %%2F, percent %%25, space %%20), and an at sign after the "+
		"host (in the database name or a parameter) too (the connection string is not shown)", what)
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

// parseReason returns why the driver could not parse conn, without conn: the driver's message
// with its quoted values left out (they may be pieces of a password), then redacted.
func parseReason(conn string, err error) string {
	var pe *pgconn.ParseConfigError
	if !errors.As(err, &pe) {
		return "invalid connection string"
	}
	bare := *pe
	bare.ConnString = ""
	msg := strings.TrimPrefix(bare.Error(), "cannot parse ``: ")
	msg = quoted.ReplaceAllStringFunc(msg, func(q string) string {
		if q == `"="` {
			return q
		}
		return `"…"`
	})
	if !strings.Contains(conn, "://") {
		msg += "; a value holding spaces or quotes is written in single quotes, with \\' and \\\\ inside"
	}
	r := &redact.Redactor{}
	r.AddConnString(conn)
	return r.String(msg)
}

// quoted matches a double-quoted string, with backslash escapes, as the driver's messages quote
// raw values.
var quoted = regexp.MustCompile(`"(?:[^"\\]|\\.)*"`)

// NewStore returns a Store connecting with conn, a parsed connection configuration.
func NewStore(conn *pgx.ConnConfig, cfg StoreConfig) (*Store, error) {
	t := cfg.Table.WithDefaults()
	if err := t.Validate(); err != nil {
		return nil, err
	}
	if cfg.Mark == "" {
		cfg.Mark = MarkDelete
	}
	if cfg.QueryTimeout == 0 {
		cfg.QueryTimeout = QueryTimeoutDefault
	}
	mark := `DELETE FROM ` + t.outbox() + ` WHERE ` + t.id("") + ` = ANY($1::bigint[])`
	switch cfg.Mark {
	case MarkDelete:
	case MarkRetain:
		mark = `UPDATE ` + t.outbox() + ` SET dispatched_at = now() WHERE ` + t.id("") + ` = ANY($1::bigint[]) AND dispatched_at IS NULL`
	default:
		return nil, fmt.Errorf("relay.mark: must be one of %s, %s, got %q", MarkDelete, MarkRetain, cfg.Mark)
	}
	if cfg.LeaderLease == 0 {
		cfg.LeaderLease = LeaderLeaseDefault
	}
	if cfg.Linger == 0 {
		cfg.Linger = LingerDefault
	}
	if err := errors.Join(QueryTimeoutRange.Check("database.query_timeout", cfg.QueryTimeout),
		LeaderLeaseRange.Check("relay.leader_lease", cfg.LeaderLease),
		LingerRange.Check("relay.linger", cfg.Linger)); err != nil {
		return nil, err
	}
	switch cfg.WaitForReplication {
	case "":
		cfg.WaitForReplication = ReplicationOff
	case ReplicationOff, ReplicationSync, ReplicationAll:
	default:
		return nil, fmt.Errorf("database.wait_for_replication: must be one of %s, %s, %s, got %q",
			ReplicationOff, ReplicationSync, ReplicationAll, cfg.WaitForReplication)
	}
	s := &Store{conn: conn, table: t, timeout: cfg.QueryTimeout, lease: cfg.LeaderLease,
		replMode: cfg.WaitForReplication, onReplWait: cfg.OnReplicationWait, linger: cfg.Linger}
	s.q = queries{
		// The claim reads from id $5 in two ordered ranges, below and above the longest run of
		// consecutive ids in flight ($1..$2), leaving out the other ids in flight ($3) by a
		// hashed subplan; the run needs no check, as no other row can have an id inside it. One
		// statement, so one snapshot.
		claim: claimQuery(t, claimCols(t, false), "", restHashed),
		// The same with no more than aboveMax other ids in flight, left out one by one, with no
		// subplan to set up: nearly every claim of two ranges.
		claimFew: claimQuery(t, claimCols(t, false), "", restFew),
		// The same from the first id past the rows in flight, when no more than aboveMax of
		// them lie at or above it (claimAbove): one ordered range.
		claimAbove: claimAboveQuery(t, claimCols(t, false)),
		// The same, leaving out the rows of held keys: used only while some key is held, so the
		// common claim pays nothing for it.
		claimHold: claimQuery(t, claimCols(t, false), holdCond(t), restHashed),
		mark:      mark,
		retry: `UPDATE ` + t.outbox() + ` SET attempts = attempts + 1, last_error = $2,
				next_attempt_at = now() + $3::interval WHERE ` + t.id("") + ` = $1`,
		// The parked table has the relay's own layout, but for the event id and the payload,
		// which keep the outbox's types (migrate --adopt creates it so).
		park: `WITH m AS (DELETE FROM ` + t.outbox() + ` WHERE ` + t.id("") + ` = $1 RETURNING *)
			INSERT INTO ` + t.parked() + ` (id, event_id, aggregate_type, aggregate_id, event_type, payload,
				topic, headers, occurred_at, created_at, attempts, reason)
			SELECT ` + t.id("m") + `, ` + t.eventID("m") + `, ` + t.aggType("m") + `, ` + t.key("m") + `, ` + t.evType("m") + `,
				` + t.payload("m") + `, ` + t.topicCol("m") + `, ` + t.headers("m") + `,
				` + t.occurred("m") + `, m.created_at, m.attempts + 1, $2 FROM m
			ON CONFLICT (id) DO NOTHING`,
		failing: `SELECT ` + t.aggType("") + `, coalesce(` + t.key("") + `, ''), min(` + t.id("") + `) FROM ` + t.outbox() + `
			WHERE attempts > 0 AND dispatched_at IS NULL GROUP BY 1, 2`,
		// Both in one round trip: a caught-up relay reloads them at every poll.
		blocked: `SELECT false, ` + t.aggType("") + `, coalesce(` + t.key("") + `, ''), min(` + t.id("") + `) FROM ` + t.outbox() + `
			WHERE attempts > 0 AND dispatched_at IS NULL GROUP BY 2, 3
			UNION ALL
			SELECT DISTINCT true, aggregate_type, coalesce(aggregate_id, ''), 0::bigint FROM ` + t.parked(),
		// The lock is taken only on the session's own backend ($2): a pooler that moved the
		// session to another backend (transaction pooling) must not leave a lock behind there.
		lock: `SELECT pg_is_in_recovery() OR current_setting('transaction_read_only') = 'on',
				pg_backend_pid(),
				CASE WHEN pg_backend_pid() = $2 THEN pg_try_advisory_lock(hashtextextended($1, 0)) ELSE false END`,
		listen: `LISTEN ` + pgx.Identifier{t.Channel()}.Sanitize(),
		// Whether the session whose backend is $1 still holds an advisory lock: the leadership.
		leading: `SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = $1 AND granted)`,
		repl:    replQuery(cfg.WaitForReplication),
	}
	if cfg.Transactions {
		s.txs = true
		s.q.claim, s.q.claimFew, s.q.claimAbove = wholeTxs(t, claimQuery(t, claimIDs(t), "", restHashed), ""), "", ""
		s.q.claimHold = wholeTxs(t, claimQuery(t, claimIDs(t), holdCond(t), restHashed), holdExpr(t))
	}
	return s, nil
}

// Open implements relay.Store: it connects one dedicated connection, and a second one for marks on
// the first Mark.
func (s *Store) Open(ctx context.Context) (relay.Session, error) {
	sess := &session{store: s}
	sess.wake.lingerFor = s.linger
	cfg := s.conn.Copy()
	cfg.OnNotification = func(*pgconn.PgConn, *pgconn.Notification) { sess.heard() }
	cfg.BuildFrontend = func(r io.Reader, w io.Writer) *pgproto3.Frontend {
		// pgx reads at most 8 KiB per system call; a claim of a thousand 1 KB rows took 130 reads.
		// Reading what the socket holds, up to 64 KiB, costs an extra copy and saves most of them.
		return pgproto3.NewFrontend(bufio.NewReaderSize(r, 64<<10), w)
	}
	SetApplicationName(cfg)
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect to database: %s", Redact(err.Error(), s.conn.Password))
	}
	sess.conn = conn
	pid, err := backendPID(ctx, conn, func(ctx context.Context) (*pgx.Conn, error) {
		pcfg := s.conn.Copy()
		SetApplicationName(pcfg)
		pcfg.RuntimeParams["application_name"] = truncate(pcfg.RuntimeParams["application_name"]+" probe", 63)
		c, err := pgx.ConnectConfig(ctx, pcfg)
		if err != nil {
			return nil, fmt.Errorf("connect to database: %s", Redact(err.Error(), s.conn.Password))
		}
		return c, nil
	})
	if err != nil {
		_ = conn.Close(context.WithoutCancel(ctx))
		return nil, sess.wrap(err)
	}
	sess.pid = pid
	if _, err := conn.Exec(ctx, claimSettings); err != nil {
		_ = conn.Close(context.WithoutCancel(ctx))
		return nil, sess.wrap(err)
	}
	if s.txs {
		var has bool
		if err := conn.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = $1::regclass AND attname = 'tx' AND NOT attisdropped)`,
			s.table.outbox()).Scan(&has); err != nil {
			_ = conn.Close(context.WithoutCancel(ctx))
			return nil, sess.wrap(err)
		}
		if !has {
			_ = conn.Close(context.WithoutCancel(ctx))
			return nil, fmt.Errorf("%w: kafka.delivery=exactly_once needs the column tx of %s, which records each row's transaction: run outbox-relay migrate (or migrate --adopt for a table of your own)",
				relay.ErrSessionUnsupported, s.table)
		}
	}
	return sess, nil
}

// claimSettings is run once on a session's connection, where the claims run: no bitmap scans.
//
// The claims read the oldest pending rows through pending_idx, in id order, up to a limit. A
// planner that expects few pending rows prefers a bitmap scan of every pending row above the
// claim's start, sorted to keep the first ones, to that ordered index scan: and it expects few
// whenever the outbox has no column statistics, as when autovacuum last analyzed it empty (the
// usual state of an outbox in delete mode) or never did. "dispatched_at IS NULL" is then given
// PostgreSQL's default selectivity of 0.5 %. When a backlog of 200k rows arrived, every claim of
// 1,000 rows read and sorted all of them (117 ms from the cursor, 0.9 s from the oldest row,
// against 1.4 ms and 0.3 s by the index), which starved the marks of CPU as well (BENCHMARKS.md,
// "Backlog under live writers"). Without bitmap scans, the ordered index scan is the cheapest
// plan under any statistics: its LIMIT stops it after the claim's rows. The setting is the
// session's own; the marks run on another connection.
const claimSettings = `SET enable_bitmapscan = off`

// markSettings is run once on the mark connection: no sequential scans.
//
// The mark is a prepared statement, and PostgreSQL keeps its generic plan until the table's
// definition or statistics change, not when the table grows. A relay that marks its first rows
// while the outbox holds a few (live writers, nothing else) gets, after five executions, a
// generic plan that scans the whole table, the cheapest on a page or two; when a backlog of 200k
// rows then arrives, every mark scans all of it, comparing each row with every id marked. Without
// sequential scans the mark finds its rows through the primary key under any plan.
const markSettings = `SET enable_seqscan = off`

// SetApplicationName names the relay's connections "outbox-relay <hostname>" in pg_stat_activity
// (and so in 'outbox-relay status'), unless the connection string sets application_name.
func SetApplicationName(cfg *pgx.ConnConfig) {
	if cfg.RuntimeParams == nil {
		cfg.RuntimeParams = map[string]string{}
	}
	if cfg.RuntimeParams["application_name"] == "" {
		host, _ := os.Hostname()
		cfg.RuntimeParams["application_name"] = truncate(strings.TrimSpace("outbox-relay "+host), 63)
	}
}

type session struct {
	store    *Store
	conn     *pgx.Conn
	notified atomic.Bool
	pid      int32 // conn's server backend process id, from pg_backend_pid() (a pooler's key is not it)
	// markConn runs the marks, so a mark's commit does not hold up the claims on conn. It is
	// used by one Mark at a time and closed by Close.
	markConn *pgx.Conn
	markMu   sync.Mutex // one user of markConn at a time: Mark or the heartbeat
	term     *lease     // the leadership term's lease, from TryLead's success to Close
	sawOther bool       // TryLead found another session holding the lock
	forced   bool       // TryLead ended a silent leader's session to take over
	hbStop   chan struct{}
	hbDone   chan struct{}
	dec      claimDecoder // reused by every Claim of the session
	sorted   []int64      // reused by skipRun
	rest     []int64      // reused by skipRun
	above    []int64      // reused by claimAbove
	hz       horizon      // Horizon's state (horizon.go)
	lastRows int          // rows the last Claim returned: the next one's first capacity
	lastFull bool         // the last Claim stopped at its row or byte bound: the next one's capacity is its own bound
	// claimedRows counts the rows the session's claims returned: how often Horizon looks.
	claimedRows int64
	wake        wakeState // the wake-up protocol's state (wake.go)
	// lingerTimer is the linger's wait between two claims (wake.go), made at the first; Close
	// releases it.
	lingerTimer *hrtimer.Timer

	// cuts: claims may stop inside their transactions (CutClaims); txRest is what the last
	// claim left (ClaimedRest). See stream.go.
	cuts   bool
	txRest *relay.TxRest

	// idle is the last claim's bounds when it was an idle relay's poll; pre the claim Blocked
	// sent with its own statement, for the Claim that follows (prefetch.go).
	idle idlePoll
	pre  *prefetched
}

func (s *session) op(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, s.store.timeout)
}

// TryLead implements relay.Session with a session-level advisory lock: it lasts as long as the
// connection, so a dead relay's leadership ends with its connection.
func (s *session) TryLead(ctx context.Context) (bool, error) {
	s.dropPrefetched()
	ctx, cancel := s.op(ctx)
	defer cancel()
	var readOnly, locked bool
	var pid int32
	sent := time.Now()
	if err := s.conn.QueryRow(ctx, s.store.q.lock, s.store.table.lockKey(), s.pid).Scan(&readOnly, &pid, &locked); err != nil {
		return false, s.wrap(err)
	}
	if pid != s.pid {
		return false, fmt.Errorf("%w: "+errPooled+" (this session's server backend changed from %d to %d)",
			relay.ErrSessionUnsupported, "transaction", s.pid, pid)
	}
	if readOnly {
		if locked {
			_, _ = s.conn.Exec(ctx, `SELECT pg_advisory_unlock(hashtextextended($1, 0))`, s.store.table.lockKey())
		}
		return false, relay.ErrReadOnly
	}
	if !locked {
		took, err := s.takeOverSilent(ctx)
		if err != nil || !took {
			return false, err
		}
		s.forced = true
	}
	if _, err := s.conn.Exec(ctx, s.store.q.listen); err != nil {
		return false, s.wrap(err)
	}
	if s.term == nil {
		s.term = newLease()
		s.term.confirm(sent, s.store.lease)
		s.hbStop, s.hbDone = make(chan struct{}), make(chan struct{})
		go s.heartbeat(s.hbStop, s.hbDone)
	}
	return true, nil
}

// Claim implements relay.Session. Rows are decoded from their binary form (claim.go); a
// connection that cannot return it (the simple protocol) is read with Scan. With
// StoreConfig.WaitForReplication on, the rows are returned only once the standbys have them.
func (s *session) Claim(ctx context.Context, from int64, skip []int64, limit, maxBytes int, hold relay.Blocked) ([]relay.Message, error) {
	if s.wake.release {
		s.dropPrefetched() // the claim comes after the sleep lock is let go
		if err := s.releaseSleep(ctx); err != nil {
			return nil, err
		}
	}
	sent := time.Now()
	var out []relay.Message
	var err error
	if pre := s.takePrefetched(from, skip, limit, maxBytes, hold); pre != nil {
		out, sent = pre.rows, pre.sent
	} else {
		out, err = s.claim(ctx, from, skip, limit, maxBytes, hold)
	}
	s.noteIdleClaim(from, skip, limit, maxBytes, hold, out, err)
	if err == nil {
		s.claimed(len(out))
		if s.term != nil {
			// The claim's answer came from the session's own backend, which holds the
			// session-level lock for as long as it lives: the leadership held after sent.
			s.term.confirm(sent, s.store.lease)
		}
	}
	if err != nil || len(out) == 0 || s.store.replMode == ReplicationOff {
		return out, err
	}
	if err := s.waitReplicated(ctx); err != nil {
		return nil, s.wrap(err) // the rows' chunks are left to the garbage collector (chunks.go)
	}
	return out, nil
}

// claimCapMin is the least capacity of a claim's messages: a caught-up relay's claims return a
// row or two.
const claimCapMin = 4

func (s *session) claim(ctx context.Context, from int64, skip []int64, limit, maxBytes int, hold relay.Blocked) ([]relay.Message, error) {
	ctx, cancel := s.op(ctx)
	defer cancel()
	s.txRest = nil
	lo, hi, rest := s.skipRun(skip)
	s.dec.pool.budget(maxBytes)
	var rows pgx.Rows
	var err error
	if len(hold) > 0 {
		types, ids, heads := holdArgs(hold)
		rows, err = s.conn.Query(ctx, s.store.q.claimHold, claimFormats, lo, hi, rest, limit, from, types, ids, heads)
	} else if start, above, one := s.claimAbove(from, lo, hi, rest, s.sorted); one {
		rows, err = s.conn.Query(ctx, s.store.q.claimAbove, claimFormats, start, above, limit)
	} else if len(rest) <= aboveMax && s.store.q.claimFew != "" {
		if rest == nil {
			rest = []int64{} // not NULL: id <> ALL(NULL) is never true
		}
		rows, err = s.conn.Query(ctx, s.store.q.claimFew, claimFormats, lo, hi, rest, limit, from)
	} else {
		rows, err = s.conn.Query(ctx, s.store.q.claim, claimFormats, lo, hi, rest, limit, from)
	}
	if err != nil {
		return nil, s.wrap(err)
	}
	return s.readClaim(rows, limit, maxBytes)
}

// readClaim reads the rows of a claim query of at most limit rows and about maxBytes bytes, and
// closes them.
func (s *session) readClaim(rows pgx.Rows, limit, maxBytes int) ([]relay.Message, error) {
	defer rows.Close()
	// As many as the last claim returned, so a caught-up relay's are small: at low rates a
	// claim returns a row or two, and a floor of 64 messages (13 KB) a claim was most of what
	// the relay allocated. After a claim that stopped at its bound (a backlog), as many as this
	// one's bound: the byte budget sizes a backlog's claims, which vary with what is in flight,
	// and growing a slice sized by the last one (a copy of every message so far, the old array
	// left to the collector) was a fifth of what a 1 KB drain allocated. An empty claim
	// allocates none.
	var out []relay.Message
	var err error
	first := min(limit, max(claimCapMin, s.lastRows))
	if s.lastFull {
		first = limit
	}
	scan := !s.dec.decodable(rows.FieldDescriptions())
	if s.dec.intern == nil {
		s.dec.intern = make(map[string]string)
	}
	s.dec.reset()
	size := 0
	for rows.Next() {
		if out == nil {
			out = make([]relay.Message, 0, first)
		}
		if scan {
			out, err = scanClaimed(out, rows)
		} else {
			out, err = s.dec.decode(out, rows.RawValues())
		}
		if err != nil {
			return nil, s.wrap(err)
		}
		size += out[len(out)-1].Size()
		if !scan {
			size += s.dec.pendingText()
		}
		if size >= maxBytes && !s.store.txs {
			break // memory is bounded by bytes, not by the backlog
		}
		if s.cuts && size >= streamCut*maxBytes { // whole transactions: cut, the rest streams (stream.go)
			if s.txRest, err = restOf(rows, scan, out[len(out)-1].ID); err != nil {
				return nil, s.wrap(err)
			}
			break
		}
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, s.wrap(err)
	}
	if !scan {
		s.dec.finish(out)
	}
	for i := range out {
		if out[i].TxID < 0 { // a row of a transaction the claim returned, which may not go now (wholeTxs)
			out[i].TxID, out[i].TxHeld = -out[i].TxID, true
		}
	}
	s.lastRows = len(out)
	s.lastFull = len(out) >= limit || size >= maxBytes
	s.claimedRows += int64(len(out))
	return out, nil
}

// holdArgs returns the held keys of hold as two arrays, their aggregate types and ids, and the
// heads that may still be claimed.
func holdArgs(hold relay.Blocked) (types, ids []string, heads []int64) {
	types, ids = make([]string, 0, len(hold)), make([]string, 0, len(hold))
	heads = []int64{}
	for k, head := range hold {
		at, aid := relay.SplitBlockKey(k)
		types, ids = append(types, at), append(ids, aid)
		if head > 0 {
			heads = append(heads, head)
		}
	}
	return types, ids, heads
}

// Release implements relay.Releaser: the chunks the claims copied the payloads and headers of msgs
// into may be reused once every piece in them was released.
func (s *session) Release(msgs []*relay.Message) { s.dec.pool.release(msgs) }

// skipRun splits the ids to skip into the longest run of consecutive ids, [lo, hi], which the
// claim passes over by range (the run holds every id between its ends, so no other row can be
// inside it), and the rest, which the claim leaves out one by one. While a backlog drains, the
// rows in flight are usually one run and rest is empty.
func (s *session) skipRun(skip []int64) (lo, hi int64, rest []int64) {
	if len(skip) == 0 {
		return 1, 0, nil // an empty run: id < 1 and id > 0 cover every id
	}
	lo, hi = skip[0], skip[0]
	for _, id := range skip {
		lo, hi = min(lo, id), max(hi, id)
	}
	if hi-lo+1 == int64(len(skip)) { // the ids are distinct: they fill [lo, hi]
		return lo, hi, nil
	}
	sorted := append(s.sorted[:0], skip...)
	slices.Sort(sorted)
	s.sorted = sorted
	lo, hi = sorted[0], sorted[0]
	start := sorted[0]
	for i := 1; i < len(sorted); i++ {
		if sorted[i] != sorted[i-1]+1 {
			start = sorted[i]
		}
		if sorted[i]-start > hi-lo {
			lo, hi = start, sorted[i]
		}
	}
	rest = s.rest[:0]
	for _, id := range sorted {
		if id < lo || id > hi {
			rest = append(rest, id)
		}
	}
	s.rest = rest
	return lo, hi, rest
}

// aboveMax is the most ids in flight a claim leaves out one by one: the claim of one range
// (claimAboveQuery) those past its start, the claim of two ranges (restFew) those outside the
// run. The claim of one range walks past each of its ids (a heap fetch each), so its gain over
// the claim of two ranges shrinks as they grow: the backend's CPU per claim of two new rows, with
// 5 ids in flight past the start, was 37 us for one range, 41 for two ranges with <> ALL, 53 for
// two ranges with hashed subplans; with 15, 40.5, 46.5 and 50.5; with 30, 50, 44.5 and 51.5
// (BenchmarkClaimCaughtUp, medians of three). One range costs no more than two up to about 25.
const aboveMax = 24

// claimAbove returns where a claim from from, leaving out the ids in flight, may start instead,
// and the ids in flight past that start; one reports whether they are few enough for the claim
// from one range (aboveMax), and the session's query has one (not with whole transactions).
// start passes from only over ids in flight, so the two claims return the same rows. lo and hi
// are the run of consecutive ids in flight and rest the others (skipRun); when rest is not
// empty, sorted is every id in flight in order (skipRun's). A caught-up relay claims from its
// horizon, which trails its newest rows by a few tens of ids: just below its rows in flight
// (acknowledged, not yet marked), or inside them. At 1,000 events a second 7 claims in 10
// started below them, with a few to a few tens in flight.
func (s *session) claimAbove(from, lo, hi int64, rest, sorted []int64) (start int64, above []int64, one bool) {
	if s.store.q.claimAbove == "" {
		return 0, nil, false
	}
	if len(rest) == 0 { // every id in flight is in [lo, hi]
		switch {
		case lo > hi || from > hi: // none in flight, or all below from
			return from, []int64{}, true
		case from >= lo:
			return hi + 1, []int64{}, true
		case hi-lo+1 > aboveMax: // the claim of two ranges steps over the run
			return 0, nil, false
		}
		above = s.above[:0] // the run lies past from: left out one by one
		for id := lo; id <= hi; id++ {
			above = append(above, id)
		}
		s.above = above
		return from, above, true
	}
	i, _ := slices.BinarySearch(sorted, from)
	start = from
	for i < len(sorted) && sorted[i] == start {
		start, i = start+1, i+1
	}
	if above = sorted[i:]; len(above) > aboveMax {
		return 0, nil, false
	}
	return start, above, true
}

// scanClaimed appends the message of the current row to out, with Scan.
func scanClaimed(out []relay.Message, rows pgx.Rows) ([]relay.Message, error) {
	var m relay.Message
	var aggregateID, headers *string
	var occurred, created pgtype.Timestamptz
	if err := rows.Scan(&m.ID, &m.EventID, &m.AggregateType, &aggregateID, &m.EventType, &m.Payload,
		&m.Topic, &headers, &occurred, &created, &m.Attempts, &m.TxID); err != nil {
		return out, err
	}
	if aggregateID != nil {
		m.AggregateID = *aggregateID
	} else {
		m.AggregateIDNull = true
	}
	if headers != nil {
		m.Headers = []byte(*headers)
	}
	if occurred.InfinityModifier == pgtype.Finite {
		m.OccurredAt = occurred.Time
	} else {
		m.OccurredAtInfinite = true // refused by the sinks
	}
	if created.InfinityModifier == pgtype.Finite {
		m.CreatedAt = created.Time
	}
	return append(out, m), nil
}

// Mark implements relay.Session.
// It runs on the session's mark connection, so it may run beside the other methods, and commits
// only if the session still holds the leadership (else it returns relay.ErrNotLeader): as when
// the marks ran on the session's own connection, a term's marks end with its leadership.
//
// The mark connection idles between marks, and the server may end an idle session
// (idle_session_timeout, a proxy's idle limit) without the term being over: a mark that finds its
// connection gone is run once more on a new one. That is safe because a mark is idempotent (it
// deletes or stamps rows not yet marked) and fenced in its own transaction.
func (s *session) Mark(ctx context.Context, ids []int64) error {
	ctx, cancel := s.op(ctx)
	defer cancel()
	s.markMu.Lock()
	defer s.markMu.Unlock()
	reused := s.markConn != nil && !s.markConn.IsClosed()
	err := s.mark(ctx, ids)
	if err != nil && reused && !errors.Is(err, relay.ErrNotLeader) && ctx.Err() == nil &&
		(s.markConn == nil || s.markConn.IsClosed()) {
		err = s.mark(ctx, ids)
	}
	return s.wrap(err)
}

// mark runs one fenced mark, connecting the mark connection first if it is not open. It closes
// the connection when it is left unusable.
func (s *session) mark(ctx context.Context, ids []int64) error {
	if err := s.openMarkConn(ctx); err != nil {
		return err
	}
	sent := time.Now()
	// One round trip for the statements, a second for the commit once the check passed.
	b := &pgx.Batch{}
	b.Queue(`BEGIN`)
	b.Queue(s.store.q.mark, ids)
	b.Queue(s.store.q.leading, s.pid)
	br := s.markConn.SendBatch(ctx, b)
	_, err := br.Exec()
	if err == nil {
		_, err = br.Exec()
	}
	leading := false
	if err == nil {
		err = br.QueryRow().Scan(&leading)
	}
	if cerr := br.Close(); err == nil {
		err = cerr
	}
	end := `COMMIT`
	if err != nil || !leading {
		end = `ROLLBACK`
	}
	if _, eerr := s.markConn.Exec(ctx, end); err == nil {
		err = eerr
	}
	if err == nil && !leading {
		err = relay.ErrNotLeader
	}
	if err != nil && !s.markConn.IsClosed() && s.markConn.PgConn().TxStatus() != 'I' {
		_ = s.markConn.Close(ctx) // left in a transaction: reconnect on the next Mark
	}
	if err == nil && s.term != nil {
		s.term.confirm(sent, s.store.lease) // the fence saw the lock held after sent
	}
	return err
}

// openMarkConn connects the mark connection unless it is open.
func (s *session) openMarkConn(ctx context.Context) error {
	if s.markConn != nil && !s.markConn.IsClosed() {
		return nil
	}
	cfg := s.store.conn.Copy()
	SetApplicationName(cfg)
	// Its own name, so an operator (or a test) ending the leader's session by name ends the
	// leadership's connection only.
	cfg.RuntimeParams["application_name"] = truncate(cfg.RuntimeParams["application_name"]+" marks", 63)
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		return fmt.Errorf("connect to database: %s", Redact(err.Error(), s.store.conn.Password))
	}
	if _, err := conn.Exec(ctx, markSettings); err != nil {
		_ = conn.Close(context.WithoutCancel(ctx))
		return err
	}
	s.markConn = conn
	return nil
}

// heartbeat confirms the term's lease every quarter of the lease, on the mark connection, with
// the same check as the mark fence: the session's backend still holds the lock. A check that
// finds the lock gone ends the term at once; one that fails (the connection, a timeout) leaves
// the lease to run out, as the relay's next call on the session will tell what happened.
//
// A tick skips the check when a claim or a mark sent within the last quarter confirmed the lease
// already (a claim answered by the session's backend shows the lock held as well as the check
// does: the backend holds it as long as it lives): an idle relay polls every relay.poll_interval,
// a busy one claims and marks all the time, and the check would only add a query a second. When
// the claims stop (the broker down, the bounds full, a long poll interval), the checks resume, so
// the leader's last sign of life in pg_stat_activity stays within a quarter of the lease of its
// confirmations.
func (s *session) heartbeat(stop, done chan struct{}) {
	defer close(done)
	every := s.store.lease / 4
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		s.term.Done() // wake waiters on an expired lease
		if s.term.confirmedSince(time.Now().Add(-every), s.store.lease) {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), s.store.lease)
		s.markMu.Lock()
		sent := time.Now()
		err := s.openMarkConn(ctx)
		leading := false
		if err == nil {
			err = s.markConn.QueryRow(ctx, s.store.q.leading, s.pid).Scan(&leading)
		}
		s.markMu.Unlock()
		cancel()
		switch {
		case err == nil && leading:
			s.term.confirm(sent, s.store.lease)
		case err == nil:
			s.term.end()
		}
	}
}

// TermContext implements relay.Fenced: the lease of the term TryLead began, and how long the
// previous leader's lease may still run: a lease if this session saw another leader and took the
// lock after it went (it may be frozen rather than gone); none if there was no other leader, or
// if TryLead ended a leader that had been silent for longer than a lease.
func (s *session) TermContext() (context.Context, time.Duration) {
	if s.term == nil {
		return nil, 0
	}
	if s.sawOther && !s.forced {
		return s.term, s.store.lease
	}
	return s.term, 0
}

// takeOverSilent is TryLead's answer to a lock held by another session: if that leader has given
// no sign of life (no query on its session or its mark connection, where its heartbeat runs) for
// longer than the lease while rows wait to be published, it is frozen or hung, not working: its
// sessions are ended and the lock taken. Its lease ran out while it was silent, so whatever it
// buffered can no longer reach the broker. Ending another session needs the same role or
// pg_signal_backend; without them the error says so.
func (s *session) takeOverSilent(ctx context.Context) (bool, error) {
	s.sawOther = true
	var pid int32
	var appName *string
	var silent, waiting bool
	err := s.conn.QueryRow(ctx, `WITH h AS (`+holderSQL+`)
		SELECT h.pid, h.application_name, coalesce(h.last_active < now() - $2::interval, false),
			EXISTS (SELECT 1 FROM `+s.store.table.outbox()+` WHERE dispatched_at IS NULL
				AND (next_attempt_at IS NULL OR next_attempt_at <= now()) AND created_at < now() - $2::interval)
		FROM h`, s.store.table.lockKey(), s.store.lease).Scan(&pid, &appName, &silent, &waiting)
	if errors.Is(err, pgx.ErrNoRows) {
		return false, nil // released meanwhile: the next try takes it
	}
	if err != nil {
		return false, s.wrap(err)
	}
	if !silent || !waiting {
		return false, nil
	}
	name := ""
	if appName != nil {
		name = *appName
	}
	var ended int
	err = s.conn.QueryRow(ctx, `SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, $3)) FROM (
			SELECT pid FROM pg_stat_activity WHERE pid = $1
				OR ($2 <> '' AND application_name = left($2 || ' marks', 63) AND pid <> pg_backend_pid())
			OFFSET 0) p`, pid, name, s.store.lease.Milliseconds()).Scan(&ended)
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "42501" { // insufficient_privilege
		return false, fmt.Errorf("%w: leader backend %d: %s (give the relay's role the leader's role or pg_signal_backend: relay_role.sql -v signal=on)",
			relay.ErrTakeoverDenied, pid, pgErr.Message)
	}
	if err != nil {
		return false, fmt.Errorf("end the session of leader %d, silent for longer than relay.leader_lease while rows wait: %w", pid, s.wrap(err))
	}
	var locked bool
	if err := s.conn.QueryRow(ctx, `SELECT CASE WHEN pg_backend_pid() = $2 THEN pg_try_advisory_lock(hashtextextended($1, 0)) ELSE false END`,
		s.store.table.lockKey(), s.pid).Scan(&locked); err != nil {
		return false, s.wrap(err)
	}
	return locked, nil
}

// Retry implements relay.Session.
func (s *session) Retry(ctx context.Context, id int64, reason string, delay time.Duration) error {
	s.dropPrefetched()
	ctx, cancel := s.op(ctx)
	defer cancel()
	_, err := s.conn.Exec(ctx, s.store.q.retry, id, reasonText(reason), delay)
	return s.wrap(err)
}

// Park implements relay.Session.
func (s *session) Park(ctx context.Context, id int64, reason string) error {
	s.dropPrefetched()
	ctx, cancel := s.op(ctx)
	defer cancel()
	_, err := s.conn.Exec(ctx, s.store.q.park, id, reasonText(reason))
	return s.wrap(err)
}

// Blocked implements relay.Session. With the parked keys, both sets are read in one round trip.
func (s *session) Blocked(ctx context.Context, withParked bool) (relay.Blocked, error) {
	s.dropPrefetched() // a claim after this reload follows it
	ctx, cancel := s.op(ctx)
	defer cancel()
	out := make(relay.Blocked)
	q := s.store.q.failing
	if withParked {
		q = s.store.q.blocked
	}
	if s.prefetchable() {
		return s.blockedAndClaim(ctx, q, withParked, out)
	}
	rows, err := s.conn.Query(ctx, q)
	if err != nil {
		return nil, s.wrap(err)
	}
	err = readBlocked(rows, withParked, out)
	return out, s.wrap(err)
}

// readBlocked reads the rows of the blocked keys' query into out.
func readBlocked(rows pgx.Rows, withParked bool, out relay.Blocked) error {
	var at, aid string
	var id int64
	var parked bool
	dest := []any{&at, &aid, &id}
	if withParked {
		dest = []any{&parked, &at, &aid, &id}
	}
	_, err := pgx.ForEachRow(rows, dest, func() error {
		k := relay.BlockKey(at, aid)
		if _, seen := out[k]; parked || !seen { // a parked key waits for no row: 0 wins
			out[k] = id
		}
		return nil
	})
	return err
}

// Notified implements relay.Session.
func (s *session) Notified() bool { return s.notified.Swap(false) }

// Close implements relay.Session.
func (s *session) Close(ctx context.Context) error {
	s.dropPrefetched()
	if s.term != nil {
		s.term.end()
	}
	if s.hbStop != nil { // Close may be called twice: the heartbeat is stopped once
		close(s.hbStop)
		<-s.hbDone
		s.hbStop = nil
	}
	if s.markConn != nil {
		_ = s.markConn.Close(ctx)
	}
	if s.lingerTimer != nil {
		s.lingerTimer.Close()
		s.lingerTimer = nil
	}
	return s.conn.Close(ctx)
}

// wrap translates driver errors at the boundary and keeps secrets out of them.
func (s *session) wrap(err error) error {
	if err == nil {
		return nil
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "25006" { // read_only_sql_transaction
		return fmt.Errorf("%w: %s", relay.ErrReadOnly, pgErr.Message)
	}
	if s.store.conn.Password != "" && strings.Contains(err.Error(), s.store.conn.Password) {
		return errors.New(Redact(err.Error(), s.store.conn.Password))
	}
	return err
}

// Redact returns s without secret (when at least redact.MinLen bytes long: a shorter one would
// mask unrelated letters) and without credential-shaped text (see redact.Text).
func Redact(s, secret string) string {
	return redact.New(secret).String(s)
}

// truncate returns s cut to at most n bytes, at a character boundary: PostgreSQL refuses text
// that ends in part of a character (SQLSTATE 22021).
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}

// reasonMaxBytes bounds the reasons stored in last_error and the parked table's reason.
const reasonMaxBytes = 2000

// reasonText returns reason as PostgreSQL stores it in a text column: valid UTF-8 without NUL
// bytes (either would make it refuse the row's update, and the relay would fail on that row
// again at every attempt), at most reasonMaxBytes long.
func reasonText(reason string) string {
	reason = strings.ToValidUTF8(reason, "\uFFFD")
	reason = strings.ReplaceAll(reason, "\x00", "\uFFFD")
	return truncate(reason, reasonMaxBytes)
}
