#!/usr/bin/env bash
# Configures and builds ftune-rank (or the given targets) on a GPU host into
# /tmp/ftune-build against the host's LibTorch, with the CUDA kernels and
# NCCL. Needs .deps/ carried (see run_on_gpu_host.sh). Prints the build time.
set -euo pipefail
build=/tmp/ftune-build
out=${FTUNE_GPU_LOGS:-/tmp/ftune-gpu-logs}
mkdir -p "$out"
prefix=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
P=$PWD/.deps/pcre/usr/lib/x86_64-linux-gnu
ln -sf /usr/lib/x86_64-linux-gnu/libpcre2-8.so.0 "$P/libpcre2-8.so"
export PKG_CONFIG_PATH=$P/pkgconfig
start=$(date +%s)
cmake -S . -B "$build" -G Ninja -DCMAKE_PREFIX_PATH="$prefix;$PWD/.deps" \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 > "$out/cmake.log" 2>&1 ||
  { tail -40 "$out/cmake.log"; exit 1; }
ninja -C "$build" "${@:-ftune-rank}" > "$out/build.log" 2>&1 ||
  { grep -E -A12 'error|FAILED' "$out/build.log" | head -80; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
