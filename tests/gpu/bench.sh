#!/usr/bin/env bash
# QLoRA benchmark of a Llama shape on a GPU host, standalone ranks
# (`ftune-rank train --nproc N`, FSDP over NCCL):
#   random weights built on the GPUs (model.random_weights: init-model's
#   bytes for the preset's config.json, no safetensors on disk), NF4 + LoRA
#   r16 on all projections, seq 2048 packed, batch 1 per GPU, activation
#   checkpointing, prefetch on a second stream unless told otherwise.
# For each GPU count prints tokens/s per GPU, HFU, scaling against 1 GPU,
# device memory (allocator peak and the device's own, runtime included)
# beside `ftune-rank plan`'s prediction, and the all-gather/reduce-scatter
# time with the part hidden behind compute.
#   bash tests/gpu/bench.sh PRESET "GPU_COUNTS" STEPS [extra fsdp yaml]
#   e.g. bash tests/gpu/bench.sh llama3-70b "1 2 4" 6
#        bash tests/gpu/bench.sh llama3-8b "2" 6 "offload_params: true"
set -euo pipefail
export NCCL_NVLS_ENABLE=0
preset=${1:-llama3-8b}
counts=${2:-"1 2"}
steps=${3:-6}
fsdp_extra=${4:-}
tag=${BENCH_TAG:-$preset}
out=/tmp/ftune-bench
mkdir -p "$out"
[ -x /tmp/ftune-build/worker/trainer/ftune-rank ] || bash tests/gpu/build_on_gpu_host.sh ftune-rank
R=/tmp/ftune-build/worker/trainer/ftune-rank
model=$out/$preset
[ -f "$model/config.json" ] || $R init-model --preset "$preset" --no-weights --out "$model" \
  --tokenizer-corpus examples/data/instructions.jsonl > "$out/init-$preset.log" 2>&1
# Every row a full 2048 tokens (documents longer than a row are truncated),
# so tokens/s compares like with like across steps and GPU counts.
python3 - "$out/long.jsonl" <<'PY'
import json, random, sys
words = open("examples/data/instructions.jsonl").read().split()
rng = random.Random(0)
with open(sys.argv[1], "w") as f:
    for _ in range(64):
        f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(3000))}) + "\n")
PY
base=""
for n in $counts; do
  name=$tag-$n
  cat > "$out/$name.yaml" <<YAML
model: {model_name_or_path: $model, random_weights: true}
dataset: {data_files: [$out/long.jsonl]}
lora: {r: 16, lora_alpha: 32}
fsdp: {${fsdp_extra}}
training:
  max_steps: $steps
  per_device_train_batch_size: 1
  max_seq_len: 2048
  packing: true
  gradient_checkpointing: true
  save_steps: 0
  logging_steps: 1
output_dir: $out/run-$name
YAML
  t0=$(date +%s)
  $R train --device cuda --nproc "$n" --spec "$out/$name.yaml" > "$out/$name.json" 2> "$out/$name.log" ||
    { grep -v '^frame' "$out/$name.log" | tail -15; exit 1; }
  echo "== $name: $n GPU(s), $(( $(date +%s) - t0 )) s in all"
  grep -E 'loaded in|collectives' "$out/$name.log" | sed 's/^/   /'
  python3 tests/gpu/throughput.py "$out/$name.log" "$n" --model "$model" ${base:+--base "$base"}
  [ -n "$base" ] || base=$(python3 tests/gpu/throughput.py "$out/$name.log" "$n" --model "$model" --tps-only)
  echo "   plan: $($R plan --spec "$out/$name.yaml" --world-size "$n" | tail -1)"
done
