"""Checks that the Python stack loads what ftune writes (adapter, merged model, scores).

Run on a host with torch + transformers + peft (the GPU hosts have them):
  python3 tests/gpu/peft_interop.py MODEL_DIR ADAPTER_DIR MERGED_DIR SCORE_JSON TOKENS_JSONL

MODEL_DIR   the base model ftune trained on (dense HF directory)
ADAPTER_DIR the PEFT adapter ftune wrote (`ftune-rank train`)
MERGED_DIR  `ftune-rank export --model MODEL_DIR --adapter ADAPTER_DIR --out MERGED_DIR`
SCORE_JSON  `ftune-rank score --model MODEL_DIR --adapter ADAPTER_DIR --tokens TOKENS_JSONL`
            (fp32, CPU)

1. PEFT loads the adapter (PeftModel.from_pretrained) and its per-token
   log-probabilities equal ftune's score output (fp32, CPU).
2. transformers loads the merged model (AutoModelForCausalLM) and it equals
   PEFT's own merge_and_unload() weight for weight, up to one bf16 rounding.
3. The merged model's logits equal base + adapter's to bf16 precision.
Prints one PASS/FAIL line per check with the figures; exits 1 on a failure.
"""
import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main():
    model_dir, adapter_dir, merged_dir, score_json, tokens_jsonl = sys.argv[1:6]
    torch.manual_seed(0)
    ok = True

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    score = json.load(open(score_json))
    sequences = [json.loads(l) for l in open(tokens_jsonl) if l.strip()]
    worst = 0.0
    with torch.no_grad():
        for seq, scored in zip(sequences, score["sequences"]):
            ids = seq["input_ids"] if isinstance(seq, dict) else seq
            x = torch.tensor([ids])
            logits = peft_model(input_ids=x).logits.float()
            logp = torch.log_softmax(logits, dim=-1)[0, :-1].gather(1, x[0, 1:, None])[:, 0]
            ours = torch.tensor([v if v is not None else float("nan") for v in scored["logprobs"]])
            worst = max(worst, (logp - ours).abs().max().item())
    passed = worst < 1e-4
    ok &= passed
    print(f"{'PASS' if passed else 'FAIL'} peft loads ftune's adapter: per-token log-prob "
          f"max |peft - ftune| = {worst:.3g} over {len(sequences)} sequences (fp32, CPU)")

    # PEFT's own merge in the checkpoint's dtype, against ftune's export.
    base_bf16 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    peft_merged = PeftModel.from_pretrained(base_bf16, adapter_dir).merge_and_unload()
    ours = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.bfloat16)
    ref_sd = peft_merged.state_dict()
    max_ulps = 0.0
    max_abs = 0.0
    for name, t in ours.state_dict().items():
        r = ref_sd[name]
        d = (t.float() - r.float()).abs()
        max_abs = max(max_abs, d.max().item())
        # One bf16 ulp at the reference's magnitude.
        ulp = torch.clamp(r.float().abs(), min=1e-30) * 2.0 ** -7
        max_ulps = max(max_ulps, (d / ulp).max().item())
    passed = max_ulps <= 1.0 + 1e-6
    ok &= passed
    print(f"{'PASS' if passed else 'FAIL'} transformers loads ftune's merged model; weights vs "
          f"peft merge_and_unload: max {max_abs:.3g} abs, {max_ulps:.2f} bf16 ulp")

    with torch.no_grad():
        x = torch.tensor([sequences[0]["input_ids"] if isinstance(sequences[0], dict)
                          else sequences[0]])
        a = ours.float()(input_ids=x).logits
        b = peft_model(input_ids=x).logits
        rel = ((a - b).abs().max() / b.abs().max()).item()
    passed = rel < 2e-2
    ok &= passed
    print(f"{'PASS' if passed else 'FAIL'} merged model logits vs base + adapter: max rel "
          f"{rel:.3g} (merged weights are rounded to bf16)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
