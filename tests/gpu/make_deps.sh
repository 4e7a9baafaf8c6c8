#!/usr/bin/env bash
# Fills .deps/ (git-ignored; pass it in the device tool's `carry`) with what
# the GPU hosts lack, from this Debian 12 dev machine:
#   .deps/include/CLI, .deps/share/cmake/CLI11   Debian's libcli11-dev
#   .deps/pcre                                   libpcre2-dev unpacked, its
#                                                .pc prefix made relative
#   .deps/cp/{bin,lib}                           stripped ftune-coordinator,
#       ftune-agent, ftune and the shared libraries `ldd` lists for them,
#       minus glibc/libstdc++/libgcc (the host's newer ones serve)
# Run after `bash scripts/build.sh ftune-coordinator ftune-agent ftune`.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -q '^/.deps/' .git/info/exclude || echo /.deps/ >> .git/info/exclude
rm -rf .deps && mkdir -p .deps/include .deps/share/cmake .deps/cp/bin .deps/cp/lib
cp -r /usr/include/CLI .deps/include/
cp -r /usr/share/cmake/CLI11 .deps/share/cmake/
(cd .deps && apt-get download libpcre2-dev > /dev/null && dpkg -x libpcre2-dev_*.deb pcre &&
  rm -f libpcre2-dev_*.deb)
sed -i 's|^prefix=.*|prefix=${pcfiledir}/../../..|' .deps/pcre/usr/lib/x86_64-linux-gnu/pkgconfig/*.pc
bins=(build/server/ftune-coordinator build/worker/agent/ftune-agent build/cli/ftune)
for b in "${bins[@]}"; do strip -o ".deps/cp/bin/$(basename "$b")" "$b"; done
for b in "${bins[@]}"; do ldd "$b" | awk '{print $3}' | grep '^/'; done | sort -u |
  grep -v -E 'libc\.so|libm\.so|libpthread|libdl\.so|ld-linux|libstdc\+\+|libgcc_s|librt\.so' |
  xargs -I{} cp -L {} .deps/cp/lib/
du -sh .deps
