# Build stage: the Rust toolchain plus cmake (aws-lc-sys, zlib-ng).
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin fhirgate && strip target/release/fhirgate

# Runtime stage: a small Debian with CA certificates, non-root.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home /var/lib/fhirgate fhirgate && mkdir -p /var/lib/fhirgate && chown fhirgate /var/lib/fhirgate
COPY --from=build /src/target/release/fhirgate /usr/local/bin/fhirgate
COPY policies /etc/fhirgate/policies
USER fhirgate
WORKDIR /var/lib/fhirgate
ENV FHIRGATE_DATA_DIR=/var/lib/fhirgate FHIRGATE_LISTEN=0.0.0.0:8080 FHIRGATE_METRICS_LISTEN=0.0.0.0:9090
EXPOSE 8080 9090
HEALTHCHECK --interval=10s --timeout=3s --retries=3 CMD curl -fsS http://127.0.0.1:9090/readyz || exit 1
ENTRYPOINT ["fhirgate"]
CMD ["serve"]
