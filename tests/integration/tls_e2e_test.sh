#!/usr/bin/env bash
# TLS end to end: a coordinator serving a self-signed certificate, an agent
# and the CLI trusting it with --tls-ca, bearer tokens on top; a job runs to
# SUCCEEDED over it, and a plaintext client is refused.
#
#   tls_e2e_test.sh COORDINATOR AGENT TEST_RANK CLI
set -euo pipefail
coord=$1 agent=$2 rank=$3 cli=$4
command -v openssl >/dev/null || { echo "FAIL: openssl missing (scripts/install-deps.sh installs it)"; exit 1; }
tmp=$(mktemp -d /tmp/ftune-tls-XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "${ok:-0}" = 1 ]; then rm -rf "$tmp"; else echo "logs kept in $tmp"; tail -n 20 "$tmp"/*.log; fi
}
trap cleanup EXIT
port=$((20000 + RANDOM % 30000))

openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=127.0.0.1" \
  -addext "subjectAltName=IP:127.0.0.1" -keyout "$tmp/key.pem" -out "$tmp/cert.pem" 2>"$tmp/openssl.log"
echo client-secret >"$tmp/client.token"
echo agent-secret >"$tmp/agent.token"

"$coord" --state-dir "$tmp/state" --listen 127.0.0.1:$port --metrics-listen "" \
  --tls-cert "$tmp/cert.pem" --tls-key "$tmp/key.pem" \
  --client-token-file "$tmp/client.token" --agent-token-file "$tmp/agent.token" \
  --heartbeat-ms 300 --tick-ms 50 >"$tmp/coordinator.log" 2>&1 &
pids+=($!)
"$agent" --coordinator 127.0.0.1:$port --tls-ca "$tmp/cert.pem" --token-file "$tmp/agent.token" \
  --work-dir "$tmp/agent" --cpu-slots 2 --host tls-host --rank-binary "$rank" >"$tmp/agent.log" 2>&1 &
pids+=($!)

export FTUNE_COORDINATOR=127.0.0.1:$port FTUNE_TOKEN_FILE=$tmp/client.token
for _ in $(seq 100); do
  "$cli" --tls-ca "$tmp/cert.pem" agents -o json 2>/dev/null | grep -q '"alive": *true' && break
  sleep 0.1
done
"$cli" --tls-ca "$tmp/cert.pem" agents

if "$cli" agents >"$tmp/plain.out" 2>&1; then
  echo "FAIL: a plaintext client was served by a TLS coordinator"; exit 1
fi

cat >"$tmp/job.yaml" <<YAML
model: $tmp/model
dataset: {data_files: [$tmp/train.jsonl]}
training: {max_steps: 6, save_steps: 3}
resources: {num_ranks: 2}
output_dir: $tmp/out
labels: {test.steps: "6", test.step_ms: "20"}
YAML
"$cli" --tls-ca "$tmp/cert.pem" submit "$tmp/job.yaml" --follow | tail -n 2
ok=1
