#!/usr/bin/env bash
# Installs every build and test dependency of ftune from Debian 12 packages.
# Idempotent and quiet on success; on failure prints apt's log and exits non-zero.
set -euo pipefail

PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config git
  protobuf-compiler libprotobuf-dev protobuf-compiler-grpc libgrpc++-dev libabsl-dev
  libsqlite3-dev sqlite3 prometheus-cpp-dev prometheus
  libgtest-dev libgmock-dev libbenchmark-dev
  libyaml-cpp-dev nlohmann-json3-dev libcli11-dev libpcre2-dev
  libtorch-dev libgloo-dev
  curl jq procps openssl
  clang libclang-rt-14-dev
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
log=$(mktemp)
export DEBIAN_FRONTEND=noninteractive
if ! { $SUDO apt-get update -q && $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
  cat "$log" >&2
  echo "install-deps: apt-get failed installing: ${missing[*]}" >&2
  exit 1
fi
rm -f "$log"
