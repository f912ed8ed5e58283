package main

import (
	"errors"
	"fmt"
	"os"
	"regexp"
	"sort"
	"strings"

	"github.com/spf13/pflag"
	"github.com/spf13/viper"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
)

// outboxNameRE is what an outbox's name may be: it is a metrics label value, a URL query value
// and part of the relay's application_name in pg_stat_activity (63 bytes in all).
var outboxNameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,31}$`)

// urlEnvKey is an entry's key naming the environment variable that holds its database.url.
const urlEnvKey = "database.url_env"

// perOutbox reports whether key may be set in an entry of outboxes:: what concerns one outbox
// (its table, its database, its sink settings, the relay's behaviour) rather than the process
// (the HTTP listener, logging, the sink kind, the example consumer).
func perOutbox(key string) bool {
	for _, p := range []string{"database.", "kafka.", "rabbitmq.", "relay."} {
		if strings.HasPrefix(key, p) {
			return true
		}
	}
	return key == "http.stall_timeout" || key == "http.backlog_scan_rows"
}

// flatten turns a YAML mapping into dotted, lowercased keys: {database: {table: x}} is
// database.table. A key holding a mapping where a value is expected is left for the caller.
func flatten(prefix string, m map[string]any, out map[string]any) {
	for k, v := range m {
		key := strings.ToLower(k)
		if prefix != "" {
			key = prefix + "." + key
		}
		if sub, ok := v.(map[string]any); ok {
			flatten(key, sub, out)
			continue
		}
		out[key] = v
	}
}

// parseOutboxes reads the entries of outboxes: in the file: each is the top-level
// configuration of v with the entry's keys on top. Its error names every problem, each with the
// entry it is in: a missing or malformed or repeated name, an unknown key or one that concerns
// the whole process, a secret written in the file, two entries on one table, and the invalid
// values of each entry.
func parseOutboxes(v *viper.Viper, file string, raw any) ([]*Config, error) {
	list, ok := raw.([]any)
	if !ok || len(list) == 0 {
		return nil, fmt.Errorf("config file %s: outboxes: must be a list of outboxes, each with a name and its database.table", file)
	}
	known := map[string]setting{}
	var keys []string
	for _, s := range settings {
		if perOutbox(s.key) {
			known[s.key] = s
			keys = append(keys, s.key)
		}
	}
	keys = append(keys, "name", urlEnvKey)
	var errs []error
	var out []*Config
	names := map[string]int{}
	tables := map[string]string{}
	for i, item := range list {
		m, ok := item.(map[string]any)
		if !ok {
			errs = append(errs, fmt.Errorf("config file %s: outboxes[%d]: must be a mapping of keys (name, database.table...)", file, i))
			continue
		}
		entry := map[string]any{}
		flatten("", m, entry)
		name := strings.TrimSpace(fmt.Sprint(entry["name"]))
		where := fmt.Sprintf("config file %s: outboxes[%d]", file, i)
		switch {
		case entry["name"] == nil:
			errs = append(errs, fmt.Errorf("%s: name: required (a short name: lowercase letters, digits, _ and -)", where))
			name = fmt.Sprintf("#%d", i)
		case !outboxNameRE.MatchString(name):
			errs = append(errs, fmt.Errorf("%s: name: must be 1 to 32 of lowercase letters, digits, _ and -, starting with a letter or digit, got %q", where, name))
		default:
			where = fmt.Sprintf("config file %s: outboxes[%s]", file, name)
			if j, dup := names[name]; dup {
				errs = append(errs, fmt.Errorf("%s: name: also the name of outboxes[%d]; each outbox needs its own", where, j))
			}
			names[name] = i
		}
		ev := viper.New()
		for _, s := range settings {
			ev.Set(s.key, v.Get(s.key))
		}
		entryKeys := sortedAnyKeys(entry)
		own := map[string]bool{}
		bad := false
		for _, k := range entryKeys {
			val := entry[k]
			s, isSetting := known[k]
			switch why, fixed := fixedKeys[k]; {
			case k == "name":
				continue
			case fixed:
				errs = append(errs, fmt.Errorf("%s: %s: not configurable: %s", where, k, why))
			case k == urlEnvKey:
				env := strings.TrimSpace(fmt.Sprint(val))
				url := strings.TrimSpace(os.Getenv(env))
				if url == "" {
					errs = append(errs, fmt.Errorf("%s: %s: the environment variable %q is unset or empty", where, k, env))
					bad = true
				}
				ev.Set("database.url", url)
				ev.Set("database.url_file", "")
				own["database.url"] = true
			case !isSetting:
				hint := "an outbox takes the keys of the database, kafka, rabbitmq and relay sections, http.stall_timeout and http.backlog_scan_rows"
				if _, global := findSetting(k); global {
					hint = "it concerns the whole process: set it at the top level of the file"
				} else if c := closest(k, keys); near(k, c) {
					hint = "did you mean " + c + "?"
				}
				errs = append(errs, fmt.Errorf("%s: unknown key %q (%s)", where, k, hint))
			case s.secret && strings.TrimSpace(fmt.Sprint(val)) != "":
				errs = append(errs, fmt.Errorf("%s: %s: a secret is not read from the config file; set %s_file to a file holding it, or %s to the name of an environment variable holding it",
					where, k, k, urlEnvKey))
			default:
				ev.Set(k, val)
				own[k] = true
				if k == "database.url_file" {
					ev.Set("database.url", "") // the entry's file, not the top-level URL
					own["database.url"] = true
				}
			}
		}
		c, err := parseConfig(ev)
		for _, e := range leaves(err) {
			mine := false
			for _, k := range errKeys(e) {
				mine = mine || own[k] || own[strings.TrimSuffix(k, "_file")] || own[k+"_file"]
			}
			if mine || len(errKeys(e)) == 0 {
				errs = append(errs, fmt.Errorf("%s: %w", where, e))
			} // else the top level's own value: reported once, for the top level
		}
		c.Name = name
		out = append(out, c)
		if bad || c.DatabaseURL == "" {
			continue
		}
		if cc, err := postgres.ParseURL(c.DatabaseURL); err == nil {
			t := c.Store.Table.WithDefaults()
			id := fmt.Sprintf("%s:%d/%s %s", cc.Host, cc.Port, cc.Database, t)
			if other, dup := tables[id]; dup {
				errs = append(errs, fmt.Errorf("%s: database.table: %s is also the table of outboxes[%s]; two relays of one process would contend for it", where, t, other))
			}
			tables[id] = name
		}
	}
	return out, errors.Join(errs...)
}

// findSetting returns the setting of key, if there is one.
func findSetting(key string) (setting, bool) {
	for _, s := range settings {
		if s.key == key {
			return s, true
		}
	}
	return setting{}, false
}

func sortedAnyKeys(m map[string]any) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// names returns the names of c's outboxes.
func (c *Config) names() []string {
	var out []string
	for _, o := range c.Outboxes {
		out = append(out, o.Name)
	}
	return out
}

// outbox returns the configuration of the outbox named name; with an empty name, the only
// outbox, or an error asking for --outbox when there are several.
func (c *Config) outbox(name string) (*Config, error) {
	if name == "" {
		if len(c.Outboxes) > 1 {
			return nil, fmt.Errorf("--outbox: required: the configuration lists %d outboxes (%s)", len(c.Outboxes), strings.Join(c.names(), ", "))
		}
		return c.Outboxes[0], nil
	}
	for _, o := range c.Outboxes {
		if o.Name == name {
			return o, nil
		}
	}
	return nil, fmt.Errorf("--outbox: no outbox named %q (the configuration lists %s)", name, strings.Join(c.names(), ", "))
}

// addOutboxFlag adds --outbox, which picks one of the outboxes a configuration file lists.
func addOutboxFlag(fs *pflag.FlagSet, what string) *string {
	return fs.String("outbox", "", "with a configuration file listing outboxes:, the name of the outbox "+what)
}

// requireOutboxes checks what running the relay needs, for every outbox.
func (c *Config) requireOutboxes() error {
	if !c.Multi {
		return c.requireRelay()
	}
	// A problem of a top-level value is every outbox's: said once, naming them all.
	var msgs []string
	who := map[string][]string{}
	for _, o := range c.Outboxes {
		for _, e := range leaves(o.requireRelay()) {
			if who[e.Error()] == nil {
				msgs = append(msgs, e.Error())
			}
			who[e.Error()] = append(who[e.Error()], o.Name)
		}
	}
	var errs []error
	for _, m := range msgs {
		errs = append(errs, fmt.Errorf("outboxes[%s]: %s", strings.Join(who[m], ", "), m))
	}
	return errors.Join(errs...)
}
