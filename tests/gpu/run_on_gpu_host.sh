#!/usr/bin/env bash
# The trainer on a GPU host (the engine and FSDP on CUDA): builds ftune-rank
# against the host's LibTorch (2.x + CUDA) with the CUDA kernels and NCCL,
# then
#   1. trains the tiny demo model on 1 GPU and on N GPUs (NCCL FSDP) with the
#      same global batch and compares the loss curves (bf16);
#   2. trains it on the CPU (fp32), exports the merged model, scores tokens,
#      and checks with transformers + peft that they load ftune's adapter and
#      merged model and compute the same numbers (tests/gpu/peft_interop.py).
# The host has no CLI11 package and no PCRE2 headers: carry them in .deps/
# (git-ignored): Debian's libcli11-dev (include/CLI, share/cmake/CLI11) and
# libpcre2-dev unpacked into .deps/pcre with its .pc prefix made relative
# (docs/data.md, "Building on the GPU hosts").
#   bash tests/gpu/run_on_gpu_host.sh [num_gpus] [out_dir]
set -euo pipefail
export NCCL_NVLS_ENABLE=0
gpus=${1:-2}
out=${2:-/tmp/ftune-gpu}
build=/tmp/ftune-build
mkdir -p "$out"
prefix=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.device_count(), "x", torch.cuda.get_device_name(0))'
tlib=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib
echo "protobuf symbols exported by libtorch_cpu: $(nm -D --defined-only "$tlib/libtorch_cpu.so" | grep -c google8protobuf || true)"
FTUNE_GPU_LOGS=$out bash tests/gpu/build_on_gpu_host.sh ftune-rank
R=$build/worker/trainer/ftune-rank
$R info
$R init-model --preset tiny --out "$out/tiny" \
  --tokenizer-corpus examples/data/instructions.jsonl > /dev/null

spec() {  # spec NAME PER_DEVICE_BATCH
  cat > "$out/$1.yaml" <<YAML
name: $1
model: {model_name_or_path: $out/tiny}
dataset: {data_files: [$PWD/examples/data/instructions.jsonl]}
lora: {r: 16, lora_alpha: 32}
training:
  learning_rate: 2.0e-3
  lr_scheduler_type: cosine
  max_steps: 20
  per_device_train_batch_size: $2
  max_seq_len: 256
  packing: true
  gradient_checkpointing: true
  save_steps: 10
output_dir: $out/$1
YAML
}
rc=0
spec gpu1 4
$R train --device cuda --spec "$out/gpu1.yaml" > "$out/gpu1.json" 2> "$out/gpu1.log" ||
  { tail -20 "$out/gpu1.log"; rc=1; }
spec gpuN $((4 / gpus))
$R train --device cuda --nproc "$gpus" --spec "$out/gpuN.yaml" > "$out/gpuN.json" \
  2> "$out/gpuN.log" || { tail -20 "$out/gpuN.log"; rc=1; }
python3 - "$out/gpu1.json" "$out/gpuN.json" <<'PY' || rc=1
import json, sys
a = json.load(open(sys.argv[1])); b = json.load(open(sys.argv[2]))
worst = max(abs(x - y) / abs(x) for x, y in zip(a["losses"], b["losses"]))
print(f"1 GPU vs {b['world_size']} GPUs (bf16, NCCL): loss {a['losses'][0]:.4f} -> "
      f"{a['losses'][-1]:.4f}; max rel diff of the curves {worst:.3g}")
print(f"tokens/s per rank: 1 GPU {a['tokens_per_second_per_rank']:.0f}, "
      f"{b['world_size']} GPUs {b['tokens_per_second_per_rank']:.0f}")
sys.exit(0 if worst < 2e-2 else 1)
PY

# Interop with transformers + peft (fp32 on the CPU, exact comparisons).
spec cpu 2
sed -i 's/max_steps: 20/max_steps: 6/' "$out/cpu.yaml"
$R train --spec "$out/cpu.yaml" > "$out/cpu.json" 2> "$out/cpu.log" ||
  { tail -20 "$out/cpu.log"; rc=1; }
$R export --model "$out/tiny" --adapter "$out/cpu/adapter" --out "$out/merged" > /dev/null
python3 -c "
import random; random.seed(1)
v = __import__('json').load(open('$out/tiny/config.json'))['vocab_size']
with open('$out/tokens.jsonl', 'w') as f:
    for n in (17, 33, 64):
        f.write(__import__('json').dumps({'input_ids': [random.randrange(v) for _ in range(n)]}) + '\n')
"
$R score --model "$out/tiny" --adapter "$out/cpu/adapter" --tokens "$out/tokens.jsonl" \
  > "$out/score.json"
python3 tests/gpu/peft_interop.py "$out/tiny" "$out/cpu/adapter" "$out/merged" \
  "$out/score.json" "$out/tokens.jsonl" 2>&1 | grep -E "PASS|FAIL|Error|error" || rc=1
exit $rc
