//go:build unix

package main

import (
	"os"
	"os/signal"
	"syscall"

	"golang.org/x/sys/unix"
)

// takeTerminal puts the demo in a process group of its own and makes it the foreground group of
// its controlling terminal, so that Ctrl-C interrupts the demo alone. Started by make (or go
// run), the demo shares its parent's group: Ctrl-C would interrupt make too, which then reports
// the target as failed (or dies of the signal) however cleanly the demo stops. The returned
// function gives the terminal back to the parent's group.
//
// Nothing changes without a controlling terminal, when the demo's group is not in the
// foreground, or when the demo already leads its group (a shell started it directly). While
// the demo holds the terminal, Ctrl-Z is ignored: it would stop the demo with make waiting on it
// and no shell job to resume.
func takeTerminal() (giveBack func()) {
	noop := func() {}
	tty, err := os.OpenFile("/dev/tty", os.O_RDWR, 0)
	if err != nil {
		return noop
	}
	fd := int(tty.Fd())
	parent := unix.Getpgrp()
	fg, err := unix.IoctlGetInt(fd, unix.TIOCGPGRP)
	if err != nil || fg != parent || parent == os.Getpid() {
		_ = tty.Close()
		return noop
	}
	// A process outside the foreground group that sets the terminal's group gets SIGTTOU.
	signal.Ignore(syscall.SIGTTOU, syscall.SIGTSTP)
	if err := unix.Setpgid(0, 0); err != nil {
		signal.Reset(syscall.SIGTTOU, syscall.SIGTSTP)
		_ = tty.Close()
		return noop
	}
	if err := unix.IoctlSetPointerInt(fd, unix.TIOCSPGRP, os.Getpid()); err != nil {
		_ = unix.Setpgid(0, parent)
		signal.Reset(syscall.SIGTTOU, syscall.SIGTSTP)
		_ = tty.Close()
		return noop
	}
	return func() {
		_ = unix.IoctlSetPointerInt(fd, unix.TIOCSPGRP, parent)
		_ = unix.Setpgid(0, parent)
		signal.Reset(syscall.SIGTTOU, syscall.SIGTSTP)
		_ = tty.Close()
	}
}
