# syntax=docker/dockerfile:1
# A wasmrpc node: `docker build -t wasmrpc .`, then
# `docker run -e AMQP_URL=amqp://user:pass@rabbit:5672/%2f wasmrpc`.
# Mount your own modules over /modules to serve them instead of the bundled
# ones; the node follows changes to that directory while it runs.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The registry and target caches survive between builds (BuildKit), so a code
# change rebuilds only wasmrpc itself.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin wasmrpc \
    && strip target/release/wasmrpc \
    && cp target/release/wasmrpc /usr/local/bin/wasmrpc

# glibc, CA certificates (for amqps://) and a non-root user; no shell.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/wasmrpc /usr/local/bin/wasmrpc
COPY modules /modules
# Compiled modules are cached in ~/.cache/wasmrpc, inside the container; set
# WASMRPC_CACHE_DIR to a volume the nonroot user (uid 65532) can write to keep
# them across containers.
# The node waits for its broker and reconnects by itself: it needs no
# start order. AMQP_URL may list the nodes of a cluster, comma-separated.
# /metrics, /healthz and /readyz on port 9090; `wasmrpc health` asks /readyz
# (the image has no shell or curl to do it with).
ENV WASMRPC_MODULES=/modules \
    AMQP_URL=amqp://guest:guest@rabbitmq:5672/%2f \
    WASMRPC_HTTP=0.0.0.0:9090
EXPOSE 9090
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/wasmrpc", "health"]
USER nonroot
ENTRYPOINT ["/usr/local/bin/wasmrpc"]
CMD ["serve"]
