#!/usr/bin/env python3
"""How far transformers + peft themselves land from the fp32 golden numbers
when they run in bf16 on CUDA: the yardstick for the bf16 tolerances of
tests/trainer/model_cuda_test.cc (ftune's bf16 CUDA run should be about as
far, not further). Prints one line per quantity; needs a GPU.

  python3 tests/golden/model/bf16_baseline.py tests/golden/model
"""
import sys

import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors import safe_open
from transformers import LlamaForCausalLM


def rel_l2(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def ce(logits, labels):
    v = logits.shape[-1]
    lb = labels[..., 1:].reshape(-1)
    return F.cross_entropy(logits[..., :-1, :].reshape(-1, v).float(), lb, ignore_index=-100,
                           reduction="sum"), int((lb != -100).sum())


def main(d):
    for name in ("llama3_tiny", "llama2_tiny"):
        with safe_open(f"{d}/{name}_golden.safetensors", "pt") as f:
            g = {k: f.get_tensor(k) for k in f.keys()}
        base = LlamaForCausalLM.from_pretrained(f"{d}/{name}", dtype=torch.bfloat16,
                                                attn_implementation="sdpa").cuda()
        pm = PeftModel.from_pretrained(base, f"{d}/{name}_adapter", is_trainable=True).cuda()
        pm.train()
        for p, label in (("a", "batch"), ("p", "packed")):
            ids, labels = g[f"{p}.input_ids"].cuda(), g[f"{p}.labels"].cuda()
            pm.zero_grad(set_to_none=True)
            if p == "a":
                logits = pm(input_ids=ids).logits
                s, n = ce(logits, labels)
            else:  # per document, as the golden reference
                pos = g["p.position_ids"][0]
                starts = [i for i in range(len(pos)) if int(pos[i]) == 0] + [len(pos)]
                pieces, s, n = [], 0.0, 0
                for a, b in zip(starts[:-1], starts[1:]):
                    lg = pm(input_ids=ids[:, a:b]).logits
                    pieces.append(lg)
                    s1, n1 = ce(lg, labels[:, a:b])
                    s, n = s + s1, n + n1
                logits = torch.cat(pieces, 1)
            loss = s / n
            loss.backward()
            worst = 0.0
            for pn, par in pm.named_parameters():
                if "lora_" in pn:
                    key = f"{p}.grad." + pn.replace(".default", "")
                    worst = max(worst, rel_l2(par.grad, g[key]))
            print(f"HF-BF16 {name} {label} logits l2-rel={rel_l2(logits.float(), g[p + '.logits']):.3g} "
                  f"loss rel={abs(float(loss) - float(g[p + '.loss'])) / float(g[p + '.loss']):.3g} "
                  f"lora grads worst l2-rel={worst:.3g} (lora dtype {par.dtype})", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
