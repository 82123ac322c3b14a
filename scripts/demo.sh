#!/usr/bin/env bash
# The demo: build Stoker and the wordcount example, start a local cluster
# (`stoker dev`: a scheduler that owns the scheduling and a worker with its
# sandbox slots, in one process), upload the module, submit a task, follow
# its progress and print the result.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "==> building stoker and the wordcount example (the first build takes a few minutes)"
cargo build --release -p stoker
cargo build --release --target wasm32-wasip1 -p wordcount
STOKER=${STOKER:-./target/release/stoker}
DATA=$(mktemp -d)
echo "==> starting a local cluster: stoker dev --data-dir $DATA (on a free port)"
"$STOKER" dev --listen 127.0.0.1:0 --data-dir "$DATA" --slots 2 >"$DATA/dev.out" 2>"$DATA/dev.log" &
DEV=$!
trap 'kill -INT $DEV 2>/dev/null; wait $DEV 2>/dev/null; rm -rf "$DATA"' EXIT
for _ in $(seq 1 100); do
    grep -q "listening on" "$DATA/dev.out" 2>/dev/null && break
    kill -0 $DEV 2>/dev/null || { cat "$DATA/dev.log"; exit 1; }
    sleep 0.1
done
export STOKER_ENDPOINT=$(sed -n 's/^listening on //p' "$DATA/dev.out")
echo "cluster at $STOKER_ENDPOINT"
echo "==> stoker module upload target/wasm32-wasip1/release/wordcount.wasm --name wordcount"
"$STOKER" module upload target/wasm32-wasip1/release/wordcount.wasm --name wordcount
echo "==> stoker task submit --module wordcount --input examples/data/stoker.txt --concurrency 2"
ID=$("$STOKER" task submit --module wordcount --input examples/data/stoker.txt --concurrency 2)
echo "task $ID submitted; stoker task wait $ID"
"$STOKER" task wait "$ID"
echo "==> stoker task show $ID"
"$STOKER" task show "$ID"
echo "==> stoker node list"
"$STOKER" node list
