package postgres

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/outbox-relay/outbox-relay/app/relay"
)

// The relay's leadership is a session-level advisory lock, its wake-ups a LISTEN and its mark
// fence a check of pg_locks by backend pid: all three need every statement of the relay's
// session to run on one server backend, for as long as the client connection lives. A direct
// connection gives that, and so does a pooler in session mode (PgBouncer's pool_mode=session).
// A pooler in transaction or statement mode hands the server backend to other clients between
// transactions: the lock would stay on a backend that other clients (another replica among
// them) then use, and two replicas would both lead.
//
// backendPID finds the session's real backend and refuses a connection that cannot keep one.
// A pooler answers the protocol's start-up with a key of its own, not the server's pid, so a
// pid from pg_backend_pid() that differs from the protocol's says a pooler is in between. Only
// then does it probe the pooler's mode, with a second client connection:
//
//   - the probe's BEGIN fails in statement mode, which refuses transaction blocks;
//   - in transaction mode the probe's transaction is given a server backend that no client holds,
//     and the session's backend was released when its last statement ended: with PgBouncer's
//     default LIFO order the probe gets exactly that backend, so both report the same pid;
//   - with another order the probe gets another idle backend, and the session's next statement,
//     while the probe holds its own, must move to a third: the session's pid changes.
//
// In session mode neither can happen: the session's backend is its own until it disconnects.
// TryLead checks the backend again in the statement that takes the lock, so a pooler that
// escaped the probe still cannot make a second leader.

// errPooled is the start of every refusal of a pooled session.
const errPooled = "the database connection goes through a connection pooler in %s mode, which cannot keep the relay's session (its leadership lock, LISTEN and mark fence need one server backend for the whole connection): point database.url at PostgreSQL directly or at a pool in session mode (pool_mode=session) for the relay; writers may keep the transaction pool"

// CheckSession connects to the database with conn, checks that the connection keeps a session
// (no connection pooler in transaction or statement mode), and disconnects. Its error wraps
// relay.ErrSessionUnsupported when a pooler cannot keep one; it never contains the password.
func CheckSession(ctx context.Context, conn *pgx.ConnConfig) error {
	connect := func(ctx context.Context, suffix string) (*pgx.Conn, error) {
		cfg := conn.Copy()
		SetApplicationName(cfg)
		if suffix != "" {
			cfg.RuntimeParams["application_name"] = truncate(cfg.RuntimeParams["application_name"]+" "+suffix, 63)
		}
		c, err := pgx.ConnectConfig(ctx, cfg)
		if err != nil {
			return nil, fmt.Errorf("connect to database: %s", Redact(err.Error(), conn.Password))
		}
		return c, nil
	}
	c, err := connect(ctx, "")
	if err != nil {
		return err
	}
	defer c.Close(context.WithoutCancel(ctx))
	_, err = backendPID(ctx, c, func(ctx context.Context) (*pgx.Conn, error) { return connect(ctx, "probe") })
	return err
}

// backendPID returns the server backend's pid of conn, an open session, and an error wrapping
// relay.ErrSessionUnsupported if conn goes through a pooler that does not keep sessions. probe
// opens the second client connection the check needs, only when a pooler is detected.
func backendPID(ctx context.Context, conn *pgx.Conn, probe func(context.Context) (*pgx.Conn, error)) (int32, error) {
	pid, err := queryPID(ctx, conn)
	if err != nil {
		return 0, fmt.Errorf("read backend pid: %w", err)
	}
	if uint32(pid) == conn.PgConn().PID() {
		return pid, nil // the server's own key: no pooler in between
	}
	other, err := probe(ctx)
	if err != nil {
		return 0, fmt.Errorf("check the connection pooler's mode: %w", err)
	}
	defer other.Close(context.WithoutCancel(ctx))
	if _, err := other.Exec(ctx, `BEGIN`, pgx.QueryExecModeSimpleProtocol); err != nil {
		if isStatementPooling(err) {
			return 0, fmt.Errorf("%w: "+errPooled, relay.ErrSessionUnsupported, "statement")
		}
		return 0, fmt.Errorf("check the connection pooler's mode: %w", err)
	}
	otherPID, err := queryPID(ctx, other)
	if err != nil {
		if isStatementPooling(err) {
			return 0, fmt.Errorf("%w: "+errPooled, relay.ErrSessionUnsupported, "statement")
		}
		return 0, fmt.Errorf("check the connection pooler's mode: %w", err)
	}
	if otherPID == pid {
		return 0, fmt.Errorf("%w: "+errPooled+" (another client was given this session's server backend %d)",
			relay.ErrSessionUnsupported, "transaction", pid)
	}
	again, err := queryPID(ctx, conn)
	if err != nil {
		return 0, fmt.Errorf("read backend pid: %w", err)
	}
	if again != pid {
		return 0, fmt.Errorf("%w: "+errPooled+" (this session's server backend changed from %d to %d)",
			relay.ErrSessionUnsupported, "transaction", pid, again)
	}
	_, _ = other.Exec(ctx, `ROLLBACK`, pgx.QueryExecModeSimpleProtocol)
	return pid, nil
}

// queryPID reads pg_backend_pid() with the simple protocol: a statement prepared on one pooled
// backend may not exist on the next.
func queryPID(ctx context.Context, conn *pgx.Conn) (int32, error) {
	var pid int32
	err := conn.QueryRow(ctx, `SELECT pg_backend_pid()`, pgx.QueryExecModeSimpleProtocol).Scan(&pid)
	return pid, err
}

// isStatementPooling reports whether err is a pooler's refusal of a transaction block, as
// PgBouncer says it in statement mode.
func isStatementPooling(err error) bool {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return strings.Contains(pgErr.Message, "statement pooling")
	}
	return strings.Contains(err.Error(), "statement pooling")
}
