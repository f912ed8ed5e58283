//go:build !unix

package procs

import "time"

// cpuTime reports that the process's CPU time cannot be read here: Start then governs nothing.
func cpuTime() (time.Duration, bool) { return 0, false }
