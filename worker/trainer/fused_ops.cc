// Autograd functions over the fused kernels; see fused_ops.h.
#include "worker/trainer/fused_ops.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "kernels/fused.h"
#include "worker/trainer/profiler.h"

#if FTUNE_FUSED_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/fused_cuda.h"
#endif

namespace ftune::trainer {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

void Check(const kernels::Status& s) { TORCH_CHECK(s.ok(), s.message()); }

uint16_t* Bits(const at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); }
const uint16_t* BitsOrNull(const at::Tensor& t) {
  return t.defined() ? reinterpret_cast<const uint16_t*>(t.data_ptr()) : nullptr;
}

#if FTUNE_FUSED_CUDA
cudaStream_t Stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}
#endif

void CheckOperand(const char* op, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16, op, ": needs bf16 tensors, got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), op, ": tensors on ", t.device(), " and ", like.device());
}

// One forward/backward of the norm on contiguous tensors; rows = numel / h.
void NormForward(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& w, double eps,
                 const at::Tensor& sum, const at::Tensor& y, const at::Tensor& rstd) {
  const int64_t h = x.size(-1), rows = x.numel() / h;
  const float e = static_cast<float>(eps);
  uint16_t* s = sum.defined() ? Bits(sum) : nullptr;
  if (x.is_cpu()) {
    Check(kernels::RmsNormForward(Bits(x), BitsOrNull(residual), Bits(w), rows, h, e, s, Bits(y),
                                  rstd.data_ptr<float>()));
    return;
  }
#if FTUNE_FUSED_CUDA
  c10::cuda::CUDAGuard guard(x.device());
  Check(kernels::RmsNormForwardCuda(Bits(x), BitsOrNull(residual), Bits(w), rows, h, e, s, Bits(y),
                                    rstd.data_ptr<float>(), Stream(x)));
#else
  TORCH_CHECK(false, "fused RMSNorm on ", x.device(), ": built without the CUDA kernels");
#endif
}

at::Tensor NormBackward(const at::Tensor& dy, const at::Tensor& s, const at::Tensor& w,
                        const at::Tensor& rstd, const at::Tensor& dres) {
  const int64_t h = s.size(-1), rows = s.numel() / h;
  at::Tensor ds = at::empty_like(s);
  if (s.is_cpu()) {
    Check(kernels::RmsNormBackward(Bits(dy), Bits(s), Bits(w), rstd.data_ptr<float>(),
                                   BitsOrNull(dres), rows, h, Bits(ds)));
    return ds;
  }
#if FTUNE_FUSED_CUDA
  c10::cuda::CUDAGuard guard(s.device());
  Check(kernels::RmsNormBackwardCuda(Bits(dy), Bits(s), Bits(w), rstd.data_ptr<float>(),
                                     BitsOrNull(dres), rows, h, Bits(ds), Stream(s)));
  return ds;
#else
  TORCH_CHECK(false, "fused RMSNorm on ", s.device(), ": built without the CUDA kernels");
#endif
}

// The norm's forward on x (and residual, when defined): {s, y} or {y}; saves
// what the backward needs.
variable_list NormForwardSaving(AutogradContext* ctx, const at::Tensor& x_in,
                                const at::Tensor& residual_in, const at::Tensor& w_in, double eps) {
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  const at::Tensor residual = residual_in.defined() ? residual_in.contiguous() : at::Tensor();
  TORCH_CHECK(w.numel() == x.size(-1), "fused RMSNorm: weight has ", w.numel(),
              " values for rows of ", x.size(-1));
  at::Tensor sum = residual.defined() ? at::empty_like(x) : at::Tensor();
  at::Tensor y = at::empty_like(x);
  at::Tensor rstd = at::empty({x.numel() / x.size(-1)}, x.options().dtype(at::kFloat));
  NormForward(x, residual, w, eps, sum, y, rstd);
  ctx->save_for_backward({residual.defined() ? sum : x, w, rstd});
  if (residual.defined()) return {sum, y};
  return {y};
}

// The gradient reaching the norm's input: through the norm from dy, plus
// dres (by the residual path) when defined.
at::Tensor NormBackwardSaved(AutogradContext* ctx, const at::Tensor& dy, const at::Tensor& dres) {
  const variable_list saved = ctx->get_saved_variables();
  const at::Tensor r = dres.defined() ? dres.contiguous() : at::Tensor();
  if (!dy.defined()) return r;
  return NormBackward(dy.contiguous(), saved[0], saved[1], saved[2], r);
}

struct RmsNormFunction : public torch::autograd::Function<RmsNormFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            double eps) {
    FTUNE_RANGE("ftune::rms_norm");
    return NormForwardSaving(ctx, x, at::Tensor(), w, eps)[0];
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    FTUNE_RANGE("ftune::rms_norm_backward");
    return {NormBackwardSaved(ctx, grads[0], at::Tensor()), at::Tensor(), at::Tensor()};
  }
};

// {s, y} with s = x + residual, y = RmsNorm(s).
struct AddRmsNormFunction : public torch::autograd::Function<AddRmsNormFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x,
                               const at::Tensor& residual, const at::Tensor& w, double eps) {
    FTUNE_RANGE("ftune::add_rms_norm");
    return NormForwardSaving(ctx, x, residual, w, eps);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    FTUNE_RANGE("ftune::add_rms_norm_backward");
    const at::Tensor ds = NormBackwardSaved(ctx, grads[1], grads[0]);
    return {ds, ds, at::Tensor(), at::Tensor()};
  }
};

struct SwigluFunction : public torch::autograd::Function<SwigluFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& g_in, const at::Tensor& u_in) {
    FTUNE_RANGE("ftune::swiglu");
    const at::Tensor g = g_in.contiguous(), u = u_in.contiguous();
    TORCH_CHECK(g.sizes() == u.sizes(), "fused SwiGLU: gate ", g.sizes(), " and up ", u.sizes());
    at::Tensor y = at::empty_like(g);
    if (g.is_cpu()) {
      Check(kernels::SwigluForward(Bits(g), Bits(u), g.numel(), Bits(y)));
    } else {
#if FTUNE_FUSED_CUDA
      c10::cuda::CUDAGuard guard(g.device());
      Check(kernels::SwigluForwardCuda(Bits(g), Bits(u), g.numel(), Bits(y), Stream(g)));
#else
      TORCH_CHECK(false, "fused SwiGLU on ", g.device(), ": built without the CUDA kernels");
#endif
    }
    ctx->save_for_backward({g, u});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    FTUNE_RANGE("ftune::swiglu_backward");
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& g = saved[0];
    const at::Tensor& u = saved[1];
    const at::Tensor dy = grads[0].contiguous();
    at::Tensor dg = at::empty_like(g), du = at::empty_like(u);
    if (g.is_cpu()) {
      Check(kernels::SwigluBackward(Bits(dy), Bits(g), Bits(u), g.numel(), Bits(dg), Bits(du)));
    } else {
#if FTUNE_FUSED_CUDA
      c10::cuda::CUDAGuard guard(g.device());
      Check(kernels::SwigluBackwardCuda(Bits(dy), Bits(g), Bits(u), g.numel(), Bits(dg), Bits(du),
                                        Stream(g)));
#endif
    }
    return {dg, du};
  }
};

at::Tensor RunRope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                   bool backward) {
  const int64_t hd = x.size(-1), heads = x.size(-2), tokens = x.numel() / (hd * heads);
  at::Tensor y = at::empty_like(x);
  if (x.is_cpu()) {
    Check(kernels::Rope(Bits(x), Bits(cos), Bits(sin), tokens, heads, hd, backward, Bits(y)));
    return y;
  }
#if FTUNE_FUSED_CUDA
  c10::cuda::CUDAGuard guard(x.device());
  Check(kernels::RopeCuda(Bits(x), Bits(cos), Bits(sin), tokens, heads, hd, backward, Bits(y),
                          Stream(x)));
  return y;
#else
  TORCH_CHECK(false, "fused RoPE on ", x.device(), ": built without the CUDA kernels");
#endif
}

struct RopeFunction : public torch::autograd::Function<RopeFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x_in, const at::Tensor& cos_in,
                            const at::Tensor& sin_in) {
    FTUNE_RANGE("ftune::rope");
    const at::Tensor x = x_in.contiguous();
    const at::Tensor cos = cos_in.contiguous(), sin = sin_in.contiguous();
    TORCH_CHECK(x.dim() == 4 && cos.dim() == 4 && cos.size(2) == 1 &&
                    cos.size(0) * cos.size(1) == x.size(0) * x.size(1) &&
                    cos.size(3) == x.size(3) && sin.sizes() == cos.sizes(),
                "fused RoPE: x ", x.sizes(), " with cos ", cos.sizes(), " and sin ", sin.sizes(),
                "; expected (b, s, heads, hd) with (b, s, 1, hd)");
    ctx->save_for_backward({cos, sin});
    return RunRope(x, cos, sin, /*backward=*/false);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    FTUNE_RANGE("ftune::rope_backward");
    const variable_list saved = ctx->get_saved_variables();
    return {RunRope(grads[0].contiguous(), saved[0], saved[1], /*backward=*/true), at::Tensor(),
            at::Tensor()};
  }
};

}  // namespace

bool FusedOpsApply(const at::Tensor& x) {
  if (x.scalar_type() != at::kBFloat16) return false;
  if (x.is_cpu()) return true;
#if FTUNE_FUSED_CUDA
  return x.is_cuda();
#else
  return false;
#endif
}

at::Tensor FusedRmsNorm(const at::Tensor& x, const at::Tensor& w, double eps) {
  CheckOperand("fused RMSNorm", x, x);
  CheckOperand("fused RMSNorm", w, x);
  TORCH_CHECK(!w.requires_grad(), "fused RMSNorm: the weight must be frozen");
  return RmsNormFunction::apply(x, w, eps);
}

std::pair<at::Tensor, at::Tensor> FusedAddRmsNorm(const at::Tensor& x, const at::Tensor& residual,
                                                  const at::Tensor& w, double eps) {
  CheckOperand("fused RMSNorm", x, x);
  CheckOperand("fused RMSNorm", residual, x);
  CheckOperand("fused RMSNorm", w, x);
  TORCH_CHECK(x.sizes() == residual.sizes(), "fused RMSNorm: x ", x.sizes(), " and residual ",
              residual.sizes());
  TORCH_CHECK(!w.requires_grad(), "fused RMSNorm: the weight must be frozen");
  variable_list out = AddRmsNormFunction::apply(x, residual, w, eps);
  return {out[0], out[1]};
}

at::Tensor FusedSwiglu(const at::Tensor& g, const at::Tensor& u) {
  CheckOperand("fused SwiGLU", g, g);
  CheckOperand("fused SwiGLU", u, g);
  return SwigluFunction::apply(g, u);
}

namespace {

void CheckPacked(const char* op, const at::Tensor& t, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.dim() == 2 && t.size(0) == rows &&
                  t.size(1) >= 2 * cols && t.stride(1) == 1,
              op, ": needs a 2-D bf16 tensor of ", rows, " rows of at least ", 2 * cols,
              " contiguous values; got ", t.scalar_type(), " ", t.sizes(), " strides ",
              t.strides());
}

}  // namespace

at::Tensor SwigluOfPacked(const at::Tensor& packed, int64_t cols) {
  CheckPacked("SwigluOfPacked", packed, packed.size(0), cols);
  at::Tensor y = at::empty({packed.size(0), cols}, packed.options());
  const kernels::SwigluRows r{packed.size(0), cols, packed.stride(0), cols, 0};
  const uint16_t* g = Bits(packed);
  if (packed.is_cpu()) {
    Check(kernels::SwigluForwardRows(g, g + cols, r, Bits(y)));
    return y;
  }
#if FTUNE_FUSED_CUDA
  c10::cuda::CUDAGuard guard(packed.device());
  Check(kernels::SwigluForwardRowsCuda(g, g + cols, r, Bits(y), Stream(packed)));
  return y;
#else
  TORCH_CHECK(false, "fused SwiGLU on ", packed.device(), ": built without the CUDA kernels");
#endif
}

void SwigluOfPackedBackward(const at::Tensor& dy_in, const at::Tensor& packed, int64_t cols,
                            const at::Tensor& grad) {
  const int64_t rows = packed.size(0);
  CheckPacked("SwigluOfPackedBackward", packed, rows, cols);
  CheckPacked("SwigluOfPackedBackward", grad, rows, cols);
  const at::Tensor dy = dy_in.reshape({rows, cols}).contiguous();
  CheckOperand("SwigluOfPackedBackward", dy, packed);
  const kernels::SwigluRows r{rows, cols, packed.stride(0), cols, grad.stride(0)};
  const uint16_t* g = Bits(packed);
  uint16_t* d = Bits(grad);
  if (packed.is_cpu()) {
    Check(kernels::SwigluBackwardRows(Bits(dy), g, g + cols, r, d, d + cols));
    return;
  }
#if FTUNE_FUSED_CUDA
  c10::cuda::CUDAGuard guard(packed.device());
  Check(kernels::SwigluBackwardRowsCuda(Bits(dy), g, g + cols, r, d, d + cols, Stream(packed)));
#else
  TORCH_CHECK(false, "fused SwiGLU on ", packed.device(), ": built without the CUDA kernels");
#endif
}

at::Tensor FusedRope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  CheckOperand("fused RoPE", x, x);
  CheckOperand("fused RoPE", cos, x);
  CheckOperand("fused RoPE", sin, x);
  return RopeFunction::apply(x, cos, sin);
}

at::Tensor FusedCrossEntropyRows(const at::Tensor& logits, const at::Tensor& targets,
                                 bool grad_in_place) {
  CheckOperand("fused cross-entropy", logits, logits);
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(),
              "fused cross-entropy: logits must be a contiguous (rows, vocab) tensor, got ",
              logits.sizes());
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.dim() == 1 &&
                  targets.size(0) == logits.size(0) && targets.device() == logits.device(),
              "fused cross-entropy: targets must be int64 (", logits.size(0), ") on ",
              logits.device(), ", got ", targets.scalar_type(), " ", targets.sizes(), " on ",
              targets.device());
  const at::Tensor t = targets.contiguous();
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  at::Tensor loss = at::empty({rows}, logits.options().dtype(at::kFloat));
  uint16_t* grad = grad_in_place ? Bits(logits) : nullptr;
  if (logits.is_cpu()) {
    Check(kernels::CrossEntropyRows(Bits(logits), t.data_ptr<int64_t>(), rows, vocab,
                                    loss.data_ptr<float>(), grad));
    return loss;
  }
#if FTUNE_FUSED_CUDA
  c10::cuda::CUDAGuard guard(logits.device());
  Check(kernels::CrossEntropyRowsCuda(Bits(logits), t.data_ptr<int64_t>(), rows, vocab,
                                      loss.data_ptr<float>(), grad, Stream(logits)));
  return loss;
#else
  TORCH_CHECK(false, "fused cross-entropy on ", logits.device(),
              ": built without the CUDA kernels");
#endif
}

}  // namespace ftune::trainer
