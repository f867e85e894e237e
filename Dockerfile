# syntax=docker/dockerfile:1
# One recipe for the three services; docker compose passes SERVICE (gateway, checkout or stock).

# Build: the whole workspace is the context; protos compile with protox, SQLite is bundled, so
# the Rust image alone (it ships gcc) is enough. Cache mounts keep rebuilds incremental.
FROM rust:1.95-slim-bookworm AS build
ARG SERVICE
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    test -n "${SERVICE}" \
    && cargo build --release --locked -p "${SERVICE}" \
    && install -D "target/release/${SERVICE}" /out/service

# Run: a slim Debian with the binary and a non-root user; no shell tools are needed because
# `service healthcheck` probes the service itself.
FROM debian:bookworm-slim
ARG SERVICE
RUN useradd --system --uid 10001 --user-group --home-dir /data --create-home tracehop
COPY --from=build /out/service /usr/local/bin/service
LABEL org.opencontainers.image.title="tracehop-${SERVICE}" \
      org.opencontainers.image.description="tracehop ${SERVICE}: distributed tracing across HTTP, gRPC and RabbitMQ"
USER tracehop
WORKDIR /data
ENTRYPOINT ["/usr/local/bin/service"]
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=6 CMD ["/usr/local/bin/service", "healthcheck"]
