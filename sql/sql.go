// Package sql embeds the outbox-relay migrations and the example service's schema.
//
// The files are templates: identifiers are written as {{.Outbox}}, {{.Parked}} and so on, and are
// replaced with quoted names for the configured schema and table before they run.
package sql

import "embed"

// Migrations holds the numbered outbox migrations, applied in file-name order.
//
//go:embed migrations/*.sql
var Migrations embed.FS

// Example holds the schema of the example service (the users table of the CreateUser use case).
//
//go:embed example/*.sql
var Example embed.FS

// Roles holds SQL that creates the least-privilege role the relay runs under.
//
//go:embed roles/*.sql
var Roles embed.FS
