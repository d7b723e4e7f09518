# syntax=docker/dockerfile:1
# One image for every plane: `fhirgate serve` (default), `fhirgate proxy`, `fhirgate control`.
#   docker build -t fhirgate:local .
# deploy/docker-compose.yml and deploy/k8s/ use it; .dockerignore keeps target/, node_modules
# and secrets out of the build context.

# Build stage: the Rust toolchain (at least the crate's rust-version) plus cmake (aws-lc-sys,
# zlib-ng). The cache mounts keep the crate registry and target/ between builds (BuildKit), so a
# source change does not rebuild every dependency; the binary is copied out of the cache.
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin fhirgate \
 && cp target/release/fhirgate /usr/local/bin/fhirgate \
 && strip /usr/local/bin/fhirgate

# Runtime stage: a small Debian (same release as the build, same glibc) with CA certificates
# (https upstreams, SMTP), curl for the health check and xmlsec1 (verifies SAML sign-ins'
# signatures); non-root.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl xmlsec1 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 fhirgate \
 && useradd --system --uid 10001 --gid 10001 --home /var/lib/fhirgate fhirgate \
 && mkdir -p /var/lib/fhirgate && chown fhirgate:fhirgate /var/lib/fhirgate
COPY --from=build /usr/local/bin/fhirgate /usr/local/bin/fhirgate
COPY policies /etc/fhirgate/policies
# Numeric, so Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER 10001:10001
WORKDIR /var/lib/fhirgate
# Listen on all interfaces inside the container. The control API keeps its loopback default
# (right for `serve`); `control` in its own container sets FHIRGATE_CONTROL_LISTEN=0.0.0.0:8081.
# With the SQLite default, mount a volume on /var/lib/fhirgate to keep the store.
ENV FHIRGATE_DATA_DIR=/var/lib/fhirgate FHIRGATE_LISTEN=0.0.0.0:8080 FHIRGATE_METRICS_LISTEN=0.0.0.0:9090
EXPOSE 8080 8081 9090
# Ready = the store answers and the signing keys are loaded (/readyz on the metrics port).
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 CMD curl -fsS http://127.0.0.1:9090/readyz || exit 1
ENTRYPOINT ["fhirgate"]
CMD ["serve"]
