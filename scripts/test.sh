#!/usr/bin/env bash
# All tests: unit, integration (guests are built to wasm by the
# stoker-test-artifacts build step), and the examples' native unit tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The dashboard test drives real headless Chromium.
if [ ! -x /usr/bin/chromium ]; then
    apt-get install -y chromium chromium-driver \
        || { apt-get update && apt-get install -y chromium chromium-driver; }
fi
cargo test --workspace --no-fail-fast "$@"
