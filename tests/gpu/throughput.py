"""Steady tokens/s per GPU, HFU and peak memory of a run, from its log.

Reads rank 0's step lines in either form ftune prints them:
  `ftune-rank train` stderr:  [rank 0] step 7  loss ... tok/s 4357.3 ...
  `ftune watch`/`--follow`:   ... rank 0   step 7  loss ... tokens/s 4357.3 ...
skipping the first `--warmup` steps (allocator and kernel warm-up).

HFU counts the work the GPU does per token for QLoRA with activation
checkpointing on a Llama-3-8B shape: forward, recomputed forward and backward
through the frozen weights (3 x 2N flops: frozen weights get no weight
gradient) plus causal attention scores and values (3 x 2 x 2 x layers x
seq/2 x hidden), over the H200's 989 TFLOP/s dense bf16 peak.

  python3 tests/gpu/throughput.py LOG NUM_GPUS [--warmup 3]
"""
import argparse
import re

N, LAYERS, HIDDEN, SEQ = 8.03e9, 32, 4096, 2048
PEAK_FLOPS = 989e12


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("log")
    ap.add_argument("gpus", type=int)
    ap.add_argument("--warmup", type=int, default=3)
    a = ap.parse_args()
    log = open(a.log).read()
    rates = [float(x) for x in re.findall(
        r'(?:\[rank 0\]|rank 0 +) step \d+ .*?(?:tok/s|tokens/s) ([0-9.]+)', log)]
    steady = rates[a.warmup:] or rates
    tps = sum(steady) / max(1, len(steady))
    flops = 3 * 2 * N + 3 * 2 * 2 * LAYERS * (SEQ / 2) * HIDDEN
    line = (f"{a.gpus} GPU(s), steps {a.warmup + 1}+: {tps:.0f} tokens/s per GPU, "
            f"HFU {tps * flops / PEAK_FLOPS * 100:.1f}%")
    peaks = [float(x) for x in re.findall(r'memory \(end\).*device peak ([0-9.]+) GiB', log)]
    if peaks:
        line += f", peak device memory {max(peaks):.2f} GiB per GPU"
    print(line)


if __name__ == "__main__":
    main()
