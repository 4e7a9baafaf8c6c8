// Causal-LM cross-entropy over lm_head, chunked over tokens.
//
// The full (tokens x vocab) fp32 logits of a long packed sequence with
// Llama 3's 128256-entry vocabulary are gigabytes (8192 tokens: 4.2 GB), more
// than the rest of a QLoRA step. ChunkedCrossEntropySum therefore computes
// lm_head + log-softmax + NLL for `chunk_tokens` rows at a time and keeps
// none of the logits: it is a custom autograd function. When only the
// hidden states need a gradient (lm_head frozen, as in LoRA training), the
// forward turns each chunk's logits into the chunk's gradient (softmax -
// onehot) times lm_head right away and keeps that (tokens x hidden) result
// for backward, which only scales it: two lm_head GEMMs per chunk. When
// lm_head needs a gradient too, backward recomputes each chunk's logits.
// Peak extra memory is chunk_tokens x vocab fp32.
//
// Numerics follow transformers' loss: logits in the compute dtype (h W^T),
// upcast to fp32, log-softmax and NLL in fp32; the gradient w.r.t. the logits
// is cast back to the compute dtype before it meets W, as autograd does for
// `logits.float()`.
//
// Thread-safety: pure functions of their inputs.
#ifndef FTUNE_WORKER_TRAINER_LOSS_H_
#define FTUNE_WORKER_TRAINER_LOSS_H_

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace ftune::trainer {

inline constexpr int64_t kIgnoreIndex = -100;

// hidden (tokens, hidden) in the compute dtype, weight (vocab, hidden) same
// dtype, targets (tokens) int64 in [0, vocab) (ignored tokens removed by the
// caller). Returns the fp32 scalar sum over tokens of -log p(target);
// differentiable w.r.t. hidden (and weight if it requires grad).
// With `fused` (bf16 hidden, lm_head frozen, fused_ops.h's
// FusedOpsApply), each chunk's log-softmax and gradient are one kernel over
// its bf16 logits (FusedCrossEntropyRows) instead of the fp32 chain: the
// same math up to the order of the row sums.
at::Tensor ChunkedCrossEntropySum(const at::Tensor& hidden, const at::Tensor& weight,
                                  const at::Tensor& targets, int64_t chunk_tokens,
                                  bool fused = false);

// log p(target) per token, (tokens) fp32, without autograd: for scoring.
at::Tensor ChunkedTargetLogProbs(const at::Tensor& hidden, const at::Tensor& weight,
                                 const at::Tensor& targets, int64_t chunk_tokens);

}  // namespace ftune::trainer

#endif  // FTUNE_WORKER_TRAINER_LOSS_H_
