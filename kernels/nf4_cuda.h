// CUDA launchers for NF4 quantization, bit-identical to the CPU reference in
// nf4.h (same per-element arithmetic, kernels/nf4_math.h; same summation
// order for the double quantization's mean).
//
// All pointers are device pointers. Every function only enqueues work on
// `stream` and returns at once: a returned error names the CUDA call or
// kernel launch that failed; errors raised while a kernel runs surface at the
// caller's next synchronization. Functions hold no state and may be called
// from any thread; calls on one stream run in order, which the scratch use
// documented below relies on.
#ifndef FTUNE_KERNELS_NF4_CUDA_H_
#define FTUNE_KERNELS_NF4_CUDA_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/nf4.h"

namespace ftune::kernels {

// x: n values (fp32, or bf16 as uint16 bits); packed: Nf4PackedBytes(n)
// bytes; absmax: Nf4NumBlocks(n, blocksize) floats.
Status QuantizeNf4Cuda(const float* x, int64_t n, int64_t blocksize, uint8_t* packed,
                       float* absmax, cudaStream_t stream);
Status QuantizeNf4Bf16Cuda(const uint16_t* x, int64_t n, int64_t blocksize, uint8_t* packed,
                           float* absmax, cudaStream_t stream);

// Double quantization of num_blocks absmax values into qabsmax (num_blocks
// codes), absmax2 (Nf4NumNestedBlocks(num_blocks) floats) and *offset (one
// float). absmax2 also serves as scratch for the mean's per-CTA partial sums
// before it receives its final values, so no allocation happens here.
Status DoubleQuantizeAbsmaxCuda(const float* absmax, int64_t num_blocks, uint8_t* qabsmax,
                                float* absmax2, float* offset, cudaStream_t stream,
                                const TorchReduceDevice& device = {});
// absmax[i] = code8[qabsmax[i]] * absmax2[i / 256] + *offset (two roundings).
Status DequantizeAbsmaxCuda(const uint8_t* qabsmax, const float* absmax2, const float* offset,
                            int64_t num_blocks, float* absmax, cudaStream_t stream);

// NF4 -> fp32 / bf16 with fp32 absmax per block.
Status DequantizeNf4Cuda(const uint8_t* packed, const float* absmax, int64_t n,
                         int64_t blocksize, float* out, cudaStream_t stream);
Status DequantizeNf4Bf16Cuda(const uint8_t* packed, const float* absmax, int64_t n,
                             int64_t blocksize, uint16_t* out, cudaStream_t stream);
// NF4 -> bf16 straight from double-quantized statistics: the absmax of each
// block is rebuilt on the fly with the same two roundings as
// DequantizeAbsmaxCuda, so the result equals DequantizeAbsmaxCuda followed by
// DequantizeNf4Bf16Cuda without the intermediate buffer.
Status DequantizeNf4Bf16NestedCuda(const uint8_t* packed, const uint8_t* qabsmax,
                                   const float* absmax2, const float* offset, int64_t n,
                                   int64_t blocksize, uint16_t* out, cudaStream_t stream);

}  // namespace ftune::kernels

#endif  // FTUNE_KERNELS_NF4_CUDA_H_
