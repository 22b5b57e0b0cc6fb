# The two commands a newcomer needs:
#   make run    build and run Kanali on the bundled examples (controller + proxy on 127.0.0.1:8080)
#   make test   the whole test suite, exactly what CI runs (.ci/run calls it)
.PHONY: run test build crds bench fmt lint image test-node

run:
	./e2e/scripts/run-demo.sh

test:
	./e2e/scripts/test-all.sh

build:
	cargo build --release --bins

# Container images with Docker (Dockerfile), tagged with the workspace version the manifests
# name. CI has no Docker: e2e/node/test-node.sh builds equivalent images with e2e/node/image.sh.
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
REGISTRY ?= ghcr.io/kanali
image:
	for t in kanali-controller kanali-proxy kanali-echo; do \
	  docker build --target $$t -t $(REGISTRY)/$$t:$(VERSION) . || exit 1; \
	done

# Only the node stage of `make test`: Kanali as pods on a single-node cluster (root).
test-node:
	./e2e/node/test-node.sh

# Regenerate manifests/crds from the Rust types (a test fails when they drift).
crds:
	cargo run -q -p kanali-crds --bin kanali-crdgen

bench:
	cargo bench -p kanali-dataplane --bench router

fmt:
	cargo fmt --all

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
