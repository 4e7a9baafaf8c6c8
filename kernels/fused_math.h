// Per-element arithmetic of the fused decoder-layer kernels (fused.h),
// shared by the CPU reference and the CUDA kernels.
//
// Each function reproduces the roundings of the LibTorch op chain it
// replaces in a bf16 model (every bf16 tensor op computes in fp32 and
// rounds its result to bf16 once), so a fused kernel gives what the chain
// gives, up to the order of a row's fp32 sum (RMSNorm) and the last bit of
// exp (SwiGLU). Values are bf16 bit patterns (uint16_t).
#ifndef FTUNE_KERNELS_FUSED_MATH_H_
#define FTUNE_KERNELS_FUSED_MATH_H_

#include <cmath>
#include <cstdint>

#include "kernels/nf4_math.h"

namespace ftune::kernels::math {

FTUNE_HD float Bf(float x) { return Bf16ToFloat(FloatToBf16(x)); }  // round to bf16

// fp32 exp: the same libm-accuracy expf on both sides (no fast-math).
FTUNE_HD float ExpF(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return std::exp(x);
#endif
}

// 1 / sqrt(x), correctly rounded on both sides (rsqrtf is approximate).
FTUNE_HD float RsqrtRn(float x) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(1.0f, __fsqrt_rn(x));
#else
  return 1.0f / std::sqrt(x);
#endif
}

// ---------------------------------------------------------------- RoPE
// HF's `x * cos + rotate_half(x) * sin` over one head of `hd` values, where
// rotate_half(x) = cat(-x2, x1): element i < hd/2 pairs with i + hd/2.
FTUNE_HD float RopeForward(float x, float partner, float c, float s, bool first_half) {
  const float rot = first_half ? -partner : partner;
  return Bf(AddRn(Bf(MulRn(x, c)), Bf(MulRn(rot, s))));
}
// Its gradient: dy * cos plus rotate_half's transpose of (dy * sin), where
// the partner's (dy * sin) is rounded on its own before the sum.
FTUNE_HD float RopeBackward(float dy, float dy_partner, float c, float s_partner,
                            bool first_half) {
  const float r = Bf(MulRn(dy_partner, s_partner));
  return Bf(AddRn(Bf(MulRn(dy, c)), first_half ? r : -r));
}

// -------------------------------------------------------------- SwiGLU
// torch's silu in fp32: x / (1 + exp(-x)).
FTUNE_HD float SiluF(float x) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(x, AddRn(1.0f, ExpF(-x)));
#else
  return x / (1.0f + ExpF(-x));
#endif
}
// y = silu(g) * u with silu(g) rounded to bf16 first (two tensor ops).
FTUNE_HD float SwigluForward(float g, float u) { return Bf(MulRn(Bf(SiluF(g)), u)); }
// Gradients of that chain: d(silu) = dy * u (rounded), du = dy * silu(g),
// dg = silu's backward in fp32: d * sig * (1 + g * (1 - sig)).
FTUNE_HD void SwigluBackward(float dy, float g, float u, float* dg, float* du) {
  const float silu = Bf(SiluF(g));
  *du = Bf(MulRn(dy, silu));
  const float ds = Bf(MulRn(dy, u));
#if defined(__CUDA_ARCH__)
  const float sig = __fdiv_rn(1.0f, AddRn(1.0f, ExpF(-g)));
#else
  const float sig = 1.0f / (1.0f + ExpF(-g));
#endif
  *dg = Bf(MulRn(MulRn(ds, sig), AddRn(1.0f, MulRn(g, SubRn(1.0f, sig)))));
}

// ------------------------------------------------------------- RMSNorm
// transformers' LlamaRMSNorm over a row whose mean square is known:
// n = bf16(x * rstd), y = bf16(w * n).
FTUNE_HD float RmsNormOutput(float x, float rstd, float w) {
  return Bf(MulRn(w, Bf(MulRn(x, rstd))));
}
// rstd of a row from its fp32 sum of squares: 1 / sqrt(sum / h + eps).
FTUNE_HD float RmsNormRstd(float sum_squares, int64_t h, float eps) {
  const float mean = MulRn(sum_squares, 1.0f / static_cast<float>(h));
  return RsqrtRn(AddRn(mean, eps));
}
// One element's gradient with a frozen weight: dn = bf16(dy * w) as the
// chain's cast gives it, then through x * rstd and the mean square:
// dx = dn * rstd - x * rstd^3 * dot / h, dot = sum(dn * x) over the row.
FTUNE_HD float RmsNormGradIn(float dy, float w) { return Bf(MulRn(dy, w)); }
FTUNE_HD float RmsNormBackward(float dn, float x, float rstd, float coef) {
  // coef = rstd^3 * dot / h, one per row.
  return SubRn(MulRn(dn, rstd), MulRn(x, coef));
}

// ------------------------------------------------------- cross-entropy
// fp32 log: the libm-accuracy logf on both sides.
FTUNE_HD float LogF(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  return std::log(x);
#endif
}
// The shift LibTorch's logsumexp takes out of a row before the exps: its
// max, or 0 when that is infinite.
FTUNE_HD float CrossEntropyShift(float row_max) {
#if defined(__CUDA_ARCH__)
  return isinf(row_max) ? 0.0f : row_max;
#else
  return std::isinf(row_max) ? 0.0f : row_max;
#endif
}
// logsumexp of a row from its shift and sum of exp(x - shift).
FTUNE_HD float CrossEntropyLse(float shift, float sum_exp) { return AddRn(LogF(sum_exp), shift); }
// d (lse - x_target) / d x: softmax, less 1 at the target, in fp32 (the
// caller rounds it to bf16 as the chain's cast before lm_head does).
FTUNE_HD float CrossEntropyGrad(float x, float lse, bool target) {
  const float p = ExpF(SubRn(x, lse));
  return target ? AddRn(p, -1.0f) : p;
}

}  // namespace ftune::kernels::math

#endif  // FTUNE_KERNELS_FUSED_MATH_H_
