package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/internal/logbuf"
)

var childSeq atomic.Int64

// cpu returns the CPU seconds the child process used so far.
func (p *proc) cpu() float64 { return procCPU(p.cmd.Process.Pid) }

// proc is a running child process.
type proc struct {
	role     string
	appName  string // application_name of its database sessions
	info     string // what the child said with "ready"
	cmd      *exec.Cmd
	stdin    io.WriteCloser
	ready    chan string
	reports  chan childReport
	progress atomic.Int64 // rows the child marked, plus offset
	offset   int64        // set before "go": what earlier children of the same run marked
	stderr   *logbuf.Buffer
	exited   chan struct{}
	err      error
}

// start starts a child with cfg and waits until it says it is ready.
func (b *bench) start(ctx context.Context, cfg childConfig) (*proc, error) {
	if cfg.AppName == "" && cfg.Role != roleKfake {
		cfg.AppName = fmt.Sprintf("bench-%d-%d", os.Getpid(), childSeq.Add(1))
	}
	if cfg.Role == roleRelay && cfg.Relay.Linger == 0 {
		cfg.Relay.Linger = b.opts.Linger
	}
	data, _ := json.Marshal(cfg)
	exe := b.exe
	if cfg.Role != roleKfake && b.opts.ChildExe != "" {
		exe = b.opts.ChildExe // the measured roles, from the build without charts and broker
	}
	readyWithin := 60 * time.Second
	if cfg.Role == roleWatermill {
		exe = b.opts.WatermillExe
		// It preloads its table before it is ready: a second per 1000 events is generous.
		readyWithin += time.Duration(cfg.Events/1000) * time.Second
	}
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), childEnv+"="+string(data))
	p := &proc{role: cfg.Role, appName: cfg.AppName, cmd: cmd, ready: make(chan string, 1), reports: make(chan childReport, 16),
		stderr: &logbuf.Buffer{}, exited: make(chan struct{})}
	cmd.Stderr = p.stderr
	if os.Getenv("BENCH_CHILD_STDERR") != "" {
		// For digging into a run (GODEBUG=gctrace=1, for instance): the children's stderr shown too.
		cmd.Stderr = io.MultiWriter(cmd.Stderr, os.Stderr)
	}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	p.stdin = stdin
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", cfg.Role, err)
	}
	go func() {
		r := bufio.NewReaderSize(stdout, 1<<20)
		for {
			line, err := r.ReadString('\n')
			line = strings.TrimSpace(line)
			switch {
			case strings.HasPrefix(line, "ready"):
				p.ready <- strings.TrimSpace(strings.TrimPrefix(line, "ready"))
			case strings.HasPrefix(line, "progress "):
				n, _ := strconv.ParseInt(strings.TrimPrefix(line, "progress "), 10, 64)
				p.progress.Store(p.offset + n)
			case strings.HasPrefix(line, "report "):
				var rep childReport
				if json.Unmarshal([]byte(strings.TrimPrefix(line, "report ")), &rep) == nil {
					p.reports <- rep
					p.progress.Store(max(p.progress.Load(), p.offset+rep.Events))
				}
			}
			if err != nil {
				break
			}
		}
		p.err = cmd.Wait()
		close(p.exited)
	}()
	select {
	case info := <-p.ready:
		p.info = info
		return p, nil
	case <-p.exited:
		return nil, fmt.Errorf("%s exited before it was ready: %v: %s", cfg.Role, p.err, p.stderrText())
	case <-time.After(readyWithin):
		p.kill()
		return nil, fmt.Errorf("%s not ready within %s: %s", cfg.Role, readyWithin, p.stderrText())
	case <-ctx.Done():
		p.kill()
		return nil, ctx.Err()
	}
}

// send writes one command line to the child.
func (p *proc) send(cmd string) error {
	_, err := io.WriteString(p.stdin, cmd+"\n")
	return err
}

// report waits for the child's next report.
func (p *proc) report(ctx context.Context, timeout time.Duration) (childReport, error) {
	select {
	case r := <-p.reports:
		return r, nil
	case <-p.exited:
		select {
		case r := <-p.reports:
			return r, nil
		default:
		}
		return childReport{}, fmt.Errorf("%s exited: %v: %s", p.role, p.err, p.stderrText())
	case <-time.After(timeout):
		return childReport{}, fmt.Errorf("%s: no report within %s (progress %d)", p.role, timeout, p.progress.Load())
	case <-ctx.Done():
		return childReport{}, ctx.Err()
	}
}

// stop asks the child to stop and waits for it to exit (killing it after 30s).
func (p *proc) stop() error {
	_ = p.send("stop")
	_ = p.stdin.Close()
	select {
	case <-p.exited:
	case <-time.After(30 * time.Second):
		p.kill()
		<-p.exited
		return fmt.Errorf("%s did not stop within 30s", p.role)
	}
	if p.err != nil {
		return fmt.Errorf("%s: %v: %s", p.role, p.err, p.stderrText())
	}
	return nil
}

func (p *proc) kill() {
	if p.cmd.Process != nil {
		_ = p.cmd.Process.Kill()
	}
}

func (p *proc) stderrText() string {
	s := p.stderr.String()
	if len(s) > 2000 {
		s = "..." + s[len(s)-2000:]
	}
	return strings.TrimSpace(s)
}

// broker is a kfake cluster in a child process.
type broker struct {
	p     *proc
	addrs []string
}

// startBroker starts a fresh kfake process with the bench topic; a fresh broker per measured run
// keeps the broker's memory (kfake holds every record) out of the next run.
func (b *bench) startBroker(ctx context.Context) (*broker, error) {
	p, err := b.start(ctx, childConfig{Role: roleKfake, Partitions: b.opts.Partitions, BrokerLog: b.opts.BrokerLog})
	if err != nil {
		return nil, err
	}
	return &broker{p: p, addrs: strings.Split(p.info, ",")}, nil
}

func (br *broker) close() { _ = br.p.stop() }

// latencyRelay starts the bench's relay child on schema's outbox, publishing to br, marking by
// delete and reporting when each event was acknowledged, with cfg's other settings, and lets it
// go.
func (b *bench) latencyRelay(ctx context.Context, schema string, br *broker, cfg childConfig) (*proc, error) {
	cfg.Role, cfg.DatabaseURL, cfg.Schema, cfg.Brokers = roleRelay, b.opts.DatabaseURL, schema, br.addrs
	cfg.Mark, cfg.Latency = postgres.MarkDelete, true
	p, err := b.start(ctx, cfg)
	if err != nil {
		return nil, err
	}
	if err := p.send("go"); err != nil {
		_ = p.stop()
		return nil, err
	}
	return p, nil
}

// schema creates a fresh schema with the outbox migrated, and returns its name.
func (b *bench) schema(ctx context.Context, section string) (string, error) {
	name := fmt.Sprintf("bench_%d_%s", os.Getpid(), section)
	if _, err := b.pool.Exec(ctx, `DROP SCHEMA IF EXISTS `+name+` CASCADE`); err != nil {
		return "", err
	}
	if _, err := postgres.Migrate(ctx, b.pool, postgres.Table{Schema: name}, nil); err != nil {
		return "", err
	}
	return name, nil
}

// dropSchema removes a schema made by schema.
func (b *bench) dropSchema(name string) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	_, _ = b.pool.Exec(ctx, `DROP SCHEMA IF EXISTS `+name+` CASCADE`)
}

// slabSize is the size of the random bytes payloads are cut from: random, so PostgreSQL's TOAST
// compression gains nothing, as with real, varied payloads.
const slabSize = 1 << 20

// slab returns the random bytes, made at the first call: a package variable would be in every
// child's heap, the relay's too, which holds nothing like it outside the bench.
var slab = sync.OnceValue(func() []byte {
	b := make([]byte, slabSize)
	_, _ = rand.Read(b)
	return b
})

// payloadOffset is where event i's payload starts in the slab.
func payloadOffset(i int64, size int) int64 { return (i * 7919) % int64(slabSize-size) }

// txSize is how many rows of the preload share a database transaction (its tx column): the
// relay in exactly-once delivery hands them over together. Set for every variant alike.
const txSize = 5

// preload inserts n events of size bytes over keys keys, in id order, with statements of 50k
// rows generated inside the database, then analyzes the table. Each txSize rows in a row get a
// tx value of their own, as if written by one small transaction each.
func (b *bench) preload(ctx context.Context, schema string, n int64, size, keys int) error {
	t := pgx.Identifier{schema, "outbox"}.Sanitize()
	const chunk = 50000
	for from := int64(1); from <= n; from += chunk {
		to := min(from+chunk-1, n)
		_, err := b.pool.Exec(ctx, `INSERT INTO `+t+` (aggregate_type, aggregate_id, event_type, payload, tx)
			SELECT 'bench', (i % $3)::text, 'bench.created', substring($4::bytea from ((i * 7919) % ($5::bigint - $6::bigint))::int + 1 for $6::int),
				((i - 1) / $7 + 1)::text::xid8
			FROM generate_series($1::bigint, $2::bigint) AS i ORDER BY i`, from, to, keys, slab(), slabSize, size, txSize)
		if err != nil {
			return fmt.Errorf("preload: %w", err)
		}
	}
	if _, err := b.pool.Exec(ctx, `VACUUM (ANALYZE) `+t); err != nil {
		return fmt.Errorf("vacuum after preload: %w", err)
	}
	// The preload's dirty pages and WAL are flushed now, not by a checkpoint during the timed
	// drain: the variants start alike.
	if _, err := b.pool.Exec(ctx, `CHECKPOINT`); err != nil {
		return fmt.Errorf("checkpoint after preload (the bench's database user needs superuser or pg_checkpoint): %w", err)
	}
	return nil
}

// setTrigger enables or disables the outbox's NOTIFY trigger.
func (b *bench) setTrigger(ctx context.Context, schema string, on bool) error {
	verb := "DISABLE"
	if on {
		verb = "ENABLE"
	}
	_, err := b.pool.Exec(ctx, `ALTER TABLE `+pgx.Identifier{schema, "outbox"}.Sanitize()+` `+verb+` TRIGGER outbox_notify`)
	return err
}

// settle waits, before a section, until the work of the sections before it is done: a
// checkpoint, no autovacuum worker running, and the kernel's dirty pages written back (at most
// two minutes), so a section does not pay for flushing what the ones before it wrote. (On the
// machine of 2026-11-28's fourth session, writers flat out reached 1,200 tx/s right after the
// drain section and 4,600 when the write-cost section ran alone.)
func (b *bench) settle(ctx context.Context) {
	start := time.Now()
	if _, err := b.pool.Exec(ctx, `CHECKPOINT`); err != nil {
		b.log.Printf("settle: checkpoint: %v", err)
	}
	var workers int
	var dirty int64
	for time.Since(start) < 2*time.Minute && ctx.Err() == nil {
		if err := b.pool.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'`).Scan(&workers); err != nil {
			b.log.Printf("settle: autovacuum workers: %v", err)
			workers = 0
		}
		dirty = procKB("/proc/meminfo", "Dirty", "Writeback") // written back or being written
		if workers == 0 && dirty < 32<<20 {
			break
		}
		time.Sleep(250 * time.Millisecond)
	}
	if d := time.Since(start); d > time.Second {
		b.log.Printf("settled in %s (autovacuum workers %d, dirty pages %.0f MiB)", d.Round(100*time.Millisecond), workers, mib(dirty))
	}
}
