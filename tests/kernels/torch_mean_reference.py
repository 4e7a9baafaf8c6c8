#!/usr/bin/env python3
"""Reference data for nf4_cuda_test's TorchMeanEmulationMatchesTorchOnThisDevice.

bitsandbytes' double quantization takes `offset = absmax.mean()` on the GPU,
so ftune's offset is only bit-exact if it adds the fp32 values in the order
torch's CUDA reduction does (kernels/nf4_cpu.cc, TorchMeanF32). This script
records torch's answer for fp32 vectors of many lengths (both sides of every
threshold in Reduce.cuh's launch configuration) and value distributions, in
the format the test reads: per record int64 n, float32 mean, float32[n] data,
little-endian.

Run it on the GPU host whose SM count the test will emulate:
    python3 tests/kernels/torch_mean_reference.py /tmp/torch_mean.bin
    FTUNE_TORCH_MEAN_REFERENCE=/tmp/torch_mean.bin nf4_cuda_test

--max-n N writes only the records with n <= N (the data of every record is
still drawn, so the records written are the same as in the full file). The
unit test's tests/kernels/testdata/torch_mean_h200.bin was made on an H200
(132 SMs) with torch 2.11.0+cu130 by:
    python3 tests/kernels/torch_mean_reference.py --max-n 2049 \
        tests/kernels/testdata/torch_mean_h200.bin
"""
import struct
import sys

import torch

# Around 128 (scalar vs 4-wide loads), 512-thread blocks, 16 and 256 values
# per thread (warp and CTA splits), the golden cases and the 70B MLP weight.
SIZES = [1, 2, 3, 5, 11, 63, 64, 100, 127, 128, 129, 130, 131, 255, 256, 257,
         511, 512, 1000, 2047, 2048, 2049, 8191, 8192, 8193, 8450, 16385,
         65536, 131071, 131072, 131073, 262147, 1000003, 3670016, 4194309]


def make(kind, n, gen):
    if kind == "uniform":  # arbitrary fp32 absmax-like values
        return torch.rand(n, generator=gen) * 0.19 + 0.01
    if kind == "bf16_absmax":  # what bf16 weights give: bf16-representable
        return (torch.randn(n, generator=gen).abs() * 0.05 + 0.01).bfloat16().float()
    if kind == "wide":  # mixed magnitudes, both signs: order shows most
        return torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * 3)
    raise ValueError(kind)


def main():
    args = sys.argv[1:]
    max_n = None
    if len(args) == 3 and args[0] == "--max-n":
        max_n = int(args[1])
        args = args[2:]
    if len(args) != 1:
        sys.exit(__doc__)
    gen = torch.Generator().manual_seed(1234)
    records = 0
    with open(args[0], "wb") as f:
        for n in SIZES:
            kinds = ["uniform", "bf16_absmax", "wide"] if n <= 1000003 else ["uniform", "wide"]
            for kind in kinds:
                x = make(kind, n, gen).float().contiguous()
                if max_n is not None and n > max_n:
                    continue
                mean = x.cuda().mean().item()  # fp32 result, exact as a Python float
                f.write(struct.pack("<qf", n, mean))
                f.write(x.numpy().astype("<f4").tobytes())
                records += 1
    print(f"wrote {records} torch.mean records on {torch.cuda.get_device_name()} "
          f"({torch.cuda.get_device_properties(0).multi_processor_count} SMs), torch {torch.__version__}")


if __name__ == "__main__":
    main()
