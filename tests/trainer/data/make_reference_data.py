#!/usr/bin/env python3
"""Makes the reference data the trainer's unit tests compare against.

Run where torch, transformers and safetensors are installed (the GPU hosts
have them in their Python stack), from the repository root:

    python3 tests/trainer/data/make_reference_data.py OUT_DIR

and copy OUT_DIR/* into tests/trainer/data/. It writes:

rope_golden.json
    RoPE inverse frequencies as transformers computes them on CPU (the
    `inv_freq` buffer of LlamaRotaryEmbedding), as fp32 bit patterns, for the
    Llama 3.1 8B, Llama 2 7B and a few small configs (linear scaling, llama3
    scaling on a tiny model, a 96-dim head).
reference_written.safetensors
    A file written by `safetensors.torch.save_file` with one tensor of each
    common dtype (values from torch.arange, see TENSORS) and metadata, to
    check that ftune reads it and writes the same bytes.
reference_verdicts.json
    For every file of tests/fuzz/corpus/safetensors, whether the reference
    implementation (`safetensors.safe_open`, the Rust crate underneath)
    accepts its header, and its error otherwise.
"""
import json
import os
import struct
import sys

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
DATA = os.path.join(ROOT, "tests", "trainer", "data")
CORPUS = os.path.join(ROOT, "tests", "fuzz", "corpus", "safetensors")

# name -> (torch dtype, shape); values: arange(numel) in float64, then
# (x - numel/2) / 4 cast to the dtype (bool: odd elements True).
TENSORS = {
    "f32": (torch.float32, [2, 3]),
    "bf16": (torch.bfloat16, [3, 4]),
    "f16": (torch.float16, [5]),
    "f64": (torch.float64, [2]),
    "i64": (torch.int64, [3]),
    "i32": (torch.int32, [2, 2]),
    "i16": (torch.int16, [3]),
    "i8": (torch.int8, [4]),
    "u8": (torch.uint8, [3]),
    "bool": (torch.bool, [5]),
    "f8_e4m3": (torch.float8_e4m3fn, [4]),
    "f8_e5m2": (torch.float8_e5m2, [4]),
    "scalar": (torch.float32, []),
    "empty": (torch.float32, [0, 3]),
}


def tensor_values(dtype, shape):
    n = 1
    for d in shape:
        n *= d
    x = torch.arange(n, dtype=torch.float64)
    if dtype == torch.bool:
        return (x.remainder(2) == 1).reshape(shape)
    if dtype in (torch.uint8,):
        return x.to(dtype).reshape(shape)
    return ((x - n / 2) / 4).to(dtype).reshape(shape)


def f32_bits(t):
    return [struct.unpack("<I", struct.pack("<f", float(v)))[0] for v in t.tolist()]


def rope_golden():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    def load(name):
        with open(os.path.join(DATA, name)) as f:
            return json.load(f)

    tiny = {"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
            "max_position_embeddings": 512}
    cases = {
        "llama3_1_8b": load("llama3_1_8b_instruct_config.json"),
        "llama3_1_8b_rope_parameters": load("llama3_1_8b_rope_parameters_config.json"),
        "llama2_7b": load("llama2_7b_config.json"),
        "llama2_7b_linear4": dict(load("llama2_7b_config.json"),
                                  rope_scaling={"type": "linear", "factor": 4.0}),
        "tiny_llama3": dict(tiny, rope_theta=10000.0,
                            rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 64}),
        "head96_theta1e6": dict(tiny, hidden_size=768, num_attention_heads=8,
                                num_key_value_heads=8, rope_theta=1e6),
    }
    out = {}
    for name, cfg in cases.items():
        try:
            config = LlamaConfig(**cfg)
        except Exception as e:  # e.g. rope_parameters unknown to this version
            out[name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        emb = LlamaRotaryEmbedding(config=config, device="cpu")
        inv = emb.inv_freq.to("cpu")
        assert inv.dtype == torch.float32, inv.dtype
        out[name] = {"config": cfg, "inv_freq_f32_bits": f32_bits(inv)}
    return out


def write_reference_file(path):
    from safetensors.torch import save_file
    tensors = {name: tensor_values(dt, shape) for name, (dt, shape) in TENSORS.items()}
    save_file(tensors, path, metadata={"format": "pt"})


def verdicts():
    from safetensors import safe_open
    out = {}
    for name in sorted(os.listdir(CORPUS)):
        path = os.path.join(CORPUS, name)
        # "ok" is the header verdict (safe_open parses and validates the
        # whole header); materializing tensors in torch is reported apart,
        # since torch adds limits of its own (e.g. F4 needs an even last dim).
        try:
            with safe_open(path, framework="pt") as f:
                keys = list(f.keys())
                f.metadata()
                verdict = {"ok": True, "tensors": len(keys)}
                try:
                    for k in keys:
                        f.get_tensor(k)
                except Exception as e:
                    verdict["load_error"] = f"{type(e).__name__}: {e}"
            out[name] = verdict
        except Exception as e:
            out[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    return out


def main():
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)
    import safetensors
    import transformers
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "safetensors": safetensors.__version__}
    print(versions)
    golden = {"versions": versions, "cases": rope_golden()}
    with open(os.path.join(out_dir, "rope_golden.json"), "w") as f:
        json.dump(golden, f, indent=1)
        f.write("\n")
    write_reference_file(os.path.join(out_dir, "reference_written.safetensors"))
    with open(os.path.join(out_dir, "reference_verdicts.json"), "w") as f:
        json.dump({"versions": versions, "files": verdicts()}, f, indent=1)
        f.write("\n")
    for name, case in golden["cases"].items():
        print(name, "error" in case and case["error"] or len(case["inv_freq_f32_bits"]))


if __name__ == "__main__":
    main()
