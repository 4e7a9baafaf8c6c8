#!/usr/bin/env python3
"""Golden greedy-decoding data for `ftune-rank generate`.

Loads the committed tiny models of tests/golden/model (llama2_tiny,
llama3_tiny, each alone and with its PEFT adapter) with transformers and peft,
float32 on the CPU with eager attention, and records what
`model.generate(input_ids, do_sample=False, max_new_tokens=N)` returns for a
few prompts of token ids. The C++ test (tests/trainer/generate_golden_test.cc)
runs ftune's prefill + KV-cache decode on the same files and must produce the
same ids.

Cases per model variant:
  p<k>           a prompt of random ids (seeded), generation stopping only at
                 max_new_tokens (eos_token_id=None), so every step is compared;
  p<k>.eos       the same prompt with eos_token_id set to the token the
                 unconstrained run produced at step 5 (counted from 0), so
                 the run must stop right after it, as transformers does (the
                 stop token is the last generated id).
Beside the JSON (ids), <out>.safetensors holds `case<i>.logits`: the logits
transformers computed (with its own KV cache) at every generated position,
(steps, vocab) fp32, which the test compares with ftune's cached forward at
1e-4 (the Llama-3-like tiny model, with tied embeddings, keeps repeating a
token greedily, so its ids alone test little).
For every step the gap between the largest and second largest logit is
recorded (`min_margin`): a greedy choice is only meaningful to compare where
that gap is far above float32 rounding. Prompts whose gap falls under
MIN_MARGIN anywhere are not used (the script draws the next one) and the
README says how many were skipped.

Run on a host with transformers + peft (the GPU hosts have them; the GPU
itself is not used):
  python3 tests/golden/generate/make_golden.py \
      --models tests/golden/model --out tests/golden/generate/golden_generate.json
"""
import argparse
import json
import platform
import sys

import torch

import peft
import transformers
from peft import PeftModel
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

MODELS = ["llama2_tiny", "llama3_tiny"]
PROMPT_LENGTHS = [1, 5, 17]
MAX_NEW_TOKENS = 24
MIN_MARGIN = 1e-3
EOS_STEP = 5


def load(models_dir, name, with_adapter):
    model = LlamaForCausalLM.from_pretrained(f"{models_dir}/{name}", dtype=torch.float32,
                                             attn_implementation="eager")
    if with_adapter:
        model = PeftModel.from_pretrained(model, f"{models_dir}/{name}_adapter")
    return model.eval()


def greedy(model, prompt, eos_token_id):
    ids = torch.tensor([prompt], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos_token_id,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True,
                             use_cache=True, temperature=None, top_p=None, top_k=None)
    new_ids = out.sequences[0, len(prompt):].tolist()
    logits = torch.stack([s[0].float() for s in out.logits]).contiguous()  # (steps, vocab)
    top = torch.topk(logits, 2, dim=-1).values
    margins = (top[:, 0] - top[:, 1]).tolist()
    return new_ids, margins, logits


def no_cache_check(model, prompt, new_ids):
    """The same ids from full forwards without a cache (argmax of the last
    position each time): the reference does not depend on the cache either."""
    ids = list(prompt)
    for want in new_ids:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
        got = int(torch.argmax(logits))
        if got != want:
            return False
        ids.append(got)
    return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tests/golden/model")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=20261207)
    args = ap.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(args.seed)
    cases = []
    tensors = {}  # per case: the logits of every generated position, (steps, vocab) fp32
    skipped = 0
    for name in MODELS:
        vocab = json.load(open(f"{args.models}/{name}/config.json"))["vocab_size"]
        for with_adapter in (False, True):
            model = load(args.models, name, with_adapter)
            variant = name + ("+adapter" if with_adapter else "")
            for k, length in enumerate(PROMPT_LENGTHS):
                for attempt in range(100):
                    # ids 3.. : not bos (1) / eos (2) / 0.
                    prompt = torch.randint(3, vocab, (length,), generator=gen).tolist()
                    new_ids, margins, logits = greedy(model, prompt, eos_token_id=None)
                    if len(new_ids) == MAX_NEW_TOKENS and min(margins) >= MIN_MARGIN:
                        break
                    skipped += 1
                else:
                    sys.exit(f"{variant}: no prompt of length {length} with margins >= {MIN_MARGIN}")
                assert no_cache_check(model, prompt, new_ids), (variant, prompt)
                tensors[f"case{len(cases)}.logits"] = logits
                cases.append({"logits": f"case{len(cases)}.logits", "name": f"{variant}/p{k}",
                              "model": name, "adapter": with_adapter,
                              "prompt": prompt, "max_new_tokens": MAX_NEW_TOKENS,
                              "eos_token_id": None, "new_ids": new_ids,
                              "min_margin": min(margins)})
                eos = new_ids[EOS_STEP]
                eos_ids, eos_margins, eos_logits = greedy(model, prompt, eos_token_id=eos)
                # It stops at the first occurrence of that id, which may be
                # earlier than EOS_STEP when the id also occurs before it.
                first = new_ids.index(eos)
                assert eos_ids == new_ids[:first + 1], (variant, eos_ids, new_ids)
                tensors[f"case{len(cases)}.logits"] = eos_logits
                cases.append({"logits": f"case{len(cases)}.logits", "name": f"{variant}/p{k}.eos",
                              "model": name,
                              "adapter": with_adapter, "prompt": prompt,
                              "max_new_tokens": MAX_NEW_TOKENS, "eos_token_id": eos,
                              "new_ids": eos_ids, "min_margin": min(eos_margins)})
                print(f"{variant} p{k} len {length}: {len(new_ids)} new ids, "
                      f"min margin {min(margins):.4g}, eos {eos} stops after {len(eos_ids)}",
                      flush=True)
    doc = {
        "generator": "tests/golden/generate/make_golden.py",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__},
        "settings": {"dtype": "float32", "device": "cpu", "attn_implementation": "eager",
                     "do_sample": False, "seed": args.seed, "min_margin": MIN_MARGIN,
                     "prompts_skipped_for_margin": skipped},
        "cases": cases,
    }
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    logits_path = args.out[:-len(".json")] + ".safetensors"
    save_file(tensors, logits_path, metadata={"generator": doc["generator"],
                                              "versions": json.dumps(doc["versions"])})
    print(f"wrote {len(cases)} cases to {args.out} ({skipped} prompts skipped)", file=sys.stderr)


if __name__ == "__main__":
    main()
