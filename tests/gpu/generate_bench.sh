#!/usr/bin/env bash
# Decode tokens/s of `ftune-rank generate` against transformers + bitsandbytes
# 4-bit on one GPU (tests/gpu/generate_bench.py says what is measured).
# Carry .deps (CLI11, PCRE2: see run_on_gpu_host.sh) and .peers (bitsandbytes).
#   bash tests/gpu/generate_bench.sh [generate_bench.py options]
# Builds ftune-rank into /tmp/ftune-build first unless it is there already, so
# on a warm host a second call goes straight to the measurement.
set -euo pipefail
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD/.peers${PYTHONPATH:+:$PYTHONPATH}
python3 -c 'import bitsandbytes, torch; print("bitsandbytes", bitsandbytes.__version__, "torch", torch.__version__, torch.cuda.get_device_name(0))'
rank=/tmp/ftune-build/worker/trainer/ftune-rank
if [ ! -x "$rank" ] || ! "$rank" generate --help > /dev/null 2>&1; then
  bash tests/gpu/build_on_gpu_host.sh ftune-rank
fi
python3 tests/gpu/generate_bench.py --rank "$rank" "$@"
