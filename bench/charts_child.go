//go:build benchchild

package main

import "errors"

// charts: the measured children's build (-tags benchchild) carries no chart library.
func (b *bench) charts() error { return errors.New("charts are not in the child build: use bin/bench") }
