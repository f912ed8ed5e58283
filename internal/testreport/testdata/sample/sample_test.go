// Package sample is a test run for testreport's test: one test passes, one skips, one fails
// when SAMPLE_FAIL is set, with a subtest.
package sample

import (
	"os"
	"testing"
)

func TestPasses(t *testing.T) { t.Log("noise a passing test prints") }

func TestSkips(t *testing.T) { t.Skip("frobnicator is not installed (Debian package frobnicator)") }

func TestFails(t *testing.T) {
	t.Run("sub", func(t *testing.T) {
		if os.Getenv("SAMPLE_FAIL") != "" {
			t.Error("the sub-assertion that broke")
		}
	})
}
