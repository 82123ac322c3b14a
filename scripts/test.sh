#!/usr/bin/env bash
# All tests: unit, integration (guests are built to wasm by the
# stoker-test-artifacts build step), and the examples' native unit tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo test --workspace --no-fail-fast "$@"
