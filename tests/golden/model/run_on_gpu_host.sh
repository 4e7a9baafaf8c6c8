#!/usr/bin/env bash
# Builds the model tests against the GPU host's LibTorch (2.x + CUDA) and
# runs them: the CPU parity tests (SDPA path on 2.x), the 20-step training
# curve, and the gpu-labelled CUDA bf16/fp32 tests; then transformers' own
# bf16 error as the yardstick for the bf16 tolerances.
#   bash tests/golden/model/run_on_gpu_host.sh [build-dir] [log-dir]
set -euo pipefail
export NCCL_NVLS_ENABLE=0
build=${1:-/tmp/ftune-build}
logs=${2:-$build/logs}
mkdir -p "$logs"
prefix=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
# The CUDA kernels of kernels/ are not needed here; LibTorch brings CUDA.
cmake -S . -B "$build" -G Ninja -DCMAKE_PREFIX_PATH="$prefix" -DFTUNE_CUDA=OFF \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo > "$logs/cmake.log" 2>&1 || { tail -40 "$logs/cmake.log"; exit 1; }
tests="model_golden_test model_unit_test model_train_test model_cuda_test"
start=$(date +%s)
ninja -C "$build" -j"$(nproc)" $tests > "$logs/build.log" 2>&1 ||
  { grep -E -A12 'error|FAILED' "$logs/build.log" | head -120; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
rc=0
for t in $tests; do
  trc=0
  "$build/tests/trainer/$t" > "$logs/$t.log" 2>&1 || trc=$?
  grep -E 'PARITY|FAILED|PASSED|SKIPPED|Failure|Expected|actual|Which is' "$logs/$t.log" || true
  echo "$t exit code $trc"
  if [ "$trc" -ne 0 ]; then
    rc=1
    # A crash rather than a failed expectation: get a backtrace (the host has
    # cuda-gdb, which also debugs host code, but no gdb).
    if command -v cuda-gdb > /dev/null; then
      cuda-gdb -batch -ex run -ex bt --args "$build/tests/trainer/$t" 2>&1 | grep -E '^#|signal' | head -30
    fi
  fi
done
python3 tests/golden/model/bf16_baseline.py tests/golden/model 2>&1 | grep -v Warning | tee "$logs/bf16_baseline.log" || rc=1
exit $rc
