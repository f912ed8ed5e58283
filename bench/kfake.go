//go:build !benchchild

package main

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime/pprof"
	"strings"

	"github.com/twmb/franz-go/pkg/kfake"
)

// runKfake runs the broker role: a kfake cluster until the parent closes stdin.
func runKfake(cfg childConfig) error {
	opts := []kfake.Opt{kfake.NumBrokers(1), kfake.SeedTopics(int32(cfg.Partitions), topic)}
	if cfg.BrokerLog != "" && cfg.BrokerLog != brokerLogMemory {
		dir, err := os.MkdirTemp(cfg.BrokerLog, "outbox-bench-kfake-")
		if err != nil {
			return fmt.Errorf("broker log: %w", err)
		}
		defer os.RemoveAll(dir) // after the cluster closed (deferred later, run first)
		opts = append(opts, kfake.DataDir(dir))
	}
	cl, err := kfake.NewCluster(opts...)
	if err != nil {
		return fmt.Errorf("start kfake: %w", err)
	}
	defer cl.Close()
	if dir := os.Getenv("BENCH_PROFILE_BROKER"); dir != "" {
		f, err := os.Create(filepath.Join(dir, fmt.Sprintf("broker-%d.pprof", os.Getpid())))
		if err == nil {
			_ = pprof.StartCPUProfile(f)
			defer pprof.StopCPUProfile()
		}
	}
	fmt.Printf("ready %s\n", strings.Join(cl.ListenAddrs(), ","))
	_, _ = io.Copy(io.Discard, os.Stdin) // run until the parent closes stdin
	return nil
}
