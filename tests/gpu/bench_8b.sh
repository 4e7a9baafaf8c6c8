#!/usr/bin/env bash
# Llama-3-8B-shaped QLoRA benchmark on a GPU host: random bf16 weights written
# by `ftune-rank init-model --preset llama3-8b`, NF4 + LoRA r16 on all
# projections, seq 2048 packed, batch 1 per GPU, activation checkpointing;
# on 1 GPU and on N GPUs (FSDP over NCCL). Prints tokens/s per GPU, HFU and
# peak device memory (tests/gpu/throughput.py says how HFU is counted).
#   bash tests/gpu/bench_8b.sh [num_gpus] [steps]
set -euo pipefail
export NCCL_NVLS_ENABLE=0
gpus=${1:-2}
steps=${2:-8}
out=/tmp/ftune-bench
mkdir -p "$out"
bash tests/gpu/build_on_gpu_host.sh ftune-rank
R=/tmp/ftune-build/worker/trainer/ftune-rank
start=$(date +%s)
[ -f "$out/l8b/config.json" ] || $R init-model --preset llama3-8b --out "$out/l8b" \
  --tokenizer-corpus examples/data/instructions.jsonl > "$out/init.log" 2>&1
echo "init-model llama3-8b: $(( $(date +%s) - start )) s, $(du -sh "$out/l8b" | cut -f1)"
for n in 1 "$gpus"; do
  cat > "$out/b$n.yaml" <<YAML
model: {model_name_or_path: $out/l8b}
dataset: {data_files: [$PWD/examples/data/instructions.jsonl], completion_only_loss: false}
lora: {r: 16, lora_alpha: 32}
training:
  max_steps: $steps
  per_device_train_batch_size: 1
  max_seq_len: 2048
  packing: true
  gradient_checkpointing: true
  save_steps: 0
  logging_steps: 1
output_dir: $out/run$n
YAML
  t0=$(date +%s)
  $R train --device cuda --nproc "$n" --spec "$out/b$n.yaml" > "$out/b$n.json" 2> "$out/b$n.log" ||
    { grep -v '^frame' "$out/b$n.log" | tail -15; exit 1; }
  echo "$n GPU(s): $(( $(date +%s) - t0 )) s total"
  grep -E 'loaded in|memory \(load\)' "$out/b$n.log" | head -3
  python3 tests/gpu/throughput.py "$out/b$n.log" "$n"
done
