#!/usr/bin/env bash
# A real Prometheus (Debian's package) on loopback scrapes a coordinator that
# is running a job (which has checkpointed and restarted once), and every
# query of the Grafana dashboard must return data for that job: the step
# phase panel from the ranks' step events, the store error and dropped event
# panels from counters that exist at 0 before anything fails.
#
#   dashboard_e2e_test.sh COORDINATOR AGENT TEST_RANK SOURCE_DIR
set -euo pipefail
coord=$1 agent=$2 rank=$3 src=$4
command -v prometheus >/dev/null || { echo "SKIP: prometheus not installed (scripts/install-deps.sh)"; exit 0; }
tmp=$(mktemp -d /tmp/ftune-dash-XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "${ok:-0}" = 1 ]; then rm -rf "$tmp"; else echo "logs kept in $tmp"; tail -n 20 "$tmp"/*.log; fi
}
trap cleanup EXIT

free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 30000))
    (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null || { echo $p; return; }
  done
}
gport=$(free_port); mport=$(free_port); pport=$(free_port)

"$coord" --state-dir "$tmp/state" --listen 127.0.0.1:$gport --metrics-listen 127.0.0.1:$mport \
  --agent-timeout 5 --grace-seconds 2 --heartbeat-ms 300 --tick-ms 50 >"$tmp/coordinator.log" 2>&1 &
pids+=($!)
"$agent" --coordinator 127.0.0.1:$gport --work-dir "$tmp/agent" --cpu-slots 2 --host dash-host \
  --rank-binary "$rank" >"$tmp/agent.log" 2>&1 &
pids+=($!)

cat >"$tmp/prometheus.yml" <<YAML
global: {scrape_interval: 1s, evaluation_interval: 1s}
scrape_configs:
  - job_name: ftune-coordinator
    static_configs: [{targets: ["127.0.0.1:$mport"]}]
YAML
prometheus --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/tsdb" \
  --web.listen-address=127.0.0.1:$pport >"$tmp/prometheus.log" 2>&1 &
pids+=($!)

metric() {  # value of the first sample of a metric on /metrics, or empty
  curl -sf "http://127.0.0.1:$mport/metrics" | grep -E "^$1(\{| )" | head -n1 | awk '{print $NF}'
}
for _ in $(seq 200); do [ "$(metric 'ftune_agents\{state="alive"\}' || true)" = "1" ] && break; sleep 0.1; done

# A job that checkpoints every 4 steps, crashes once at step 6 (so the
# restart counter has moved) and then runs long enough to be scraped.
cat >"$tmp/job.yaml" <<YAML
name: dashboard
model: $tmp/model
dataset: {data_files: [$tmp/train.jsonl]}
training: {max_steps: 400, save_steps: 4}
resources: {num_ranks: 2}
output_dir: $tmp/out
max_restarts: 2
labels: {test.steps: "400", test.step_ms: "100", test.crash_at_step: "6", test.crash_rank: "1", test.crash_attempt: "0"}
YAML
cli=$(dirname "$coord")/../cli/ftune
job=$(FTUNE_COORDINATOR=127.0.0.1:$gport "$cli" submit "$tmp/job.yaml" | awk '{print $NF}' | tail -n1)
echo "submitted $job"
for _ in $(seq 300); do
  restarts=$(curl -sf "http://127.0.0.1:$mport/metrics" | grep -E "^ftune_job_restarts_total\{" | awk '{print $NF}' || true)
  step=$(curl -sf "http://127.0.0.1:$mport/metrics" | grep -E '^ftune_job_step\{.*rank="0"' | awk '{print $NF}' || true)
  [ "${restarts:-0}" = "1" ] && [ "${step%.*}" -ge 12 ] 2>/dev/null && break
  sleep 0.1
done
echo "restarts=$restarts step=$step"
# The series behind the panels that are easiest to leave empty, on the
# coordinator's own page first (a clearer failure than an empty query).
page=$(curl -sf "http://127.0.0.1:$mport/metrics")
for series in "ftune_job_step_phase_seconds\{job_id=\"$job\",phase=\"forward\",rank=\"0\"\} " \
              "ftune_job_step_phase_seconds\{job_id=\"$job\",phase=\"exposed_comm\",rank=\"1\"\} " \
              "ftune_store_errors_total 0$" \
              "ftune_events_dropped_total\{reason=\"unknown_job\"\} " \
              "ftune_events_dropped_total\{reason=\"rendezvous_not_placed\"\} "; do
  grep -qE "^$series" <<<"$page" || { echo "FAIL: no series /^$series/ on /metrics"; exit 1; }
done
sleep 6   # a few scrapes, so rate() has two points inside its window
bash "$src/deploy/check_dashboard_queries.sh" --job-id "$job" --rate-interval 10s \
  "http://127.0.0.1:$pport" "$src/deploy/grafana/dashboards/ftune.json"
ok=1
