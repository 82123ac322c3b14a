# The entry points: `make demo`, `make test`, and `make check` (what CI runs).
.PHONY: demo test test-governor check lint bench

demo:
	bash scripts/demo.sh

test:
	bash scripts/test.sh

# The real CPU-band test of the fuel governor alone, with its timeline.
test-governor:
	bash scripts/setup.sh
	STOKER_GOVERNOR_TEST=require cargo test -p stoker --test governor -- --nocapture

lint:
	bash scripts/setup.sh
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy --target wasm32-wasip1 -p stoker-guest -p wordcount -p primes -p sort -p misbehave -- -D warnings

check: lint test

bench:
	cargo bench -p stoker
