// Package redact removes credentials from text bound for logs and error messages.
//
// It works on the text, never on a parse of the connection string, because the strings that
// matter most are the malformed ones: a password with an unescaped '@' makes a driver read part
// of it as the host and print it in "no such host". Two layers:
//
//   - Text removes what looks like a credential wherever it is: everything between "://" and the
//     last '@' after it on the line, and the value of every "password=" (sslpassword= too),
//     quoted or not, an unterminated quote running to the end of the line.
//   - A Redactor also knows the configured connection strings and secrets, and removes them, the
//     credential parts found in them by the same two rules, and the pieces of those a parser
//     could have split off (at '@', ':', '/', spaces, quotes and the like), so a fragment a
//     driver echoes ("lookup Tail99@db") goes too.
//
// Literal secrets and fragments shorter than MinLen are not removed where they appear: replacing
// every "p" of a message hides nothing and garbles the rest. They are still removed by their
// position, by Text.
package redact

import (
	"net/url"
	"slices"
	"strings"
	"sync"
)

// Mask replaces every credential removed.
const Mask = "xxxxx"

// MinLen is the length, in bytes, of the shortest literal secret or fragment of one that is
// removed wherever it appears.
const MinLen = 3

// Text removes the credentials recognisable by their shape in s: the user:password part of URLs
// (between "://" and the last '@' on the line) and password= values.
func Text(s string) string {
	if strings.Contains(s, "://") {
		s = urlCredentials(s)
	}
	if strings.Contains(strings.ToLower(s), "password") {
		s = kvPasswords(s)
	}
	return s
}

// urlCredentials masks, for each "://", the text up to the last '@' before the end of its line.
func urlCredentials(s string) string {
	var b strings.Builder
	for {
		i := strings.Index(s, "://")
		if i < 0 {
			b.WriteString(s)
			return b.String()
		}
		start := i + len("://")
		end := len(s)
		if nl := strings.IndexByte(s[start:], '\n'); nl >= 0 {
			end = start + nl
		}
		b.WriteString(s[:start])
		if at := strings.LastIndexByte(s[start:end], '@'); at >= 0 {
			b.WriteString(Mask)
			s = s[start+at:]
		} else {
			s = s[start:]
		}
	}
}

// kvPasswords masks the value of every password= (any case, spaces around '=' allowed).
func kvPasswords(s string) string {
	var b strings.Builder
	for {
		i, vstart := passwordKey(s)
		if i < 0 {
			b.WriteString(s)
			return b.String()
		}
		b.WriteString(s[:vstart])
		vend := valueEnd(s, vstart)
		if vend > vstart {
			b.WriteString(Mask)
		}
		s = s[vend:]
	}
}

// passwordKey finds the next "password" followed by optional spaces and '=', returning its index
// and where its value starts (after the '=' and any spaces), or -1.
func passwordKey(s string) (int, int) {
	lower := strings.ToLower(s)
	from := 0
	for {
		i := strings.Index(lower[from:], "password")
		if i < 0 {
			return -1, -1
		}
		i += from
		j := i + len("password")
		for j < len(s) && (s[j] == ' ' || s[j] == '\t') {
			j++
		}
		if j < len(s) && s[j] == '=' {
			j++
			for j < len(s) && (s[j] == ' ' || s[j] == '\t') {
				j++
			}
			return i, j
		}
		from = i + len("password")
	}
}

// valueEnd returns where the value starting at i ends: after its closing quote if quoted (the end
// of the line if the quote is not closed), else at the next space.
func valueEnd(s string, i int) int {
	if i < len(s) && s[i] == '\'' {
		for j := i + 1; j < len(s); j++ {
			switch s[j] {
			case '\\':
				j++
			case '\'':
				return j + 1
			case '\n':
				return j
			}
		}
		return len(s)
	}
	j := i
	for j < len(s) && !isSpace(s[j]) {
		j++
	}
	return j
}

func isSpace(c byte) bool {
	return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'
}

// Redactor removes known secrets and credential-shaped text. The zero value is ready to use;
// a nil *Redactor applies Text only. It is safe for concurrent use.
type Redactor struct {
	mu       sync.RWMutex
	secrets  map[string]bool
	replacer *strings.Replacer // the secrets, longest first; nil when there are none
}

// New returns a Redactor knowing the bare secrets given (passwords, not connection strings).
func New(secrets ...string) *Redactor {
	r := &Redactor{}
	r.Add(secrets...)
	return r
}

// Add records bare secrets: each one, and its URL-escaped forms, is removed wherever it appears.
func (r *Redactor) Add(secrets ...string) {
	var lits []string
	for _, s := range secrets {
		lits = append(lits, s, url.QueryEscape(s), url.PathEscape(s))
	}
	r.add(lits)
}

// AddConnString records connection strings, in URL (scheme://user:password@host/...) or
// key=value (password=...) form, well formed or not: the string itself and the credentials in
// it, by the rules of Text, with their pieces.
func (r *Redactor) AddConnString(conns ...string) {
	var lits []string
	for _, c := range conns {
		c = strings.TrimSpace(c)
		creds := ConnSecrets(c)
		if len(creds) > 0 {
			lits = append(lits, c)
		}
		lits = append(lits, creds...)
	}
	r.add(lits)
}

func (r *Redactor) add(lits []string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	changed := false
	for _, l := range lits {
		if len(l) >= MinLen && !r.secrets[l] {
			if r.secrets == nil {
				r.secrets = map[string]bool{}
			}
			r.secrets[l] = true
			changed = true
		}
	}
	if !changed {
		return
	}
	all := make([]string, 0, len(r.secrets))
	for s := range r.secrets {
		all = append(all, s)
	}
	// Longest first: the replacer tries its patterns in argument order at each position.
	slices.SortFunc(all, func(a, b string) int {
		if len(a) != len(b) {
			return len(b) - len(a)
		}
		return strings.Compare(a, b)
	})
	pairs := make([]string, 0, 2*len(all))
	for _, s := range all {
		pairs = append(pairs, s, Mask)
	}
	r.replacer = strings.NewReplacer(pairs...)
}

// String returns s without the known secrets and without credential-shaped text.
func (r *Redactor) String(s string) string {
	if r != nil {
		r.mu.RLock()
		rep := r.replacer
		r.mu.RUnlock()
		if rep != nil {
			s = rep.Replace(s)
		}
	}
	return Text(s)
}

// ConnSecrets returns the parts of the connection string conn that are, or may be, part of a
// credential, found without parsing it: in a URL the text between "://" and the last '@' and
// the password after its first ':'; every password= value, with the words after an unquoted
// one up to the next key=value (a password with an unquoted space), or everything after an
// unterminated quote; their percent-decoded forms; and the pieces of all these split at the
// characters parsers split at. Pieces shorter than MinLen are left out.
func ConnSecrets(conn string) []string {
	var out []string
	addPieces := func(v string) {
		if v == "" {
			return
		}
		out = append(out, v)
		if dec := percentDecode(v); dec != v {
			out = append(out, dec)
		}
		for _, p := range strings.FieldsFunc(v, isSeparator) {
			out = append(out, p)
			if dec := percentDecode(p); dec != p {
				out = append(out, dec)
			}
		}
	}
	if i := strings.Index(conn, "://"); i >= 0 {
		rest := conn[i+len("://"):]
		if at := strings.LastIndexByte(rest, '@'); at >= 0 {
			cred := rest[:at]
			if _, pass, ok := strings.Cut(cred, ":"); ok {
				out = append(out, cred)
				addPieces(pass)
			} else if strings.ContainsAny(cred, "@/") {
				addPieces(cred) // no ':': a password may still be in there
			} // else a user name alone: not a secret, and it helps to read "role relay does not exist"
			// A parser ending the credentials at an earlier '@' or '/' takes what follows as
			// the host: "lookup ss@db" for "user:p@ss@db". Its view of both sides goes too.
			for k := 0; k < len(cred); k++ {
				if cred[k] == '@' || cred[k] == '/' {
					out = append(out, cred[:k], cred[k+1:]+"@")
				}
			}
		}
	}
	s := conn
	for {
		i, vstart := passwordKey(s)
		if i < 0 {
			break
		}
		vend := valueEnd(s, vstart)
		v := s[vstart:vend]
		if strings.HasPrefix(v, "'") {
			inner := strings.TrimSuffix(strings.TrimPrefix(v, "'"), "'")
			addPieces(inner)
			addPieces(strings.NewReplacer(`\'`, `'`, `\\`, `\`).Replace(inner))
		} else {
			addPieces(v)
			// Words after an unquoted value, up to the next key=value, are probably more of it.
			for _, w := range strings.Fields(s[vend:]) {
				if strings.Contains(w, "=") {
					break
				}
				addPieces(w)
			}
		}
		s = s[vend:]
	}
	kept := out[:0]
	for _, p := range out {
		if len(p) >= MinLen {
			kept = append(kept, p)
		}
	}
	slices.Sort(kept)
	return slices.Compact(kept)
}

// isSeparator reports the characters a connection-string parser may split a value at.
func isSeparator(r rune) bool {
	return strings.ContainsRune("@:/?#&=%'\"\\`,;[]()<>", r) || r <= ' ' || r == 0x7f
}

// percentDecode decodes the valid %XX escapes of s and leaves the rest as is.
func percentDecode(s string) string {
	if !strings.Contains(s, "%") {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '%' && i+2 < len(s) && isHex(s[i+1]) && isHex(s[i+2]) {
			b.WriteByte(unhex(s[i+1])<<4 | unhex(s[i+2]))
			i += 2
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

func unhex(c byte) byte {
	switch {
	case '0' <= c && c <= '9':
		return c - '0'
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10
	}
	return c - 'A' + 10
}
