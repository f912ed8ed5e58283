package main

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
)

// releaseStartupPages unmaps the pages of the executable's read-only mappings (its code and
// read-only data) from the process, and returns how many bytes of address space it released;
// `run` calls it once the relay has started. The kernel maps a file in blocks of 16 pages
// around each page touched, and start-up touches code and tables of nearly every linked
// package (their init functions, the configuration, the connections): about 23 MiB of the
// 33 MB binary were resident in an idle relay, of which the relay's work needs 10–15. The
// pages stay in the page cache, clean: what the relay touches again is mapped back from there
// by a minor fault, and the rest is left for the kernel to reclaim instead of being counted in
// the process's resident memory.
//
// Only private mappings of the executable that are not writable and hold no page of their
// own (no copy-on-write page, Anonymous: 0 kB in /proc/self/smaps) are released: their
// contents are the file's, so MADV_DONTNEED loses nothing. A binary linked dynamically has
// relocated read-only data (RELRO, a copy-on-write page) and is left alone there.
func releaseStartupPages() (int64, error) {
	var exe syscall.Stat_t
	if err := syscall.Stat("/proc/self/exe", &exe); err != nil {
		return 0, fmt.Errorf("stat /proc/self/exe: %w", err)
	}
	smaps, err := os.ReadFile("/proc/self/smaps")
	if err != nil {
		return 0, fmt.Errorf("read /proc/self/smaps: %w", err)
	}
	var released int64
	for _, m := range parseSmaps(smaps) {
		if m.inode != exe.Ino || m.perms[1] == 'w' || m.perms[3] != 'p' || m.anonymous != 0 {
			continue
		}
		if _, _, e := syscall.Syscall(syscall.SYS_MADVISE, uintptr(m.start), uintptr(m.end-m.start), syscall.MADV_DONTNEED); e != 0 {
			return released, fmt.Errorf("madvise %x-%x: %w", m.start, m.end, e)
		}
		released += int64(m.end - m.start)
	}
	return released, nil
}

// mapping is one mapping of /proc/self/smaps: what releaseStartupPages needs of it.
type mapping struct {
	start, end uint64
	perms      string // rwxp: read, write, execute, p(rivate) or s(hared)
	inode      uint64
	anonymous  int64 // kB of anonymous pages
}

// parseSmaps reads the mappings of a /proc/<pid>/smaps file. A header line starts a mapping
// ("start-end perms offset dev inode [path]"); the lines after it are its fields ("Name: value
// kB"), of which it keeps Anonymous.
func parseSmaps(b []byte) []mapping {
	var ms []mapping
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 0, 4096), 1<<20) // a path may be long
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 0 {
			continue
		}
		if strings.HasSuffix(f[0], ":") {
			if f[0] == "Anonymous:" && len(ms) > 0 && len(f) > 1 {
				if kb, err := strconv.ParseInt(f[1], 10, 64); err == nil {
					ms[len(ms)-1].anonymous = kb
				}
			}
			continue
		}
		lo, hi, ok := strings.Cut(f[0], "-")
		if !ok || len(f) < 5 || len(f[1]) != 4 {
			continue
		}
		start, err1 := strconv.ParseUint(lo, 16, 64)
		end, err2 := strconv.ParseUint(hi, 16, 64)
		inode, err3 := strconv.ParseUint(f[4], 10, 64)
		if err1 != nil || err2 != nil || err3 != nil {
			continue
		}
		// Until its Anonymous line is read, a mapping counts as holding pages of its own.
		ms = append(ms, mapping{start: start, end: end, perms: f[1], inode: inode, anonymous: -1})
	}
	return ms
}
