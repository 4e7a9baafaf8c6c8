#!/bin/sh
# Runs one libFuzzer binary for a bounded time as a test:
#   run_fuzzer.sh FUZZER SEED_DIR WORK_DIR [libFuzzer flags...]
# The committed seed corpus is only read; new inputs go to a fresh WORK_DIR
# (emptied first, so every run starts from the same seeds), and a crash
# reproducer lands in WORK_DIR/artifacts/. A fixed -seed in the flags keeps CI
# runs reproducible; run the binary by hand for longer, random exploration.
set -eu
fuzzer=$1
seeds=$2
work=$3
shift 3
rm -rf "$work"
mkdir -p "$work/corpus" "$work/artifacts"
exec "$fuzzer" -artifact_prefix="$work/artifacts/" "$@" "$work/corpus" "$seeds"
