package domain

import (
	"encoding/json"
	"errors"
	"testing"
	"time"
)

func TestNewUserValidates(t *testing.T) {
	t.Parallel()
	cases := []struct{ name, email string }{
		{"", "a@example.com"},
		{"Ann", "not-an-address"},
		{"Ann", "Ann <a@example.com>"},
	}
	for _, c := range cases {
		if _, err := NewUser(c.name, c.email); !errors.Is(err, ErrInvalidUser) {
			t.Errorf("NewUser(%q, %q) error = %v, want ErrInvalidUser", c.name, c.email, err)
		}
	}
}

func TestUserCreatedRoundTrip(t *testing.T) {
	t.Parallel()
	u, err := NewUser("Ann", "ann@example.com")
	if err != nil {
		t.Fatal(err)
	}
	at := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	ev := NewUserCreated(u, at)
	b, err := json.Marshal(ev)
	if err != nil {
		t.Fatal(err)
	}
	var raw map[string]any
	if err := json.Unmarshal(b, &raw); err != nil {
		t.Fatal(err)
	}
	if _, ok := raw["name"]; ok {
		t.Errorf("payload %s carries the name: events carry ids and minimal data", b)
	}
	got, err := UnmarshalUserCreated(b)
	if err != nil {
		t.Fatal(err)
	}
	if got != ev {
		t.Errorf("round trip = %+v, want %+v", got, ev)
	}
	if ev.AggregateID() != u.ID() || ev.EventType() != "UserCreated" {
		t.Errorf("event identity = %s/%s", ev.EventType(), ev.AggregateID())
	}
}
