# syntax=docker/dockerfile:1
# outbox-relay: a static binary on a distroless base, running as a non-root user.
#   docker build -t outbox-relay --build-arg VERSION=$(git describe --tags --always) \
#     --build-arg REVISION=$(git rev-parse --short HEAD) .

FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod go mod download
COPY . .
ARG VERSION=dev
ARG REVISION=unknown
# CGO_ENABLED=0: a static binary that needs no libc in the runtime image.
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=0 GOOS=linux go build -trimpath \
      -ldflags "-s -w -X main.version=${VERSION} -X main.revision=${REVISION}" \
      -o /out/outbox-relay ./cmd/outbox-relay

# distroless/static: CA certificates and tzdata, no shell, no package manager; the nonroot
# variant runs as uid/gid 65532.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/outbox-relay /usr/local/bin/outbox-relay
USER 65532:65532
# /metrics, /healthz and /readyz (http.addr).
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/outbox-relay"]
CMD ["run"]
