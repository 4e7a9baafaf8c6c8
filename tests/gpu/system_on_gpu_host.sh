#!/usr/bin/env bash
# The whole system on a GPU host (issue 6, "On the GPU host"): the
# control-plane binaries built on the Debian dev machine are carried in
# .deps/cp (stripped ftune-coordinator, ftune-agent, ftune + the shared
# libraries `ldd` lists, minus glibc/libstdc++), ftune-rank is built here
# against the host's CUDA LibTorch. A coordinator and an agent (its GPUs from
# NVML) run locally; a Llama-3-8B-shaped job (random weights written by
# init-model) runs on N GPUs and then on 1, followed from the CLI, with the
# Prometheus metrics scraped while they run.
#   bash tests/gpu/system_on_gpu_host.sh [num_gpus] [steps]
set -euo pipefail
export NCCL_NVLS_ENABLE=0
gpus=${1:-2}
steps=${2:-20}
out=/tmp/ftune-sys
mkdir -p "$out"
bash tests/gpu/build_on_gpu_host.sh ftune-rank
R=/tmp/ftune-build/worker/trainer/ftune-rank
CP=$PWD/.deps/cp
cp_run() { LD_LIBRARY_PATH=$CP/lib "$@"; }
# Ranks use the host's libraries, not the carried ones.
printf '#!/bin/sh\nunset LD_LIBRARY_PATH\nexec %s "$@"\n' "$R" > "$out/rank.sh"
chmod +x "$out/rank.sh"
export FTUNE_COORDINATOR=127.0.0.1:7450
cp_run "$CP/bin/ftune-coordinator" --state-dir "$out/state" --listen "$FTUNE_COORDINATOR" \
  --metrics-listen 127.0.0.1:9464 > "$out/coordinator.log" 2>&1 &
for _ in $(seq 50); do cp_run "$CP/bin/ftune" agents > /dev/null 2>&1 && break; sleep 0.2; done
cp_run "$CP/bin/ftune-agent" --work-dir "$out/agent" --rank-binary "$out/rank.sh" \
  > "$out/agent.log" 2>&1 &
for _ in $(seq 50); do
  cp_run "$CP/bin/ftune" agents -o json 2>/dev/null | grep -q '"alive": *true' && break; sleep 0.2
done
cp_run "$CP/bin/ftune" agents
[ -f "$out/l8b/config.json" ] || $R init-model --preset llama3-8b --out "$out/l8b" \
  --tokenizer-corpus examples/data/instructions.jsonl > "$out/init.log" 2>&1
# Scrape /metrics every second while jobs run; keep the lines of live jobs.
( while true; do
    python3 -c "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:9464/metrics').read().decode())" \
      2>/dev/null | grep -E '^ftune_job_(loss|tokens_per_second|gpu_memory_peak_bytes|host_rss_bytes|step)\{' \
      > "$out/metrics.tmp" && [ -s "$out/metrics.tmp" ] && mv "$out/metrics.tmp" "$out/metrics.last"
    sleep 1
  done ) > /dev/null 2>&1 &
scraper=$!
trap 'kill $scraper $(jobs -p) 2>/dev/null || true' EXIT
for n in "$gpus" 1; do
  cat > "$out/job$n.yaml" <<YAML
name: llama3-8b-shape-$n
model: {model_name_or_path: $out/l8b}
dataset: {data_files: [$PWD/examples/data/instructions.jsonl], completion_only_loss: false}
lora: {r: 16, lora_alpha: 32}
training:
  max_steps: $steps
  per_device_train_batch_size: 1
  max_seq_len: 2048
  packing: true
  gradient_checkpointing: true
  save_steps: 10
resources: {num_ranks: $n}
output_dir: $out/run$n
YAML
  rm -f "$out/metrics.last"
  cp_run "$CP/bin/ftune" submit "$out/job$n.yaml" --follow > "$out/follow$n.log" 2>&1 || true
  grep -E 'rank 0 +step ([0-9]*0|1) |checkpoint|loaded in|SUCCEEDED|FAILED|summary' "$out/follow$n.log" | tail -12
  echo "--- /metrics while the $n-GPU job ran (last scrape):"
  cat "$out/metrics.last" 2>/dev/null | head -12
  python3 tests/gpu/throughput.py "$out/follow$n.log" "$n"
done
for n in "$gpus" 1; do
  echo "plan for $n GPU(s): $($R plan --spec "$out/job$n.yaml" 2>/dev/null)"
done
