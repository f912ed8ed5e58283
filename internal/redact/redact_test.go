package redact_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/internal/redact"
)

// pieces returns s and its parts split at the characters parsers split at, those of at least
// redact.MinLen bytes: what must not show once s is redacted.
func pieces(s string) []string {
	out := []string{s}
	for _, p := range strings.FieldsFunc(s, func(r rune) bool { return strings.ContainsRune("@:/%'\" ", r) }) {
		if len(p) >= redact.MinLen {
			out = append(out, p)
		}
	}
	return out
}

// malformed is a table of connection strings, most of them mistyped, with a password holding
// each character that breaks a connection string: @ : / % ' " and a space. Every database name is
// one that does not exist, so a connection that parses fails after reaching the server.
var malformed = []struct {
	name     string
	dsn      string
	password string
	// shaped: the password sits where Text finds it without knowing it (between :// and the last
	// '@', or in a quoted or space-free password= value).
	shaped bool
	// gone: more text that must not show; kept: text that must.
	gone, kept []string
}{
	{name: "url, unescaped @", dsn: "postgres://relay:Hunter2@Tail99@127.0.0.1:5432/outbox_nodb",
		password: "Hunter2@Tail99", shaped: true, gone: []string{"Tail99@127.0.0.1"}},
	{name: "url, short password with @ (p@ss)", dsn: "postgres://postgres:p@ss@127.0.0.1:5432/outbox_nodb",
		password: "p@ss", shaped: true, gone: []string{"ss@127.0.0.1"}, kept: []string{"postgres"}},
	{name: "url, colon", dsn: "postgres://relay:Hunter2:Tail99@127.0.0.1:5432/outbox_nodb",
		password: "Hunter2:Tail99", shaped: true},
	{name: "url, slash", dsn: "postgres://relay:Hunter2/Tail99@127.0.0.1:5432/outbox_nodb",
		password: "Hunter2/Tail99", shaped: true},
	{name: "url, bad percent", dsn: "postgres://relay:Hunter2%zzTail99@127.0.0.1:5432/outbox_nodb",
		password: "Hunter2%zzTail99", shaped: true},
	{name: "url, quotes", dsn: `postgres://relay:Hunter2'Tail99"Mike@127.0.0.1:5432/outbox_nodb`,
		password: `Hunter2'Tail99"Mike`, shaped: true},
	{name: "url, space", dsn: "postgres://relay:Hunter2 Tail99@127.0.0.1:5432/outbox_nodb",
		password: "Hunter2 Tail99", shaped: true},
	{name: "url, all of them", dsn: `postgres://relay:Alpha@Bravo:Charlie/Delta%Echo'Foxtrot"Golf Hotel@127.0.0.1:5432/outbox_nodb`,
		password: `Alpha@Bravo:Charlie/Delta%Echo'Foxtrot"Golf Hotel`, shaped: true},
	{name: "url, escaped correctly", dsn: "postgres://relay:Hunter2%40Tail99%2F%25@127.0.0.1:5432/outbox_nodb",
		password: "Hunter2@Tail99/%", shaped: true, gone: []string{"Hunter2%40Tail99"}},
	{name: "url, password parameter", dsn: "postgres://relay@127.0.0.1:5432/outbox_nodb?password=Hunter2%40Tail99",
		password: "Hunter2@Tail99", shaped: true, gone: []string{"Hunter2%40Tail99"}, kept: []string{`role "relay"`}},
	{name: "key=value, unterminated quote", dsn: "host=127.0.0.1 user=relay password='Hunter2 Tail99 dbname=outbox_nodb",
		password: "Hunter2 Tail99", shaped: true},
	{name: "key=value, unquoted space", dsn: "host=127.0.0.1 user=relay password=Hunter2 Tail99 dbname=outbox_nodb",
		password: "Hunter2 Tail99"},
	{name: "key=value, quoted space", dsn: "host=127.0.0.1 user=relay password='Hunter2 Tail99' dbname=outbox_nodb",
		password: "Hunter2 Tail99", shaped: true},
	{name: "key=value, escaped quote", dsn: `host=127.0.0.1 user=relay password='Hunter2\'Tail99 "Mike"' dbname=outbox_nodb`,
		password: `Hunter2'Tail99 "Mike"`, shaped: true},
	{name: "key=value, @ : / %", dsn: "host=127.0.0.1 user=relay password=Hunter2@Tail99:Mike/Oscar%zz dbname=outbox_nodb",
		password: "Hunter2@Tail99:Mike/Oscar%zz", shaped: true},
	{name: "key=value, p@ss", dsn: "host=127.0.0.1 user=postgres password=p@ss dbname=outbox_nodb",
		password: "p@ss", shaped: true, kept: []string{"user=postgres"}},
	{name: "key=value, spaces around =", dsn: "host=127.0.0.1 user=relay password = 'Hunter2 Tail99' dbname=outbox_nodb",
		password: "Hunter2 Tail99", shaped: true},
}

// driverTexts returns what the driver says about dsn: its parse error, or the error of
// connecting with it. These are the messages that leaked.
func driverTexts(t *testing.T, dsn string) []string {
	t.Helper()
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		return []string{err.Error()}
	}
	cfg.ConnectTimeout = 10 * time.Second
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	conn, err := pgx.ConnectConfig(ctx, cfg)
	if err == nil {
		_ = conn.Close(ctx)
		t.Fatalf("connected with %q: the test needs a failure", dsn)
	}
	return []string{err.Error()}
}

// TestRedactMalformedConnStrings: whatever the driver or a message makes of a malformed
// connection string, once redacted with the string known, neither the password nor any piece of
// it shows; and where it sits in its place, Text alone removes it.
func TestRedactMalformedConnStrings(t *testing.T) {
	t.Parallel()
	for _, c := range malformed {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			r := &redact.Redactor{}
			r.AddConnString(c.dsn)
			echoed := "cannot parse `" + c.dsn + "`: failed to parse"
			driver := driverTexts(t, c.dsn)
			texts := append(driver, echoed, c.dsn, "dial: "+c.dsn+"\nnext line")
			secret := append(pieces(c.password), c.gone...)
			for i, text := range texts {
				out := r.String(text)
				for _, s := range secret {
					if strings.Contains(out, s) {
						t.Errorf("%q shows in\n%s\nredacted from\n%s", s, out, text)
					}
				}
				for _, k := range c.kept {
					if i < len(driver) && strings.Contains(text, k) && !strings.Contains(out, k) {
						t.Errorf("%q was masked too:\n%s", k, out)
					}
				}
			}
			if !c.shaped {
				return
			}
			for _, text := range []string{echoed, c.dsn} {
				out := redact.Text(text)
				for _, s := range pieces(c.password) {
					if strings.Contains(out, s) {
						t.Errorf("Text, knowing no secret: %q shows in\n%s", s, out)
					}
				}
			}
		})
	}
}

// TestRedactKeepsTheRest: redaction removes credentials, not the diagnosis around them.
func TestRedactKeepsTheRest(t *testing.T) {
	t.Parallel()
	for _, c := range []struct{ in, want string }{
		{"failed to connect to `user=postgres database=app`: 127.0.0.1:5432 (127.0.0.1): server error: FATAL: password authentication failed for user \"relay\" (SQLSTATE 28P01)",
			"failed to connect to `user=postgres database=app`: 127.0.0.1:5432 (127.0.0.1): server error: FATAL: password authentication failed for user \"relay\" (SQLSTATE 28P01)"},
		{"dial postgres://relay:s3cret@db:5432/app?sslmode=require: refused",
			"dial postgres://xxxxx@db:5432/app?sslmode=require: refused"},
		{"amqp://guest:gu@st@rabbit:5672/ unreachable", "amqp://xxxxx@rabbit:5672/ unreachable"},
		{"one postgres://a:b@h1/x\ntwo h2@example", "one postgres://xxxxx@h1/x\ntwo h2@example"},
		{"host=db password='a b\\'c' dbname=app", "host=db password=xxxxx dbname=app"},
		{"host=db PASSWORD = s3cret dbname=app", "host=db PASSWORD = xxxxx dbname=app"},
		{"sslpassword=k3y sslmode=verify-full", "sslpassword=xxxxx sslmode=verify-full"},
		{"host=db password='unterminated dbname=app\nnext", "host=db password=xxxxx\nnext"},
		{"no credentials at http://example.com/x", "no credentials at http://example.com/x"},
	} {
		if got := redact.Text(c.in); got != c.want {
			t.Errorf("Text(%q)\n got %q\nwant %q", c.in, got, c.want)
		}
	}
	// A secret too short to mask where it appears: "p" is not removed from "postgres".
	r := redact.New("p", "s3cret")
	if got := r.String("user=postgres lookup p failed: s3cret"); got != "user=postgres lookup p failed: xxxxx" {
		t.Errorf("short secret: got %q", got)
	}
	// A bare secret goes in its URL-escaped forms too.
	r = redact.New("a/b c#d")
	if got := r.String("pw a%2Fb+c%23d or a%2Fb%20c%23d"); strings.Contains(got, "a%2F") {
		t.Errorf("escaped secret shows: %q", got)
	}
	var none *redact.Redactor
	if got := none.String("postgres://u:pw@h/db"); got != "postgres://xxxxx@h/db" {
		t.Errorf("nil Redactor: %q", got)
	}
}
