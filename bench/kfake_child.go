//go:build benchchild

package main

import "errors"

// runKfake: the measured children's build (-tags benchchild) carries no broker; the parent starts
// the broker from its own binary.
func runKfake(childConfig) error {
	return errors.New("the broker role is not in the child build: start it from bin/bench")
}
