#!/bin/sh
# Runs one of this folder's libFuzzer harnesses for a bounded time, as a ctest
# test or by hand:
#   tests/fuzz/run_fuzzer.sh NAME BIN_DIR [libFuzzer flags...]
# NAME is the fuzzer (its CMake target), BIN_DIR the folder holding its binary
# (build/tests/fuzz/bin). Its seeds are corpus/<NAME without "_fuzzer">/; its
# dictionary and limits are in the table below. Flags given here come after
# those defaults and win (libFuzzer keeps a flag's last value), e.g. for a
# long, random session:
#   tests/fuzz/run_fuzzer.sh safetensors_fuzzer build/tests/fuzz/bin \
#       -runs=-1 -max_total_time=3600 -seed=0
# The committed seeds are only read; new inputs go to BIN_DIR/NAME.work/corpus
# (emptied first, so every run starts from the same seeds); a run stops
# after its number of runs or 25 s, whichever comes first; a crash
# reproducer lands in BIN_DIR/NAME.work/artifacts/. The fixed -seed keeps
# ctest runs reproducible.
set -eu
if [ $# -lt 2 ]; then
  echo "usage: $0 NAME BIN_DIR [libFuzzer flags...]" >&2
  exit 2
fi
name=$1
bin_dir=$2
shift 2
here=$(cd "$(dirname "$0")" && pwd)

#   fuzzer                   dictionary        runs    max_len
case $name in
  safetensors_fuzzer)        dict=model;       runs=200000; max_len=8192 ;;
  config_fuzzer)             dict=model;       runs=200000; max_len=8192 ;;
  tokenizer_json_fuzzer)     dict=tokenizer;   runs=50000;  max_len=16384 ;;
  tokenizer_encode_fuzzer)   dict=tokenizer;   runs=50000;  max_len=4096 ;;
  dataset_reader_fuzzer)     dict=dataset;     runs=100000; max_len=8192 ;;
  chat_template_fuzzer)      dict=dataset;     runs=100000; max_len=8192 ;;
  checkpoint_manifest_fuzzer) dict=checkpoint; runs=200000; max_len=8192 ;;
  jobspec_yaml_fuzzer)       dict=jobspec;     runs=50000;  max_len=8192 ;;
  jobspec_proto_fuzzer)      dict=jobspec;     runs=100000; max_len=4096 ;;
  channel_fuzzer)            dict=none;        runs=100000; max_len=4096 ;;
  spool_fuzzer)              dict=none;        runs=20000;  max_len=4096 ;;
  *)
    echo "$0: unknown fuzzer '$name' (see the table in $0)" >&2
    exit 2 ;;
esac

seeds=$here/corpus/${name%_fuzzer}
work=$bin_dir/$name.work
rm -rf "$work"
mkdir -p "$work/corpus" "$work/artifacts"
dict_flag=
if [ "$dict" != none ]; then dict_flag=-dict=$here/$dict.dict; fi
# -close_fd_mask=2: the target's own stderr (the spool logs every dropped
# tail) is closed; libFuzzer's and the sanitizers' reports still come out.
# shellcheck disable=SC2086
exec "$bin_dir/$name" -artifact_prefix="$work/artifacts/" \
  -seed=1 -runs=$runs -max_total_time=25 -max_len=$max_len -timeout=10 \
  -rss_limit_mb=2048 $dict_flag -close_fd_mask=2 -print_final_stats=1 \
  "$@" "$work/corpus" "$seeds"
