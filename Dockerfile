# syntax=docker/dockerfile:1
# driftless container image: a static musl binary on distroless (no shell, no package
# manager, CA certificates included), running as the unprivileged user 65532 that
# deploy/base/deployment.yaml also asks for.
#
#   docker build -t driftless .
#
# TLS is rustls throughout (kube, octocrab and reqwest are built without OpenSSL), so the only
# C code is ring's, which musl-gcc compiles: nothing dynamically linked is left.
#
# Kustomize apps are rendered by a pinned `kustomize` release binary (static Go), checked
# against its published SHA-256 before it is unpacked; the build fails on any mismatch.

FROM debian:bookworm-slim AS kustomize
ARG KUSTOMIZE_VERSION=5.0.1
# kustomize_v5.0.1_linux_amd64.tar.gz, from the release's checksums.txt.
ARG KUSTOMIZE_SHA256=dca623b36aef84fbdf28f79d02e9b3705ff641424ac1f872d5420dadb12fb78d
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && curl -fsSLo /tmp/kustomize.tar.gz \
       "https://github.com/kubernetes-sigs/kustomize/releases/download/kustomize%2Fv${KUSTOMIZE_VERSION}/kustomize_v${KUSTOMIZE_VERSION}_linux_amd64.tar.gz" \
    && echo "${KUSTOMIZE_SHA256}  /tmp/kustomize.tar.gz" | sha256sum -c - \
    && tar -xzf /tmp/kustomize.tar.gz -C /usr/local/bin kustomize \
    && /usr/local/bin/kustomize version

FROM rust:1-bookworm AS builder
# musl-gcc for ring's C and assembly; the Debian version that bookworm ships is what we want.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/* \
    && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# Cache mounts keep the registry and the build between image builds; the binary is copied out
# of the cached target directory because a cache mount is not part of the image layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --target x86_64-unknown-linux-musl --bin driftless \
    && cp target/x86_64-unknown-linux-musl/release/driftless /driftless

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=builder /driftless /driftless
COPY --from=kustomize /usr/local/bin/kustomize /usr/local/bin/kustomize
# nonroot's uid and gid, numeric so that runAsNonRoot can verify it.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/driftless"]
CMD ["serve", "--config", "/etc/driftless/driftless.toml"]
