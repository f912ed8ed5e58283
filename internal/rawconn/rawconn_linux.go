package rawconn

import (
	"errors"
	"io"
	"net"
	"os"
	"syscall"
	"unsafe"
)

const supported = true

// socket is the part of *net.TCPConn and *net.UnixConn Wrap needs.
type socket interface {
	net.Conn
	SyscallConn() (syscall.RawConn, error)
}

// conn is a TCP or Unix socket whose Read and Write are raw system calls. Everything else
// (Close, deadlines, addresses) is the socket's own.
type conn struct {
	socket
	rc syscall.RawConn
}

// Wrap returns c with Read and Write done as raw system calls, when c is a TCP or Unix socket
// and the package is enabled; c itself otherwise.
func Wrap(c net.Conn) net.Conn {
	if off.Load() {
		return c
	}
	var s socket
	switch t := c.(type) {
	case *net.TCPConn:
		s = t
	case *net.UnixConn:
		s = t
	default:
		return c
	}
	rc, err := s.SyscallConn()
	if err != nil {
		return c
	}
	return &conn{socket: s, rc: rc}
}

// Read implements net.Conn: one read(2) of what the socket holds, waiting in the poller while
// it holds nothing.
func (c *conn) Read(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	var n int
	var errno syscall.Errno
	err := c.rc.Read(func(fd uintptr) bool {
		for {
			r, _, e := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&b[0])), uintptr(len(b)))
			switch e {
			case syscall.EINTR:
				continue
			case syscall.EAGAIN:
				return false // wait in the poller (or for the deadline)
			}
			n, errno = int(r), e
			return true
		}
	})
	switch {
	case err != nil:
		return 0, c.opError("read", err)
	case errno != 0:
		return 0, c.opError("read", os.NewSyscallError("read", errno))
	case n == 0:
		return 0, io.EOF
	}
	return n, nil
}

// Write implements net.Conn: write(2) until all of b is written, waiting in the poller while
// the socket's buffer is full.
func (c *conn) Write(b []byte) (int, error) {
	var n int
	var errno syscall.Errno
	err := c.rc.Write(func(fd uintptr) bool {
		for n < len(b) {
			r, _, e := syscall.RawSyscall(syscall.SYS_WRITE, fd, uintptr(unsafe.Pointer(&b[n])), uintptr(len(b)-n))
			switch e {
			case 0:
				n += int(r)
			case syscall.EINTR:
			case syscall.EAGAIN:
				return false
			default:
				errno = e
				return true
			}
		}
		return true
	})
	switch {
	case err != nil:
		return n, c.opError("write", err)
	case errno != 0:
		return n, c.opError("write", os.NewSyscallError("write", errno))
	}
	return n, nil
}

// opError wraps err as net's own Read and Write do, so that callers' checks (net.Error's
// Timeout, os.ErrDeadlineExceeded, net.ErrClosed, syscall.ECONNRESET) hold. The raw
// connection's errors (a deadline, a closed connection) come wrapped as "raw-read" or
// "raw-write": their cause is kept.
func (c *conn) opError(op string, err error) error {
	var oe *net.OpError
	if errors.As(err, &oe) {
		err = oe.Err
	}
	return &net.OpError{Op: op, Net: c.LocalAddr().Network(), Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: err}
}
