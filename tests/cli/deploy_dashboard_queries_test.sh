#!/usr/bin/env bash
# Runs deploy/check_dashboard_queries.sh against a real Prometheus holding
# one sample series for every metric in docs/control-plane.md (written as
# OpenMetrics and loaded with `promtool tsdb create-blocks-from`, so no
# coordinator is needed), on loopback:
#   - the dashboard as shipped: every query returns data (exit 0),
#   - --job-id of a job that has no series: exactly the per-job queries fail,
#   - a renamed metric and a PromQL syntax error: both listed (exit 1),
#   - an unreachable Prometheus: every query listed as failed.
# Exits 77 (skipped) when prometheus or promtool is not installed.
# Usage: deploy_dashboard_queries_test.sh SOURCE_DIR
set -euo pipefail

src="${1:?usage: deploy_dashboard_queries_test.sh SOURCE_DIR}"
dash="$src/deploy/grafana/dashboards/ftune.json"
doc="$src/docs/control-plane.md"
check="$src/deploy/check_dashboard_queries.sh"
for tool in prometheus promtool curl jq; do
  command -v "$tool" >/dev/null || { echo "SKIP: $tool is not installed"; exit 77; }
done

tmp="$(mktemp -d)"
prom_pid=""
cleanup() {
  if [[ -n "$prom_pid" ]]; then
    kill "$prom_pid" 2>/dev/null || true
    wait "$prom_pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }

# --- one series per documented metric, a sample every 5s for the last minute
value_of() {
  case "$1" in
    job_id) echo job-1 ;;
    rank) echo 0 ;;
    state) echo alive ;;
    method) echo /ftune.v1.JobService/ListJobs ;;
    version) echo 0.1.0 ;;
    *) echo x ;;
  esac
}
now="$(date +%s)"
{
  while IFS='|' read -r _ name type labels _; do
    name="$(tr -d '` ' <<<"$name")"
    type="$(tr -d ' ' <<<"$type")"
    sel=""
    for label in $( (grep -oE '`[a-z_]+`' <<<"$labels" || true) | tr -d '`'); do
      sel+="${sel:+,}$label=\"$(value_of "$label")\""
    done
    if [[ "$type" == histogram ]]; then
      for i in $(seq 12 -1 0); do
        t=$((now - 5 * i)); n=$((13 - i))
        for le in 0.005 0.1 1 +Inf; do
          echo "${name}_bucket{${sel:+$sel,}le=\"$le\"} $n $t"
        done
      done
      for suffix in sum count; do
        for i in $(seq 12 -1 0); do echo "${name}_$suffix{$sel} $((13 - i)) $((now - 5 * i))"; done
      done
    else
      for i in $(seq 12 -1 0); do echo "$name{$sel} $((13 - i)) $((now - 5 * i))"; done
    fi
  done < <(grep -E '^\| `ftune_[a-z0-9_]+` \|' "$doc")
  echo "# EOF"
} >"$tmp/metrics.om"
promtool tsdb create-blocks-from openmetrics "$tmp/metrics.om" "$tmp/tsdb" >"$tmp/backfill.out" 2>&1 ||
  { echo "FAIL: backfill: $(cat "$tmp/backfill.out")"; exit 1; }

# --- Prometheus on a free loopback port
printf 'global:\n  scrape_interval: 5s\nscrape_configs: []\n' >"$tmp/prometheus.yml"
url=""
for attempt in 1 2 3 4 5; do
  port=$((20000 + RANDOM % 20000))
  prometheus --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/tsdb" \
    --web.listen-address="127.0.0.1:$port" >"$tmp/prometheus.log" 2>&1 &
  prom_pid=$!
  for _ in $(seq 100); do
    if curl -sf "http://127.0.0.1:$port/-/ready" >/dev/null 2>&1; then
      url="http://127.0.0.1:$port"
      break 2
    fi
    kill -0 "$prom_pid" 2>/dev/null || break
    sleep 0.1
  done
  kill "$prom_pid" 2>/dev/null || true
  wait "$prom_pid" 2>/dev/null || true
  prom_pid=""
done
[[ -n "$url" ]] || { echo "FAIL: prometheus did not start: $(tail -5 "$tmp/prometheus.log")"; exit 1; }

run_check() {  # run_check OUTFILE ARGS...; echoes the exit status
  local out="$1"; shift
  set +e
  "$check" "$@" >"$out" 2>&1
  local rc=$?
  set -e
  echo "$rc"
}

total="$("$check" --list "$dash" | wc -l)"
per_job="$("$check" --list --job-id @ "$dash" | grep -c 'job_id=~"@"')"

rc="$(run_check "$tmp/all.out" "$url" "$dash")"
[[ "$rc" -eq 0 ]] || fail "shipped dashboard against full data: exit $rc: $(cat "$tmp/all.out")"
grep -q "^all $total dashboard queries returned data from $url$" "$tmp/all.out" ||
  fail "unexpected summary: $(cat "$tmp/all.out")"

rc="$(run_check "$tmp/job.out" --job-id job-1 "$url" "$dash")"
[[ "$rc" -eq 0 ]] || fail "--job-id job-1: exit $rc: $(cat "$tmp/job.out")"

rc="$(run_check "$tmp/nojob.out" --job-id job-404 "$url" "$dash")"
[[ "$rc" -eq 1 ]] || fail "--job-id job-404 should fail, exit $rc"
n_fail="$(grep -c '^FAIL .*job_id=~"job-404".*: no data$' "$tmp/nojob.out" || true)"
[[ "$n_fail" -eq "$per_job" ]] ||
  fail "--job-id job-404: expected $per_job per-job queries listed, got $n_fail: $(cat "$tmp/nojob.out")"
grep -q "^$per_job of $total dashboard queries returned no data from $url$" "$tmp/nojob.out" ||
  fail "--job-id job-404: unexpected summary: $(tail -1 "$tmp/nojob.out")"

jq '(.panels[] | select(.title == "Queue depth") | .targets[0].expr) = "ftune_queue_length"
    | (.panels[] | select(.title == "Jobs by state") | .targets[0].expr) = "sum by (state (ftune_jobs)"' \
  "$dash" >"$tmp/broken.json"
rc="$(run_check "$tmp/broken.out" "$url" "$tmp/broken.json")"
[[ "$rc" -eq 1 ]] || fail "broken dashboard should fail, exit $rc"
grep -q '^FAIL \[Queue depth\] ftune_queue_length: no data$' "$tmp/broken.out" ||
  fail "renamed metric not listed: $(cat "$tmp/broken.out")"
grep -q '^FAIL \[Jobs by state\] sum by (state (ftune_jobs): error: bad_data: ' "$tmp/broken.out" ||
  fail "syntax error not listed: $(cat "$tmp/broken.out")"
[[ "$(grep -c '^FAIL' "$tmp/broken.out")" -eq 2 ]] || fail "only the two broken queries should fail: $(cat "$tmp/broken.out")"

kill "$prom_pid"; wait "$prom_pid" 2>/dev/null || true; prom_pid=""
rc="$(run_check "$tmp/down.out" "$url" "$dash")"
[[ "$rc" -eq 1 ]] || fail "unreachable Prometheus should fail, exit $rc"
[[ "$(grep -c '^FAIL .*request failed' "$tmp/down.out" || true)" -eq "$total" ]] ||
  fail "unreachable Prometheus: every query should be listed: $(cat "$tmp/down.out")"

if [[ $failures -gt 0 ]]; then
  echo "$failures check(s) failed"
  exit 1
fi
echo "check_dashboard_queries.sh against Prometheus: all checks passed ($total queries, $per_job per job)"
