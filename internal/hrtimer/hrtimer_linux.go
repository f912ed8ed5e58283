package hrtimer

import (
	"context"
	"os"
	"syscall"
	"time"
	"unsafe"
)

// Linux's timerfd flags (linux/timerfd.h: the values of O_NONBLOCK and O_CLOEXEC) and its clock
// (linux/time.h).
const (
	tfdNonblock    = syscall.O_NONBLOCK
	tfdCloexec     = syscall.O_CLOEXEC
	clockMonotonic = 1
)

const supported = true

// sysTimer is a one-shot timerfd whose expiry the network poller waits for.
type sysTimer struct {
	f  *os.File // non-blocking, so registered with the poller
	rc syscall.RawConn
	fd uintptr
}

// newSysTimer returns a timerfd-backed timer, or nil if the kernel refuses one (a seccomp
// profile, an old kernel).
func newSysTimer() *sysTimer {
	fd, _, e := syscall.RawSyscall(syscall.SYS_TIMERFD_CREATE, clockMonotonic, tfdNonblock|tfdCloexec, 0)
	if e != 0 {
		return nil
	}
	f := os.NewFile(fd, "timerfd")
	rc, err := f.SyscallConn()
	if err != nil {
		_ = f.Close()
		return nil
	}
	return &sysTimer{f: f, rc: rc, fd: fd}
}

// arm sets the timer to expire once, d from now (0 disarms it). Arming also clears an expiry
// not read yet.
func (s *sysTimer) arm(d time.Duration) error {
	spec := [4]int64{0, 0, int64(d / time.Second), int64(d % time.Second)} // itimerspec: interval, value
	if _, _, e := syscall.RawSyscall6(syscall.SYS_TIMERFD_SETTIME, s.fd, 0, uintptr(unsafe.Pointer(&spec)), 0, 0, 0); e != 0 {
		return e
	}
	return nil
}

// sleep arms the timer and waits in the poller for its expiry, or until ctx ends.
func (s *sysTimer) sleep(ctx context.Context, d time.Duration) error {
	stop := func() bool { return true }
	// cancelled is closed by the callback that ends the sleep on ctx, once it set the deadline,
	// so the sleep can clear the deadline before the next.
	var cancelled chan struct{}
	if ctx.Done() != nil {
		cancelled = make(chan struct{})
		stop = context.AfterFunc(ctx, func() {
			_ = s.f.SetReadDeadline(time.Unix(1, 0)) // in the past: the read below returns
			close(cancelled)
		})
	}
	var buf [8]byte // the number of expiries
	var ferr error
	armed := false
	err := s.rc.Read(func(fd uintptr) bool {
		if !armed {
			// Armed here, not before Read: Read first makes the poller forget the descriptor's
			// last readiness, so an expiry before that (a goroutine held up between arming and
			// Read) would be lost, and the wait with it. Armed after, the expiry, even an
			// immediate one, is an edge the wait below sees; until then there is nothing to read.
			armed = true
			ferr = s.arm(d)
			return ferr != nil
		}
		_, _, e := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&buf[0])), uintptr(len(buf)))
		if e == syscall.EAGAIN {
			return false // not expired yet: wait in the poller
		}
		if e != 0 {
			ferr = e
		}
		return true
	})
	if !stop() {
		// ctx ended and the callback ran or runs: wait for it, then undo what it did.
		<-cancelled
		_ = s.f.SetReadDeadline(time.Time{})
		_ = s.arm(0)
		return ctx.Err()
	}
	if err != nil {
		return err
	}
	return ferr
}

func (s *sysTimer) close() { _ = s.f.Close() }
