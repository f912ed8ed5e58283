# outbox-relay — run `make` for the list of targets.
SHELL := /bin/bash
GO    ?= go
BIN   := bin/outbox-relay
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
REVISION ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
LDFLAGS  := -s -w -X main.version=$(VERSION) -X main.revision=$(REVISION)
# The test timeout is a safety net against hangs, not a performance assertion.
TEST_FLAGS ?= -race -count=1 -timeout 40m

.DEFAULT_GOAL := help

.PHONY: help
help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

.PHONY: build
build: ## build bin/outbox-relay
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN) ./cmd/outbox-relay

# The binary, not go run (which exits 1 when its child was interrupted). The demo takes the
# terminal's foreground, so a Ctrl-C reaches it alone and make exits 0 after its summary.
.PHONY: demo
demo: build ## run the demo: local Postgres (or OUTBOX_DATABASE_URL), embedded broker, writers, relay, consumer
	@exec $(BIN) demo $(DEMO_ARGS)

# go test -json through testreport: the usual output, then every skipped test and its reason.
# OUTBOX_REQUIRE_TOOLS=1 (set by .ci/run) fails a test whose tool is missing instead of skipping it.
.PHONY: test
test: build ## run every test, list the skipped ones (needs PostgreSQL on 127.0.0.1:5432 or OUTBOX_TEST_DATABASE_URL)
	$(GO) vet ./...
	$(GO) vet -tags benchchild ./bench
	@$(GO) build -o bin/testreport ./internal/testreport
	set -o pipefail; OUTBOX_RELAY_BIN=$(CURDIR)/$(BIN) $(GO) test -json $(TEST_FLAGS) ./... | bin/testreport

# staticcheck and golangci-lint are pinned: a new release's new checks must not fail CI by
# themselves. golangci-lint v2.15.0 builds with Go 1.26 from the module proxy (about 3 minutes
# the first time, cached after); .golangci.yml lists its linters and why each.
STATICCHECK ?= honnef.co/go/tools/cmd/staticcheck@v0.8.2
GOLANGCI_LINT ?= github.com/golangci/golangci-lint/v2/cmd/golangci-lint@v2.15.0

.PHONY: lint
lint: ## go vet, gofmt, staticcheck and golangci-lint
	$(GO) vet ./...
	@test -z "$$(gofmt -l .)" || (gofmt -l . && exit 1)
	$(GO) run $(STATICCHECK) ./...
	$(GO) run $(GOLANGCI_LINT) run ./...

.PHONY: bench
bench: build ## run the benchmark suite and write BENCHMARKS.md figures (minutes)
	@if [ -x bench/run.sh ]; then bench/run.sh; else echo "bench/run.sh missing"; exit 1; fi

.PHONY: clean
clean: ## remove build output
	rm -rf bin
