#!/usr/bin/env bash
# Runs Ferry's whole test suite: unit and property tests, the API server
# against the real kubectl, and the QEMU tests. Installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
ferry_setup
cargo test --no-fail-fast "$@"
