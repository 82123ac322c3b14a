#!/usr/bin/env bash
# Installs what a fresh machine with only the Rust toolchain lacks.
set -euo pipefail
if ! rustup target list --installed | grep -qx wasm32-wasip1; then
    echo "==> installing the wasm32-wasip1 target"
    rustup target add wasm32-wasip1
fi
