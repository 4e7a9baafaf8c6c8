#!/usr/bin/env bash
# The whole system on a GPU host (coordinator, agent and ranks on GPUs): the
# control-plane binaries built on the Debian dev machine are carried in
# .deps/cp (stripped ftune-coordinator, ftune-agent, ftune + the shared
# libraries `ldd` lists, minus glibc/libstdc++; tests/gpu/make_deps.sh),
# ftune-rank is built here against the host's CUDA LibTorch. A coordinator
# and an agent (its GPUs from NVML) run locally; each job of the list runs
# in turn, followed from the CLI (`ftune submit --follow`), with the
# Prometheus metrics scraped while it runs. The models are random-weight
# HF directories written to this host's disk by `ftune-rank init-model`
# (a 70B one is 141 GB: start writing it early with --prepare).
#   bash tests/gpu/system_on_gpu_host.sh "PRESET:GPUS ..." [steps]
#   bash tests/gpu/system_on_gpu_host.sh --prepare PRESET   (writes in the background)
#   e.g. bash tests/gpu/system_on_gpu_host.sh "llama3-8b:4 llama3-8b:2" 20
# WEIGHTS=random writes only config.json + tokenizer and has the ranks build
# the same weights on the GPUs (model.random_weights), skipping the disk.
set -euo pipefail
export NCCL_NVLS_ENABLE=0
out=/tmp/ftune-sys
mkdir -p "$out"
[ -x /tmp/ftune-build/worker/trainer/ftune-rank ] || bash tests/gpu/build_on_gpu_host.sh ftune-rank
R=/tmp/ftune-build/worker/trainer/ftune-rank
weights=${WEIGHTS:-files}
model_dir() { [ "$weights" = random ] && echo "$out/$1-config" || echo "$out/$1"; }
write_model() {  # preset
  [ -f "$(model_dir "$1")/config.json" ] && return 0
  local t0=$(date +%s)
  $R init-model --preset "$1" --out "$(model_dir "$1")" $([ "$weights" = random ] && echo --no-weights) \
    --tokenizer-corpus examples/data/instructions.jsonl > "$out/init-$1.log" 2>&1
  echo "init-model $1: $(( $(date +%s) - t0 )) s, $(du -sh "$(model_dir "$1")" | cut -f1) on disk"
}
if [ "${1:-}" = "--prepare" ]; then
  # A new session, so it outlives this command (the machine keeps it).
  setsid bash -c "$(declare -f model_dir write_model); out=$out R=$R weights=$weights; write_model $2 > $out/prepare-$2.log 2>&1" \
    < /dev/null > /dev/null 2>&1 &
  echo "writing $2 in the background ($out/prepare-$2.log)"
  exit 0
fi
jobs_list=${1:-"llama3-8b:2"}
steps=${2:-20}
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
# Scrape /metrics every second while jobs run; keep the lines of live jobs.
( while true; do
    python3 -c "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:9464/metrics').read().decode())" \
      2>/dev/null | grep -E '^ftune_job_(loss|tokens_per_second|gpu_memory_peak_bytes|host_rss_bytes|step)\{' \
      > "$out/metrics.tmp" && [ -s "$out/metrics.tmp" ] && mv "$out/metrics.tmp" "$out/metrics.last"
    sleep 1
  done ) > /dev/null 2>&1 &
scraper=$!
trap 'kill $scraper $(jobs -p) 2>/dev/null || true' EXIT
for job in $jobs_list; do
  preset=${job%%:*}
  n=${job##*:}
  while [ -f "$out/prepare-$preset.log" ] && [ ! -f "$out/$preset/config.json" ]; do sleep 2; done
  cat "$out/prepare-$preset.log" 2>/dev/null || true
  write_model "$preset"
  name=$preset-shape-$n
  cat > "$out/$name.yaml" <<YAML
name: $name
model: {model_name_or_path: $(model_dir "$preset"), random_weights: $([ "$weights" = random ] && echo true || echo false)}
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
output_dir: $out/run-$name
YAML
  rm -f "$out/metrics.last"
  t0=$(date +%s)
  cp_run "$CP/bin/ftune" submit "$out/$name.yaml" --follow > "$out/follow-$name.log" 2>&1 || true
  echo "== $name through the coordinator: $(( $(date +%s) - t0 )) s"
  grep -E 'rank 0 +step ([0-9]*0|1) |checkpoint|loaded in|collectives|SUCCEEDED|FAILED|summary|memory \(end\)' \
    "$out/follow-$name.log" | tail -14
  echo "--- /metrics while it ran (last scrape):"
  head -16 "$out/metrics.last" 2>/dev/null || true
  python3 tests/gpu/throughput.py "$out/follow-$name.log" "$n" --model "$(model_dir "$preset")"
  echo "   plan: $($R plan --spec "$out/$name.yaml" | tail -1)"
done
cp_run "$CP/bin/ftune" jobs
