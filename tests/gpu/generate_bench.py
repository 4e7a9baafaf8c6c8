"""Decode speed of `ftune-rank generate` against transformers' `generate` with
bitsandbytes 4-bit, on one GPU, in one run.

Both sides load the same random-weight Llama-3-8B-shaped directory (bf16
safetensors written here by transformers), quantize the seven projections to
NF4 (double quant, bf16 compute) and decode greedily from the same prompt of
random ids, batch 1, with a KV cache, for exactly --new tokens (ftune
--ignore-eos, transformers min_new_tokens): ftune with --load-in-4bit (the
NF4 linear training uses), transformers with BitsAndBytesConfig(load_in_4bit)
and SDPA. Decode tokens/s counts the tokens after the first one over the time
after the first one, on both sides (ftune reports it itself; for
transformers it is (new - 1) / (time(new tokens) - time(1 token)), each the
best of --repeat runs after a warm-up).

On a GPU host, with .deps and .peers carried (tests/gpu/run_on_gpu_host.sh):
  bash tests/gpu/generate_bench.sh
which builds ftune-rank if needed and runs this script. Prints one JSON line
per side and a summary line with both rates and their ratio.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

SHAPES = {
    # name: (hidden, intermediate, heads, kv_heads, layers, vocab)
    "llama3-8b": (4096, 14336, 32, 8, 32, 128256),
}


def build(shape, path):
    from transformers import LlamaConfig, LlamaForCausalLM
    if os.path.exists(f"{path}/config.json"):
        return
    h, i, nh, kv, nl, vocab = SHAPES[shape]
    cfg = LlamaConfig(hidden_size=h, intermediate_size=i, num_attention_heads=nh,
                      num_key_value_heads=kv, num_hidden_layers=nl, vocab_size=vocab,
                      max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = LlamaForCausalLM(cfg).to(torch.bfloat16)
    m.save_pretrained(path, safe_serialization=True)
    del m
    torch.cuda.empty_cache()


def run_ftune(rank, path, prompt, new):
    cmd = [rank, "generate", "--model", path, "--load-in-4bit", "--device", "cuda",
           "--input-ids", ",".join(map(str, prompt)), "--max-new-tokens", str(new),
           "--ignore-eos", "-o", "json"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        return {"side": "ftune", "error": r.stderr[-2000:]}
    done = json.loads(r.stdout.strip().splitlines()[-1])
    return {"side": "ftune", "decode_tokens_per_s": round(done["decode_tokens_per_s"], 2),
            "prefill_s": round(done["prefill_seconds"], 4), "new_tokens": done["new_tokens"],
            "process_wall_s": round(wall, 1), "ids": done["ids"]}


def run_hf(path, prompt, new, repeat):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=q,
                                             attn_implementation="sdpa", device_map={"": 0}).eval()
    ids = torch.tensor([prompt], device="cuda")

    def timed(n):
        best, out = None, None
        for _ in range(repeat):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                 use_cache=True, pad_token_id=0, temperature=None, top_p=None,
                                 top_k=None)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            best = dt if best is None else min(best, dt)
        return best, out

    timed(8)  # warm-up
    t1, _ = timed(1)
    tn, out = timed(new)
    return {"side": "transformers+bitsandbytes", "decode_tokens_per_s": round((new - 1) / (tn - t1), 2),
            "prefill_s": round(t1, 4), "new_tokens": new,
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "ids": out[0, len(prompt):].tolist()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", required=True, help="ftune-rank built for this GPU")
    ap.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    ap.add_argument("--dir", default="/tmp/ftune-generate-bench")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    ap.add_argument("--new", type=int, default=128, help="new tokens")
    ap.add_argument("--repeat", type=int, default=1, help="transformers runs per length (best)")
    args = ap.parse_args()
    gpu = torch.cuda.get_device_name(0)
    path = f"{args.dir}/{args.shape}"
    t0 = time.perf_counter()
    build(args.shape, path)
    print(f"model directory {path} ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr,
          flush=True)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 128000, (args.prompt,), generator=g).tolist()
    rows = [run_ftune(args.rank, path, prompt, args.new)]
    print(json.dumps({k: v for k, v in rows[0].items() if k != "ids"}), flush=True)
    rows.append(run_hf(path, prompt, args.new, args.repeat))
    print(json.dumps({k: v for k, v in rows[1].items() if k != "ids"}), flush=True)
    a, b = rows
    same = 0
    if "ids" in a and "ids" in b:
        while same < min(len(a["ids"]), len(b["ids"])) and a["ids"][same] == b["ids"][same]:
            same += 1
    summary = {"gpu": gpu, "shape": args.shape, "prompt_tokens": args.prompt,
               "new_tokens": args.new,
               "ftune_decode_tokens_per_s": a.get("decode_tokens_per_s"),
               "peer_decode_tokens_per_s": b.get("decode_tokens_per_s"),
               "ratio": (round(a["decode_tokens_per_s"] / b["decode_tokens_per_s"], 3)
                         if "decode_tokens_per_s" in a and "decode_tokens_per_s" in b else None),
               # bf16 greedy on random weights: the two may part ways early.
               "same_leading_ids": same}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
