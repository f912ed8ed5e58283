package faults_test

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// A database transaction far larger than the relay's memory budget, in exactly-once delivery:
// streamed inside one Kafka transaction (app/relay/stream.go), never held whole.

// hugeTxRows is the size of the huge transaction of the stream tests: rows of about 1 KB, 150 MB
// in all, 71 times the default relay.max_in_flight_bytes (2 MiB).
const hugeTxRows = 150000

// streamEnv is the environment of a relay in exactly-once mode with a transaction timeout long
// enough to stream hugeTxRows rows on a loaded machine.
func (e *env) streamEnv() []string {
	return append(e.eoEnv(), "OUTBOX_KAFKA_TRANSACTION_TIMEOUT=300s")
}

// peakRSS returns the process's peak resident set size (VmHWM), in bytes.
func (p *proc) peakRSS(t *testing.T) int64 {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", p.cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return kb << 10
		}
	}
	t.Fatal("no VmHWM in /proc status")
	return 0
}

// hugeLoad writes small transactions, one transaction of hugeTxRows rows of about 1 KB, and small
// transactions again.
func (e *env) hugeLoad() {
	e.t.Helper()
	e.loader.Run(e.ctx, 50)
	if err := e.loader.Bulk(e.ctx, hugeTxRows, hugeTxRows); err != nil {
		e.t.Fatal(err)
	}
	e.loader.Run(e.ctx, 50)
}

// streamOptions are eoOptions with payloads of about 1 KB.
func streamOptions() options {
	o := eoOptions()
	o.load.PayloadBytes = 1000
	return o
}

// TestFaultEO12HugeTransaction: one database transaction of 150,000 rows of about 1 KB (150 MB)
// between small ones is published by a relay with the default memory budget (2 MiB): its peak
// resident memory stays far below the transaction's size, and a read_committed reader sees every
// event once, in order per key, and the huge transaction in one Kafka transaction.
func TestFaultEO12HugeTransaction(t *testing.T) {
	t.Parallel()
	e := setup(t, streamOptions())
	e.hugeLoad()
	p := e.startProcess("eo12", e.streamEnv()...)
	start := time.Now()
	e.waitDrained(600 * time.Second)
	took := time.Since(start)
	rss := p.peakRSS(t)
	p.signal(t, syscall.SIGTERM)
	if code := p.wait(t, 60*time.Second); code != 0 {
		t.Errorf("relay exit code after SIGTERM: %d, want 0", code)
	}
	if p.logs.count("streamed transaction committed") == 0 {
		t.Errorf("the huge transaction was not streamed:\n%s", p.logs.tail(30))
	}
	for _, l := range p.logs.matching("stream") {
		t.Log(l)
	}
	const txBytes = hugeTxRows * 1000
	t.Logf("huge transaction of %d rows (%d MB) published in %s; relay peak RSS %d MB", hugeTxRows, txBytes>>20, took.Round(time.Millisecond), rss>>20)
	if rss > txBytes/2 {
		t.Errorf("relay peak RSS %d MB, want well below the transaction's %d MB", rss>>20, txBytes>>20)
	}
	rep := e.checkEO()
	if rep.Committed < hugeTxRows {
		t.Errorf("%d events committed, want more than %d", rep.Committed, hugeTxRows)
	}
	result(t, 112, rep, fmt.Sprintf("one transaction of %d rows of 1 KB streamed, peak RSS %d MB", hugeTxRows, rss>>20))
}

// TestFaultEO13KillMidStream: the leader is killed (-9) while it streams a transaction of 100,000
// rows (part of it produced in the open Kafka transaction); the next leader fences it, streams
// the transaction again, whole: no duplicate, nothing of the first attempt visible.
func TestFaultEO13KillMidStream(t *testing.T) {
	t.Parallel()
	o := streamOptions()
	e := setup(t, o)
	e.loader.Run(e.ctx, 20)
	if err := e.loader.Bulk(e.ctx, 100000, 100000); err != nil {
		t.Fatal(err)
	}
	p1 := e.startProcess("eo13-a", e.streamEnv()...)
	e.eventually(300*time.Second, "the stream under way", func() (bool, string) {
		n := e.records() // end offsets: the open transaction's records count
		return p1.logs.count("streaming database transactions") > 0 && n > 20000, "records " + itoa(n)
	})
	p1.signal(t, syscall.SIGKILL)
	p1.wait(t, 30*time.Second)
	e.terminate("eo13-a")
	e.terminate("eo13-a marks")
	p2 := e.startProcess("eo13-b", e.streamEnv()...)
	e.loader.Run(e.ctx, 20)
	e.waitDrained(600 * time.Second)
	p2.signal(t, syscall.SIGTERM)
	if code := p2.wait(t, 60*time.Second); code != 0 {
		t.Errorf("relay exit code after SIGTERM: %d, want 0", code)
	}
	rep := e.checkEO()
	if rep.Committed < 100000 {
		t.Errorf("%d events committed, want more than 100,000", rep.Committed)
	}
	result(t, 113, rep, "killed -9 in the middle of a stream of 100,000 rows")
}

// matching returns the lines that contain s.
func (b *logBuffer) matching(s string) []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []string
	for _, l := range b.lines {
		if strings.Contains(l, s) {
			out = append(out, l)
		}
	}
	return out
}
