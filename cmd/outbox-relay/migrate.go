package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/spf13/pflag"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
)

func migrateCmd(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("migrate", "Create or upgrade the outbox tables. Safe to run twice, and from several replicas at once.", stderr)
	addFlags(fs)
	addOutboxFlag(fs, "to migrate (default: every outbox; --adopt needs one)")
	example := fs.Bool("example", false, "also create the example service's users table")
	adopt := fs.Bool("adopt", false, "prepare an existing outbox table (database.table, database.columns): print what it adds, apply only with --yes")
	yes := fs.Bool("yes", false, "with --adopt: apply the statements printed")
	lockTimeout := fs.String("lock-timeout", "10s", "with --adopt: give up when a lock on the table is not granted within this (a PostgreSQL interval; 0 waits)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfgs, err := loadOutboxes(fs, !*adopt)
	if err != nil {
		return err
	}
	for _, cfg := range cfgs {
		if err := migrateOne(ctx, cfg, *adopt, *yes, *example, *lockTimeout, stdout); err != nil {
			if len(cfgs) > 1 {
				return fmt.Errorf("outbox %s: %w", cfg.Name, err)
			}
			return err
		}
	}
	return nil
}

// migrateOne migrates (or adopts) the table of one outbox.
func migrateOne(ctx context.Context, cfg *Config, adopt, yes, example bool, lockTimeout string, stdout io.Writer) error {
	pool, err := openPool(ctx, cfg)
	if err != nil {
		return err
	}
	defer pool.Close()
	if adopt {
		return adoptTable(ctx, pool, cfg.Store.Table, yes, lockTimeout, stdout)
	}
	fmt.Fprintf(stdout, "migrating %s\n", cfg.Store.Table.WithDefaults())
	applied := 0
	_, err = postgres.Migrate(ctx, pool, cfg.Store.Table, func(s postgres.MigrationStep) {
		if s.Applied {
			applied++
			fmt.Fprintf(stdout, "  applied          %s\n", s.Name)
		} else {
			fmt.Fprintf(stdout, "  already applied  %s\n", s.Name)
		}
	})
	if err != nil {
		return fmt.Errorf("migrate: %s", postgres.Redact(err.Error(), pool.Config().ConnConfig.Password))
	}
	if example {
		if err := postgres.MigrateExample(ctx, pool, cfg.Store.Table); err != nil {
			return fmt.Errorf("migrate example: %w", err)
		}
		fmt.Fprintln(stdout, "  example users table ready")
	}
	fmt.Fprintf(stdout, "done: %d applied\n", applied)
	return nil
}

// loadOutbox loads the configuration of a command on one outbox: the only one, or the one
// --outbox names when the file lists several.
func loadOutbox(fs *pflag.FlagSet) (*Config, error) {
	cfgs, err := loadOutboxes(fs, false)
	if err != nil {
		return nil, err
	}
	return cfgs[0], nil
}

// loadOutboxes loads the configuration of a command on one outbox or, with every true and no
// --outbox, on each outbox the file lists.
func loadOutboxes(fs *pflag.FlagSet, every bool) ([]*Config, error) {
	all, _, err := loadConfig(fs)
	if all == nil {
		return nil, err
	}
	name, _ := fs.GetString("outbox") // "" when the command has no --outbox
	cfgs := all.Outboxes
	if name != "" || !every {
		cfg, perr := all.outbox(name)
		if perr != nil {
			return nil, errors.Join(err, perr)
		}
		cfgs = []*Config{cfg}
	}
	for _, c := range cfgs {
		more := c.requireDatabase()
		if more != nil && all.Multi {
			more = fmt.Errorf("outboxes[%s]: %w", c.Name, more)
		}
		err = joinNew(err, more)
	}
	if err != nil {
		return nil, err
	}
	return cfgs, nil
}

// loadDatabase loads the configuration of a command that needs only the database (the outbox
// --outbox names, when the file lists several), and connects.
func loadDatabase(ctx context.Context, fs *pflag.FlagSet) (*Config, *pgxpool.Pool, error) {
	cfg, err := loadOutbox(fs)
	if err != nil {
		return nil, nil, err
	}
	pool, err := openPool(ctx, cfg)
	if err != nil {
		return nil, nil, err
	}
	return cfg, pool, nil
}

// openPool connects a small pool within database.connect_timeout.
func openPool(ctx context.Context, cfg *Config) (*pgxpool.Pool, error) {
	if _, err := postgres.ParseURL(cfg.DatabaseURL); err != nil {
		return nil, err // refuses a URL whose password the driver would split
	}
	pc, err := pgxpool.ParseConfig(cfg.DatabaseURL)
	if err != nil {
		return nil, fmt.Errorf("database.url: invalid connection string")
	}
	pc.ConnConfig.ConnectTimeout = cfg.ConnectTimeout
	pc.MaxConns = 4
	pool, err := pgxpool.NewWithConfig(ctx, pc)
	if err != nil {
		return nil, fmt.Errorf("database: %s", postgres.Redact(err.Error(), pc.ConnConfig.Password))
	}
	cctx, cancel := context.WithTimeout(ctx, cfg.ConnectTimeout)
	defer cancel()
	if err := pool.Ping(cctx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("database %s:%d/%s unreachable: %s", pc.ConnConfig.Host, pc.ConnConfig.Port,
			pc.ConnConfig.Database, postgres.Redact(err.Error(), pc.ConnConfig.Password))
	}
	return pool, nil
}

// adoptTable prints the statements that prepare an existing table for the relay, with the locks
// they take, and applies them with yes.
func adoptTable(ctx context.Context, pool *pgxpool.Pool, t postgres.Table, yes bool, lockTimeout string, stdout io.Writer) error {
	plan, err := postgres.PlanAdopt(ctx, pool, t)
	if err != nil {
		return fmt.Errorf("migrate --adopt: %s", postgres.Redact(err.Error(), pool.Config().ConnConfig.Password))
	}
	if len(plan.Statements) == 0 {
		fmt.Fprintf(stdout, "%s is adopted already: nothing to do\n", plan.Table)
		return nil
	}
	fmt.Fprintf(stdout, "-- adopt %s (%d MiB): the writers' columns are left as they are\n", plan.Table, plan.Bytes>>20)
	fmt.Fprintf(stdout, "-- one transaction, lock_timeout %s\n", lockTimeout)
	for _, s := range plan.Statements {
		fmt.Fprintf(stdout, "%s;\n", s)
	}
	fmt.Fprintln(stdout, "-- locks held until the transaction commits:")
	for _, l := range plan.Locks {
		fmt.Fprintf(stdout, "--   %s\n", l)
	}
	if !yes {
		fmt.Fprintln(stdout, "-- nothing applied: run again with --yes to apply these statements")
		return nil
	}
	start := time.Now()
	if err := postgres.Adopt(ctx, pool, plan, lockTimeout); err != nil {
		return fmt.Errorf("migrate --adopt: %s", postgres.Redact(err.Error(), pool.Config().ConnConfig.Password))
	}
	fmt.Fprintf(stdout, "done: %s adopted in %s\n", plan.Table, time.Since(start).Round(time.Millisecond))
	return nil
}
