# syntax=docker/dockerfile:1
#
# dmpay server image.
#
#   docker build -t dmpay .      # BuildKit (Docker's default builder) for the cache mounts
#   docker run --rm -p 127.0.0.1:50051:50051 -p 127.0.0.1:9464:9464 -e DMPAY_ENV=development dmpay
#
# The image runs `dmpay serve` (migrate, then serve gRPC until SIGTERM). It is in
# production mode unless DMPAY_ENV=development is set, and production refuses to start
# without real secrets and a named processor (docs/configuration.md, SECURITY.md).
# Without DMPAY_DATABASE_URL it uses SQLite under /var/lib/dmpay/var/ (lost with the
# container unless a volume is mounted there); docker-compose.yml runs it on PostgreSQL.
#
# There is no HEALTHCHECK: the image holds no gRPC client. Orchestrators should probe
# the gRPC health service themselves (Kubernetes has native gRPC probes); see
# docs/operations.md, "Containers and Kubernetes".

# ---- build ---------------------------------------------------------------------------
FROM rust:1-bookworm AS build
WORKDIR /src

# Only what `cargo build --bin dmpay` reads: the manifest and lock file, the build script
# and the protos it compiles (protoc is vendored), the migrations that `sqlx::migrate!`
# embeds at compile time, and the sources. tests/, examples/ and fuzz/ are not needed.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY migrations ./migrations
COPY src ./src

# The registry and target directories are BuildKit cache mounts: a source change
# rebuilds only dmpay, not its dependencies. Cargo decides freshness by mtime, which a
# build context does not guarantee to move forward, so dmpay's own crate and build
# script are always rebuilt here (this step runs only when an input above changed). The
# binary is copied out of the cached target directory in the same step, since the cache
# is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    touch build.rs src/lib.rs src/main.rs \
    && cargo build --release --locked --bin dmpay \
    && cp target/release/dmpay /usr/local/bin/dmpay

# ---- runtime -------------------------------------------------------------------------
FROM debian:bookworm-slim AS runtime

RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 dmpay \
    && useradd --system --uid 10001 --gid dmpay --home-dir /var/lib/dmpay --no-create-home \
       --shell /usr/sbin/nologin dmpay \
    && mkdir -p /var/lib/dmpay \
    && chown dmpay:dmpay /var/lib/dmpay \
    && chmod 0700 /var/lib/dmpay

COPY --from=build /usr/local/bin/dmpay /usr/local/bin/dmpay

# The defaults bind 127.0.0.1, which is unreachable from outside a container.
ENV DMPAY_GRPC_ADDR=0.0.0.0:50051 \
    DMPAY_METRICS_ADDR=0.0.0.0:9464

WORKDIR /var/lib/dmpay
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001

# gRPC (and grpc.health.v1.Health), and Prometheus /metrics over HTTP.
EXPOSE 50051 9464

# dmpay handles SIGTERM itself (NOT_SERVING, then drains in-flight calls for up to 10 s);
# give `docker stop` / Kubernetes more than that before SIGKILL.
STOPSIGNAL SIGTERM
ENTRYPOINT ["dmpay"]
CMD ["serve"]
