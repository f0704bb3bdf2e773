# pgstore as a container: a static-enough binary (rustls, no OpenSSL) on a slim Debian.
#   docker build -t pgstore .
#   docker run -p 50051:50051 -e PGSTORE_DATABASE_URL=postgres://app:secret@db:5432/events pgstore
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin pgstore

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home pgstore
COPY --from=build /src/target/release/pgstore /usr/local/bin/pgstore
USER pgstore
ENV PGSTORE_LISTEN=0.0.0.0:50051 \
    PGSTORE_METRICS_LISTEN=0.0.0.0:9090 \
    PGSTORE_LOG__FORMAT=json
EXPOSE 50051 9090
ENTRYPOINT ["pgstore"]
CMD ["serve"]
