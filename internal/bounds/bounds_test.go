package bounds

import (
	"testing"
	"time"
)

func TestIntAndDuration(t *testing.T) {
	ints := Int{Min: 1, Max: 10}
	durs := Duration{Min: 10 * time.Millisecond, Max: time.Minute}
	for _, c := range []struct {
		name string
		err  error
		want string // "" when the value is accepted
	}{
		{"int in range", ints.Check("a.b", 1), ""},
		{"int at max", ints.Check("a.b", 10), ""},
		{"int below", ints.Check("a.b", 0), "a.b: must be an integer between 1 and 10, got 0"},
		{"int above", ints.Check("a.b", 11), "a.b: must be an integer between 1 and 10, got 11"},
		{"int parsed", second(ints.Parse("a.b", "7")), ""},
		{"int not a number", second(ints.Parse("a.b", "ten")), `a.b: must be an integer between 1 and 10, got "ten"`},
		{"int parsed above", second(ints.Parse("a.b", "12")), `a.b: must be an integer between 1 and 10, got "12"`},
		{"duration in range", durs.Check("c.d", time.Second), ""},
		{"duration below", durs.Check("c.d", time.Millisecond), "c.d: must be a duration between 10ms and 1m0s, got 1ms"},
		{"duration parsed", second(durs.Parse("c.d", "2s")), ""},
		{"duration without unit", second(durs.Parse("c.d", "500")), `c.d: must be a duration between 10ms and 1m0s (like 500ms, 10s, 2m), got "500"`},
		{"duration parsed above", second(durs.Parse("c.d", "2m")), `c.d: must be a duration between 10ms and 1m0s (like 500ms, 10s, 2m), got "2m"`},
	} {
		got := ""
		if c.err != nil {
			got = c.err.Error()
		}
		if got != c.want {
			t.Errorf("%s: got %q, want %q", c.name, got, c.want)
		}
	}
}

func second[T any](_ T, err error) error { return err }
