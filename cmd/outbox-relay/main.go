// Command outbox-relay publishes the rows of a PostgreSQL transactional outbox to Kafka, in order
// per aggregate, marking each row only after the broker acknowledged it.
//
// Commands: run, migrate, status, parked, consume, demo, version. Configuration comes from an
// optional YAML file, environment variables OUTBOX_<SECTION>_<KEY> and flags; see
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
	"strings"
	"syscall"

	"github.com/jackc/pgx/v5"
	"github.com/spf13/pflag"
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
		{"version", "print the version", versionCmd},
	}
}

func main() {
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
			err := c.run(ctx, args[1:], stdout, stderr)
			if errors.Is(err, pflag.ErrHelp) {
				return 0
			}
			if err != nil {
				fmt.Fprintf(stderr, "outbox-relay %s: %v\n", c.name, err)
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
		fmt.Fprintf(w, "  %-9s %s\n", c.name, c.usage)
	}
	fmt.Fprintln(w, "\nRun 'outbox-relay <command> --help' for the flags of a command and their environment variables.")
}

// newFlagSet returns a flag set whose usage lists every flag with its environment variable.
func newFlagSet(name, summary string, stderr io.Writer) *pflag.FlagSet {
	fs := pflag.NewFlagSet(name, pflag.ContinueOnError)
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

// newLogger returns the process logger; every string it writes has the secrets removed.
func newLogger(w io.Writer, level, format string, secrets ...string) *slog.Logger {
	var lvl slog.Level
	_ = lvl.UnmarshalText([]byte(level))
	var clean []string
	for _, s := range secrets {
		if len(s) >= 3 {
			clean = append(clean, s)
		}
	}
	opts := &slog.HandlerOptions{Level: lvl, ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
		if len(clean) == 0 {
			return a
		}
		var s string
		switch a.Value.Kind() {
		case slog.KindString:
			s = a.Value.String()
		case slog.KindAny:
			if err, ok := a.Value.Any().(error); ok {
				s = err.Error()
			} else {
				return a
			}
		default:
			return a
		}
		for _, sec := range clean {
			s = strings.ReplaceAll(s, sec, "xxxxx")
		}
		return slog.String(a.Key, s)
	}}
	if format == "text" {
		return slog.New(slog.NewTextHandler(w, opts))
	}
	return slog.New(slog.NewJSONHandler(w, opts))
}

// secretsOf returns the secret values of cfg, to keep them out of logs and errors.
func secretsOf(cfg *Config) []string {
	out := []string{cfg.Kafka.SASL.Password, cfg.RabbitMQ.Password()}
	if cc, err := pgx.ParseConfig(cfg.DatabaseURL); err == nil {
		out = append(out, cc.Password)
	}
	return out
}

func versionCmd(_ context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("version", "Print the version and the revision it was built from.", stderr)
	if err := fs.Parse(args); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "outbox-relay %s (revision %s)\n", version, revision)
	return nil
}
