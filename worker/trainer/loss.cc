// Chunked lm_head cross-entropy; see loss.h for why and how.
#include "worker/trainer/loss.h"
#include "worker/trainer/fused_ops.h"
#include "worker/trainer/profiler.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>

namespace ftune::trainer {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

void CheckInputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                 int64_t chunk_tokens) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "cross-entropy: hidden (tokens, hidden) ", hidden.sizes(),
              " does not fit lm_head weight (vocab, hidden) ", weight.sizes());
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0),
              "cross-entropy: targets ", targets.sizes(), " for hidden ", hidden.sizes());
  TORCH_CHECK(targets.scalar_type() == at::kLong, "cross-entropy: targets must be int64, got ",
              targets.scalar_type());
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), "cross-entropy: hidden dtype ",
              hidden.scalar_type(), " differs from lm_head's ", weight.scalar_type());
  TORCH_CHECK(chunk_tokens >= 1, "cross-entropy: chunk_tokens (", chunk_tokens, ") must be >= 1");
}

// fp32 logits of rows [begin, end): (rows, vocab).
at::Tensor ChunkLogits(const at::Tensor& hidden, const at::Tensor& weight, int64_t begin,
                       int64_t end) {
  return at::linear(hidden.slice(0, begin, end), weight).to(at::kFloat);
}

struct ChunkedCrossEntropy : public torch::autograd::Function<ChunkedCrossEntropy> {
  // eager_grad: only hidden needs a gradient (lm_head frozen, the LoRA
  // case). The forward then also computes d sum / d hidden chunk by chunk
  // from the logits it has, and backward only scales it: two lm_head GEMMs
  // per chunk instead of three, no logits recomputed.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& hidden,
                            const at::Tensor& weight, const at::Tensor& targets,
                            int64_t chunk_tokens, bool eager_grad, bool fused) {
    ctx->saved_data["chunk"] = chunk_tokens;
    ctx->saved_data["eager"] = eager_grad;
    const int64_t n = hidden.size(0);
    at::Tensor total = at::zeros({}, hidden.options().dtype(at::kFloat));
    at::Tensor grad_h = eager_grad ? at::empty_like(hidden) : at::Tensor();  // (n, hidden)
    for (int64_t b = 0; b < n; b += chunk_tokens) {
      const int64_t e = std::min(n, b + chunk_tokens);
      if (fused) {
        // bf16 logits; the kernel writes each row's loss and overwrites
        // the logits with their gradient.
        at::Tensor logits = at::linear(hidden.slice(0, b, e), weight);  // (rows, vocab)
        total.add_(FusedCrossEntropyRows(logits, targets.slice(0, b, e), /*grad_in_place=*/true)
                       .sum());
        grad_h.slice(0, b, e).copy_(at::matmul(logits, weight));
        continue;
      }
      const at::Tensor t = targets.slice(0, b, e).unsqueeze(1);             // (rows, 1)
      at::Tensor logits = ChunkLogits(hidden, weight, b, e);                // (rows, vocab)
      at::Tensor lse = at::logsumexp(logits, {-1}, /*keepdim=*/true);       // (rows, 1)
      total.add_((lse - logits.gather(1, t)).sum());
      if (!eager_grad) continue;
      // softmax - onehot, in place of the logits; cast to the compute dtype
      // before it meets W, as autograd does for `logits.float()`.
      at::Tensor p = logits.sub_(lse).exp_();
      p.scatter_add_(1, t, at::full({e - b, 1}, -1.0, p.options()));
      grad_h.slice(0, b, e).copy_(at::matmul(p.to(hidden.scalar_type()), weight));
    }
    if (eager_grad) {
      ctx->saved_data["grad_h"] = grad_h;
    } else {
      ctx->save_for_backward({hidden, weight, targets});
    }
    return total;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    if (ctx->saved_data["eager"].toBool()) {
      at::Tensor grad_h = ctx->saved_data["grad_h"].toTensor();
      ctx->saved_data.erase("grad_h");
      const at::Tensor g = grad_outputs[0].to(at::kFloat);  // () d loss / d sum
      return {grad_h.mul(g).to(grad_h.scalar_type()), at::Tensor(), at::Tensor(), at::Tensor(),
              at::Tensor(), at::Tensor()};
    }
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& hidden = saved[0];
    const at::Tensor& weight = saved[1];
    const at::Tensor& targets = saved[2];
    const int64_t chunk_tokens = ctx->saved_data["chunk"].toInt();
    const at::Tensor g = grad_outputs[0].to(at::kFloat);  // () d loss / d sum
    const int64_t n = hidden.size(0);
    const bool need_h = ctx->needs_input_grad(0);
    const bool need_w = ctx->needs_input_grad(1);
    at::Tensor grad_h = need_h ? at::empty_like(hidden) : at::Tensor();
    at::Tensor grad_w = need_w ? at::zeros_like(weight, weight.options().dtype(at::kFloat))
                               : at::Tensor();
    for (int64_t b = 0; b < n; b += chunk_tokens) {
      const int64_t e = std::min(n, b + chunk_tokens);
      at::Tensor p = at::softmax(ChunkLogits(hidden, weight, b, e), -1);  // (rows, vocab)
      p.scatter_add_(1, targets.slice(0, b, e).unsqueeze(1),
                     at::full({e - b, 1}, -1.0, p.options()));
      p.mul_(g);
      at::Tensor gl = p.to(hidden.scalar_type());  // d loss / d logits in the compute dtype
      if (need_h) grad_h.slice(0, b, e).copy_(at::matmul(gl, weight));  // (rows, hidden)
      if (need_w) grad_w.add_(at::matmul(gl.t(), hidden.slice(0, b, e)).to(at::kFloat));
    }
    if (need_w) grad_w = grad_w.to(weight.scalar_type());
    return {grad_h, grad_w, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor ChunkedCrossEntropySum(const at::Tensor& hidden, const at::Tensor& weight,
                                  const at::Tensor& targets, int64_t chunk_tokens, bool fused) {
  FTUNE_RANGE("ftune::loss");
  CheckInputs(hidden, weight, targets, chunk_tokens);
  const bool eager_grad =
      at::GradMode::is_enabled() && hidden.requires_grad() && !weight.requires_grad();
  // The fused kernel computes the gradient with the loss: only on the eager
  // path, for bf16 on a device the kernels run on.
  fused = fused && eager_grad && FusedOpsApply(hidden);
  return ChunkedCrossEntropy::apply(hidden, weight, targets, chunk_tokens, eager_grad, fused);
}

at::Tensor ChunkedTargetLogProbs(const at::Tensor& hidden, const at::Tensor& weight,
                                 const at::Tensor& targets, int64_t chunk_tokens) {
  CheckInputs(hidden, weight, targets, chunk_tokens);
  c10::NoGradGuard no_grad;
  const int64_t n = hidden.size(0);
  at::Tensor out = at::empty({n}, hidden.options().dtype(at::kFloat));
  for (int64_t b = 0; b < n; b += chunk_tokens) {
    const int64_t e = std::min(n, b + chunk_tokens);
    at::Tensor logits = ChunkLogits(hidden, weight, b, e);  // (rows, vocab)
    at::Tensor tgt = logits.gather(1, targets.slice(0, b, e).unsqueeze(1)).squeeze(1);
    out.slice(0, b, e).copy_(tgt - at::logsumexp(logits, {-1}));
  }
  return out;
}

}  // namespace ftune::trainer
