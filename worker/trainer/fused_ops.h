// Differentiable fused ops of the decoder layer over the kernels of
// kernels/fused.h: RMSNorm (optionally with the residual add before it),
// SwiGLU and RoPE; and the loss's cross-entropy rows. Each gives what the LibTorch op chain it replaces gives
// in bf16 (same roundings, up to the order of RMSNorm's row sums), reading
// and writing each activation once instead of once per op, and saving
// less for backward (RMSNorm keeps its bf16 input and one fp32 per row,
// not fp32 copies of the row).
//
// bf16 only, on CUDA (the kernels) or the CPU (their references, for
// tests); the norm weight must not require a gradient. `FusedOpsApply`
// says whether a tensor qualifies; the model uses the unfused chain
// otherwise, so fp32 and the parity tests against transformers are
// untouched.
#ifndef FTUNE_WORKER_TRAINER_FUSED_OPS_H_
#define FTUNE_WORKER_TRAINER_FUSED_OPS_H_

#include <ATen/core/Tensor.h>

#include <utility>

namespace ftune::trainer {

// True when x is bf16 and on a device the fused kernels run on (CUDA in a
// build with the kernels, or the CPU).
bool FusedOpsApply(const at::Tensor& x);

// transformers' LlamaRMSNorm over the last dimension: w * bf16(x * rstd).
at::Tensor FusedRmsNorm(const at::Tensor& x, const at::Tensor& w, double eps);
// (s, RmsNorm(s)) with s = x + residual: the residual add and the norm
// after it in one pass; gradients of both outputs flow to x and residual.
std::pair<at::Tensor, at::Tensor> FusedAddRmsNorm(const at::Tensor& x, const at::Tensor& residual,
                                                  const at::Tensor& w, double eps);
// silu(g) * u.
at::Tensor FusedSwiglu(const at::Tensor& g, const at::Tensor& u);
// silu(gate) * up where gate and up are the column ranges [0, cols) and
// [cols, 2 cols) of the 2-D bf16 `packed` (a fused gate/up GEMM's output;
// its rows may be wider): a new (rows, cols) tensor, with no copy of gate
// or up. Not differentiable; the fused projection's autograd function
// (fused_projection.h) calls it and the backward below.
at::Tensor SwigluOfPacked(const at::Tensor& packed, int64_t cols);
// The gradients of gate and up for dy (rows, cols), written into the same
// column ranges of the 2-D bf16 `grad` (rows as wide as it is).
void SwigluOfPackedBackward(const at::Tensor& dy, const at::Tensor& packed, int64_t cols,
                            const at::Tensor& grad);
// x * cos + rotate_half(x) * sin for x of shape (batch, seq, heads, head_dim)
// and cos/sin of shape (batch, seq, 1, head_dim) (no gradient).
at::Tensor FusedRope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

// The cross-entropy of each row of the 2-D contiguous bf16 `logits`
// (rows, vocab) against `targets` (rows) int64 in [0, vocab) (not checked
// on CUDA; a row with a target outside gets a NaN loss): returns the fp32
// per-row lse - logit[target] (rows), as LibTorch computes it on the
// logits cast to fp32, and with `grad_in_place` overwrites the logits with
// bf16(softmax - onehot), the rows' gradient that meets lm_head. One kernel
// instead of the fp32 chain's casts, logsumexp, subtract and exp. Not
// differentiable (the loss's autograd function calls it).
at::Tensor FusedCrossEntropyRows(const at::Tensor& logits, const at::Tensor& targets,
                                 bool grad_in_place);

}  // namespace ftune::trainer

#endif  // FTUNE_WORKER_TRAINER_FUSED_OPS_H_
