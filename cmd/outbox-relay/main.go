// Command outbox-relay publishes the rows of a PostgreSQL transactional outbox to Kafka, in order
// per aggregate, marking each row only after the broker acknowledged it.
//
// Commands: run, migrate, status, parked, replay, partitions, consume, demo, version. Configuration
// comes from an optional YAML file, environment variables OUTBOX_<SECTION>_<KEY> and flags; see
// configs/outbox-relay.yaml.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime"
	"slices"
	"strings"
	"syscall"

	"github.com/spf13/pflag"

	"github.com/outbox-relay/outbox-relay/internal/rawconn"
	"github.com/outbox-relay/outbox-relay/internal/redact"
)

// Set at build time with -ldflags "-X main.version=... -X main.revision=...".
var (
	version  = "dev"
	revision = "unknown"
)

// command is one subcommand.
type command struct {
	name  string
	usage string
	run   func(ctx context.Context, args []string, stdout, stderr io.Writer) error
}

func commands() []command {
	return []command{
		{"run", "run the relay (the daemon)", runCmd},
		{"migrate", "create or upgrade the outbox tables, idempotently", migrateCmd},
		{"demo", "run the relay on embedded defaults with writers and a consumer", demoCmd},
		{"consume", "run the example consumer: welcome each new user once (Kafka group, inbox)", consumeCmd},
		{"status", "show pending, oldest age and parked rows per topic, and who leads", statusCmd},
		{"parked", "list, retry or drop parked rows (rows the relay gave up on)", parkedCmd},
		{"replay", "publish retained events again, byte for byte (relay.mark=retain)", replayCmd},
		{"partitions", "list or repin the partition count each topic's keys are hashed with", partitionsCmd},
		{"version", "print the version", versionCmd},
	}
}

func main() {
	// Nothing in the process reads a heap profile (it serves none): sampling allocations for one
	// would only cost CPU and the profiler's tables (its bucket hash alone is 1.4 MB).
	runtime.MemProfileRate = 0
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	os.Exit(dispatch(ctx, os.Args[1:], os.Stdout, os.Stderr))
}

// dispatch runs the subcommand named by args[0] and returns the exit code.
func dispatch(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(stdout)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	for _, c := range commands() {
		if c.name == args[0] {
			// Before any connection is dialled: OUTBOX_RAW_IO=off is the kill switch of the
			// sockets' raw reads and writes (internal/rawconn) and of the linger's timerfd
			// (internal/hrtimer follows it).
			err := rawconn.Configure(os.Getenv)
			if err == nil {
				err = c.run(ctx, args[1:], stdout, stderr)
			}
			if errors.Is(err, pflag.ErrHelp) {
				return 0
			}
			if err != nil {
				fmt.Fprintf(stderr, "outbox-relay %s: %s\n", c.name, processSecrets.String(err.Error()))
				return 1
			}
			return 0
		}
	}
	fmt.Fprintf(stderr, "outbox-relay: unknown command %q\n\n", args[0])
	usage(stderr)
	return 2
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "Usage: outbox-relay <command> [flags]\n\nCommands:")
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-10s %s\n", c.name, c.usage)
	}
	fmt.Fprintln(w, "\nRun 'outbox-relay <command> --help' for the flags of a command and their environment variables.")
}

// subcommand reads the subcommand of a command that has several (parked, partitions) from
// args[0]. It returns "" when there is none to run: for help (usage printed, err nil), a missing
// one (usage printed, and an error) or one not in subs (an error naming the valid ones).
func subcommand(args []string, usage string, stderr io.Writer, subs ...string) (string, error) {
	want := strings.Join(subs[:len(subs)-1], ", ") + " or " + subs[len(subs)-1]
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprintln(stderr, usage)
		if len(args) == 0 {
			return "", errors.New("missing subcommand: " + want)
		}
		return "", nil
	}
	if !slices.Contains(subs, args[0]) {
		return "", fmt.Errorf("unknown subcommand %q: want %s", args[0], want)
	}
	return args[0], nil
}

// newFlagSet returns a flag set whose usage lists every flag with its environment variable.
func newFlagSet(name, summary string, stderr io.Writer) *pflag.FlagSet {
	fs := pflag.NewFlagSet(name, pflag.ContinueOnError)
	// Unknown flags land in fs.Args(), for loadConfig to report them all with the errors of the
	// other settings, rather than pflag stopping at the first.
	fs.ParseErrorsAllowlist.UnknownFlagsHandling = pflag.PassUnknownFlagToArgs
	fs.SetOutput(stderr)
	fs.SortFlags = false
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: outbox-relay %s [flags]\n\n%s\n\nFlags:\n%s", name, summary, fs.FlagUsages())
		fmt.Fprintln(stderr, "\nSecrets are read only from the environment or from files:")
		for _, s := range settings {
			if s.secret {
				fmt.Fprintf(stderr, "  %-28s %s\n", envName(s.key), s.help)
			}
		}
	}
	return fs
}

// processSecrets holds the secrets this process was configured with (loadConfig adds them): the
// logger and the error dispatch prints remove them, their pieces, and anything shaped like a
// credential, from every string they write.
var processSecrets redact.Redactor

// newLogger returns the process logger. Every string and error it writes goes through
// processSecrets (and the secrets given here), and every duration is written as a Go duration
// string ("1.5s"), in both formats.
func newLogger(w io.Writer, level, format string, secrets ...string) *slog.Logger {
	var lvl slog.Level
	_ = lvl.UnmarshalText([]byte(level))
	processSecrets.Add(secrets...)
	opts := &slog.HandlerOptions{Level: lvl, ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
		switch a.Value.Kind() {
		case slog.KindDuration:
			return slog.String(a.Key, a.Value.Duration().String())
		case slog.KindString:
			return slog.String(a.Key, processSecrets.String(a.Value.String()))
		case slog.KindAny:
			if err, ok := a.Value.Any().(error); ok {
				return slog.String(a.Key, processSecrets.String(err.Error()))
			}
		}
		return a
	}}
	if format == "text" {
		return slog.New(slog.NewTextHandler(w, opts))
	}
	return slog.New(slog.NewJSONHandler(w, opts))
}

// secretsOf returns the bare secret values of cfg, to keep them out of logs and errors (the
// connection strings are known to processSecrets since loadConfig).
func secretsOf(cfg *Config) []string {
	out := []string{cfg.Kafka.SASL.Password, cfg.Kafka.SASL.OAuth.ClientSecret, cfg.RabbitMQ.Password()}
	for _, o := range cfg.Outboxes {
		if o != cfg {
			out = append(out, o.Kafka.SASL.Password, o.Kafka.SASL.OAuth.ClientSecret, o.RabbitMQ.Password())
		}
	}
	return out
}

func versionCmd(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("version", "Print the version and the revision it was built from.", stderr)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	fmt.Fprintf(stdout, "outbox-relay %s (revision %s)\n", version, revision)
	return nil
}
