# syntax=docker/dockerfile:1
#
# Waymark's container image: one binary, `waymark`, whose subcommands are the
# whole platform (`dev`), the processors on Kafka + ScyllaDB/Cassandra (`run`),
# the gRPC API (`serve`) and the operator commands (`replay`, `projections`,
# ...). See docs/operations/container.md.
#
#   docker build -t waymark:0.1.0 .            # or: podman build -t waymark:0.1.0 .
#   docker run --rm -p 127.0.0.1:50051:50051 -p 127.0.0.1:19092:19092 \
#     -p 127.0.0.1:9464:9464 -v waymark-data:/var/lib/waymark waymark:0.1.0
#
# Machines without a registry build the same image from Debian packages with
# `scripts/image build` (mmdebstrap + buildah).
#
# Both base images can be replaced (a mirror, a pinned digest):
#   --build-arg RUST_IMAGE=... --build-arg RUNTIME_IMAGE=...
ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0

# ---------------------------------------------------------------- build
FROM ${RUST_IMAGE} AS build
# What the C parts need: librdkafka (its own configure script: make, perl),
# OpenSSL built from source (rdkafka's ssl-vendored: perl, make), zstd and
# jemalloc (cc, make), zlib found with pkg-config, and objcopy. All present in
# the full rust image; listed for the slim one.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev make perl pkg-config zlib1g-dev binutils \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# .dockerignore keeps target/, .git and the docs out of the context; the
# protobuf files are compiled by protox (no protoc needed).
COPY . .
# The release profile keeps line tables (Cargo.toml); they are stripped from
# the copy in the image (233 MB -> 39 MB), symbols stay for backtraces.
# .cargo/config.toml sets jemalloc's options at build time.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p waymark-cli --bin waymark \
 && mkdir -p /out/bin /out/lib /out/data \
 && objcopy --strip-debug target/release/waymark /out/bin/waymark \
 && for lib in $(ldd /out/bin/waymark | awk '$1 ~ /^libz\.so/ { print $3 }'); do cp -L "$lib" /out/lib/; done \
 && /out/bin/waymark --version

# ---------------------------------------------------------------- runtime
# distroless/cc: glibc, libgcc_s, CA certificates, /etc/passwd with the
# nonroot user (65532); no shell, no package manager. OpenSSL, librdkafka,
# zstd and jemalloc are linked into the binary statically; zlib is the one
# shared library distroless/cc lacks, copied from the build stage (/usr/lib is
# on the loader's default path).
FROM ${RUNTIME_IMAGE}
ARG VERSION
COPY --from=build /out/lib/ /usr/lib/
COPY --from=build /out/bin/waymark /usr/local/bin/waymark
COPY topology.yaml /etc/waymark/topology.yaml
COPY --from=build --chown=65532:65532 /out/data /var/lib/waymark
# WAYMARK_TOPOLOGY: every subcommand reads this file (mount a ConfigMap over
# /etc/waymark to change it). SSL_CERT_FILE: the CA bundle for the statically
# linked OpenSSL (its default directory, /usr/local/ssl, does not exist here).
ENV WAYMARK_TOPOLOGY=/etc/waymark/topology.yaml \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
USER 65532:65532
WORKDIR /var/lib/waymark
# gRPC (Query, Ingest, Admin, health, reflection), the Kafka protocol of
# `waymark dev`, Prometheus metrics.
EXPOSE 50051 19092 9464
# The embedded log and projection store of `waymark dev`.
VOLUME ["/var/lib/waymark"]
ENTRYPOINT ["/usr/local/bin/waymark"]
# The whole platform in one process, for trying it out. A container's ports
# are not loopback, and Waymark refuses to serve beyond loopback without TLS
# and authentication unless --insecure is given (docs/operations/security.md):
# the published ports are the only way in, so keep them on 127.0.0.1 (as in
# the example above) or configure TLS and tokens instead of --insecure.
# Production runs `run` and `serve` with their own arguments (k8s/).
CMD ["dev", "--data-dir", "/var/lib/waymark", \
     "--grpc-addr", "0.0.0.0:50051", "--kafka-addr", "0.0.0.0:19092", "--metrics-addr", "0.0.0.0:9464", \
     "--insecure"]
# No HEALTHCHECK: the image has no shell or probe binary; orchestrators probe
# gRPC health (grpc.health.v1) directly (k8s/: grpc probes).
LABEL org.opencontainers.image.title="waymark" \
      org.opencontainers.image.description="Waymark: Kafka-centric event-sourced stream processing (waymark dev, run, serve)" \
      org.opencontainers.image.source="https://github.com/waymark/waymark" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
