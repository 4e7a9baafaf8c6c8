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

#include "worker/trainer/fused_ops.h"
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

// Qwen2's q/k/v carry a frozen bias, added before the adapter.
TEST(FusedProjectionTest, BiasesAsTheModulesAddThem) {
  auto q = Module(32, 24, 4, 2.0, 9), k = Module(8, 24, 4, 2.0, 10), v = Module(8, 24, 4, 2.0, 11);
  for (auto* m : {q.get(), k.get(), v.get()}) {
    m->set_bias((at::randn({m->out_features()}) * 3.0).to(at::kBFloat16));
  }
  const std::vector<const LoraLinear*> mods = {q.get(), k.get(), v.get()};
  const at::Tensor x = at::randn({2, 3, 24}).to(at::kBFloat16);
  ASSERT_TRUE(FusedProjectionsApply(mods, x, true));
  Compare(Project(mods, x, true), Project(mods, x, false));
  // A bias of another dtype than the input's is left to the modules.
  v->set_bias(at::zeros({8}));
  EXPECT_FALSE(FusedProjectionsApply(mods, x, true));
}

// The packed SwiGLU reads gate and up where one GEMM wrote them, and its
// backward writes their gradients there: the same bits as the kernel on
// separate copies.
TEST(FusedProjectionTest, PackedSwigluIsTheSwigluOfItsColumns) {
  at::manual_seed(12);
  const int64_t rows = 5, cols = 24, width = 2 * cols + 6;  // 6 more columns, as A's rows
  const at::Tensor packed = at::randn({rows, width}).to(at::kBFloat16);
  const at::Tensor g = packed.narrow(1, 0, cols).contiguous();
  const at::Tensor u = packed.narrow(1, cols, cols).contiguous();
  EXPECT_TRUE(at::equal(SwigluOfPacked(packed, cols), FusedSwiglu(g, u)));
  const at::Tensor gg = g.clone().set_requires_grad(true), uu = u.clone().set_requires_grad(true);
  const at::Tensor dy = at::randn({rows, cols}).to(at::kBFloat16);
  const auto grads = torch::autograd::grad({FusedSwiglu(gg, uu)}, {gg, uu}, {dy});
  at::Tensor grad = at::full({rows, width}, 7.0, packed.options());
  SwigluOfPackedBackward(dy, packed, cols, grad);
  EXPECT_TRUE(at::equal(grad.narrow(1, 0, cols), grads[0]));
  EXPECT_TRUE(at::equal(grad.narrow(1, cols, cols), grads[1]));
  // The columns after gate and up are left alone.
  EXPECT_TRUE(at::equal(grad.narrow(1, 2 * cols, width - 2 * cols),
                        at::full({rows, width - 2 * cols}, 7.0, packed.options())));
  EXPECT_THROW(SwigluOfPacked(packed, width), c10::Error);  // wider than the rows
}

// GateUpSwiglu against the projections it replaces: bit for bit against
// FusedLoraProjections + FusedSwiglu (the same GEMMs and kernels, with
// copies), and within bf16 roundings against silu(gate) * up module by
// module; every gradient too, with the buffer kept or rebuilt.
TEST(FusedProjectionTest, GateUpSwigluMatchesTheProjectionsAndSwiglu) {
  auto gate = Module(40, 32, 4, 2.0, 13), up = Module(40, 32, 8, 0.5, 14);
  const std::vector<const LoraLinear*> mods = {gate.get(), up.get()};
  at::manual_seed(15);
  const at::Tensor x_in = at::randn({2, 6, 32}).to(at::kBFloat16);
  const at::Tensor dy = at::randn({2, 6, 40}).to(at::kBFloat16);
  auto run = [&](int how) {
    at::Tensor x = x_in.detach().clone().set_requires_grad(true);
    at::Tensor y;
    if (how == 0) {
      y = GateUpSwiglu(*gate, *up, x, /*training=*/true, /*fuse=*/true);
    } else if (how == 1) {
      const std::vector<at::Tensor> gu = FusedLoraProjections(mods, x, true);
      y = FusedSwiglu(gu[0], gu[1]);
    } else {
      y = at::silu(gate->Forward(x, true)) * up->Forward(x, true);
    }
    std::vector<at::Tensor> inputs = {x, gate->adapter().a, gate->adapter().b, up->adapter().a,
                                      up->adapter().b};
    std::vector<at::Tensor> out = torch::autograd::grad({y}, inputs, {dy});
    out.insert(out.begin(), y);
    return out;
  };
  for (bool keep : {false, true}) {
    std::unique_ptr<KeepDequantizedWeights> kept;
    if (keep) kept = std::make_unique<KeepDequantizedWeights>();
    const auto fused = run(0), copies = run(1), plain = run(2);
    ASSERT_EQ(fused.size(), 6u);
    for (size_t i = 0; i < fused.size(); ++i) {
      EXPECT_EQ(fused[i].sizes(), copies[i].sizes()) << i;
      EXPECT_TRUE(at::equal(fused[i], copies[i])) << "tensor " << i << " keep " << keep;
      const double rel = RelL2(fused[i], plain[i]);
      std::printf("GATE-UP-SWIGLU %zu l2-rel %.3g (keep %d)\n", i, rel, keep);
      EXPECT_LT(rel, 2e-2) << "tensor " << i;
    }
  }
  // Unfused, it is the modules and LibTorch's ops.
  at::Tensor x = x_in.to(at::kFloat);
  EXPECT_TRUE(at::equal(GateUpSwiglu(*gate, *up, x, false, /*fuse=*/true),
                        at::silu(gate->Forward(x, false)) * up->Forward(x, false)));
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
