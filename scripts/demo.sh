#!/usr/bin/env bash
# The demo: build Stoker and the wordcount example, then run a whole task
# (plan, count in parallel sandboxes, merge, finish) on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "==> building stoker and the wordcount example (the first build takes a few minutes)"
cargo build --release -p stoker
cargo build --release --target wasm32-wasip1 -p wordcount
echo "==> stoker run-local: wordcount over examples/data/stoker.txt"
./target/release/stoker run-local \
    --module target/wasm32-wasip1/release/wordcount.wasm \
    --input examples/data/stoker.txt
