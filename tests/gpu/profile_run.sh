#!/usr/bin/env bash
# One profiled QLoRA run of a Llama shape on one GPU (random weights, seq
# 2048 packed, batch 1, LoRA r16 on all projections), then the trace's
# summary (tests/gpu/trace_summary.py): where a step's time goes.
#   bash tests/gpu/profile_run.sh RANK_BINARY [PRESET] [CHECKPOINTING] [OUT] [LAYERS]
#   e.g. bash tests/gpu/profile_run.sh /tmp/ftune-build/worker/trainer/ftune-rank llama3-8b true
# Set FTUNE_FUSED_KERNELS=0 to trace the op chains instead of the fused kernels.
set -euo pipefail
rank=$1
preset=${2:-llama3-8b}
ckpt=${3:-true}
out=${4:-/tmp/ftune-profile}
layers=${5:-}  # e.g. 8: the preset's first 8 layers (the 70B shape's side-by-side row)
mkdir -p "$out"
model=$out/$preset${layers:+-$layers}
[ -f "$model/config.json" ] || "$rank" init-model --preset "$preset" --no-weights --out "$model" \
  --tokenizer-corpus examples/data/instructions.jsonl ${layers:+--layers "$layers"} > "$out/init.log" 2>&1
python3 - "$out/long.jsonl" <<'PY'
import json, random, sys
words = open("examples/data/instructions.jsonl").read().split()
rng = random.Random(0)
with open(sys.argv[1], "w") as f:
    for _ in range(32):
        f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(6000))}) + "\n")
PY
cat > "$out/spec.yaml" <<YAML
model: {model_name_or_path: $model, random_weights: true}
dataset: {data_files: [$out/long.jsonl]}
lora: {r: 16, lora_alpha: 16, lora_dropout: 0.0}
training:
  max_steps: 8
  per_device_train_batch_size: 1
  max_seq_len: 2048
  packing: true
  gradient_checkpointing: $ckpt
  save_steps: 0
  logging_steps: 1
  profile_steps: "5-6"
output_dir: $out/run
YAML
rm -rf "$out/run"
"$rank" train --device cuda --nproc 1 --spec "$out/spec.yaml" > "$out/train.log" 2>&1 ||
  { tail -30 "$out/train.log"; exit 1; }
grep -E '\[rank 0\] step [5-8] ' "$out/train.log" | tail -4
python3 tests/gpu/trace_summary.py "$(ls "$out"/run/profile/*.json | head -1)" --top 25
