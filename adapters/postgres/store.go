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
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
	"github.com/jackc/pgx/v5/pgtype"

	"github.com/outbox-relay/outbox-relay/app"
)

// Mark modes: what happens to a row once the broker acknowledged it.
const (
	// MarkDelete deletes published rows (the default).
	MarkDelete = "delete"
	// MarkRetain stamps published rows with dispatched_at and keeps them until purged.
	MarkRetain = "retain"
)

// QueryTimeoutDefault is the default of StoreConfig.QueryTimeout.
const QueryTimeoutDefault = 30 * time.Second

// StoreConfig configures a Store.
type StoreConfig struct {
	// Table is the outbox the relay reads.
	Table Table
	// Mark is MarkDelete (default) or MarkRetain.
	Mark string
	// QueryTimeout bounds every query of a session, so a stalled connection is noticed.
	// Default 30s.
	QueryTimeout time.Duration
}

// Store is the relay's view of one outbox in PostgreSQL: app.Store.
type Store struct {
	conn    *pgx.ConnConfig
	table   Table
	timeout time.Duration
	q       queries
}

var (
	_ app.Store    = (*Store)(nil)
	_ app.Releaser = (*session)(nil)
)

type queries struct {
	claim, claimHold, mark, retry, park, failing, parkedKeys, lock, listen, leading string
}

// holdCond leaves out the rows of the held keys, the pairs ($6[i], $7[i]), but for the heads $8.
// The keys form a hashed subplan, looked up once per row read: the rows keep their index order,
// and the held rows a claim passes over are never sent to the relay. Without it, more held rows
// at the front of the outbox than a batch held every claim up, and with them every other key.
const holdCond = ` AND ((aggregate_type, coalesce(aggregate_id, '')) NOT IN (SELECT * FROM unnest($6::text[], $7::text[]))
			OR id = ANY($8::bigint[]))`

// claimPart is one ordered range of the claim query.
func claimPart(t Table, cond string) string {
	return `(SELECT id, event_id::text AS event_id, aggregate_type, coalesce(aggregate_id, '') AS aggregate_id,
			event_type, payload, coalesce(topic, '') AS topic, headers::text AS headers, occurred_at, created_at, attempts
		FROM ` + t.outbox() + `
		WHERE dispatched_at IS NULL AND (next_attempt_at IS NULL OR next_attempt_at <= now()) AND ` + cond + `
			AND id >= $5 AND id NOT IN (SELECT unnest($3::bigint[]))
		ORDER BY id LIMIT $4)`
}

// ParseURL parses a PostgreSQL connection string. Its errors never contain the password.
func ParseURL(url string) (*pgx.ConnConfig, error) {
	cfg, err := pgx.ParseConfig(url)
	if err != nil {
		return nil, fmt.Errorf("database.url: %s", redactURL(err.Error()))
	}
	return cfg, nil
}

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
	mark := `DELETE FROM ` + t.outbox() + ` WHERE id = ANY($1::bigint[])`
	switch cfg.Mark {
	case MarkDelete:
	case MarkRetain:
		mark = `UPDATE ` + t.outbox() + ` SET dispatched_at = now() WHERE id = ANY($1::bigint[]) AND dispatched_at IS NULL`
	default:
		return nil, fmt.Errorf("relay.mark: must be %q or %q, got %q", MarkDelete, MarkRetain, cfg.Mark)
	}
	s := &Store{conn: conn, table: t, timeout: cfg.QueryTimeout}
	s.q = queries{
		// The claim reads from id $5 in two ordered ranges, below and above the longest run of
		// consecutive ids in flight ($1..$2), leaving out the other ids in flight ($3) one by
		// one; the run needs no check, as no other row can have an id inside it. One statement,
		// so one snapshot.
		claim: claimPart(t, `id < $1`) + ` UNION ALL ` + claimPart(t, `id > $2`) + ` ORDER BY id LIMIT $4`,
		// The same, leaving out the rows of held keys: used only while some key is held, so the
		// common claim pays nothing for it.
		claimHold: claimPart(t, `id < $1`+holdCond) + ` UNION ALL ` + claimPart(t, `id > $2`+holdCond) + ` ORDER BY id LIMIT $4`,
		mark:      mark,
		retry: `UPDATE ` + t.outbox() + ` SET attempts = attempts + 1, last_error = $2,
				next_attempt_at = now() + $3::interval WHERE id = $1`,
		park: `WITH m AS (DELETE FROM ` + t.outbox() + ` WHERE id = $1 RETURNING *)
			INSERT INTO ` + t.parked() + ` (id, event_id, aggregate_type, aggregate_id, event_type, payload,
				topic, headers, occurred_at, created_at, attempts, reason)
			SELECT id, event_id, aggregate_type, aggregate_id, event_type, payload, topic, headers,
				occurred_at, created_at, attempts + 1, $2 FROM m
			ON CONFLICT (id) DO NOTHING`,
		failing: `SELECT aggregate_type, coalesce(aggregate_id, ''), min(id) FROM ` + t.outbox() + `
			WHERE attempts > 0 AND dispatched_at IS NULL GROUP BY 1, 2`,
		parkedKeys: `SELECT DISTINCT aggregate_type, coalesce(aggregate_id, '') FROM ` + t.parked(),
		lock: `SELECT pg_is_in_recovery() OR current_setting('transaction_read_only') = 'on',
				pg_try_advisory_lock(hashtextextended($1, 0))`,
		listen: `LISTEN ` + pgx.Identifier{t.Channel()}.Sanitize(),
		// Whether the session whose backend is $1 still holds an advisory lock: the leadership.
		leading: `SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = $1 AND granted)`,
	}
	return s, nil
}

// Open implements app.Store: it connects one dedicated connection, and a second one for marks on
// the first Mark.
func (s *Store) Open(ctx context.Context) (app.Session, error) {
	sess := &session{store: s}
	cfg := s.conn.Copy()
	cfg.OnNotification = func(*pgconn.PgConn, *pgconn.Notification) { sess.notified.Store(true) }
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
	sess.pid = conn.PgConn().PID()
	return sess, nil
}

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
	pid      uint32 // conn's backend process id
	// markConn runs the marks, so a mark's commit does not hold up the claims on conn. It is
	// used by one Mark at a time and closed by Close.
	markConn *pgx.Conn
	dec      claimDecoder // reused by every Claim of the session
	sorted   []int64      // reused by skipRun
	rest     []int64      // reused by skipRun
	hz       horizon      // Horizon's state (horizon.go)
	lastRows int          // rows the last Claim returned: the next one's first capacity
}

func (s *session) op(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, s.store.timeout)
}

// TryLead implements app.Session with a session-level advisory lock: it lasts as long as the
// connection, so a dead relay's leadership ends with its connection.
func (s *session) TryLead(ctx context.Context) (bool, error) {
	ctx, cancel := s.op(ctx)
	defer cancel()
	var readOnly, locked bool
	if err := s.conn.QueryRow(ctx, s.store.q.lock, s.store.table.lockKey()).Scan(&readOnly, &locked); err != nil {
		return false, s.wrap(err)
	}
	if readOnly {
		if locked {
			_, _ = s.conn.Exec(ctx, `SELECT pg_advisory_unlock(hashtextextended($1, 0))`, s.store.table.lockKey())
		}
		return false, app.ErrReadOnly
	}
	if !locked {
		return false, nil
	}
	if _, err := s.conn.Exec(ctx, s.store.q.listen); err != nil {
		return false, s.wrap(err)
	}
	return true, nil
}

// Claim implements app.Session. Rows are decoded from their binary form (claim.go); a
// connection that cannot return it (the simple protocol) is read with Scan.
func (s *session) Claim(ctx context.Context, from int64, skip []int64, limit, maxBytes int, hold app.Blocked) ([]app.Message, error) {
	ctx, cancel := s.op(ctx)
	defer cancel()
	lo, hi, rest := s.skipRun(skip)
	s.dec.pool.budget(maxBytes)
	var rows pgx.Rows
	var err error
	if len(hold) == 0 {
		rows, err = s.conn.Query(ctx, s.store.q.claim, claimFormats, lo, hi, rest, limit, from)
	} else {
		types, ids, heads := holdArgs(hold)
		rows, err = s.conn.Query(ctx, s.store.q.claimHold, claimFormats, lo, hi, rest, limit, from, types, ids, heads)
	}
	if err != nil {
		return nil, s.wrap(err)
	}
	defer rows.Close()
	// As many as the last claim returned, so a backlog's full batches are read without growing
	// the slice (each growth copied every message so far), and a caught-up relay's are small.
	out := make([]app.Message, 0, min(limit, max(64, s.lastRows)))
	scan := !decodable(rows.FieldDescriptions())
	if s.dec.intern == nil {
		s.dec.intern = make(map[string]string)
	}
	s.dec.reset()
	size := 0
	for rows.Next() {
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
		if size >= maxBytes {
			break // memory is bounded by bytes, not by the backlog
		}
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, s.wrap(err)
	}
	if !scan {
		s.dec.finish(out)
	}
	s.lastRows = len(out)
	return out, nil
}

// holdArgs returns the held keys of hold as two arrays, their aggregate types and ids, and the
// heads that may still be claimed.
func holdArgs(hold app.Blocked) (types, ids []string, heads []int64) {
	types, ids = make([]string, 0, len(hold)), make([]string, 0, len(hold))
	heads = []int64{}
	for k, head := range hold {
		at, aid := app.SplitBlockKey(k)
		types, ids = append(types, at), append(ids, aid)
		if head > 0 {
			heads = append(heads, head)
		}
	}
	return types, ids, heads
}

// Release implements app.Releaser: the chunks the claims copied the payloads and headers of msgs
// into may be reused once every piece in them was released.
func (s *session) Release(msgs []*app.Message) { s.dec.pool.release(msgs) }

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

// scanClaimed appends the message of the current row to out, with Scan.
func scanClaimed(out []app.Message, rows pgx.Rows) ([]app.Message, error) {
	var m app.Message
	var headers *string
	var occurred, created pgtype.Timestamptz
	if err := rows.Scan(&m.ID, &m.EventID, &m.AggregateType, &m.AggregateID, &m.EventType, &m.Payload,
		&m.Topic, &headers, &occurred, &created, &m.Attempts); err != nil {
		return out, err
	}
	if headers != nil {
		m.Headers = []byte(*headers)
	}
	if occurred.InfinityModifier == pgtype.Finite { // infinite: zero, refused by the sinks
		m.OccurredAt = occurred.Time
	}
	if created.InfinityModifier == pgtype.Finite {
		m.CreatedAt = created.Time
	}
	return append(out, m), nil
}

// Mark implements app.Session.
// It runs on the session's mark connection, so it may run beside the other methods, and commits
// only if the session still holds the leadership (else it returns app.ErrNotLeader): as when
// the marks ran on the session's own connection, a term's marks end with its leadership.
func (s *session) Mark(ctx context.Context, ids []int64) error {
	ctx, cancel := s.op(ctx)
	defer cancel()
	if s.markConn == nil || s.markConn.IsClosed() {
		cfg := s.store.conn.Copy()
		SetApplicationName(cfg)
		// Its own name, so an operator (or a test) ending the leader's session by name ends the
		// leadership's connection only.
		cfg.RuntimeParams["application_name"] = truncate(cfg.RuntimeParams["application_name"]+" marks", 63)
		conn, err := pgx.ConnectConfig(ctx, cfg)
		if err != nil {
			return fmt.Errorf("connect to database: %s", Redact(err.Error(), s.store.conn.Password))
		}
		s.markConn = conn
	}
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
		err = app.ErrNotLeader
	}
	if err != nil && !s.markConn.IsClosed() && s.markConn.PgConn().TxStatus() != 'I' {
		_ = s.markConn.Close(ctx) // left in a transaction: reconnect on the next Mark
	}
	return s.wrap(err)
}

// Retry implements app.Session.
func (s *session) Retry(ctx context.Context, id int64, reason string, delay time.Duration) error {
	ctx, cancel := s.op(ctx)
	defer cancel()
	_, err := s.conn.Exec(ctx, s.store.q.retry, id, truncate(reason, 2000), delay)
	return s.wrap(err)
}

// Park implements app.Session.
func (s *session) Park(ctx context.Context, id int64, reason string) error {
	ctx, cancel := s.op(ctx)
	defer cancel()
	_, err := s.conn.Exec(ctx, s.store.q.park, id, truncate(reason, 2000))
	return s.wrap(err)
}

// Blocked implements app.Session.
func (s *session) Blocked(ctx context.Context, withParked bool) (app.Blocked, error) {
	ctx, cancel := s.op(ctx)
	defer cancel()
	out := make(app.Blocked)
	rows, err := s.conn.Query(ctx, s.store.q.failing)
	if err != nil {
		return nil, s.wrap(err)
	}
	var at, aid string
	var id int64
	_, err = pgx.ForEachRow(rows, []any{&at, &aid, &id}, func() error {
		out[app.BlockKey(at, aid)] = id
		return nil
	})
	if err != nil {
		return nil, s.wrap(err)
	}
	if !withParked {
		return out, nil
	}
	rows, err = s.conn.Query(ctx, s.store.q.parkedKeys)
	if err != nil {
		return nil, s.wrap(err)
	}
	_, err = pgx.ForEachRow(rows, []any{&at, &aid}, func() error {
		out[app.BlockKey(at, aid)] = 0
		return nil
	})
	return out, s.wrap(err)
}

// Wait implements app.Session.
func (s *session) Wait(ctx context.Context, timeout time.Duration) error {
	wctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	_, err := s.conn.WaitForNotification(wctx)
	if err != nil && wctx.Err() != nil && ctx.Err() == nil && !s.conn.IsClosed() {
		return nil // the timeout passed: the connection is still good
	}
	return s.wrap(err)
}

// Notified implements app.Session.
func (s *session) Notified() bool { return s.notified.Swap(false) }

// Close implements app.Session.
func (s *session) Close(ctx context.Context) error {
	if s.markConn != nil {
		_ = s.markConn.Close(ctx)
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
		return fmt.Errorf("%w: %s", app.ErrReadOnly, pgErr.Message)
	}
	if s.store.conn.Password != "" && strings.Contains(err.Error(), s.store.conn.Password) {
		return errors.New(Redact(err.Error(), s.store.conn.Password))
	}
	return err
}

// Redact replaces every occurrence of secret in s.
func Redact(s, secret string) string {
	if secret == "" {
		return s
	}
	return strings.ReplaceAll(s, secret, "xxxxx")
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n]
}

var urlPassword = regexp.MustCompile(`(://[^:/@\s]*:)[^@\s]*@`)
var kvPassword = regexp.MustCompile(`(?i)(password\s*=\s*)('[^']*'|\S+)`)

// redactURL removes passwords written in a connection string, URL or key=value form.
func redactURL(s string) string {
	s = urlPassword.ReplaceAllString(s, "${1}xxxxx@")
	return kvPassword.ReplaceAllString(s, "${1}xxxxx")
}
