package main

import (
	"bytes"
	"os"
	"strconv"
	"strings"
	"testing"
)

// TestParseSmaps reads the mappings and their anonymous pages; a mapping whose Anonymous line
// is missing counts as holding pages of its own.
func TestParseSmaps(t *testing.T) {
	smaps := `00400000-012ab000 r-xp 00000000 fd:01 123456                             /usr/local/bin/outbox-relay
Size:              14948 kB
Rss:               11304 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me sd
012ab000-02367000 r--p 00eab000 fd:01 123456                             /usr/local/bin/outbox-relay (deleted)
Anonymous:             8 kB
02367000-02418000 rw-p 01f67000 fd:01 123456                             /usr/local/bin/outbox-relay
Size:                708 kB
c000000000-c004000000 rw-p 00000000 00:00 0 
Anonymous:         12288 kB
`
	got := parseSmaps([]byte(smaps))
	want := []mapping{
		{start: 0x400000, end: 0x12ab000, perms: "r-xp", inode: 123456, anonymous: 0},
		{start: 0x12ab000, end: 0x2367000, perms: "r--p", inode: 123456, anonymous: 8},
		{start: 0x2367000, end: 0x2418000, perms: "rw-p", inode: 123456, anonymous: -1},
		{start: 0xc000000000, end: 0xc004000000, perms: "rw-p", inode: 0, anonymous: 12288},
	}
	if len(got) != len(want) {
		t.Fatalf("%d mappings, want %d: %+v", len(got), len(want), got)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("mapping %d: %+v, want %+v", i, got[i], want[i])
		}
	}
}

// TestReleaseStartupPages: the executable's read-only pages leave the resident set (RssFile
// falls), and the process runs on, mapping back what it touches.
func TestReleaseStartupPages(t *testing.T) {
	before := rssFileKB(t)
	released, err := releaseStartupPages()
	if err != nil {
		t.Fatal(err)
	}
	after := rssFileKB(t)
	if released <= 0 || after >= before {
		t.Errorf("released %d bytes of address space; RssFile %d kB before, %d kB after, want it lower", released, before, after)
	}
	// Code and data from the released pages still work: they are mapped back from the file.
	if got := strings.Repeat("ab", 3); got != "ababab" {
		t.Errorf("after the release: %q", got)
	}
}

// rssFileKB returns the process's RssFile from /proc/self/status, in kB.
func rssFileKB(t *testing.T) int64 {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for line := range bytes.Lines(b) {
		if v, ok := bytes.CutPrefix(line, []byte("RssFile:")); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(string(v)), " kB"), 10, 64)
			if err != nil {
				t.Fatalf("RssFile %q: %v", v, err)
			}
			return kb
		}
	}
	t.Fatal("no RssFile in /proc/self/status")
	return 0
}
