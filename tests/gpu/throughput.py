"""Steady tokens/s per GPU, HFU and peak memory of a run, from its log.

Reads rank 0's step lines in either form ftune prints them:
  `ftune-rank train` stderr:  [rank 0] step 7  loss ... tok/s 4357.3 ...
  `ftune watch`/`--follow`:   ... rank 0   step 7  loss ... tokens/s 4357.3 ...
skipping the first `--warmup` steps (allocator and kernel warm-up).

HFU counts the work the GPU does per token for QLoRA with activation
checkpointing: forward, recomputed forward and backward through the frozen
weights (3 x 2N flops, N = parameters in matrix products: all but the input
embedding; frozen weights get no weight gradient) plus causal attention
scores and values (3 x 2 x 2 x layers x seq/2 x hidden), over the H200's
989 TFLOP/s dense bf16 peak. The shape comes from the model's config.json.

  python3 tests/gpu/throughput.py LOG NUM_GPUS --model DIR [--warmup 3]
      [--base TOKENS_PER_S_OF_1_GPU] [--tps-only]
"""
import argparse
import json
import re

SEQ = 2048
PEAK_FLOPS = 989e12


def shape(model_dir):
    c = json.load(open(f"{model_dir}/config.json"))
    h, i, L, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    heads, kv = c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"])
    hd = c.get("head_dim") or h // heads
    per_layer = h * heads * hd * 2 + h * kv * hd * 2 + 3 * h * i
    n = L * per_layer + (0 if c.get("tie_word_embeddings") else v * h)
    return n, L, h


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("log")
    ap.add_argument("gpus", type=int)
    ap.add_argument("--model", required=True)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--base", type=float)
    ap.add_argument("--tps-only", action="store_true")
    a = ap.parse_args()
    log = open(a.log).read()
    rates = [float(x) for x in re.findall(
        r'(?:\[rank 0\]|rank 0 +) step \d+ .*?(?:tok/s|tokens/s) ([0-9.]+)', log)]
    steady = rates[a.warmup:] or rates
    tps = sum(steady) / max(1, len(steady))
    if a.tps_only:
        print(f"{tps:.1f}")
        return
    n, layers, hidden = shape(a.model)
    flops = 3 * 2 * n + 3 * 2 * 2 * layers * (SEQ / 2) * hidden
    line = (f"   {a.gpus} GPU(s), steps {a.warmup + 1}+: {tps:.0f} tokens/s per GPU, "
            f"HFU {tps * flops / PEAK_FLOPS * 100:.1f}%")
    if a.base:
        line += f", scaling efficiency {tps / a.base * 100:.0f}% of 1 GPU"
    print(line)
    mem = re.findall(r'memory \(end\).*device peak ([0-9.]+) GiB.*?reserved peak ([0-9.]+) GiB.*?'
                     r'device in use ([0-9.]+) GiB.*?device peak with runtime ([0-9.]+) GiB', log)
    if mem:
        worst = max(mem, key=lambda m: float(m[3]))
        print(f"   memory per GPU (worst rank): allocated peak {worst[0]} GiB, reserved peak "
              f"{worst[1]} GiB, device peak with runtime {worst[3]} GiB")
    host = re.findall(r'memory \(end\): host rss [0-9.]+ GiB \(peak ([0-9.]+) GiB\)', log)
    if host:
        print(f"   host peak RSS per rank (worst): {max(float(h) for h in host):.2f} GiB")


if __name__ == "__main__":
    main()
