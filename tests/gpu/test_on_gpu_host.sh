#!/usr/bin/env bash
# The whole tree on a GPU host, tests included, then every test labelled
# `gpu` (CUDA kernels, the CUDA model and score paths, NCCL collectives):
#   bash tests/gpu/test_on_gpu_host.sh [extra ctest arguments]
# Builds into /tmp/ftune-build (tests/gpu/build_on_gpu_host.sh: the host's
# LibTorch with CUDA, .deps/ carried for CLI11 and PCRE2; the control plane
# is off there, as the host has no gRPC). Exit status: ctest's.
set -euo pipefail
export NCCL_NVLS_ENABLE=0
out=${FTUNE_GPU_LOGS:-/tmp/ftune-gpu-logs}
mkdir -p "$out"
# -k 0: report every target that fails, not the first.
FTUNE_GPU_LOGS=$out bash "$(dirname "$0")/build_on_gpu_host.sh" -k 0 all
ctest --test-dir /tmp/ftune-build -L gpu --output-on-failure --timeout 600 "$@" 2>&1 |
  tee "$out/ctest-gpu.log"
