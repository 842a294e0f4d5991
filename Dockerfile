# syntax=docker/dockerfile:1
# A wasmrpc node: `docker build -t wasmrpc .`, then
# `docker run -e AMQP_URL=amqp://user:pass@rabbit:5672/%2f wasmrpc`.
# Mount your own modules over /modules to serve them instead of the bundled ones.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so that editing the code does not refetch them.
COPY Cargo.toml Cargo.lock ./
COPY host/Cargo.toml host/Cargo.toml
RUN mkdir -p host/src host/benches tests/integration \
    && echo 'fn main() {}' > host/src/main.rs \
    && touch host/src/lib.rs host/benches/sandbox.rs tests/integration/main.rs \
    && cargo fetch --locked
COPY wit wit
COPY host host
COPY tests tests
RUN cargo build --release --locked --bin wasmrpc \
    && strip target/release/wasmrpc

# glibc, CA certificates (for amqps://) and a non-root user; no shell.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/wasmrpc /usr/local/bin/wasmrpc
COPY modules /modules
ENV WASMRPC_MODULES=/modules \
    AMQP_URL=amqp://guest:guest@rabbitmq:5672/%2f \
    RUST_LOG=info
USER nonroot
ENTRYPOINT ["/usr/local/bin/wasmrpc"]
CMD ["serve"]
