//go:build !linux

package hrtimer

import (
	"context"
	"time"
)

const supported = false

// sysTimer does not exist outside Linux: newSysTimer returns nil, and Timer uses Go's timers.
type sysTimer struct{}

func newSysTimer() *sysTimer                                 { return nil }
func (*sysTimer) sleep(context.Context, time.Duration) error { return nil }
func (*sysTimer) close()                                     {}
