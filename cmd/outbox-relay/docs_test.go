package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"unicode"
)

// repoRoot is the repository's root, seen from this package's directory.
const repoRoot = "../.."

// docFiles are the Markdown files whose links must all resolve inside the repository.
var docFiles = []string{"README.md", "BENCHMARKS.md", "docs/DESIGN.md", "docs/ENGINE-LOG.md", "app/relay/DESIGN.md"}

var (
	// inlineLinkRE matches [text](target) and ![alt](target), with an optional "title".
	inlineLinkRE = regexp.MustCompile(`!?\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+"[^"]*")?\s*\)`)
	// refLinkRE matches a reference definition: [label]: target
	refLinkRE = regexp.MustCompile(`(?m)^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)`)
	// codeSpanRE matches inline code, whose brackets are not links.
	codeSpanRE = regexp.MustCompile("`[^`\n]*`")
	// parentPathRE matches a path that climbs out of the file's directory, linked or not.
	parentPathRE = regexp.MustCompile(`(?:\.\./)+[A-Za-z0-9._/-]+`)
	// schemeRE matches a link with a scheme (https:, mailto:...), which is not a file.
	schemeRE = regexp.MustCompile(`^[a-zA-Z][a-zA-Z0-9+.-]*:`)
)

// TestDocLinksResolveInRepository checks that every relative link of docFiles names a file or directory the repository tracks (a user's clone has it),
// that every #anchor names a heading of its target, and that no path, linked or quoted, leads
// out of the repository.
func TestDocLinksResolveInRepository(t *testing.T) {
	t.Parallel()
	root, err := filepath.Abs(repoRoot)
	if err != nil {
		t.Fatal(err)
	}
	tracked := trackedFiles(t, root)
	checked := 0
	defer func() {
		if checked < 20 {
			t.Errorf("found %d links in %v; is the pattern broken?", checked, docFiles)
		}
	}()
	for _, doc := range docFiles {
		b, err := os.ReadFile(filepath.Join(root, doc))
		if err != nil {
			t.Fatal(err)
		}
		text := stripFencedCode(string(b))
		for _, m := range parentPathRE.FindAllString(string(b), -1) {
			if p := filepath.Join(root, filepath.Dir(doc), m); !inside(root, p) {
				t.Errorf("%s mentions %s, outside the repository: a clone does not have it", doc, m)
			}
		}
		var targets []string
		for _, m := range inlineLinkRE.FindAllStringSubmatch(codeSpanRE.ReplaceAllString(text, ""), -1) {
			targets = append(targets, m[1])
		}
		for _, m := range refLinkRE.FindAllStringSubmatch(text, -1) {
			targets = append(targets, m[1])
		}
		checked += len(targets)
		for _, target := range targets {
			if target == "" || schemeRE.MatchString(target) {
				continue
			}
			path, anchor, _ := strings.Cut(target, "#")
			file := doc
			if path != "" {
				abs := filepath.Join(root, filepath.Dir(doc), filepath.FromSlash(path))
				if !inside(root, abs) {
					t.Errorf("%s links %s, outside the repository", doc, target)
					continue
				}
				rel, _ := filepath.Rel(root, abs)
				file = filepath.ToSlash(rel)
				if !tracked(file) {
					t.Errorf("%s links %s: %s is not a file of the repository", doc, target, file)
					continue
				}
			}
			if anchor != "" && strings.HasSuffix(file, ".md") {
				if !hasAnchor(t, filepath.Join(root, file), anchor) {
					t.Errorf("%s links %s: %s has no heading with anchor #%s", doc, target, file, anchor)
				}
			}
		}
	}
}

// trackedFiles returns whether a path (slash-separated, relative to root) is a file git tracks
// or a directory holding one. Without git (an exported tree) it falls back to the file system.
func trackedFiles(t *testing.T, root string) func(string) bool {
	t.Helper()
	out, err := exec.Command("git", "-C", root, "ls-files", "-z").Output()
	if err != nil {
		t.Logf("git ls-files: %v; checking links against the file system instead", err)
		return func(p string) bool {
			_, err := os.Stat(filepath.Join(root, p))
			return err == nil
		}
	}
	files := map[string]bool{}
	for _, f := range strings.Split(string(out), "\x00") {
		for f != "" && f != "." {
			files[f] = true
			f = filepath.ToSlash(filepath.Dir(f))
		}
	}
	return func(p string) bool { return files[strings.TrimSuffix(p, "/")] }
}

func inside(root, p string) bool {
	rel, err := filepath.Rel(root, p)
	return err == nil && rel != ".." && !strings.HasPrefix(rel, "../")
}

// stripFencedCode blanks the lines inside ``` fences, whose brackets are code, not links.
func stripFencedCode(s string) string {
	lines := strings.Split(s, "\n")
	in := false
	for i, l := range lines {
		if strings.HasPrefix(strings.TrimSpace(l), "```") {
			in = !in
			lines[i] = ""
			continue
		}
		if in {
			lines[i] = ""
		}
	}
	return strings.Join(lines, "\n")
}

// hasAnchor reports whether the Markdown file has a heading whose GitHub anchor is anchor.
func hasAnchor(t *testing.T, file, anchor string) bool {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]int{}
	for _, l := range strings.Split(stripFencedCode(string(b)), "\n") {
		if !strings.HasPrefix(l, "#") {
			continue
		}
		title := strings.TrimSpace(strings.TrimLeft(l, "#"))
		slug := headingAnchor(title)
		if n := seen[slug]; n > 0 {
			seen[slug]++
			slug += "-" + strconv.Itoa(n)
		} else {
			seen[slug] = 1
		}
		if slug == anchor {
			return true
		}
	}
	return false
}

// headingAnchor is GitHub's anchor for a heading: lower case, spaces to hyphens, punctuation
// other than hyphens and underscores dropped.
func headingAnchor(title string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(title) {
		switch {
		case unicode.IsLetter(r) || unicode.IsDigit(r) || r == '-' || r == '_':
			b.WriteRune(r)
		case r == ' ':
			b.WriteByte('-')
		}
	}
	return b.String()
}
