# The gateway image. Build from the repository root:
#   docker build -f deploy/docker/gateway.Dockerfile -t chat-gateway:0.1.0 .
# Stage 1 builds the workspace's dependencies against stub sources, so that layer is reused
# until Cargo.toml or Cargo.lock change; stage 2 builds the real code; the runtime stage holds
# only the binary, runs as a numeric non-root user and needs no shell tools but bash.

FROM rust:1.95.0-slim-bookworm AS deps
# jemalloc (the gateway's allocator, tikv-jemallocator) builds its C sources with make, which the
# slim image lacks.
RUN apt-get update && apt-get install -y --no-install-recommends make \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY chat-protocol/Cargo.toml chat-protocol/
COPY chat-core/Cargo.toml chat-core/
COPY gateway/Cargo.toml gateway/
COPY persistence-worker/Cargo.toml persistence-worker/
COPY loadtest/harness/Cargo.toml loadtest/harness/
# Stub crate roots: every member must have its targets for the workspace to load.
RUN for d in chat-protocol chat-core gateway persistence-worker; do mkdir -p "$d/src" && touch "$d/src/lib.rs"; done \
 && for d in gateway persistence-worker loadtest/harness; do mkdir -p "$d/src" && echo 'fn main() {}' > "$d/src/main.rs"; done \
 && cargo build --release --locked -p gateway --bin gateway

FROM deps AS build
COPY chat-protocol chat-protocol
COPY chat-core chat-core
COPY gateway gateway
COPY persistence-worker persistence-worker
COPY loadtest/harness loadtest/harness
# The web client is compiled into the gateway binary (gateway/src/web_client.rs).
COPY web web
# COPY keeps the files' own mtimes, which may be older than the stub build: touch the crate
# roots so Cargo rebuilds the workspace crates instead of reusing the stubs.
RUN touch chat-protocol/src/lib.rs chat-core/src/lib.rs gateway/src/lib.rs gateway/src/main.rs \
 && cargo build --release --locked -p gateway --bin gateway \
 && install -m 0755 target/release/gateway /usr/local/bin/gateway

FROM debian:12.11-slim AS runtime
COPY --from=build /usr/local/bin/gateway /usr/local/bin/gateway
COPY deploy/docker/healthcheck.sh /usr/local/bin/chat-healthcheck
# Any uid works; 10001 matches runAsUser in the Helm chart and k8s/ manifests.
USER 10001:10001
# Public: /ws and /api/v1 (gateway_listen). Internal: /healthz, /readyz, /metrics
# (gateway_internal_listen); keep it off the public network.
EXPOSE 8080 9090
ENV CHAT_LOG_FORMAT=json
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["/usr/local/bin/chat-healthcheck", "gateway"]
# SIGTERM starts the drain; give `docker stop` more than gateway_shutdown_grace_secs + 2 s
# (compose sets stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/gateway"]
