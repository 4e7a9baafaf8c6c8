// Fused kernels for bf16 training: RMSNorm (with the residual add before
// it), SwiGLU and RoPE, forward and backward, and the loss's cross-entropy
// with its gradient. Each replaces a
// chain of LibTorch tensor ops (which read and write the whole activation
// once per op) by one pass, with the chain's roundings (fused_math.h).
//
// These are the CPU references; fused_cuda.h has the same functions on the
// device. Values are bf16 bit patterns (uint16_t), row-major. The norm
// weight is frozen (QLoRA trains only adapters), so no weight gradient.
// Functions are pure and thread-safe; a returned Status names a bad
// argument.
#ifndef FTUNE_KERNELS_FUSED_H_
#define FTUNE_KERNELS_FUSED_H_

#include <cstdint>

#include "kernels/nf4.h"  // Status

namespace ftune::kernels {

// RMSNorm of `rows` rows of `h` values with weight w (h values):
//   s = x + residual (rounded to bf16; written to `sum`) when residual is
//   not null, else s = x (sum may be null);
//   rstd[r] = 1 / sqrt(mean(s^2) + eps) in fp32; y = bf16(w * bf16(s * rstd)).
Status RmsNormForward(const uint16_t* x, const uint16_t* residual, const uint16_t* w,
                      int64_t rows, int64_t h, float eps, uint16_t* sum, uint16_t* y,
                      float* rstd);
// Gradient of RmsNormForward's y with respect to s (and so to x and the
// residual alike), given dy, the normed input s, w and the forward's rstd;
// plus dres (the gradient reaching s by other paths, may be null), summed
// in bf16 as autograd accumulates it.
Status RmsNormBackward(const uint16_t* dy, const uint16_t* s, const uint16_t* w,
                       const float* rstd, const uint16_t* dres, int64_t rows, int64_t h,
                       uint16_t* ds);

// y = silu(g) * u over n values, and its gradients.
Status SwigluForward(const uint16_t* g, const uint16_t* u, int64_t n, uint16_t* y);
Status SwigluBackward(const uint16_t* dy, const uint16_t* g, const uint16_t* u, int64_t n,
                      uint16_t* dg, uint16_t* du);

// The same over `rows` rows of `cols` values where each operand has a row
// stride (in values): g and u may be column ranges of one wider buffer (a
// fused gate/up GEMM's output, row stride `ld_gu`) and dg/du may be written
// into column ranges of another (`ld_d`), so no operand needs a copy.
struct SwigluRows {
  int64_t rows = 0, cols = 0;
  int64_t ld_gu = 0;  // row stride of g and u
  int64_t ld_y = 0;   // row stride of y (forward) or dy (backward)
  int64_t ld_d = 0;   // row stride of dg and du (backward)
};
Status SwigluForwardRows(const uint16_t* g, const uint16_t* u, const SwigluRows& shape,
                         uint16_t* y);
Status SwigluBackwardRows(const uint16_t* dy, const uint16_t* g, const uint16_t* u,
                          const SwigluRows& shape, uint16_t* dg, uint16_t* du);

// RoPE on x of shape (tokens, heads, hd) with cos/sin of shape (tokens, hd):
// y = x * cos + rotate_half(x) * sin. With backward = true, x is the
// output's gradient and y the input's. hd must be even.
Status Rope(const uint16_t* x, const uint16_t* cos, const uint16_t* sin, int64_t tokens,
            int64_t heads, int64_t hd, bool backward, uint16_t* y);

// Cross-entropy of `rows` rows of `vocab` bf16 logits against targets in
// [0, vocab), as LibTorch computes it on the logits cast to fp32:
//   lse = log(sum exp(x - m)) + m (m the row's max, 0 if infinite),
//   loss[r] = lse - x[target];
// and, when grad is not null, grad = bf16(exp(x - lse) - [i == target]),
// the gradient of the row's loss that meets lm_head. grad may be logits
// itself (overwritten in place).
Status CrossEntropyRows(const uint16_t* logits, const int64_t* targets, int64_t rows,
                        int64_t vocab, float* loss, uint16_t* grad);

// Argument checks shared by both sides; `name` prefixes the message.
Status CheckRmsNormArgs(const char* name, int64_t rows, int64_t h, float eps);
Status CheckRopeArgs(const char* name, int64_t tokens, int64_t heads, int64_t hd);
// Strides at least `cols` (ld_d only when `backward`), no negative sizes.
Status CheckSwigluRows(const char* name, const SwigluRows& shape, bool backward);
Status CheckCrossEntropyArgs(const char* name, int64_t rows, int64_t vocab);

}  // namespace ftune::kernels

#endif  // FTUNE_KERNELS_FUSED_H_
