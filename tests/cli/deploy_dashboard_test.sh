#!/usr/bin/env bash
# Checks deploy/grafana/dashboards/ftune.json without a Prometheus, through
# deploy/check_dashboard_queries.sh --list:
#   - the number of panel queries (so a lost panel target is noticed),
#   - every metric it uses is in docs/control-plane.md, and every metric
#     there is on the dashboard,
#   - label names in selectors and by()/without() clauses are labels the
#     contract gives those metrics,
#   - $job_id is only used with =~ (the "All" value and the check script's
#     default are regexes), and the template variables are as specified,
#   - every panel uses the ${datasource} variable, ids are unique, panels do
#     not overlap,
#   - every expression parses as PromQL (promtool check rules), when
#     promtool is installed,
#   - the check script's substitution and error handling.
# Usage: deploy_dashboard_test.sh SOURCE_DIR
set -euo pipefail

src="${1:?usage: deploy_dashboard_test.sh SOURCE_DIR}"
dash="$src/deploy/grafana/dashboards/ftune.json"
doc="$src/docs/control-plane.md"
check="$src/deploy/check_dashboard_queries.sh"
expected_queries=22

command -v jq >/dev/null || { echo "FAIL: jq is required (scripts/install-deps.sh installs it)"; exit 1; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

failures=0
fail() { echo "FAIL: $*"; failures=$((failures + 1)); }

# --- the contract: "| `ftune_jobs` | gauge | `state` |"
declare -A doc_type doc_labels
while IFS='|' read -r _ name type labels _; do
  name="$(tr -d '` ' <<<"$name")"
  doc_type[$name]="$(tr -d ' ' <<<"$type")"
  doc_labels[$name]=" $( (grep -oE '`[a-z_]+`' <<<"$labels" || true) | tr -d '`' | tr '\n' ' ')"
done < <(grep -E '^\| `ftune_[a-z0-9_]+` \|' "$doc")
[[ ${#doc_type[@]} -ge 10 ]] || { echo "FAIL: could not read the metrics table of $doc"; exit 1; }

# Documented family of a series name: histograms expose _bucket/_sum/_count.
family() {
  local n="$1"
  if [[ -n "${doc_type[$n]:-}" ]]; then echo "$n"; return; fi
  local base="${n%_bucket}"; base="${base%_sum}"; base="${base%_count}"
  if [[ "$base" != "$n" && "${doc_type[$base]:-}" == histogram ]]; then echo "$base"; return; fi
  echo ""
}

# --- queries as the check script sees them
mapfile -t exprs < <("$check" --list "$dash")
[[ ${#exprs[@]} -eq $expected_queries ]] ||
  fail "expected $expected_queries panel queries, --list printed ${#exprs[@]}"

declare -A used
for expr in "${exprs[@]}"; do
  expr_labels=" "
  for name in $(grep -oE 'ftune_[a-z0-9_]+' <<<"$expr" | sort -u); do
    fam="$(family "$name")"
    if [[ -z "$fam" ]]; then
      fail "metric $name (in: $expr) is not in docs/control-plane.md"
      continue
    fi
    used[$fam]=1
    expr_labels+="${doc_labels[$fam]} "
    [[ "$name" == *_bucket ]] && expr_labels+=" le "
  done
  # Selectors: ftune_x{label=~"..."}
  while read -r selector; do
    [[ -n "$selector" ]] || continue
    name="${selector%%\{*}"
    fam="$(family "$name")"
    [[ -n "$fam" ]] || continue
    allowed="${doc_labels[$fam]} "
    [[ "$name" == *_bucket ]] && allowed+=" le "
    for label in $(grep -oE '[a-z_]+ *(=~|!~|!=|=)' <<<"${selector#*\{}" | grep -oE '^[a-z_]+'); do
      [[ "$allowed" == *" $label "* ]] || fail "label $label is not a label of $fam (in: $expr)"
    done
  done < <(grep -oE 'ftune_[a-z0-9_]+\{[^}]*\}' <<<"$expr" || true)
  # Grouping: by (a, b) / without (a)
  while read -r clause; do
    [[ -n "$clause" ]] || continue
    for label in $(sed -E 's/^(by|without) *\(//; s/\)$//; s/,/ /g' <<<"$clause"); do
      [[ "$expr_labels" == *" $label "* ]] || fail "grouping label $label is not a label of the metrics in: $expr"
    done
  done < <(grep -oE '(by|without) *\([^)]*\)' <<<"$expr" || true)
done
for name in "${!doc_type[@]}"; do
  [[ -n "${used[$name]:-}" ]] || fail "documented metric $name is on no dashboard panel"
done

# --- $job_id: only as job_id=~"$job_id"
raw="$(jq -r '[.panels[] | recurse(.panels[]?) | .targets[]? | .expr // empty] | .[]' "$dash")"
n_var="$(grep -o '\$job_id' <<<"$raw" | wc -l || true)"
n_regex="$(grep -o 'job_id=~"\$job_id"' <<<"$raw" | wc -l || true)"
[[ "$n_var" -ge 10 ]] || fail "expected the per-job panels to filter on \$job_id ($n_var uses)"
[[ "$n_var" -eq "$n_regex" ]] || fail "\$job_id must be matched with =~ (found $n_var uses, $n_regex as job_id=~\"\$job_id\")"

# --- structure
jq -e '.schemaVersion >= 36 and .uid == "ftune" and (.title | length > 0)' "$dash" >/dev/null ||
  fail "dashboard needs schemaVersion >= 36, uid ftune and a title"
jq -e '.templating.list | any(.type == "datasource" and .name == "datasource" and .query == "prometheus")' \
  "$dash" >/dev/null || fail "no 'datasource' template variable of type datasource (prometheus)"
jq -e '.templating.list | any(.type == "query" and .name == "job_id"
         and .query.query == "label_values(ftune_job_step, job_id)"
         and .datasource.uid == "${datasource}")' "$dash" >/dev/null ||
  fail "no 'job_id' variable from label_values(ftune_job_step, job_id) on \${datasource}"
bad_ds="$(jq -r '[.panels[] | recurse(.panels[]?) | select(.type != "row")
                 | select(.datasource.uid != "${datasource}"
                          or ([.targets[]? | select(.datasource.uid != "${datasource}")] | length > 0))
                 | .title] | join(", ")' "$dash")"
[[ -z "$bad_ds" ]] || fail "panels not on \${datasource}: $bad_ds"
jq -e '[.panels[] | recurse(.panels[]?) | .id] | length == (unique | length)' "$dash" >/dev/null ||
  fail "panel ids are not unique"
overlaps="$(jq -r '[.panels[] | recurse(.panels[]?) | {t: .title, g: .gridPos}] as $p
  | [range(0; $p | length) as $i | range($i + 1; $p | length) as $j
     | $p[$i].g as $a | $p[$j].g as $b
     | select($a.x < $b.x + $b.w and $b.x < $a.x + $a.w and $a.y < $b.y + $b.h and $b.y < $a.y + $a.h)
     | "\($p[$i].t) / \($p[$j].t)"] | join(", ")' "$dash")"
[[ -z "$overlaps" ]] || fail "overlapping panels: $overlaps"
jq -e '[.panels[] | recurse(.panels[]?) | .gridPos | .x + .w <= 24] | all' "$dash" >/dev/null ||
  fail "a panel is wider than the 24-column grid"

# --- PromQL syntax, through promtool's rule checker
if command -v promtool >/dev/null; then
  {
    echo "groups:"
    echo "  - name: ftune_dashboard"
    echo "    rules:"
    i=0
    for expr in "${exprs[@]}"; do
      i=$((i + 1))
      echo "      - record: ftune_dashboard:query_$i"
      echo "        expr: '${expr//\'/\'\'}'"
    done
  } >"$tmp/rules.yml"
  promtool check rules "$tmp/rules.yml" >"$tmp/promtool.out" 2>&1 ||
    fail "promtool rejects a dashboard query: $(cat "$tmp/promtool.out")"
else
  echo "note: promtool not installed; PromQL syntax not checked"
fi

# --- the check script itself
mapfile -t job_exprs < <("$check" --list --job-id job-7 --rate-interval 1m "$dash")
joined="$(printf '%s\n' "${job_exprs[@]}")"
[[ "$(grep -c 'job_id=~"job-7"' <<<"$joined")" -eq "$n_var" ]] || fail "--job-id was not substituted everywhere"
grep -q '\[1m\]' <<<"$joined" || fail "--rate-interval was not substituted"
! grep -q '\$' <<<"$joined" || fail "a variable was left in: $(grep '\$' <<<"$joined")"

jq '.panels[1].targets[0].expr = "rate(ftune_jobs[$__range])"' "$dash" >"$tmp/leftover.json"
if out="$("$check" --list "$tmp/leftover.json" 2>&1)"; then
  fail "an unknown variable must fail --list"
else
  [[ $? -eq 2 && "$out" == *"unsubstituted variable in: rate(ftune_jobs[\$__range])"* ]] ||
    fail "unexpected message for an unknown variable: $out"
fi
echo "not json" >"$tmp/bad.json"
set +e
"$check" --list "$tmp/bad.json" >/dev/null 2>&1; rc_bad=$?
"$check" --list >/dev/null 2>&1; rc_usage=$?
"$check" --list "$tmp/absent.json" >/dev/null 2>&1; rc_absent=$?
set -e
[[ $rc_bad -eq 2 ]] || fail "a file that is not JSON must exit 2, got $rc_bad"
[[ $rc_usage -eq 2 ]] || fail "a missing argument must exit 2, got $rc_usage"
[[ $rc_absent -eq 2 ]] || fail "an unreadable dashboard must exit 2, got $rc_absent"

if [[ $failures -gt 0 ]]; then
  echo "$failures check(s) failed"
  exit 1
fi
echo "dashboard: ${#exprs[@]} queries, ${#doc_type[@]} documented metrics, all checks passed"
