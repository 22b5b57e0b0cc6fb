# The two commands a newcomer needs:
#   make run    build and run Kanali on the bundled examples (controller + proxy on 127.0.0.1:8080)
#   make test   the whole test suite, exactly what CI runs (.ci/run calls it)
.PHONY: run test build crds bench fmt lint

run:
	./e2e/scripts/run-demo.sh

test:
	./e2e/scripts/test-all.sh

build:
	cargo build --release --bins

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
