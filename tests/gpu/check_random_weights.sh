#!/usr/bin/env bash
# model.random_weights on CUDA builds init-model's exact bytes: trains the
# tiny shape (2 layers) on 2 GPUs from init-model's safetensors and from
# weights generated on the GPUs, and requires identical loss lines.
#   bash tests/gpu/check_random_weights.sh
set -euo pipefail
export NCCL_NVLS_ENABLE=0
R=/tmp/ftune-build/worker/trainer/ftune-rank
d=/tmp/ftune-rw
rm -rf "$d" && mkdir -p "$d"
$R init-model --preset tiny --layers 2 --out "$d/files" \
  --tokenizer-corpus examples/data/instructions.jsonl > /dev/null 2>&1
$R init-model --preset tiny --layers 2 --no-weights --out "$d/random" \
  --tokenizer-corpus examples/data/instructions.jsonl > /dev/null 2>&1
for m in files random; do
  cat > "$d/$m.yaml" <<YAML
model: {model_name_or_path: $d/$m, random_weights: $([ $m = random ] && echo true || echo false)}
dataset: {data_files: [$PWD/examples/data/instructions.jsonl]}
lora: {r: 8, lora_alpha: 16}
training: {max_steps: 4, per_device_train_batch_size: 2, max_seq_len: 256, packing: true,
           gradient_checkpointing: true, save_steps: 0, logging_steps: 1}
output_dir: $d/out-$m
YAML
  $R train --device cuda --nproc 2 --spec "$d/$m.yaml" 2>&1 >/dev/null |
    grep -oE '\[rank 0\] step [0-9]+  loss [0-9.]+' > "$d/$m.loss"
done
if cmp -s "$d/files.loss" "$d/random.loss" && [ -s "$d/files.loss" ]; then
  echo "random weights on CUDA == init-model files: $(tr '\n' ' ' < "$d/random.loss")"
else
  echo "MISMATCH:"; paste "$d/files.loss" "$d/random.loss"; exit 1
fi
