#!/usr/bin/env bash
# Installs what a fresh machine with only the Rust toolchain lacks.
set -euo pipefail
if ! rustup target list --installed | grep -qx wasm32-wasip1; then
    echo "==> installing the wasm32-wasip1 target"
    rustup target add wasm32-wasip1
fi
# The gRPC contract test drives the API from Python (grpcio and grpcio-tools
# go into a venv under the target directory, from PyPI, on first run).
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    echo "==> installing python3 with its venv module"
    if command -v apt-get >/dev/null; then
        SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
        $SUDO apt-get update -q && $SUDO apt-get install -y -q python3 python3-venv
    else
        echo "error: install python3 with its venv module (the Python gRPC client test needs it)" >&2
        exit 1
    fi
fi
