// Selective recompute (worker/trainer/recompute.h): a checkpointed layer's
// forward keeps GEMM outputs and its recompute takes them back instead of
// multiplying. Checked here on the GEMMs themselves (Nf4Linear, the fused
// q/k/v and gate/up GEMMs): a replay returns exactly what was kept (a kept
// output marked by +1 comes back marked, so no GEMM ran), its gradients
// equal a plain forward's bit for bit, only the sites the stash covers take
// part, and every misuse fails with a message. nf4_linear_test runs whole
// models with each RecomputeKeep.
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>
#include <gtest/gtest.h>
#include <torch/csrc/autograd/autograd.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "worker/trainer/fused_projection.h"
#include "worker/trainer/lora.h"
#include "worker/trainer/nf4_linear.h"
#include "worker/trainer/recompute.h"

namespace ftune::trainer {
namespace {

std::unique_ptr<LoraLinear> Module(int64_t out, int64_t in, int64_t r, int seed) {
  at::manual_seed(seed);
  auto m = std::make_unique<LoraLinear>(
      Nf4Linear::Quantize(at::randn({out, in}) * 0.05, Nf4Options{}));
  if (r > 0) {
    LoraAdapter ad;
    ad.a = (at::randn({r, in}) * 0.1).set_requires_grad(true);
    ad.b = (at::randn({out, r}) * 0.1).set_requires_grad(true);  // nonzero: B's path shows
    ad.scaling = 2.0;
    m->Attach(std::move(ad));
  }
  return m;
}

// x and every adapter's A and B of `mods`, the inputs gradients are taken for.
std::vector<at::Tensor> Inputs(const at::Tensor& x, const std::vector<const LoraLinear*>& mods) {
  std::vector<at::Tensor> in = {x};
  for (const LoraLinear* m : mods) {
    if (!m->has_adapter()) continue;
    in.push_back(m->adapter().a);
    in.push_back(m->adapter().b);
  }
  return in;
}

// sum_i <outs[i], a fixed random weight>: every output and element counts.
at::Tensor WeighedSum(const std::vector<at::Tensor>& outs) {
  at::Tensor loss = at::zeros({}, at::kFloat);
  for (size_t i = 0; i < outs.size(); ++i) {
    at::manual_seed(100 + static_cast<int>(i));
    loss = loss + (outs[i].to(at::kFloat) * at::randn(outs[i].sizes())).sum();
  }
  return loss;
}

void ExpectSameGrads(const std::vector<at::Tensor>& got, const std::vector<at::Tensor>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_TRUE(got[i].defined() && want[i].defined()) << "gradient " << i;
    EXPECT_TRUE(at::equal(got[i], want[i]))
        << "gradient " << i << " max-abs " << (got[i] - want[i]).abs().max().item<double>();
  }
}

std::string ErrorOf(const std::function<void()>& f) {
  try {
    f();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}

TEST(RecomputeTest, KeepNamesRoundTrip) {
  for (RecomputeKeep k :
       {RecomputeKeep::kNothing, RecomputeKeep::kDownProj, RecomputeKeep::kAllProjections}) {
    RecomputeKeep parsed = RecomputeKeep::kNothing;
    ASSERT_TRUE(ParseRecomputeKeep(RecomputeKeepName(k), &parsed)) << RecomputeKeepName(k);
    EXPECT_EQ(parsed, k);
  }
  RecomputeKeep unchanged = RecomputeKeep::kDownProj;
  EXPECT_FALSE(ParseRecomputeKeep("gemms", &unchanged));
  EXPECT_EQ(unchanged, RecomputeKeep::kDownProj);
}

TEST(RecomputeTest, Nf4LinearReplaysTheKeptOutputWithTheSameGradients) {
  auto m = Module(48, 64, 8, 1);
  const at::Tensor x0 = at::randn({2, 5, 64});
  const std::vector<const LoraLinear*> mods = {m.get()};

  // The forward of a checkpointed layer: no graph, the base output kept.
  GemmOutputStash stash(RecomputeKeep::kAllProjections);
  at::Tensor y0;
  {
    c10::NoGradGuard no_grad;
    RecordGemmOutputs record(&stash);
    GemmSiteScope site(GemmSite::kAttention);
    y0 = m->Forward(x0, /*training=*/true);
  }
  ASSERT_EQ(stash.outputs().size(), 1u);
  EXPECT_TRUE(at::equal(stash.outputs()[0], m->base().Forward(x0)));
  stash.CheckUnmodified();

  // A plain forward and backward.
  at::Tensor xp = x0.clone().set_requires_grad(true);
  const at::Tensor yp = m->Forward(xp, true);
  EXPECT_TRUE(at::equal(yp, y0));
  const std::vector<at::Tensor> want = torch::autograd::grad({WeighedSum({yp})}, Inputs(xp, mods));

  // The recompute, replaying the kept output: same output, same gradients.
  const int64_t taken_before = KeptGemmOutputsTaken();
  at::Tensor xr = x0.clone().set_requires_grad(true);
  at::Tensor yr;
  {
    ReplayGemmOutputs replay(&stash);
    GemmSiteScope site(GemmSite::kAttention);
    yr = m->Forward(xr, true);
  }
  stash.CheckAllTaken();
  EXPECT_EQ(KeptGemmOutputsTaken(), taken_before + 1);
  EXPECT_TRUE(at::equal(yr, y0));
  ExpectSameGrads(torch::autograd::grad({WeighedSum({yr})}, Inputs(xr, mods)), want);
  // The kept tensor itself gained no autograd history.
  EXPECT_FALSE(stash.outputs()[0].requires_grad());

  // Replaying a marked output gives it back marked: the GEMM did not run.
  GemmOutputStash marked(RecomputeKeep::kAllProjections, {stash.outputs()[0] + 1});
  {
    ReplayGemmOutputs replay(&marked);
    GemmSiteScope site(GemmSite::kAttention);
    c10::NoGradGuard no_grad;
    const at::Tensor ym = m->Forward(x0, true);
    EXPECT_TRUE(at::allclose(ym, y0 + 1, 1e-5, 1e-5));
  }
}

TEST(RecomputeTest, OnlyTheCoveredSitesTakePart) {
  auto m = Module(16, 32, 4, 2);
  const at::Tensor x = at::randn({3, 32});
  c10::NoGradGuard no_grad;
  GemmOutputStash down(RecomputeKeep::kDownProj);
  {
    RecordGemmOutputs record(&down);
    m->Forward(x, true);  // outside any site
    {
      GemmSiteScope site(GemmSite::kAttention);
      m->Forward(x, true);
    }
    {
      GemmSiteScope site(GemmSite::kMlpIn);
      m->Forward(x, true);
    }
    EXPECT_EQ(down.outputs().size(), 0u);
    GemmSiteScope site(GemmSite::kDownProj);
    m->Forward(x, true);
    // The innermost site counts.
    GemmSiteScope inner(GemmSite::kAttention);
    m->Forward(x, true);
  }
  EXPECT_EQ(down.outputs().size(), 1u);

  GemmOutputStash nothing(RecomputeKeep::kNothing);
  {
    RecordGemmOutputs record(&nothing);
    for (GemmSite s : {GemmSite::kAttention, GemmSite::kMlpIn, GemmSite::kDownProj}) {
      GemmSiteScope site(s);
      m->Forward(x, true);
    }
  }
  EXPECT_EQ(nothing.outputs().size(), 0u);

  GemmOutputStash all(RecomputeKeep::kAllProjections);
  {
    RecordGemmOutputs record(&all);
    for (GemmSite s : {GemmSite::kAttention, GemmSite::kMlpIn, GemmSite::kDownProj}) {
      GemmSiteScope site(s);
      m->Forward(x, true);
    }
  }
  EXPECT_EQ(all.outputs().size(), 3u);

  // Replaying a kDownProj stash at an uncovered site multiplies as usual.
  GemmOutputStash marked(RecomputeKeep::kDownProj, {m->base().Forward(x) + 1});
  {
    ReplayGemmOutputs replay(&marked);
    GemmSiteScope site(GemmSite::kAttention);
    EXPECT_FALSE(GemmStashReplaying());
    EXPECT_TRUE(at::equal(m->Forward(x, true), m->Forward(x, true)));
  }
  EXPECT_NE(ErrorOf([&] { marked.CheckAllTaken(); }).find("used 0 of the 1"), std::string::npos);
  // And outside any scope nothing is kept or taken.
  EXPECT_FALSE(GemmStashReplaying());
}

TEST(RecomputeTest, MisuseFailsWithTheCounts) {
  auto m = Module(16, 32, 0, 3);
  const at::Tensor x = at::randn({4, 32});
  c10::NoGradGuard no_grad;

  GemmOutputStash wrong(RecomputeKeep::kAllProjections, {at::zeros({4, 15})});
  std::string e = ErrorOf([&] {
    ReplayGemmOutputs replay(&wrong);
    GemmSiteScope site(GemmSite::kMlpIn);
    m->Forward(x, true);
  });
  EXPECT_NE(e.find("wants [4, 16]"), std::string::npos) << e;
  EXPECT_NE(e.find("kept [4, 15]"), std::string::npos) << e;

  GemmOutputStash empty(RecomputeKeep::kAllProjections);
  e = ErrorOf([&] {
    ReplayGemmOutputs replay(&empty);
    GemmSiteScope site(GemmSite::kMlpIn);
    m->Forward(x, true);
  });
  EXPECT_NE(e.find("more kept GEMMs (1) than the forward kept (0)"), std::string::npos) << e;

  GemmOutputStash stash(RecomputeKeep::kAllProjections);
  at::Tensor y;
  {
    RecordGemmOutputs record(&stash);
    GemmSiteScope site(GemmSite::kDownProj);
    y = m->Forward(x, true);  // no adapter: the kept tensor itself
  }
  stash.CheckUnmodified();
  y.add_(1);
  e = ErrorOf([&] { stash.CheckUnmodified(); });
  EXPECT_NE(e.find("modified in place"), std::string::npos) << e;
}

// The fused GEMMs: q/k/v as three outputs, gate/up into SwiGLU. Under
// KeepDequantizedWeights, as a checkpointed layer's recompute runs.
TEST(RecomputeTest, FusedProjectionsReplayTheKeptOutputWithTheSameGradients) {
  auto q = Module(64, 96, 8, 4), k = Module(32, 96, 8, 5), v = Module(32, 96, 0, 6);
  const std::vector<const LoraLinear*> qkv = {q.get(), k.get(), v.get()};
  auto gate = Module(80, 96, 8, 7), up = Module(80, 96, 8, 8);
  const std::vector<const LoraLinear*> gu = {gate.get(), up.get()};
  const at::Tensor x0 = at::randn({2, 6, 96}).to(at::kBFloat16);
  ASSERT_TRUE(FusedProjectionsApply(qkv, x0, true));
  ASSERT_TRUE(FusedProjectionsApply(gu, x0, true));

  auto run = [&](bool swiglu, GemmOutputStash* replay_from) {
    at::Tensor x = x0.clone().set_requires_grad(true);
    std::vector<at::Tensor> outs;
    {
      KeepDequantizedWeights keep;
      std::unique_ptr<ReplayGemmOutputs> replay;
      if (replay_from != nullptr) replay = std::make_unique<ReplayGemmOutputs>(replay_from);
      GemmSiteScope site(swiglu ? GemmSite::kMlpIn : GemmSite::kAttention);
      if (swiglu) {
        outs = {GateUpSwiglu(*gate, *up, x, true, /*fuse=*/true)};
      } else {
        outs = FusedLoraProjections(qkv, x, true);
      }
    }
    if (replay_from != nullptr) replay_from->CheckAllTaken();
    std::vector<at::Tensor> result = outs;
    for (const at::Tensor& g :
         torch::autograd::grad({WeighedSum(outs)}, Inputs(x, swiglu ? gu : qkv))) {
      result.push_back(g);
    }
    return result;
  };

  for (bool swiglu : {false, true}) {
    SCOPED_TRACE(swiglu ? "gate/up + SwiGLU" : "q/k/v");
    GemmOutputStash stash(RecomputeKeep::kAllProjections);
    {
      c10::NoGradGuard no_grad;
      RecordGemmOutputs record(&stash);
      GemmSiteScope site(swiglu ? GemmSite::kMlpIn : GemmSite::kAttention);
      if (swiglu) {
        GateUpSwiglu(*gate, *up, x0, true, true);
      } else {
        FusedLoraProjections(qkv, x0, true);
      }
    }
    ASSERT_EQ(stash.outputs().size(), 1u);  // one GEMM: every base output and x A^T
    const int64_t rows = swiglu ? 80 + 80 + 16 : 64 + 32 + 32 + 16;
    EXPECT_EQ(stash.outputs()[0].sizes(), at::IntArrayRef({12, rows}));
    stash.CheckUnmodified();

    const std::vector<at::Tensor> plain = run(swiglu, nullptr);
    const std::vector<at::Tensor> replayed = run(swiglu, &stash);
    ExpectSameGrads(replayed, plain);  // outputs, then x, A and B grads
  }

  // A marked kept output comes back marked in every q/k/v output.
  GemmOutputStash stash(RecomputeKeep::kAllProjections);
  {
    c10::NoGradGuard no_grad;
    RecordGemmOutputs record(&stash);
    GemmSiteScope site(GemmSite::kAttention);
    FusedLoraProjections(qkv, x0, true);
  }
  const at::Tensor marked_y = stash.outputs()[0] + 1;
  GemmOutputStash marked(RecomputeKeep::kAllProjections, {marked_y});
  c10::NoGradGuard no_grad;
  ReplayGemmOutputs replay(&marked);
  GemmSiteScope site(GemmSite::kAttention);
  const std::vector<at::Tensor> outs = FusedLoraProjections(qkv, x0, true);
  ASSERT_EQ(outs.size(), 3u);
  EXPECT_TRUE(at::equal(outs[0], marked_y.narrow(1, 0, 64).view({2, 6, 64})));
  EXPECT_TRUE(at::equal(outs[1], marked_y.narrow(1, 64, 32).view({2, 6, 32})));
  EXPECT_TRUE(at::equal(outs[2], marked_y.narrow(1, 96, 32).view({2, 6, 32})));
}

}  // namespace
}  // namespace ftune::trainer
