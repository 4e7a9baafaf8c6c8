"""Loss curves of the fast path against the path before the speed work, on
one GPU: the same job (same random weights, data order and seeds) run twice
with `ftune-rank train`, once as ranks run by default (fused kernels and
projections, LoRA in bf16 with fp32 masters) and once with the LibTorch op
chains and LoRA computed in fp32 as PEFT does (FTUNE_FUSED_KERNELS=0
FTUNE_LORA_FP32=1). Prints both curves' per-step losses side by side and the
largest and mean relative difference; the fast path is expected within 1%.

  python3 tests/gpu/loss_curve.py --rank BUILD/worker/trainer/ftune-rank \
      [--preset llama3.2-1b --layers 4 --steps 200 --seq 512]
"""
import argparse
import json
import os
import re
import subprocess


def run(rank, spec, env_extra, log):
    env = dict(os.environ, **env_extra)
    with open(log, "w") as f:
        rc = subprocess.run([rank, "train", "--device", "cuda", "--nproc", "1", "--spec", spec],
                            stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    text = open(log).read()
    if rc != 0:
        raise SystemExit(f"train failed ({log}):\n{text[-1500:]}")
    losses = {}
    for m in re.finditer(r"\[rank 0\] step (\d+)\s+loss ([0-9.]+)", text):
        losses[int(m.group(1))] = float(m.group(2))
    return losses


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", required=True)
    ap.add_argument("--preset", default="llama3.2-1b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--out", default="/tmp/ftune-loss-curve")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    model = f"{a.out}/{a.preset}-{a.layers}"
    if not os.path.exists(f"{model}/config.json"):
        subprocess.run([a.rank, "init-model", "--preset", a.preset, "--layers", str(a.layers),
                        "--no-weights", "--out", model, "--tokenizer-corpus",
                        "examples/data/instructions.jsonl"], check=True,
                       stdout=subprocess.DEVNULL)
    curves = {}
    for name, env in (("fast", {}), ("before", {"FTUNE_FUSED_KERNELS": "0",
                                                 "FTUNE_LORA_FP32": "1"})):
        spec = f"{a.out}/{name}.yaml"
        open(spec, "w").write(f"""model: {{model_name_or_path: {model}, random_weights: true}}
dataset: {{data_files: [examples/data/instructions.jsonl]}}
lora: {{r: 16, lora_alpha: 32, lora_dropout: 0.0}}
training:
  max_steps: {a.steps}
  per_device_train_batch_size: 4
  max_seq_len: {a.seq}
  packing: true
  learning_rate: 0.0005
  gradient_checkpointing: true
  save_steps: 0
  logging_steps: 1
  seed: 7
output_dir: {a.out}/run-{name}
""")
        curves[name] = run(a.rank, spec, env, f"{a.out}/{name}.log")
    steps = sorted(set(curves["fast"]) & set(curves["before"]))
    if len(steps) < a.steps:
        raise SystemExit(f"only {len(steps)} common logged steps of {a.steps}")
    rel = [abs(curves["fast"][s] - curves["before"][s]) / abs(curves["before"][s]) for s in steps]
    for s in steps[:: max(1, len(steps) // 20)] + [steps[-1]]:
        print(f"step {s:4d}  before {curves['before'][s]:.4f}  fast {curves['fast'][s]:.4f}")
    print(json.dumps({"steps": len(steps), "first_loss": curves["before"][steps[0]],
                      "last_loss_before": curves["before"][steps[-1]],
                      "last_loss_fast": curves["fast"][steps[-1]],
                      "max_rel_diff": max(rel), "mean_rel_diff": sum(rel) / len(rel)}))


if __name__ == "__main__":
    main()
