#!/usr/bin/env python3
"""Golden parity data for ftune's Llama + LoRA engine (worker/trainer/).

Builds two tiny random Llama models with transformers, wraps them with PEFT
LoRA and records what the Python stack computes, so that the C++ engine can be
checked against it on a machine without Python:

  llama3_tiny/          Llama-3-like: GQA (4 q heads, 2 kv heads), rope_theta
                        500000, rope_scaling llama3 (original_max_position 64 so
                        that all three frequency bands occur at head_dim 16),
                        tie_word_embeddings (like Llama 3.2), one model.safetensors.
  llama2_tiny/          Llama-2-like: MHA, rope_theta 10000, untied lm_head,
                        saved SHARDED (model.safetensors.index.json + shards).
  qwen2_tiny/           Qwen2ForCausalLM (Qwen2.5 0.5B-3B-like): biases on
                        q/k/v (not o_proj), GQA, rope_theta 1e6, rms eps 1e-6,
                        tie_word_embeddings, use_sliding_window false.
  mistral_tiny/         MistralForCausalLM (Mistral 7B v0.3-like): GQA,
                        rope_theta 1e6, sliding_window null, untied lm_head.
  <name>_adapter/       the PEFT adapter as peft saves it (adapter_config.json,
                        adapter_model.safetensors), r=8, alpha=16, dropout 0, all
                        seven targets, with lora_B set to random values so that
                        gradients reach lora_A too.
  <name>_golden.safetensors
      inv_freq                          RoPE inverse frequencies (fp32)
      a.input_ids/labels                (2, 24) batch, labels -100 on prompts
      a.base_logits                     adapter disabled
      a.logits, a.loss, a.grad.<name>   with the adapter; grads after one backward
      p.input_ids/position_ids/labels   (1, 32): 3 packed documents (10, 13, 9),
                                        position ids restarting at 0
      p.logits, p.loss, p.grad.<name>   reference = each document run on its own
                                        (so no mask logic of transformers is
                                        trusted); loss = CE sum / valid tokens
                                        over the whole pack. Recorded too, as
                                        metadata: how far transformers' own
                                        packed forward (position_ids, no
                                        attention_mask, eager) is from it; with
                                        transformers 5.17 that was 10.5 / 2.8
                                        max-abs: it attended across documents.
      train.input_ids/labels            (40, 2, 16): 20 steps x accumulation 2
      train.loss (20), train.micro_loss (40), train.grad_norm (20),
      train.lr (20), train.final.<name> LoRA weights after step 20
      init.kaiming_a                    torch.manual_seed(1234);
                                        kaiming_uniform_(empty(8, 64), a=sqrt(5))
    and string metadata: library versions, LoRA and optimizer settings.

Everything runs on the CPU in float32 with eager attention (exact math).

Training semantics (what transformers' Trainer does since 4.46): a step
accumulates 2 micro-batches; each micro-batch contributes
CE_sum(micro) / num_items_in_batch, where num_items_in_batch is the number of
non-ignored target tokens over the whole step, so the step's loss is the token
mean over the accumulated batch; then clip_grad_norm_(max_grad_norm), AdamW
step, scheduler step (cosine with warmup via transformers.get_scheduler),
zero_grad. max_grad_norm is set to 0.6 x the gradient norm of the first step
(rounded to 3 significant digits) so clipping is active early and not later.

Run on the GPU host (it has transformers, peft, safetensors):
  python3 tests/golden/model/make_golden.py --out tests/golden/model
"""
import argparse
import json
import math
import os
import platform
import shutil
import sys

import torch
import torch.nn.functional as F

import peft
import safetensors
import transformers
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, get_scheduler
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

# family -> (config class, model class)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_R = 8
LORA_ALPHA = 16
VOCAB = 128

MODELS = {
    "llama3_tiny": dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        bos_token_id=1, eos_token_id=2, seed=11, shard=None),
    "llama2_tiny": dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
        rope_scaling=None, bos_token_id=1, eos_token_id=2, seed=22, shard="150KB"),
    "qwen2_tiny": dict(
        family="qwen2", vocab_size=VOCAB, hidden_size=64, intermediate_size=176,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=True, use_sliding_window=False, rope_scaling=None,
        bos_token_id=None, eos_token_id=2, seed=33, shard=None),
    "mistral_tiny": dict(
        family="mistral", vocab_size=VOCAB, hidden_size=64, intermediate_size=168,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=1000000.0,
        tie_word_embeddings=False, sliding_window=None, rope_scaling=None,
        bos_token_id=1, eos_token_id=2, seed=44, shard=None),
}

OPT = dict(lr=2e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
SCHED = dict(name="cosine", num_warmup_steps=3, num_training_steps=20)
ACCUM = 2


def make_config(spec):
    kw = {k: v for k, v in spec.items()
          if k not in ("seed", "shard", "rope_scaling", "rope_theta", "family")}
    rope = spec["rope_scaling"]
    config_class = FAMILIES[spec.get("family", "llama")][0]
    probe = config_class()
    if hasattr(probe, "rope_parameters"):  # transformers v5 spelling
        params = {"rope_type": "default", "rope_theta": spec["rope_theta"]}
        if rope:
            params.update(rope)
        kw["rope_parameters"] = params
    else:
        kw["rope_theta"] = spec["rope_theta"]
        kw["rope_scaling"] = rope
    cfg = config_class(**kw)
    try:
        cfg._attn_implementation = "eager"
    except Exception:  # older spellings
        cfg._attn_implementation_internal = "eager"
    return cfg


def expected_inv_freq(spec):
    """The llama3 rope_scaling formula (transformers' _compute_llama3_parameters),
    in float64, as an independent check."""
    hd = spec["hidden_size"] // spec["num_attention_heads"]
    inv = [1.0 / spec["rope_theta"] ** (2 * i / hd) for i in range(hd // 2)]
    r = spec["rope_scaling"]
    if not r:
        return inv
    old, lo, hi, fac = (r["original_max_position_embeddings"], r["low_freq_factor"],
                        r["high_freq_factor"], r["factor"])
    out = []
    for f in inv:
        wl = 2 * math.pi / f
        if wl > old / lo:
            out.append(f / fac)
        elif wl < old / hi:
            out.append(f)
        else:
            s = (old / wl - lo) / (hi - lo)
            out.append((1 - s) * f / fac + s * f)
    return out


def randomize(model, seed):
    # HF's init (std 0.02, norms 1) gives nearly uniform logits; larger random
    # weights and non-trivial norm weights make every term of the forward matter.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                # Qwen2's q/k/v biases: large enough that dropping one shows.
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))


def lora_params(pm):
    """(saved name, parameter) of every LoRA weight, in a fixed order."""
    out = []
    for n, p in pm.named_parameters():
        if "lora_" in n:
            assert p.requires_grad, n
            out.append((n.replace(".default", ""), p))
    return out


def ce_sum(logits, labels):
    """HF causal LM loss terms: logits[t] predicts labels[t + 1]; -100 ignored."""
    v = logits.shape[-1]
    lg = logits[..., :-1, :].reshape(-1, v).float()
    lb = labels[..., 1:].reshape(-1)
    return F.cross_entropy(lg, lb, ignore_index=-100, reduction="sum"), int((lb != -100).sum())


def grads_dict(prefix, pm):
    return {f"{prefix}.grad.{n}": p.grad.detach().clone().contiguous() for n, p in lora_params(pm)}


def save_bnb4(out_dir, name):
    """<name>_bnb4/: the model as transformers + bitsandbytes save a
    load_in_4bit model (NF4, double quant, fp32 compute), and
    <name>_bnb4_golden.safetensors: its logits on batch a of the golden file
    (CUDA, fp32 compute, TF32 off). Needs a GPU and bitsandbytes."""
    import bitsandbytes
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.join(out_dir, name), quantization_config=q, dtype=torch.float32,
        device_map={"": 0}, attn_implementation="eager").eval()
    qdir = os.path.join(out_dir, name + "_bnb4")
    shutil.rmtree(qdir, ignore_errors=True)
    model.save_pretrained(qdir, safe_serialization=True)
    gen = os.path.join(qdir, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)
    golden = load_file(os.path.join(out_dir, name + "_golden.safetensors"))
    with torch.no_grad():
        logits = model(input_ids=golden["a.input_ids"].cuda()).logits.float().cpu()
    meta = {"bitsandbytes": bitsandbytes.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "device": torch.cuda.get_device_name(0),
            "compute_dtype": "float32", "tf32": "off"}
    save_file({"a.bnb_logits": logits.contiguous()},
              os.path.join(out_dir, name + "_bnb4_golden.safetensors"), metadata=meta)
    print("bnb4", name, sorted(os.listdir(qdir)), meta, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--bnb", default="",
                    help="models (already written to --out) to also load in 4-bit with "
                         "bitsandbytes on CUDA and save as <name>_bnb4/")
    ap.add_argument("--models", default=",".join(MODELS),
                    help="comma-separated subset of " + ",".join(MODELS))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(4)

    versions = {
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__,
        "safetensors": safetensors.__version__,
    }
    print("versions", versions, flush=True)

    for name in args.models.split(","):
        spec = MODELS[name]
        print(f"== {name}", flush=True)
        cfg = make_config(spec)
        torch.manual_seed(spec["seed"])
        model = FAMILIES[spec.get("family", "llama")][1](cfg).float().eval()
        randomize(model, spec["seed"])
        print("attn_implementation", model.config._attn_implementation, flush=True)

        mdir = os.path.join(args.out, name)
        shutil.rmtree(mdir, ignore_errors=True)
        if spec["shard"]:
            model.save_pretrained(mdir, safe_serialization=True, max_shard_size=spec["shard"])
        else:
            model.save_pretrained(mdir, safe_serialization=True)
        gen = os.path.join(mdir, "generation_config.json")
        if os.path.exists(gen):
            os.remove(gen)  # not needed by anyone here
        print("saved", sorted(os.listdir(mdir)), flush=True)

        out = {}
        meta = dict(versions)
        inv = model.model.rotary_emb.inv_freq.detach().float().clone()
        exp = torch.tensor(expected_inv_freq(spec), dtype=torch.float64)
        meta["inv_freq_vs_formula_max_rel"] = repr(float(((inv.double() - exp).abs() / exp).max()))
        assert float(((inv.double() - exp).abs() / exp).max()) < 1e-6, (inv, exp)
        out["inv_freq"] = inv

        lcfg = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=TARGETS,
                          bias="none", task_type="CAUSAL_LM")
        pm = get_peft_model(model, lcfg)
        g = torch.Generator().manual_seed(spec["seed"] + 1000)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
        pm.eval()  # dropout is 0 anyway; eval keeps HF from any train-only path
        adir = os.path.join(args.out, name + "_adapter")
        shutil.rmtree(adir, ignore_errors=True)
        pm.save_pretrained(adir)
        readme = os.path.join(adir, "README.md")
        if os.path.exists(readme):
            os.remove(readme)
        params = [p for _, p in lora_params(pm)]
        trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
        assert len(trainable) == len(params) == 2 * 7 * spec["num_hidden_layers"], trainable

        gen_in = torch.Generator().manual_seed(spec["seed"] + 2000)

        # --- batch a: (2, 24), prompt tokens masked, two trailing "pad" labels.
        ids = torch.randint(0, VOCAB, (2, 24), generator=gen_in)
        labels = ids.clone()
        labels[0, :6] = -100
        labels[1, :3] = -100
        labels[1, -2:] = -100
        with torch.no_grad(), pm.disable_adapter():
            out["a.base_logits"] = pm(input_ids=ids).logits.float()
        pm.zero_grad(set_to_none=True)
        res = pm(input_ids=ids, labels=labels)
        s, n = ce_sum(res.logits, labels)
        loss = s / n
        meta["a.hf_loss_vs_script_abs"] = repr(float((res.loss - loss).abs()))
        assert float((res.loss - loss).abs()) < 1e-5 * float(loss), (res.loss, loss)
        loss.backward()
        out["a.input_ids"], out["a.labels"] = ids, labels
        out["a.logits"] = res.logits.detach().float()
        out["a.loss"] = loss.detach().reshape(1)
        out.update(grads_dict("a", pm))

        # --- batch p: three documents packed into one row of 32.
        lens = [10, 13, 9]
        pids = torch.randint(0, VOCAB, (1, sum(lens)), generator=gen_in)
        ppos = torch.cat([torch.arange(l) for l in lens]).unsqueeze(0)
        plab = pids.clone()
        starts = [0, lens[0], lens[0] + lens[1]]
        for st in starts:
            plab[0, st] = -100  # never predicted across a document boundary
        plab[0, starts[1]:starts[1] + 4] = -100  # a prompt inside document 2
        pm.zero_grad(set_to_none=True)
        total_s, total_n, pieces = 0.0, 0, []
        for st, l in zip(starts, lens):
            lg = pm(input_ids=pids[:, st:st + l]).logits
            pieces.append(lg)
            s, n = ce_sum(lg, plab[:, st:st + l])
            total_s = total_s + s
            total_n += n
        ploss = total_s / total_n
        ploss.backward()
        plogits = torch.cat(pieces, dim=1).detach().float()
        with torch.no_grad():
            try:
                hf_packed = pm(input_ids=pids, position_ids=ppos).logits.float()
                meta["p.hf_packed_vs_per_document_max_abs"] = repr(float((hf_packed - plogits).abs().max()))
            except Exception as e:  # informational only
                meta["p.hf_packed_vs_per_document_max_abs"] = "error: " + repr(e)
        print("packed: transformers' own packed forward vs per-document:",
              meta["p.hf_packed_vs_per_document_max_abs"], flush=True)
        out["p.input_ids"], out["p.position_ids"], out["p.labels"] = pids, ppos, plab
        out["p.logits"] = plogits
        out["p.loss"] = ploss.detach().reshape(1)
        out.update(grads_dict("p", pm))

        # --- kaiming check for seeded A init.
        torch.manual_seed(1234)
        ka = torch.empty(LORA_R, spec["hidden_size"])
        torch.nn.init.kaiming_uniform_(ka, a=math.sqrt(5))
        out["init.kaiming_a"] = ka

        # --- 20 AdamW steps with accumulation 2, clipping and cosine warmup.
        steps = SCHED["num_training_steps"]
        tids = torch.randint(0, VOCAB, (steps * ACCUM, 2, 16), generator=gen_in)
        tlab = tids.clone()
        for i in range(steps * ACCUM):
            for r in range(2):
                k = int(torch.randint(0, 7, (1,), generator=gen_in))
                tlab[i, r, :k] = -100
        pm.train()  # dropout 0: identical to eval, as in a real Trainer run

        def step_grads(step):
            mids = range(step * ACCUM, (step + 1) * ACCUM)
            n_items = sum(int((tlab[i][:, 1:] != -100).sum()) for i in mids)
            micro, total = [], 0.0
            for i in mids:
                lg = pm(input_ids=tids[i]).logits
                s, _ = ce_sum(lg, tlab[i])
                (s / n_items).backward()
                micro.append(float(s) / n_items)
                total += float(s)
            return total / n_items, micro

        pm.zero_grad(set_to_none=True)
        step_grads(0)
        g0 = float(torch.nn.utils.clip_grad_norm_(params, float("inf")))
        max_grad_norm = float(f"{0.6 * g0:.3g}")
        pm.zero_grad(set_to_none=True)

        opt = torch.optim.AdamW(params, **OPT)
        sched = get_scheduler(SCHED["name"], optimizer=opt, num_warmup_steps=SCHED["num_warmup_steps"],
                              num_training_steps=steps)
        losses, micro_losses, norms, lrs = [], [], [], []
        for step in range(steps):
            l, micro = step_grads(step)
            norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(l)
            micro_losses += micro
            norms.append(norm)
        print("train loss", [round(x, 5) for x in losses], flush=True)
        print("grad norm", [round(x, 4) for x in norms], "max_grad_norm", max_grad_norm, flush=True)
        print("lr", lrs, flush=True)
        out["train.input_ids"], out["train.labels"] = tids, tlab
        out["train.loss"] = torch.tensor(losses, dtype=torch.float64)
        out["train.micro_loss"] = torch.tensor(micro_losses, dtype=torch.float64)
        out["train.grad_norm"] = torch.tensor(norms, dtype=torch.float64)
        out["train.lr"] = torch.tensor(lrs, dtype=torch.float64)
        for n, p in lora_params(pm):
            out[f"train.final.{n}"] = p.detach().clone().contiguous()

        meta.update({
            "model": name,
            "lora_r": str(LORA_R), "lora_alpha": str(LORA_ALPHA), "lora_dropout": "0.0",
            "target_modules": ",".join(TARGETS), "use_rslora": "false",
            "optimizer": "torch.optim.AdamW", "lr": repr(OPT["lr"]),
            "betas": f"{OPT['betas'][0]},{OPT['betas'][1]}", "eps": repr(OPT["eps"]),
            "weight_decay": repr(OPT["weight_decay"]),
            "lr_scheduler_type": SCHED["name"], "num_warmup_steps": str(SCHED["num_warmup_steps"]),
            "num_training_steps": str(steps), "gradient_accumulation_steps": str(ACCUM),
            "max_grad_norm": repr(max_grad_norm), "first_step_grad_norm": repr(g0),
            "loss_semantics": "micro CE_sum / num_items_in_batch of the whole step (transformers Trainer)",
            "attn_implementation": str(model.config._attn_implementation),
        })
        out = {k: v.contiguous() for k, v in out.items()}
        save_file(out, os.path.join(args.out, name + "_golden.safetensors"), metadata=meta)
        print(json.dumps(meta, indent=1), flush=True)

    for name in [n for n in args.bnb.split(",") if n]:
        save_bnb4(args.out, name)
    print("done", flush=True)


if __name__ == "__main__":
    sys.exit(main())
