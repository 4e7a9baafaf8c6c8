// CUDA launchers of the fused decoder-layer kernels; the contract of each is
// that of the CPU reference of the same name in fused.h (bf16 bit patterns,
// row-major, same roundings; RMSNorm's row sums may add in another order).
// All pointers are device pointers; every function only enqueues work on
// `stream` and returns at once (errors while a kernel runs surface at the
// caller's next synchronization). Stateless and thread-safe.
#ifndef FTUNE_KERNELS_FUSED_CUDA_H_
#define FTUNE_KERNELS_FUSED_CUDA_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/fused.h"

namespace ftune::kernels {

Status RmsNormForwardCuda(const uint16_t* x, const uint16_t* residual, const uint16_t* w,
                          int64_t rows, int64_t h, float eps, uint16_t* sum, uint16_t* y,
                          float* rstd, cudaStream_t stream);
Status RmsNormBackwardCuda(const uint16_t* dy, const uint16_t* s, const uint16_t* w,
                           const float* rstd, const uint16_t* dres, int64_t rows, int64_t h,
                           uint16_t* ds, cudaStream_t stream);
Status SwigluForwardCuda(const uint16_t* g, const uint16_t* u, int64_t n, uint16_t* y,
                         cudaStream_t stream);
Status SwigluBackwardCuda(const uint16_t* dy, const uint16_t* g, const uint16_t* u, int64_t n,
                          uint16_t* dg, uint16_t* du, cudaStream_t stream);
Status SwigluForwardRowsCuda(const uint16_t* g, const uint16_t* u, const SwigluRows& shape,
                             uint16_t* y, cudaStream_t stream);
Status SwigluBackwardRowsCuda(const uint16_t* dy, const uint16_t* g, const uint16_t* u,
                              const SwigluRows& shape, uint16_t* dg, uint16_t* du,
                              cudaStream_t stream);
Status RopeCuda(const uint16_t* x, const uint16_t* cos, const uint16_t* sin, int64_t tokens,
                int64_t heads, int64_t hd, bool backward, uint16_t* y, cudaStream_t stream);

// One CTA per row: the row's max, then its sum of exps, then (with grad)
// the gradient over it; grad may be logits. A target outside [0, vocab)
// cannot be refused on the device: its row's loss is NaN (callers check
// targets first).
Status CrossEntropyRowsCuda(const uint16_t* logits, const int64_t* targets, int64_t rows,
                            int64_t vocab, float* loss, uint16_t* grad, cudaStream_t stream);

}  // namespace ftune::kernels

#endif  // FTUNE_KERNELS_FUSED_CUDA_H_
