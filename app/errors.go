package app

import "errors"

// ErrConflict is returned by repositories when a unique fact (such as an email) already exists.
var ErrConflict = errors.New("conflict")
