//go:build !linux

package rawconn

import "net"

const supported = false

// Wrap returns c: raw system calls are only used on Linux.
func Wrap(c net.Conn) net.Conn { return c }
