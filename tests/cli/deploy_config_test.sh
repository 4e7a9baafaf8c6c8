#!/usr/bin/env bash
# Checks deploy/'s configuration files against the tools that read them:
#   - prometheus.yml with `promtool check config`, scraping the coordinator's
#     documented metrics address every 5s,
#   - the systemd units with `systemd-analyze verify` (the binaries they
#     start are replaced by /bin/true: they are not installed here),
#   - the Grafana provisioning files point at the dashboard and a
#     Prometheus datasource.
# A check whose tool is missing is reported and skipped.
# Usage: deploy_config_test.sh SOURCE_DIR
set -euo pipefail

src="${1:?usage: deploy_config_test.sh SOURCE_DIR}"
deploy="$src/deploy"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }

prom="$deploy/prometheus/prometheus.yml"
if command -v promtool >/dev/null; then
  promtool check config "$prom" >"$tmp/promtool.out" 2>&1 ||
    fail "promtool check config: $(cat "$tmp/promtool.out")"
else
  echo "note: promtool not installed; prometheus.yml syntax not checked"
fi
grep -qE '^\s*scrape_interval:\s*5s\s*$' "$prom" || fail "prometheus.yml: scrape_interval is not 5s"
grep -qE "targets:\s*\[\"127\.0\.0\.1:9464\"\]" "$prom" ||
  fail "prometheus.yml: does not scrape 127.0.0.1:9464 (--metrics-listen default)"
grep -q '`127.0.0.1:9464`' "$src/docs/control-plane.md" ||
  fail "docs/control-plane.md no longer says the metrics port is 127.0.0.1:9464; update prometheus.yml"

if command -v systemd-analyze >/dev/null; then
  for unit in ftune-coordinator ftune-agent; do
    sed -E 's#/usr/local/bin/ftune-[a-z]+#/bin/true#' "$deploy/systemd/$unit.service" \
      >"$tmp/$unit.service"
    # verify exits 0 on unknown keys and bad values; it only warns, so any
    # output is a failure.
    out="$(systemd-analyze verify "$tmp/$unit.service" 2>&1 || echo "exit status $?")"
    [[ -z "$out" ]] || fail "systemd-analyze verify $unit.service: $out"
  done
else
  echo "note: systemd-analyze not installed; units not verified"
fi
grep -q -- '--listen ${FTUNE_LISTEN}' "$deploy/systemd/ftune-coordinator.service" ||
  fail "coordinator unit does not pass --listen"
grep -q '^Environment=FTUNE_LISTEN=127.0.0.1:7450$' "$deploy/systemd/ftune-coordinator.service" ||
  fail "coordinator unit does not default to 127.0.0.1:7450"
grep -q '^Environment=FTUNE_METRICS_LISTEN=127.0.0.1:9464$' "$deploy/systemd/ftune-coordinator.service" ||
  fail "coordinator unit does not default --metrics-listen to 127.0.0.1:9464"

ds="$deploy/grafana/provisioning/datasources/ftune.yaml"
grep -qE '^\s*type:\s*prometheus\s*$' "$ds" || fail "$ds: no prometheus datasource"
grep -qE '^apiVersion:\s*1\s*$' "$ds" || fail "$ds: apiVersion 1 missing"
db="$deploy/grafana/provisioning/dashboards/ftune.yaml"
grep -qE '^apiVersion:\s*1\s*$' "$db" || fail "$db: apiVersion 1 missing"
grep -qE '^\s*path:\s*/' "$db" || fail "$db: no dashboards path"
grep -qE '^\s*type:\s*file\s*$' "$db" || fail "$db: provider is not of type file"

if [[ $failures -gt 0 ]]; then
  echo "$failures check(s) failed"
  exit 1
fi
echo "deploy configuration: all checks passed"
