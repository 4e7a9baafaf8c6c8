#!/bin/sh
# Runs one libFuzzer binary for a bounded time as a test:
#   run_fuzzer.sh FUZZER SEED_DIR WORK_DIR [libFuzzer flags...]
# Seeds are only read; new inputs go to a fresh WORK_DIR and a crash
# reproducer to WORK_DIR/artifacts/.
set -eu
fuzzer=$1
seeds=$2
work=$3
shift 3
rm -rf "$work"
mkdir -p "$work/corpus" "$work/artifacts"
exec "$fuzzer" -artifact_prefix="$work/artifacts/" "$@" "$work/corpus" "$seeds"
