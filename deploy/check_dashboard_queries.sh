#!/usr/bin/env bash
# Checks that every query of a Grafana dashboard returns data from a live
# Prometheus, so a renamed metric or a typo in a label shows up as a failing
# check instead of an empty panel nobody notices.
#
# Usage:
#   check_dashboard_queries.sh [--job-id ID] [--rate-interval DUR] PROM_URL DASHBOARD_JSON
#   check_dashboard_queries.sh --list [--job-id ID] [--rate-interval DUR] DASHBOARD_JSON
#
# Every panel target's `expr` (rows and nested panels included, hidden
# targets skipped) is taken from the dashboard; Grafana variables are
# replaced the way Grafana would for one job: $job_id / ${job_id} /
# [[job_id]] by --job-id (default ".+", any job: the dashboard matches
# job_id with =~), $__rate_interval and $__interval by --rate-interval
# (default 30s). Each query goes to PROM_URL/api/v1/query (an instant query
# at "now"); one that fails or returns an empty result is listed.
#
# --list prints the substituted expressions, one per line, and queries
# nothing (used by the tests to check the dashboard without a Prometheus).
#
# Exit: 0 every query returned data (or --list succeeded), 1 some query
# returned no data or failed, 2 usage error, missing tool or unreadable
# dashboard. Needs bash, jq and (to query) curl.
set -euo pipefail

usage() {
  sed -n '/^# Usage:/,/^#$/p' "$0" | sed -e 's/^# \{0,1\}//' >&2
  exit 2
}

list=0
job_id='.+'
rate_interval='30s'
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --list) list=1; shift ;;
    --job-id) [[ $# -ge 2 ]] || usage; job_id="$2"; shift 2 ;;
    --job-id=*) job_id="${1#*=}"; shift ;;
    --rate-interval) [[ $# -ge 2 ]] || usage; rate_interval="$2"; shift 2 ;;
    --rate-interval=*) rate_interval="${1#*=}"; shift ;;
    -h|--help) usage ;;
    -*) echo "check_dashboard_queries: unknown option $1" >&2; usage ;;
    *) args+=("$1"); shift ;;
  esac
done

if [[ $list -eq 1 ]]; then
  [[ ${#args[@]} -eq 1 ]] || usage
  dashboard="${args[0]}"
else
  [[ ${#args[@]} -eq 2 ]] || usage
  prom_url="${args[0]%/}"
  dashboard="${args[1]}"
fi

need() {
  command -v "$1" >/dev/null 2>&1 || {
    echo "check_dashboard_queries: $1 is required (apt-get install $1)" >&2
    exit 2
  }
}
need jq
[[ $list -eq 1 ]] || need curl
[[ -r "$dashboard" ]] || { echo "check_dashboard_queries: cannot read $dashboard" >&2; exit 2; }

# One line per target: "<panel title>\t<expr>", whitespace inside an expr
# folded to single spaces so multi-line queries stay on their line.
if ! targets="$(jq -r --arg job "$job_id" --arg rate "$rate_interval" '
    [.panels[]? | recurse(.panels[]?)]
    | .[]
    | (.title // "untitled" | gsub("[\t\n\r]"; " ")) as $title
    | .targets[]?
    | select((.expr // "") != "" and (.hide // false) != true)
    | (.expr
       | gsub("[\t\n\r ]+"; " ")
       | gsub("\\$\\{job_id(:[a-z]+)?\\}|\\[\\[job_id\\]\\]|\\$job_id\\b"; $job)
       | gsub("\\$\\{__rate_interval\\}|\\$__rate_interval\\b"; $rate)
       | gsub("\\$\\{__interval\\}|\\$__interval\\b"; $rate)) as $expr
    | "\($title)\t\($expr)"
  ' "$dashboard")"; then
  echo "check_dashboard_queries: $dashboard is not a dashboard JSON file" >&2
  exit 2
fi
if [[ -z "$targets" ]]; then
  echo "check_dashboard_queries: no panel target with an expr in $dashboard" >&2
  exit 2
fi

# A variable left over would reach Prometheus as a syntax error; say which.
leftover=0
while IFS=$'\t' read -r title expr; do
  if [[ "$expr" =~ \$[{A-Za-z_] ]]; then
    echo "check_dashboard_queries: [$title] unsubstituted variable in: $expr" >&2
    leftover=1
  fi
done <<<"$targets"
[[ $leftover -eq 0 ]] || exit 2

if [[ $list -eq 1 ]]; then
  cut -f2- <<<"$targets"
  exit 0
fi

total=0
failed=0
while IFS=$'\t' read -r title expr; do
  total=$((total + 1))
  if ! body="$(curl -sS --max-time 15 -G "$prom_url/api/v1/query" \
                 --data-urlencode "query=$expr" 2>&1)"; then
    echo "FAIL [$title] $expr: request failed: $body"
    failed=$((failed + 1))
    continue
  fi
  verdict="$(jq -r '
      if .status != "success" then "error: \(.errorType // "?"): \(.error // "no error text")"
      elif (.data.result | length) == 0 then "no data"
      else "ok" end' <<<"$body" 2>/dev/null || echo "not a Prometheus API answer: ${body:0:200}")"
  if [[ "$verdict" != ok ]]; then
    echo "FAIL [$title] $expr: $verdict"
    failed=$((failed + 1))
  fi
done <<<"$targets"

if [[ $failed -gt 0 ]]; then
  echo "$failed of $total dashboard queries returned no data from $prom_url"
  exit 1
fi
echo "all $total dashboard queries returned data from $prom_url"
