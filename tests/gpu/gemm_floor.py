"""The GEMM floor of a QLoRA step: the time of the forward and input-gradient
matrix products of a Llama shape, measured with bf16 cuBLAS on this GPU.

A QLoRA step cannot be faster than the products it must run through the
frozen weights: per layer the q/k/v, o, gate/up and down projections forward
(x W^T) and their input gradients (dy W), plus lm_head's; frozen weights get
no weight gradient. Attention, dequantization, norms and the optimizer come
on top. side_by_side.py prints the floor beside ftune's step time.

  python3 tests/gpu/gemm_floor.py --config MODEL/config.json --tokens 2048
prints one JSON line: {"floor_ms": ..., "per_layer_ms": ..., "lm_head_ms": ...}.
"""
import argparse
import json

import torch


def timed(fn, reps=20, warm=5):
    for _ in range(warm):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps  # ms


def products_ms(tokens, n_in, n_out):
    """Forward x W^T and input gradient dy W of one (n_out, n_in) weight."""
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(tokens, n_in, device=dev, dtype=dt)
    w = torch.randn(n_out, n_in, device=dev, dtype=dt)
    dy = torch.randn(tokens, n_out, device=dev, dtype=dt)
    return timed(lambda: torch.mm(x, w.t())) + timed(lambda: torch.mm(dy, w))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--tokens", type=int, default=2048)
    a = ap.parse_args()
    c = json.load(open(a.config))
    h, i, L, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or h // heads
    t = a.tokens
    # As ftune runs them: q/k/v as one product, gate/up as one.
    layer = (products_ms(t, h, (heads + 2 * kv) * hd) + products_ms(t, heads * hd, h) +
             products_ms(t, h, 2 * i) + products_ms(t, i, h))
    head = products_ms(t, h, v)
    print(json.dumps({"floor_ms": layer * L + head, "per_layer_ms": layer, "lm_head_ms": head,
                      "tokens": t, "gpu": torch.cuda.get_device_name(0)}))


if __name__ == "__main__":
    main()
