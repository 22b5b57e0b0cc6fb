# syntax=docker/dockerfile:1
# Kanali's images, for those who build with Docker: `make image` builds all three, or one with
#   docker build --target kanali-proxy -t ghcr.io/kanali/kanali-proxy:0.1.0 .
# Targets: kanali-controller, kanali-proxy, and kanali-echo (the echo upstream of the examples).
# Runtime: distroless `cc` (glibc, libgcc, CA certificates; no shell, no package manager) as
# its nonroot user, 65532 — the user the manifests' securityContext names.
# Our CI has no Docker: it builds the equivalent images from the same binaries with
# e2e/node/image.sh (a FROM-scratch layer with the binary, its libraries and the CA bundle).

# Bookworm, like distroless cc-debian12: the binaries link against the runtime's glibc.
FROM rust:1.95-bookworm AS build
WORKDIR /src
# The image's toolchain (the one rust-toolchain.toml pins) without the rustfmt and clippy
# components the file also asks for: a build needs neither.
ENV RUSTUP_TOOLCHAIN=1.95.0 CARGO_TERM_COLOR=never CARGO_TARGET_DIR=/target
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/target \
    cargo build --release --locked --bin kanali-controller --bin kanali-proxy --bin kanali-echo \
 && mkdir -p /out \
 && cp /target/release/kanali-controller /target/release/kanali-proxy /target/release/kanali-echo /out/

FROM gcr.io/distroless/cc-debian12:nonroot AS kanali-controller
LABEL org.opencontainers.image.source="https://github.com/kanali/kanali" \
      org.opencontainers.image.description="Kanali controller: compiles the kanali.io resources into routing snapshots for the proxies"
COPY --from=build /out/kanali-controller /usr/local/bin/kanali-controller
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kanali-controller"]

FROM gcr.io/distroless/cc-debian12:nonroot AS kanali-echo
LABEL org.opencontainers.image.source="https://github.com/kanali/kanali" \
      org.opencontainers.image.description="Kanali's echo upstream, for the examples and tests"
COPY --from=build /out/kanali-echo /usr/local/bin/kanali-echo
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kanali-echo"]

# Last, so that a plain `docker build .` gives the proxy.
FROM gcr.io/distroless/cc-debian12:nonroot AS kanali-proxy
LABEL org.opencontainers.image.source="https://github.com/kanali/kanali" \
      org.opencontainers.image.description="Kanali proxy: serves API traffic from the controller's snapshots"
COPY --from=build /out/kanali-proxy /usr/local/bin/kanali-proxy
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kanali-proxy"]
