package kafka

import (
	"regexp/syntax"
	"strings"
	"testing"
)

// TestNamesCheckLengthApart guards the heap the name checks hold: each package-level expression
// compiles to a small program (a bounded repetition such as {1,249} compiles to one of 249
// copies, about 100 kB each for the life of the process), and the lengths are still enforced.
func TestNamesCheckLengthApart(t *testing.T) {
	for _, re := range []string{nameRE.String(), placeholderRE.String(), uuidRE.String()} {
		if n := progLen(t, re); n > 100 {
			t.Errorf("%s compiles to %d instructions, want at most 100: check the length apart", re, n)
		}
	}
	for _, tc := range []struct {
		name string
		err  bool
	}{
		{strings.Repeat("a", 249), false},
		{strings.Repeat("a", 250), true},
		{"", true},
		{"a/b", true},
	} {
		err := Config{Brokers: []string{"localhost:9092"}, TopicTemplate: tc.name}.WithDefaults().Validate()
		if tc.name != "" && (err != nil) != tc.err { // an empty template is the default
			t.Errorf("topic_template of %d characters: err %v, want error %v", len(tc.name), err, tc.err)
		}
		err = ConsumerConfig{Group: tc.name, Topics: []string{"t"}, DeadLetterTopic: "dlq"}.WithDefaults().Validate()
		if (err != nil && strings.Contains(err.Error(), "consumer.group")) != tc.err {
			t.Errorf("consumer.group of %d characters: err %v, want error %v", len(tc.name), err, tc.err)
		}
		if got := validName(tc.name, topicMaxLen); got == tc.err {
			t.Errorf("validName(%d characters) = %v", len(tc.name), got)
		}
	}
	for _, tc := range []struct {
		header string
		err    bool
	}{{strings.Repeat("h", 100), false}, {strings.Repeat("h", 101), true}} {
		err := Config{Brokers: []string{"localhost:9092"}, IDHeader: tc.header}.WithDefaults().Validate()
		if (err != nil) != tc.err {
			t.Errorf("id_header of %d characters: err %v, want error %v", len(tc.header), err, tc.err)
		}
	}
}

// progLen is the number of instructions expr compiles to.
func progLen(t *testing.T, expr string) int {
	t.Helper()
	re, err := syntax.Parse(expr, syntax.Perl)
	if err != nil {
		t.Fatal(err)
	}
	prog, err := syntax.Compile(re.Simplify())
	if err != nil {
		t.Fatal(err)
	}
	return len(prog.Inst)
}
