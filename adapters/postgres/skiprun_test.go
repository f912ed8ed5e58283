package postgres

import (
	"slices"
	"testing"
)

// TestSkipRun checks the split of the ids a claim skips into one range and the rest, without a
// database: every id of skip is in [lo, hi] or in rest, no id outside skip is in [lo, hi], and
// the range is the longest run.
func TestSkipRun(t *testing.T) {
	cases := []struct {
		name   string
		skip   []int64
		lo, hi int64
		rest   []int64
	}{
		{name: "nothing to skip: an empty range", skip: nil, lo: 1, hi: 0},
		{name: "one id", skip: []int64{7}, lo: 7, hi: 7},
		{name: "one run, in order", skip: []int64{3, 4, 5, 6}, lo: 3, hi: 6},
		{name: "one run, out of order", skip: []int64{6, 3, 5, 4}, lo: 3, hi: 6},
		{name: "a gap: the longest run by range", skip: []int64{1, 2, 10, 11, 12}, lo: 10, hi: 12, rest: []int64{1, 2}},
		{name: "a gap, out of order", skip: []int64{12, 2, 10, 1, 11}, lo: 10, hi: 12, rest: []int64{1, 2}},
		{name: "runs of equal length: the first", skip: []int64{5, 6, 1, 2}, lo: 1, hi: 2, rest: []int64{5, 6}},
		{name: "scattered ids", skip: []int64{9, 3, 7}, lo: 3, hi: 3, rest: []int64{7, 9}},
		// skip holds distinct ids (relay.Session.Claim): with a duplicate, as in [4 4 6], the fast
		// path's span check would take [4, 6] and skip row 5.
	}
	var s session // the buffers are reused from one case to the next, as by one session's claims
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			lo, hi, rest := s.skipRun(tc.skip)
			if lo != tc.lo || hi != tc.hi || !slices.Equal(rest, tc.rest) {
				t.Fatalf("skipRun(%v) = %d, %d, %v, want %d, %d, %v", tc.skip, lo, hi, rest, tc.lo, tc.hi, tc.rest)
			}
			for _, id := range tc.skip {
				if (id < lo || id > hi) && !slices.Contains(rest, id) {
					t.Fatalf("id %d is neither in the range nor in rest", id)
				}
			}
			for id := lo; id <= hi; id++ {
				if !slices.Contains(tc.skip, id) {
					t.Fatalf("the range [%d, %d] covers id %d, which is not skipped", lo, hi, id)
				}
			}
		})
	}
}
