// FusedLoraProjections against each module's own LoraLinear::Forward: the
// outputs and the gradients of x, A and B, in bf16 on the CPU (NF4 bases),
// with the dequantized buffer kept for backward or rebuilt, and with a
// module that has no adapter. The CUDA path runs the same code on the GPU
// host (model_cuda_test compares the fused model with the unfused one).
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include <cstdio>
#include <memory>
#include <vector>

#include "worker/trainer/fused_projection.h"
#include "worker/trainer/lora.h"
#include "worker/trainer/nf4_linear.h"

namespace ftune::trainer {
namespace {

double RelL2(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor x = a.to(at::kDouble), y = b.to(at::kDouble);
  return ((x - y).norm() / y.norm().clamp_min(1e-30)).item<double>();
}

std::unique_ptr<LoraLinear> Module(int64_t out, int64_t in, int64_t r, double scaling, int seed) {
  at::manual_seed(seed);
  auto m = std::make_unique<LoraLinear>(Nf4Linear::Quantize(at::randn({out, in}) * 0.05, Nf4Options{}));
  if (r > 0) {
    LoraAdapter ad;
    ad.a = at::randn({r, in}) * 0.1;
    ad.b = at::randn({out, r}) * 0.1;  // nonzero, so B's path shows
    ad.scaling = scaling;
    m->Attach(std::move(ad));
  }
  return m;
}

struct Result {
  std::vector<at::Tensor> outputs;
  std::vector<at::Tensor> grads;  // x, then each adapter's A and B
};

Result Project(const std::vector<const LoraLinear*>& mods, const at::Tensor& x_in, bool fused) {
  at::Tensor x = x_in.detach().clone().set_requires_grad(true);
  std::vector<at::Tensor> outs;
  if (fused) {
    outs = FusedLoraProjections(mods, x, /*training=*/true);
  } else {
    for (const LoraLinear* m : mods) outs.push_back(m->Forward(x, /*training=*/true));
  }
  std::vector<at::Tensor> inputs = {x};
  for (const LoraLinear* m : mods) {
    if (!m->has_adapter()) continue;
    inputs.push_back(m->adapter().a);
    inputs.push_back(m->adapter().b);
  }
  // A loss that weighs every output differently.
  at::Tensor loss = at::zeros({}, at::kFloat);
  for (size_t i = 0; i < outs.size(); ++i) {
    at::manual_seed(100 + i);
    loss = loss + (outs[i].to(at::kFloat) * at::randn(outs[i].sizes())).sum();
  }
  Result r;
  r.outputs = outs;
  r.grads = torch::autograd::grad({loss}, inputs);
  return r;
}

void Compare(const Result& fused, const Result& plain) {
  ASSERT_EQ(fused.outputs.size(), plain.outputs.size());
  for (size_t i = 0; i < fused.outputs.size(); ++i) {
    EXPECT_EQ(fused.outputs[i].sizes(), plain.outputs[i].sizes());
    EXPECT_EQ(fused.outputs[i].scalar_type(), at::kBFloat16);
    const double rel = RelL2(fused.outputs[i], plain.outputs[i]);
    std::printf("FUSED-PROJ output %zu l2-rel %.3g\n", i, rel);
    EXPECT_LT(rel, 1e-2) << "output " << i;
  }
  ASSERT_EQ(fused.grads.size(), plain.grads.size());
  for (size_t i = 0; i < fused.grads.size(); ++i) {
    EXPECT_EQ(fused.grads[i].scalar_type(), plain.grads[i].scalar_type()) << i;
    const double rel = RelL2(fused.grads[i], plain.grads[i]);
    std::printf("FUSED-PROJ grad %zu l2-rel %.3g\n", i, rel);
    EXPECT_LT(rel, 2e-2) << "grad " << i;
  }
}

TEST(FusedProjectionTest, QkvShapesMatchSeparateModules) {
  auto q = Module(64, 48, 4, 2.0, 1), k = Module(16, 48, 4, 2.0, 2), v = Module(16, 48, 8, 0.5, 3);
  const std::vector<const LoraLinear*> mods = {q.get(), k.get(), v.get()};
  at::manual_seed(7);
  const at::Tensor x = at::randn({2, 5, 48}).to(at::kBFloat16);
  ASSERT_TRUE(FusedProjectionsApply(mods, x, true));
  const Result fused = Project(mods, x, true), plain = Project(mods, x, false);
  Compare(fused, plain);
  // x's gradient sums six paths (one GEMM here, six products and their adds
  // there), so it differs by bf16 roundings, within Compare's 2e-2; the
  // adapters' paths are of the base's size here (B is not zero), so one
  // left out would be off by tens of percent.
  // The buffer kept for backward (a checkpointed layer's recompute).
  KeepDequantizedWeights keep;
  Compare(Project(mods, x, true), Project(mods, x, false));
}

TEST(FusedProjectionTest, AModuleWithoutAnAdapter) {
  auto g = Module(32, 24, 0, 0.0, 4), u = Module(32, 24, 2, 1.0, 5);
  const std::vector<const LoraLinear*> mods = {g.get(), u.get()};
  const at::Tensor x = at::randn({7, 24}).to(at::kBFloat16);
  Compare(Project(mods, x, true), Project(mods, x, false));
}

TEST(FusedProjectionTest, AppliesOnlyWhereItComputesTheSame) {
  auto a = Module(8, 16, 2, 1.0, 6), b = Module(8, 16, 2, 1.0, 7), c = Module(8, 12, 2, 1.0, 8);
  const at::Tensor x = at::randn({3, 16}).to(at::kBFloat16);
  EXPECT_TRUE(FusedProjectionsApply({a.get(), b.get()}, x, true));
  EXPECT_FALSE(FusedProjectionsApply({a.get(), b.get()}, x.to(at::kFloat), true));  // fp32
  EXPECT_FALSE(FusedProjectionsApply({a.get(), c.get()}, x, true));  // other input size
  a->mutable_adapter().dropout = 0.1;
  EXPECT_FALSE(FusedProjectionsApply({a.get(), b.get()}, x, true));  // dropout while training
  EXPECT_TRUE(FusedProjectionsApply({a.get(), b.get()}, x, false));
  a->mutable_adapter().dropout = 0.0;
  a->set_fp32_compute(true);
  EXPECT_FALSE(FusedProjectionsApply({a.get(), b.get()}, x, true));
  // A dense base is not fused.
  LoraLinear dense(std::make_unique<DenseLinear>(at::randn({8, 16}).to(at::kBFloat16)));
  EXPECT_FALSE(FusedProjectionsApply({&dense, b.get()}, x, true));
  EXPECT_THROW(FusedLoraProjections({&dense, b.get()}, x, true), c10::Error);
}

}  // namespace
}  // namespace ftune::trainer
