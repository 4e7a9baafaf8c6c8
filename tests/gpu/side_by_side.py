"""ftune against the Python stack on one GPU, in one run, one row after another.

The peer is transformers + peft + bitsandbytes (NF4, double quant, bf16
compute, SDPA), run by the peer script given with --peer (its JSON lines
carry tokens_per_s and peak_gib, the allocator peak). ftune is
`ftune-rank train --nproc 1` on the same shape with random weights, seq
--seq, batch 1, LoRA r16 on all seven projections, no dropout, AdamW.

Rows per shape:
  ckpt on        both sides checkpoint every layer;
  peer memory    ftune with gradient_checkpointing auto and its allocator
                 capped at the peer's checkpointed peak (fsdp.device_memory_limit);
  keep           ftune checkpointing every layer, each keeping its down_proj
                 output for the recompute (FTUNE_RECOMPUTE_KEEP=down_proj): a
                 fixed policy within the peer's checkpointed memory;
  fastest        each side at its fastest setting that fits the GPU: the peer
                 without checkpointing (when it fits), ftune with auto;
  fastest-redequant  ftune's fastest row again with no layer keeping its
                 dequantized weights for backward
                 (FTUNE_DEQUANTIZED_KEPT_LAYERS=0): what keeping them buys.
For each: tokens/s of each side, the ratio, peak allocated GiB of each,
ftune's step time beside its GEMM floor (gemm_floor.py: the forward and
input-gradient products of the shape, timed with cuBLAS in the same run),
and ftune's MFU and HFU over the GPU's dense bf16 peak (docs/performance.md):
  MFU = tokens/s x model FLOPs per token / peak. Model FLOPs: forward 2N and
        input gradient 2N through the frozen weights (N = parameters in matrix
        products, lm_head included; frozen weights get no weight gradient),
        plus causal attention (QK^T and PV over seq/2 keys on average) forward
        and backward (3x the forward);
  HFU = the same with the FLOPs that ran again: the recomputed forward of the
        checkpointed layers.

  python3 tests/gpu/side_by_side.py --rank BUILD/worker/trainer/ftune-rank \
      --peer .peers/peer_hf_qlora.py [--shapes llama3-8b,llama3-70b-8of80] [--seq 2048]
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12}
# The peer's shape names and ftune's init-model presets.
SHAPES = {
    "llama3-8b": ("llama3-8b", None),
    "llama3-70b-8of80": ("llama3-70b", 8),
}
GIB = 2 ** 30


def sh(cmd, log, env=None):
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    return r.returncode


def peer(script, shape, seq, ckpt, out):
    if script is None:
        return {"error": "skipped"}
    log = f"{out}/peer-{shape}-{seq}-{ckpt}.log"
    sh([sys.executable, script, "--shape", shape, "--seq", str(seq), "--modes", "qlora",
        "--ckpt", ckpt, "--steps", "6", "--warm", "2"], log)
    for line in open(log):
        line = line.strip()
        if line.startswith("{") and "tokens_per_s" in line:
            return json.loads(line)
    tail = open(log).read()[-600:]
    oom = "OutOfMemory" in tail or "out of memory" in tail
    return {"error": "out of memory" if oom else tail}


def gemm_floor(model, seq, out):
    log = f"{out}/gemm-floor-{os.path.basename(model)}-{seq}.log"
    sh([sys.executable, os.path.join(os.path.dirname(__file__), "gemm_floor.py"),
        "--config", f"{model}/config.json", "--tokens", str(seq)], log)
    for line in open(log):
        if line.startswith("{"):
            return json.loads(line)["floor_ms"]
    return None


def model_flops(config, seq, recomputed_layers, keep="nothing"):
    """(model FLOPs, executed FLOPs) per token; `keep`: what each recomputed
    layer kept of its forward (its GEMMs that did not run again)."""
    h, i, L, v = config["hidden_size"], config["intermediate_size"], \
        config["num_hidden_layers"], config["vocab_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or h // heads
    per_layer = h * heads * hd * 2 + h * kv * hd * 2 + 3 * h * i
    n = L * per_layer + v * h
    # Causal attention: QK^T and PV over seq/2 keys on average, 2 flops each.
    attn_fwd_layer = 2 * 2 * (seq / 2) * heads * hd
    model = 2 * n + 2 * n + 3 * attn_fwd_layer * L      # forward + input gradient
    kept = {"nothing": 0, "down_proj": h * i, "projections": per_layer}[keep]
    executed = model + recomputed_layers * (2 * (per_layer - kept) + attn_fwd_layer)
    return model, executed


def ftune(rank, preset, layers, seq, mode, limit, out, data, keep=None, dense=None):
    name = f"{preset}{'-' + str(layers) if layers else ''}-{seq}-{mode}" + \
        (f"-keep-{keep}" if keep else "") + (f"-dense-{dense}" if dense is not None else "")
    model = f"{out}/{preset}{'-' + str(layers) if layers else ''}"
    if not os.path.exists(f"{model}/config.json"):
        cmd = [rank, "init-model", "--preset", preset, "--no-weights", "--out", model,
               "--tokenizer-corpus", "examples/data/instructions.jsonl"]
        if layers:
            cmd += ["--layers", str(layers)]
        if sh(cmd, f"{out}/init-{name}.log") != 0:
            return {"error": open(f"{out}/init-{name}.log").read()[-600:]}
    ckpt = {"on": "true", "off": "false", "auto": "auto"}[mode]
    fsdp = f"{{device_memory_limit: {limit}}}" if limit else "{}"
    spec = f"""model: {{model_name_or_path: {model}, random_weights: true}}
dataset: {{data_files: [{data}]}}
lora: {{r: 16, lora_alpha: 16, lora_dropout: 0.0}}
fsdp: {fsdp}
training:
  max_steps: 8
  per_device_train_batch_size: 1
  max_seq_len: {seq}
  packing: true
  gradient_checkpointing: {ckpt}
  save_steps: 0
  logging_steps: 1
output_dir: {out}/run-{name}
"""
    open(f"{out}/{name}.yaml", "w").write(spec)
    log = f"{out}/{name}.log"
    env = dict(os.environ)
    if keep:
        env["FTUNE_RECOMPUTE_KEEP"] = keep
    if dense is not None:
        env["FTUNE_DEQUANTIZED_KEPT_LAYERS"] = str(dense)
    rc = sh([rank, "train", "--device", "cuda", "--nproc", "1", "--spec", f"{out}/{name}.yaml"], log,
            env)
    text = open(log).read()
    if rc != 0:
        oom = "out of memory" in text.lower()
        return {"error": "out of memory" if oom else text[-800:]}
    rates = [float(x) for x in re.findall(r'\[rank 0\] step \d+ .*?tok/s ([0-9.]+)', text)]
    steady = rates[3:] or rates
    mem = re.findall(r'memory \(end\).*device peak ([0-9.]+) GiB.*?device peak with runtime '
                     r'([0-9.]+) GiB', text)
    auto = re.search(r'gradient_checkpointing auto: (\d+) of (\d+) layers', text)
    kept = re.search(r'each keeping (\w+) for its recompute', text)
    dense_kept = re.search(r'(\d+) of the (?:others|layers) keeping their dequantized weights', text)
    config = json.load(open(f"{model}/config.json"))
    L = config["num_hidden_layers"]
    recomputed = int(auto.group(1)) if auto else (L if mode == "on" else 0)
    keep = keep or (kept.group(1) if kept else "nothing")
    return {"tokens_per_s": sum(steady) / max(1, len(steady)),
            "peak_gib": float(mem[-1][0]) if mem else None,
            "device_gib": float(mem[-1][1]) if mem else None,
            "checkpointed": f"{recomputed}/{L}" + (f" keep {keep}" if recomputed and keep != "nothing"
                                                   else "") +
                            (f", {dense_kept.group(1)} dequant kept" if dense_kept else ""),
            "flops": model_flops(config, seq, recomputed, keep)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", required=True)
    ap.add_argument("--peer", required=True)
    ap.add_argument("--shapes", default="llama3-8b,llama3-70b-8of80")
    ap.add_argument("--seq", default="2048")
    ap.add_argument("--out", default="/tmp/ftune-side-by-side")
    ap.add_argument("--gpu", default="H100")
    ap.add_argument("--rows", default="on,peer,keep,fastest")
    ap.add_argument("--skip-peer", action="store_true", help="ftune's rows only (quick checks)")
    ap.add_argument("--peer-memory", type=float, help="with --skip-peer: the peer's GiB to cap at")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    data = f"{a.out}/long.jsonl"
    import random
    words = open("examples/data/instructions.jsonl").read().split()
    rng = random.Random(0)
    with open(data, "w") as f:
        for _ in range(64):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(6000))}) + "\n")
    peak = PEAK_FLOPS.get(a.gpu, 989e12)
    if a.skip_peer:
        a.peer = None
    table = []
    for shape in a.shapes.split(","):
        preset, layers = SHAPES[shape]
        for seq in [int(s) for s in a.seq.split(",")]:
            p_on = {"error": "not run"}
            if "on" in a.rows or "peer" in a.rows or "keep" in a.rows:
                p_on = peer(a.peer, shape, seq, "on", a.out)
                print(json.dumps({"peer": shape, "seq": seq, "ckpt": "on", **p_on}), flush=True)
            rows = []
            if "on" in a.rows:
                rows.append(("ckpt on (both)", p_on, ftune(a.rank, preset, layers, seq, "on", None,
                                                           a.out, data)))
            if a.skip_peer and a.peer_memory:
                p_on = {"peak_gib": a.peer_memory}
            if "peer" in a.rows and "peak_gib" in p_on:
                limit = f"{p_on['peak_gib']}GiB"
                rows.append((f"at the peer's memory ({limit})", p_on,
                             ftune(a.rank, preset, layers, seq, "auto", limit, a.out, data)))
            if "keep" in a.rows:
                rows.append(("ckpt on, keeping down_proj", p_on,
                             ftune(a.rank, preset, layers, seq, "on", None, a.out, data,
                                   keep="down_proj")))
            if "fastest" in a.rows:
                p_off = peer(a.peer, shape, seq, "off", a.out)
                print(json.dumps({"peer": shape, "seq": seq, "ckpt": "off", **p_off}), flush=True)
                p_best = p_off if "tokens_per_s" in p_off and \
                    p_off["tokens_per_s"] > p_on.get("tokens_per_s", 0) else p_on
                rows.append(("fastest that fits (peer ckpt " +
                             ("off" if p_best is p_off else "on") + ", ftune auto)", p_best,
                             ftune(a.rank, preset, layers, seq, "auto", None, a.out, data)))
                if "fastest-redequant" in a.rows.split(","):
                    rows.append(("fastest, no dequantized weights kept", p_best,
                                 ftune(a.rank, preset, layers, seq, "auto", None, a.out, data,
                                       dense=0)))
            model = f"{a.out}/{preset}{'-' + str(layers) if layers else ''}"
            floor = gemm_floor(model, seq, a.out) if os.path.exists(f"{model}/config.json") \
                else None
            print(json.dumps({"gemm_floor_ms": floor, "shape": shape, "seq": seq}), flush=True)
            for label, p, f in rows:
                if f.get("tokens_per_s"):
                    f["step_ms"] = seq / f["tokens_per_s"] * 1000  # batch 1, rows of seq
                    f["floor_ms"] = floor
                print(json.dumps({"row": label, "shape": shape, "seq": seq, "ftune": {
                    k: v for k, v in f.items() if k != "flops"}}), flush=True)
                table.append((shape, seq, label, p, f))
    print(f"\n| shape | seq | row | peer tok/s | ftune tok/s | ratio | peer GiB | ftune GiB "
          f"(device) | ftune ckpt layers | ftune step ms (GEMM floor ms) | MFU | HFU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for shape, seq, label, p, f in table:
        pt, ft = p.get("tokens_per_s"), f.get("tokens_per_s")
        ratio = f"{ft / pt:.2f}x" if pt and ft else "-"
        mfu = hfu = "-"
        if ft and "flops" in f:
            mfu = f"{ft * f['flops'][0] / peak * 100:.1f}%"
            hfu = f"{ft * f['flops'][1] / peak * 100:.1f}%"
        step = "-"
        if f.get("step_ms"):
            step = f"{f['step_ms']:.1f}"
            if f.get("floor_ms"):
                step += f" ({f['floor_ms']:.1f}, {f['step_ms'] / f['floor_ms']:.2f}x)"
        print(f"| {shape} | {seq} | {label} | {pt or p.get('error', '-')[:40]} | "
              f"{round(ft) if ft else f.get('error', '-')[:60]} | {ratio} | {p.get('peak_gib', '-')} | "
              f"{f.get('peak_gib', '-')} ({f.get('device_gib', '-')}) | {f.get('checkpointed', '-')} | "
              f"{step} | {mfu} | {hfu} |")
    print(f"\n{a.gpu}, {time.strftime('%Y-%m-%d')}; MFU/HFU over {peak / 1e12:.0f} TFLOP/s dense bf16")


if __name__ == "__main__":
    main()
