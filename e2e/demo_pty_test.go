//go:build linux

package e2e_test

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/outbox-relay/outbox-relay/internal/logbuf"
	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

// TestMakeDemoCtrlC runs `make demo` as a user does, in a terminal of its own (a pseudo-terminal
// the test holds, make as the session leader in its foreground), and types Ctrl-C there: the
// terminal sends SIGINT to its whole foreground process group, as it would to make and
// everything it started. The summary is printed and make exits 0, without
// "make: *** [...] Error" or "Interrupt".
func TestMakeDemoCtrlC(t *testing.T) {
	t.Parallel()
	makeBin := testenv.LookPath(t, "make", "Debian package make")
	bin := relayBinary(t)
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	ptm, pts := openPTY(t)

	// -o build: use the binary this test run built rather than rebuild bin/outbox-relay, which
	// other tests of a `make test` run are executing.
	cmd := exec.Command(makeBin, "-o", "build", "demo", "BIN="+bin, "DEMO_ARGS=--rate 50 --writers 2")
	cmd.Dir = root
	cmd.Env = demoEnv(demoSchema(t))
	cmd.Stdin, cmd.Stdout, cmd.Stderr = pts, pts, pts
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	_ = pts.Close() // the children hold it; the master reads EIO once they all exit
	out := &logbuf.Buffer{}
	copied := make(chan struct{})
	go func() {
		defer close(copied)
		buf := make([]byte, 4096)
		for {
			n, err := ptm.Read(buf)
			_, _ = out.Write(buf[:n])
			if err != nil {
				return
			}
		}
	}()
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	finished := false
	defer func() {
		if !finished {
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			_ = killSession(cmd.Process.Pid)
			<-exited
		}
		if t.Failed() {
			t.Logf("terminal output:\n%s", lastBytes(out.String(), 6000))
		}
	}()

	deadline := time.Now().Add(2 * time.Minute)
	for strings.Count(out.String(), "received UserCreated") < 3 {
		select {
		case err := <-exited:
			finished = true
			t.Fatalf("make demo exited before printing events: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("make demo printed %d received events in two minutes", strings.Count(out.String(), "received UserCreated"))
		}
		time.Sleep(100 * time.Millisecond)
	}
	if _, err := ptm.Write([]byte{0x03}); err != nil { // Ctrl-C, with the terminal's default VINTR
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		finished = true
		var exit *exec.ExitError
		if errors.As(err, &exit) {
			t.Errorf("make demo after Ctrl-C: %v, want exit 0", exit)
		} else if err != nil {
			t.Fatal(err)
		}
	case <-time.After(time.Minute):
		t.Fatal("make demo still running a minute after Ctrl-C")
	}
	select {
	case <-copied:
	case <-time.After(10 * time.Second):
	}
	got := out.String()
	if strings.Contains(got, "make: ***") || strings.Contains(got, "Interrupt") {
		t.Errorf("make reported the demo as failed or interrupted")
	}
	checkSummary(t, strings.ReplaceAll(got, "\r", ""))
}

// openPTY returns a new pseudo-terminal: its master, which the test reads and types into, and
// its slave, which becomes the controlling terminal of the processes started on it.
func openPTY(t *testing.T) (ptm, pts *os.File) {
	t.Helper()
	ptm, err := os.OpenFile("/dev/ptmx", os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Fatalf("open /dev/ptmx: %v", err)
	}
	t.Cleanup(func() { _ = ptm.Close() })
	fd := int(ptm.Fd())
	if err := unix.IoctlSetPointerInt(fd, unix.TIOCSPTLCK, 0); err != nil { // unlockpt
		t.Fatalf("unlock pty: %v", err)
	}
	n, err := unix.IoctlGetUint32(fd, unix.TIOCGPTN) // ptsname
	if err != nil {
		t.Fatalf("pty number: %v", err)
	}
	pts, err = os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Fatalf("open pty slave: %v", err)
	}
	return ptm, pts
}

// killSession kills what is left of the session sid (the demo moves to a group of its own).
func killSession(sid int) error {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return err
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if s, err := unix.Getsid(pid); err == nil && s == sid {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	return nil
}
