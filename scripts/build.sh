#!/usr/bin/env bash
# Configures and builds ftune into build/ (Ninja, ccache). Extra arguments are
# ninja targets; none builds everything.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${FTUNE_BUILD_JOBS:-$(nproc)}
if [ ! -f build/build.ninja ]; then
  cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >.cmake-configure.log 2>&1 || {
    cat .cmake-configure.log >&2; echo "build: cmake configure failed" >&2; exit 1; }
  grep 'ftune:' .cmake-configure.log || true
fi
ninja -C build -j "$jobs" "$@"
