// The fused ops (worker/trainer/fused_ops.h) against the LibTorch op chains
// they replace, forward and backward through autograd, in bf16 on the CPU
// (where they run the kernels' CPU references; the CUDA kernels are checked
// against those references by fused_cuda_test, and the fused model against
// the unfused one by model_cuda_test).
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include <cstdio>
#include <string>

#include "worker/trainer/fused_ops.h"

namespace ftune::trainer {
namespace {

at::Tensor RandomBf16(at::IntArrayRef shape, double scale, bool grad = true) {
  return (at::randn(shape) * scale).to(at::kBFloat16).set_requires_grad(grad);
}

// Share of elements that differ, and the largest difference in bf16 steps
// relative to the reference's magnitude.
struct Agreement {
  double differ_share;
  double max_rel;
};
Agreement Agree(const at::Tensor& got, const at::Tensor& want) {
  const at::Tensor g = got.to(at::kFloat), w = want.to(at::kFloat);
  const double differ = (g != w).to(at::kFloat).mean().item<double>();
  const double max_rel = ((g - w).abs() / (w.abs() + 1e-3)).max().item<double>();
  return {differ, max_rel};
}

// The chains as model.cc writes them.
at::Tensor ChainRmsNorm(const at::Tensor& x, const at::Tensor& w, double eps) {
  at::Tensor xf = x.to(at::kFloat);
  xf = xf * at::rsqrt(xf.pow(2).mean({-1}, true) + eps);
  return w * xf.to(x.scalar_type());
}
// silu(g) * u as a bf16 model computes it on CUDA: each op in fp32, its
// result rounded to bf16. (LibTorch's CPU bf16 kernels round inside silu
// too, so they are not the reference here.)
at::Tensor ChainSwiglu(const at::Tensor& g, const at::Tensor& u) {
  const at::Tensor s = at::silu(g.to(at::kFloat)).to(at::kBFloat16);
  return (s.to(at::kFloat) * u.to(at::kFloat)).to(at::kBFloat16);
}
at::Tensor ChainRope(const at::Tensor& x, const at::Tensor& c, const at::Tensor& s) {
  const int64_t half = x.size(-1) / 2;
  return x * c + at::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1) * s;
}

at::Tensor Grad(const at::Tensor& y, const at::Tensor& dy, const at::Tensor& x) {
  return torch::autograd::grad({y}, {x}, {dy}, /*retain_graph=*/true)[0];
}

TEST(FusedOpsTest, AppliesToBf16Only) {
  EXPECT_TRUE(FusedOpsApply(at::zeros({2}, at::kBFloat16)));
  EXPECT_FALSE(FusedOpsApply(at::zeros({2}, at::kFloat)));
}

TEST(FusedOpsTest, RopeEqualsTheChainBitForBit) {
  at::manual_seed(1);
  const at::Tensor x = RandomBf16({2, 17, 4, 64}, 1.0);
  const at::Tensor ang = at::arange(17 * 64, at::kFloat).view({1, 17, 1, 64}).expand({2, 17, 1, 64}) * 0.01;
  const at::Tensor c = ang.cos().to(at::kBFloat16).contiguous(), s = ang.sin().to(at::kBFloat16).contiguous();
  const at::Tensor dy = RandomBf16({2, 17, 4, 64}, 1.0, false);
  const at::Tensor want = ChainRope(x, c, s), got = FusedRope(x, c, s);
  EXPECT_TRUE(at::equal(got, want));
  EXPECT_TRUE(at::equal(Grad(got, dy, x), Grad(want, dy, x)));
}

TEST(FusedOpsTest, SwigluAgreesWithTheChain) {
  at::manual_seed(2);
  const at::Tensor g = RandomBf16({3, 33, 96}, 3.0), u = RandomBf16({3, 33, 96}, 1.0);
  const at::Tensor dy = RandomBf16({3, 33, 96}, 0.1, false);
  const at::Tensor want = ChainSwiglu(g, u), got = FusedSwiglu(g, u);
  // LibTorch's CPU exp may differ in its last fp32 bit: allow a bf16 step
  // on a few values.
  for (const auto& [name, a] :
       {std::pair{"y", Agree(got, want)},
        {"dg", Agree(Grad(got, dy, g), Grad(want, dy, g))},
        {"du", Agree(Grad(got, dy, u), Grad(want, dy, u))}}) {
    std::printf("FUSED swiglu %s: %.4f differ, max rel %.3g\n", name, a.differ_share, a.max_rel);
    EXPECT_LT(a.differ_share, 0.02) << name;
    EXPECT_LT(a.max_rel, 1.6e-2) << name;
  }
  // A wrong derivative (e.g. silu's own value for its slope) is far off.
  EXPECT_GT(Agree(Grad(got, dy, g), dy * u).max_rel, 0.1);
}

TEST(FusedOpsTest, AddRmsNormAgreesWithTheChain) {
  at::manual_seed(3);
  const double eps = 1e-5;
  const at::Tensor x = RandomBf16({2, 9, 256}, 1.0), r = RandomBf16({2, 9, 256}, 0.5);
  const at::Tensor w = RandomBf16({256}, 0.3, /*grad=*/false) + 1.0;
  const at::Tensor dy = RandomBf16({2, 9, 256}, 0.01, false), ds = RandomBf16({2, 9, 256}, 0.01, false);
  // Chain: s = x + r; y = norm(s); loss sees both s (residual path) and y.
  const at::Tensor s_want = x + r, y_want = ChainRmsNorm(s_want, w, eps);
  auto [s_got, y_got] = FusedAddRmsNorm(x, r, w, eps);
  EXPECT_TRUE(at::equal(s_got, s_want));
  const Agreement fy = Agree(y_got, y_want);
  std::printf("FUSED rmsnorm y: %.4f differ, max rel %.3g\n", fy.differ_share, fy.max_rel);
  EXPECT_LT(fy.differ_share, 0.02);
  EXPECT_LT(fy.max_rel, 1.6e-2);
  auto grads = [&](const at::Tensor& s, const at::Tensor& y) {
    return torch::autograd::grad({s, y}, {x, r}, {ds, dy}, /*retain_graph=*/true);
  };
  const auto want = grads(s_want, y_want), got = grads(s_got, y_got);
  for (int i = 0; i < 2; ++i) {
    const Agreement a = Agree(got[i], want[i]);
    std::printf("FUSED rmsnorm d%s: %.4f differ, max rel %.3g\n", i == 0 ? "x" : "residual",
                a.differ_share, a.max_rel);
    EXPECT_LT(a.differ_share, 0.05);
    // Relative to |grad| + 1e-3; gradients here are ~1e-2.
    EXPECT_LT(a.max_rel, 5e-2);
  }
  // Without the residual path the gradient is the norm's alone.
  const at::Tensor y1 = FusedRmsNorm(x, w, eps), y1_want = ChainRmsNorm(x, w, eps);
  const Agreement a = Agree(Grad(y1, dy, x), Grad(y1_want, dy, x));
  EXPECT_LT(a.differ_share, 0.05);
  EXPECT_LT(a.max_rel, 5e-2);
}

// The loss rows against loss.cc's fp32 chain on bf16 logits: the cast,
// logsumexp, lse - logit[target], and exp(x - lse) - onehot cast to bf16.
TEST(FusedOpsTest, CrossEntropyRowsAgreeWithTheChain) {
  at::manual_seed(5);
  for (int64_t vocab : {int64_t{1000}, int64_t{4096}}) {
    SCOPED_TRACE(vocab);
    const at::Tensor logits = RandomBf16({6, vocab}, 3.0, /*grad=*/false);
    const at::Tensor targets = at::randint(0, vocab, {6}, at::kLong);
    const at::Tensor xf = logits.to(at::kFloat);
    const at::Tensor lse = at::logsumexp(xf, {-1}, /*keepdim=*/true);
    const at::Tensor want_loss = (lse - xf.gather(1, targets.unsqueeze(1))).squeeze(1);
    at::Tensor p = (xf - lse).exp();
    p.scatter_add_(1, targets.unsqueeze(1), at::full({6, 1}, -1.0));
    const at::Tensor want_grad = p.to(at::kBFloat16);

    const at::Tensor kept = logits.clone();
    const at::Tensor loss_only = FusedCrossEntropyRows(kept, targets, /*grad_in_place=*/false);
    EXPECT_TRUE(at::equal(kept, logits)) << "the logits changed without grad_in_place";
    at::Tensor work = logits.clone();
    const at::Tensor loss = FusedCrossEntropyRows(work, targets, /*grad_in_place=*/true);
    EXPECT_TRUE(at::equal(loss, loss_only));
    EXPECT_LT((loss - want_loss).abs().max().item<double>(), 1e-5 * want_loss.abs().max().item<double>());
    const Agreement a = Agree(work, want_grad);
    std::printf("FUSED cross-entropy vocab %lld: %.4f of gradients differ, max rel %.3g\n",
                static_cast<long long>(vocab), a.differ_share, a.max_rel);
    EXPECT_LT(a.differ_share, 0.01);
    EXPECT_LT(a.max_rel, 1.6e-2);
    // A gradient without the target's -1 is far off at the targets.
    EXPECT_GT(Agree(work, (xf - lse).exp().to(at::kBFloat16)).max_rel, 0.5);
  }
  // Targets outside the vocabulary are refused by name on the CPU.
  at::Tensor logits = at::zeros({2, 10}, at::kBFloat16);
  try {
    FusedCrossEntropyRows(logits, at::full({2}, 10, at::kLong), true);
    FAIL() << "a target past the vocabulary was accepted";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("target 10 of row 0 is outside [0, 10)"), std::string::npos)
        << e.what();
  }
}

TEST(FusedOpsTest, RefusesWhatItDoesNotHandle) {
  const at::Tensor x = at::zeros({2, 8}, at::kFloat);
  EXPECT_THROW(FusedRmsNorm(x, at::ones({8}), 1e-5), c10::Error);
  const at::Tensor xb = at::zeros({2, 8}, at::kBFloat16);
  EXPECT_THROW(FusedRmsNorm(xb, at::ones({8}, at::kBFloat16).set_requires_grad(true), 1e-5),
               c10::Error);
  EXPECT_THROW(FusedRmsNorm(xb, at::ones({7}, at::kBFloat16), 1e-5), c10::Error);
}

}  // namespace
}  // namespace ftune::trainer
