#!/usr/bin/env bash
# The README's first command: installs dependencies, builds, starts a local
# coordinator (SQLite state in demo-run/) and an agent with 2 CPU slots (GPUs
# when NVML finds them), submits examples/demo.yaml and follows it to the end.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
bash scripts/install-deps.sh
echo "demo: building (first build takes a few minutes)..."
bash scripts/build.sh ftune-coordinator ftune-agent ftune ftune-test-rank >/dev/null

run=${FTUNE_DEMO_DIR:-$root/demo-run}
rm -rf "$run/state" "$run/agent" "$run/output"
mkdir -p "$run"
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

slots=()
if ! ldconfig -p 2>/dev/null | grep -q libnvidia-ml; then slots=(--cpu-slots 2); fi
build/worker/agent/ftune-agent --work-dir "$run/agent" "${slots[@]}" \
  --rank-binary "$root/build/tests/fake_rank/ftune-test-rank" >"$run/agent.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  build/cli/ftune agents -o json 2>/dev/null | grep -q '"alive": *true' && break; sleep 0.1
done

echo "demo: coordinator on $FTUNE_COORDINATOR, metrics on http://127.0.0.1:$metrics_port/metrics"
sed "s#demo-run/model#$run/model#; s#examples/data#$root/examples/data#" examples/demo.yaml \
  >"$run/demo.yaml"
echo "output_dir: $run/output" >>"$run/demo.yaml"
build/cli/ftune submit "$run/demo.yaml" --follow
