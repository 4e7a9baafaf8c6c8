#!/usr/bin/env python3
"""NF4 golden data for ftune's kernels, made by bitsandbytes' CUDA kernels.

Run on a GPU host with bitsandbytes importable (the tests read the committed
output; nothing here runs in CI):

    python3 tests/golden/nf4/make_golden.py --out tests/golden/nf4

Each nf4_caseN.safetensors holds one bf16 weight `weight` and what
bitsandbytes makes of it with NF4, blocksize 64 (see README.md beside this
file for the tensors). The weights are seeded, so a rerun with the same
bitsandbytes writes the same tensors (the header's metadata order may
differ); the script prints a SHA-256 of each file's tensor data.

    python3 tests/golden/nf4/make_golden.py --check tests/golden/nf4

re-quantizes the stored weights and compares every stored tensor instead.
"""
import argparse
import hashlib
import json
import os

import torch
import bitsandbytes as bnb
import bitsandbytes.functional as F
from safetensors.torch import save_file

BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256  # bitsandbytes quantizes the absmax in blocks of 256


def make_weight(case, gen):
    """The cases' weights: each one exercises an edge of the format."""
    if case == 0:  # one 64x64 matrix: 64 whole blocks, one nested block
        w = torch.randn(64, 64, generator=gen) * 0.02
    elif case == 1:  # an all-zero block (absmax 0) among normal ones
        w = torch.randn(128, 320, generator=gen) * 0.05
        w.view(-1)[64 * 7:64 * 8] = 0
    elif case == 3:  # rows of 130: blocks cross rows; 34 nested blocks
        w = torch.randn(4160, 130, generator=gen)
        w[::97] *= 40  # outlier rows: a wide spread of absmax values
    elif case == 4:  # 672 elements: a partial last block of 32
        w = torch.randn(7, 96, generator=gen) * 3
    else:
        raise ValueError(case)
    return w.to(torch.bfloat16)


def quantize(weight, double_quant):
    packed, state = F.quantize_4bit(weight, blocksize=BLOCKSIZE,
                                    compress_statistics=double_quant,
                                    quant_type="nf4")
    return packed, state


def golden_case(case, seed):
    gen = torch.Generator().manual_seed(seed + case)
    weight = make_weight(case, gen)
    w = weight.cuda()

    packed, state = quantize(w, True)
    packed_plain, state_plain = quantize(w, False)
    # The fp32 copy of the weight must give the very same bytes.
    packed32, state32 = quantize(w.float(), True)
    assert torch.equal(packed32, packed), "fp32 and bf16 inputs gave different codes"
    assert torch.equal(state32.absmax, state.absmax)
    # bitsandbytes dequantizes to the weight's dtype (bf16); stored widened
    # to fp32.
    dequantized = F.dequantize_4bit(packed, state).float()

    tensors = {
        "weight": weight.contiguous(),
        "packed": packed.cpu().contiguous(),
        "absmax": state.absmax.cpu().contiguous(),
        "nested_absmax": state.state2.absmax.float().cpu().contiguous(),
        "nested_quant_map": state.state2.code.float().cpu().contiguous(),
        "offset": state.offset.float().reshape(1).cpu(),
        "quant_map": state.code.float().cpu().contiguous(),
        "dequantized": dequantized.cpu().contiguous(),
        "packed_plain": packed_plain.cpu().contiguous(),
        "absmax_plain": state_plain.absmax.float().cpu().contiguous(),
    }
    metadata = {
        "shape": json.dumps(list(weight.shape)),
        "blocksize": str(BLOCKSIZE),
        "nested_blocksize": str(NESTED_BLOCKSIZE),
        "seed": str(seed + case),
        "source": "bitsandbytes %s quantize_4bit nf4, CUDA kernels, "
                  "compress_statistics=True" % bnb.__version__,
    }
    return tensors, metadata


def check_dir(directory):
    """Re-quantizes the weights of existing golden files and compares every
    stored tensor: the same bitsandbytes must give the same bytes."""
    from safetensors.torch import load_file
    bad = 0
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".safetensors"):
            continue
        stored = load_file(os.path.join(directory, name))
        w = stored["weight"].cuda()
        packed, state = quantize(w, True)
        packed_plain, state_plain = quantize(w, False)
        got = {"packed": packed, "absmax": state.absmax,
               "nested_absmax": state.state2.absmax.float(),
               "offset": state.offset.float().reshape(1),
               "packed_plain": packed_plain,
               "absmax_plain": state_plain.absmax.float()}
        for key, value in got.items():
            same = torch.equal(value.cpu().reshape(-1), stored[key].reshape(-1))
            bad += not same
            print("check %s %s: %s" % (name, key, "same" if same else "DIFFERENT"))
    return bad


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--seed", type=int, default=20261207)
    parser.add_argument("--check", help="compare against the golden files in this directory instead")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("make_golden.py: needs a CUDA device (bitsandbytes' CUDA kernels are the reference)")
    if args.check:
        raise SystemExit(1 if check_dir(args.check) else 0)
    os.makedirs(args.out, exist_ok=True)
    for case in (0, 1, 3, 4):
        tensors, metadata = golden_case(case, args.seed)
        path = os.path.join(args.out, "nf4_case%d.safetensors" % case)
        save_file(tensors, path, metadata=metadata)
        digest = hashlib.sha256()
        for key in sorted(tensors):
            digest.update(tensors[key].contiguous().view(torch.uint8).numpy().tobytes())
        digest = digest.hexdigest()
        print("%s %s %s" % (path, metadata["shape"], digest))


if __name__ == "__main__":
    main()
