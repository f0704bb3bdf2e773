# pgstore as a container: one stripped binary (rustls, no OpenSSL) on Debian slim.
#   docker build -t pgstore .
#   docker run -p 50051:50051 -e PGSTORE_DATABASE_URL=postgres://app@db:5432/events pgstore
# The image listens on 0.0.0.0: before the port leaves the host, set tokens
# (PGSTORE_AUTH__TOKENS) and TLS (PGSTORE_TLS__CERT_FILE, PGSTORE_TLS__KEY_FILE); see
# docs/operations.md.
FROM rust:1-bookworm AS build
WORKDIR /src

# Dependencies first, in their own layer: it is rebuilt only when a manifest, the lock file, the
# build script or the API changes, not on every source edit.
COPY Cargo.toml Cargo.lock build.rs ./
COPY bench/Cargo.toml bench/Cargo.toml
COPY proto proto
RUN mkdir -p src bench/src \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && echo 'fn main() {}' > bench/src/main.rs \
 && cargo build --profile dist --locked --bin pgstore \
 && rm -rf src bench/src

COPY src src
COPY migrations migrations
COPY bench/src bench/src
# The placeholder crate's artefacts are older than the sources just copied; make sure cargo
# rebuilds pgstore itself.
RUN touch src/main.rs src/lib.rs \
 && cargo build --profile dist --locked --bin pgstore \
 && cp target/dist/pgstore /usr/local/bin/pgstore

FROM debian:bookworm-slim
# CA certificates: TLS to PostgreSQL (sslmode=verify-full) and `pgstore health` over https.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home pgstore
COPY --from=build /usr/local/bin/pgstore /usr/local/bin/pgstore
USER 10001
ENV PGSTORE_LISTEN=0.0.0.0:50051 \
    PGSTORE_METRICS_LISTEN=0.0.0.0:9090 \
    PGSTORE_LOG__FORMAT=json
EXPOSE 50051 9090
# `pgstore health` dials the port of PGSTORE_LISTEN on the loopback interface.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["pgstore", "health", "--timeout", "3s"]
ENTRYPOINT ["pgstore"]
CMD ["serve"]
