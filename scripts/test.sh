#!/usr/bin/env bash
# Installs dependencies, builds everything and runs the whole test suite
# (ctest labels: unit, integration; gpu tests skip themselves without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash scripts/build.sh
cd build
ctest --output-on-failure --timeout 600 -j "${FTUNE_TEST_JOBS:-2}" "$@"
