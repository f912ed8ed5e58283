package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"
)

// TestLogDurationsAreStrings: every duration attribute, at the top, in a group or added with
// With, is written as a Go duration string in the JSON logs, as in the text logs, not as
// nanoseconds.
func TestLogDurationsAreStrings(t *testing.T) {
	var buf bytes.Buffer
	log := newLogger(&buf, "info", "json").With("down_for", 90*time.Second)
	log.Warn("publish failed, will retry", "retry_in", time.Second, "err", errors.New("boom"),
		slog.Group("backoff", "min", 1500*time.Millisecond, "max", 5*time.Minute), "rows", 3)
	var line map[string]any
	if err := json.Unmarshal(buf.Bytes(), &line); err != nil {
		t.Fatalf("not one JSON line: %v\n%s", err, buf.String())
	}
	backoff, _ := line["backoff"].(map[string]any)
	for _, c := range []struct {
		got  any
		want string
	}{{line["retry_in"], "1s"}, {line["down_for"], "1m30s"}, {backoff["min"], "1.5s"}, {backoff["max"], "5m0s"}} {
		if c.got != c.want {
			t.Errorf("duration written as %#v, want %q; line: %s", c.got, c.want, buf.String())
		}
	}
	if line["rows"] != float64(3) || line["err"] != "boom" {
		t.Errorf("other attributes changed: %s", buf.String())
	}
	buf.Reset()
	newLogger(&buf, "info", "text").Info("x", "retry_in", time.Second)
	if !strings.Contains(buf.String(), "retry_in=1s") {
		t.Errorf("text log: %s", buf.String())
	}
}

// TestLogRedactsSecrets: the configured connection strings, their pieces and credential-shaped
// text never reach a log line, in messages, attributes or errors.
func TestLogRedactsSecrets(t *testing.T) {
	processSecrets.AddConnString("postgres://relay:Lgr-Hunter2@Lgr-Tail99@127.0.0.1:5432/db")
	var buf bytes.Buffer
	log := newLogger(&buf, "debug", "json", "Lgr-Sasl-Pw")
	log.Error("lookup Lgr-Tail99@127.0.0.1: no such host", "err",
		errors.New("failed: password=Other-Secret host=db"), "dsn", "amqp://guest:Other-Pw@mq:5672/",
		"sasl", "Lgr-Sasl-Pw")
	out := buf.String()
	for _, s := range []string{"Lgr-Hunter2", "Lgr-Tail99", "Other-Secret", "Other-Pw", "Lgr-Sasl-Pw"} {
		if strings.Contains(out, s) {
			t.Errorf("log shows %q: %s", s, out)
		}
	}
	if !strings.Contains(out, "no such host") || !strings.Contains(out, "mq:5672") {
		t.Errorf("redaction removed the diagnosis: %s", out)
	}
}
