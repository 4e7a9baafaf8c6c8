#!/usr/bin/env bash
# The README's first command: installs dependencies, builds, writes a tiny
# random-weight Llama with its own tokenizer (ftune-rank init-model), starts a
# local coordinator (SQLite state in demo-run/) and an agent with 2 CPU slots
# (its GPUs when NVML finds some and ftune-rank was built with CUDA), submits
# examples/tiny-qlora.yaml (NF4 + LoRA + FSDP over 2 ranks on the
# examples/ instruction dataset) and follows it to the end: loss per step,
# checkpoints, and a summary line with the PEFT adapter's path.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
bash scripts/install-deps.sh
echo "demo: building (the first build takes a while on 2 cores)..."
bash scripts/build.sh ftune-coordinator ftune-agent ftune ftune-rank >/dev/null
rank_bin=$root/build/worker/trainer/ftune-rank

run=${FTUNE_DEMO_DIR:-$root/demo-run}
rm -rf "$run/state" "$run/agent" "$run/tiny-qlora"
mkdir -p "$run"
if [ ! -f "$run/tiny-llama/config.json" ]; then
  echo "demo: writing a tiny Llama (random weights, BPE tokenizer trained on the dataset)"
  "$rank_bin" init-model --preset tiny --out "$run/tiny-llama" \
    --tokenizer-corpus examples/data/instructions.jsonl >/dev/null
fi
port=${FTUNE_DEMO_PORT:-7450}
metrics_port=${FTUNE_DEMO_METRICS_PORT:-9464}
export FTUNE_COORDINATOR=127.0.0.1:$port
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

build/server/ftune-coordinator --state-dir "$run/state" --listen "$FTUNE_COORDINATOR" \
  --metrics-listen "127.0.0.1:$metrics_port" >"$run/coordinator.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do build/cli/ftune agents >/dev/null 2>&1 && break; sleep 0.1; done
build/cli/ftune agents >/dev/null || { cat "$run/coordinator.log"; exit 1; }

# GPUs only when the driver is there and this ftune-rank can use them
# (Debian's LibTorch is CPU-only).
slots=(--cpu-slots 2)
if ldconfig -p 2>/dev/null | grep -q libnvidia-ml && "$rank_bin" info | grep -q '"cuda": true'; then
  slots=()
fi
build/worker/agent/ftune-agent --work-dir "$run/agent" "${slots[@]}" \
  --rank-binary "$rank_bin" >"$run/agent.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  build/cli/ftune agents -o json 2>/dev/null | grep -q '"alive": *true' && break; sleep 0.1
done

echo "demo: coordinator on $FTUNE_COORDINATOR, metrics on http://127.0.0.1:$metrics_port/metrics"
# The example's relative paths (demo-run/...) resolve against the directory
# `ftune submit` runs in; FTUNE_DEMO_DIR moves them.
sed "s#demo-run/#$run/#g" examples/tiny-qlora.yaml >"$run/tiny-qlora.yaml"
build/cli/ftune submit "$run/tiny-qlora.yaml" --follow
