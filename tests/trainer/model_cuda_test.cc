// The golden parity tests on CUDA (label gpu): bf16 compute with fp32
// adapters against transformers' fp32 numbers with bf16 tolerances, fp32 on
// CUDA against them tightly, and CUDA against this engine's own CPU run.
// Skipped, with a message, where LibTorch sees no CUDA device.
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <string>

#include "model_test_util.h"
#include "worker/trainer/model.h"
#include "worker/trainer/torch_compat.h"

namespace ftune::trainer {
namespace {

using testing::ComputeLossAndGrads;
using testing::GoldenFile;
using testing::LoadGoldenModel;
using testing::LossAndGrads;
using testing::MaxAbsDiff;
using testing::RelDiff;
using testing::RelL2;

// bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%); two layers
// of it, a 128-way softmax and a 64-wide reduction per product leave errors
// of about 1% of a tensor's norm. These bounds are a few times that, and far
// below what a wrong mask, RoPE or scaling gives (> 30%).
constexpr double kBf16LogitsRelL2 = 3e-2;
constexpr double kBf16LossRel = 2e-2;
constexpr double kBf16GradRelL2 = 1e-1;

class CudaGoldenTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (!at::hasCUDA()) {
      GTEST_SKIP() << "no CUDA device visible to LibTorch " << compat::TorchVersion()
                   << ": gpu parity tests skipped (run them on the GPU host)";
    }
    golden_ = std::make_unique<GoldenFile>(GetParam());
  }
  at::Tensor G(const std::string& name, bool cuda = true) {
    return golden_->Get(name, cuda ? c10::Device(c10::kCUDA, 0) : c10::Device(c10::kCPU));
  }
  std::unique_ptr<GoldenFile> golden_;
};

void ReportAndCheckGrads(const std::string& what, const LossAndGrads& got, GoldenFile& golden,
                         const std::string& prefix, double bound) {
  double worst = 0;
  for (const auto& [name, g] : got.grads) {
    const double rel = RelL2(g, golden.Get(prefix + ".grad." + name));
    EXPECT_LT(rel, bound) << what << " " << name;
    worst = std::max(worst, rel);
  }
  EXPECT_EQ(got.grads.size(), 28u);
  std::printf("PARITY-CUDA %s lora grads worst l2-rel=%.3g\n", what.c_str(), worst);
}

TEST_P(CudaGoldenTest, Bf16WithinBf16Tolerances) {
  for (bool checkpointing : {false, true}) {
    ModelOptions o = DefaultModelOptions(c10::Device(c10::kCUDA, 0));
    ASSERT_EQ(o.dtype, at::kBFloat16);
    o.activation_checkpointing = checkpointing;
    auto m = LoadGoldenModel(GetParam(), o, /*with_adapter=*/true);
    for (const char* prefix : {"a", "p"}) {
      const std::string p = prefix;
      const at::Tensor ids = G(p + ".input_ids");
      const at::Tensor pos = p == "p" ? G("p.position_ids") : at::Tensor();
      const std::string what = GetParam() + " bf16 " + (p == "a" ? "batch" : "packed") +
                               (checkpointing ? "/checkpointed" : "");
      {
        c10::NoGradGuard no_grad;
        at::Tensor logits = m->Logits(ids, pos);
        const double rel = RelL2(logits, golden_->Get(p + ".logits"));
        std::printf("PARITY-CUDA %s logits l2-rel=%.3g max-abs=%.3g\n", what.c_str(), rel,
                    MaxAbsDiff(logits, golden_->Get(p + ".logits")));
        EXPECT_LT(rel, kBf16LogitsRelL2) << what;
      }
      LossAndGrads got = ComputeLossAndGrads(*m, ids, pos, G(p + ".labels"));
      const double ref = golden_->Get(p + ".loss").item<double>();
      std::printf("PARITY-CUDA %s loss ftune=%.6f ref=%.6f rel=%.3g\n", what.c_str(), got.loss,
                  ref, std::abs(got.loss - ref) / ref);
      EXPECT_LT(std::abs(got.loss - ref) / ref, kBf16LossRel) << what;
      ReportAndCheckGrads(what, got, *golden_, p, kBf16GradRelL2);
    }
  }
}

// fp32 on CUDA computes what transformers computes on the CPU: only the
// order of floating-point sums differs (cuBLAS, SDPA kernels).
TEST_P(CudaGoldenTest, Fp32OnCudaMatchesTightly) {
  ModelOptions o = DefaultModelOptions(c10::Device(c10::kCUDA, 0));
  o.dtype = at::kFloat;
  auto m = LoadGoldenModel(GetParam(), o, /*with_adapter=*/true);
  for (const char* prefix : {"a", "p"}) {
    const std::string p = prefix;
    const at::Tensor ids = G(p + ".input_ids");
    const at::Tensor pos = p == "p" ? G("p.position_ids") : at::Tensor();
    const std::string what = GetParam() + " fp32 " + (p == "a" ? "batch" : "packed");
    {
      c10::NoGradGuard no_grad;
      const double d = RelDiff(m->Logits(ids, pos), golden_->Get(p + ".logits"));
      std::printf("PARITY-CUDA %s logits max-rel=%.3g\n", what.c_str(), d);
      EXPECT_LT(d, 1e-4) << what;
    }
    LossAndGrads got = ComputeLossAndGrads(*m, ids, pos, G(p + ".labels"));
    const double ref = golden_->Get(p + ".loss").item<double>();
    EXPECT_LT(std::abs(got.loss - ref) / ref, 1e-4) << what;
    ReportAndCheckGrads(what, got, *golden_, p, 1e-3);
  }
}

// The engine's own CPU fp32 run against its CUDA bf16 run of the same model.
TEST_P(CudaGoldenTest, CudaBf16AgainstCpuFp32) {
  auto cpu = LoadGoldenModel(GetParam(), DefaultModelOptions(c10::kCPU), true);
  auto gpu = LoadGoldenModel(GetParam(), DefaultModelOptions(c10::Device(c10::kCUDA, 0)), true);
  c10::NoGradGuard no_grad;
  at::Tensor a = cpu->Logits(G("p.input_ids", false), G("p.position_ids", false));
  at::Tensor b = gpu->Logits(G("p.input_ids"), G("p.position_ids"));
  const double rel = RelL2(b, a);
  std::printf("PARITY-CUDA %s cuda-bf16 vs cpu-fp32 packed logits l2-rel=%.3g\n",
              GetParam().c_str(), rel);
  EXPECT_LT(rel, kBf16LogitsRelL2);
}

// The fused kernels (RMSNorm with the residual add, SwiGLU, RoPE) against
// the LibTorch op chains they replace, same model, same bf16 inputs: they
// compute the same roundings, so only RMSNorm's row sums may differ.
TEST_P(CudaGoldenTest, FusedKernelsMatchTheOpChains) {
  for (bool checkpointing : {false, true}) {
    ModelOptions o = DefaultModelOptions(c10::Device(c10::kCUDA, 0));
    o.activation_checkpointing = checkpointing;
    o.fused_kernels = true;
    auto fused = LoadGoldenModel(GetParam(), o, /*with_adapter=*/true);
    o.fused_kernels = false;
    auto chain = LoadGoldenModel(GetParam(), o, /*with_adapter=*/true);
    for (const char* prefix : {"a", "p"}) {
      const std::string p = prefix;
      const at::Tensor ids = G(p + ".input_ids");
      const at::Tensor pos = p == "p" ? G("p.position_ids") : at::Tensor();
      const std::string what = GetParam() + " fused vs chain " + (p == "a" ? "batch" : "packed") +
                               (checkpointing ? "/checkpointed" : "");
      {
        c10::NoGradGuard no_grad;
        const double rel = RelL2(fused->Logits(ids, pos), chain->Logits(ids, pos));
        std::printf("PARITY-CUDA %s logits l2-rel=%.3g\n", what.c_str(), rel);
        EXPECT_LT(rel, 5e-3) << what;
      }
      const LossAndGrads a = ComputeLossAndGrads(*fused, ids, pos, G(p + ".labels"));
      const LossAndGrads b = ComputeLossAndGrads(*chain, ids, pos, G(p + ".labels"));
      EXPECT_LT(std::abs(a.loss - b.loss) / b.loss, 2e-3) << what;
      double worst = 0;
      for (const auto& [name, g] : a.grads) worst = std::max(worst, RelL2(g, b.grads.at(name)));
      std::printf("PARITY-CUDA %s loss %.6f vs %.6f, lora grads worst l2-rel=%.3g\n", what.c_str(),
                  a.loss, b.loss, worst);
      EXPECT_LT(worst, 3e-2) << what;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(TinyLlamas, CudaGoldenTest,
                         ::testing::Values("llama3_tiny", "llama2_tiny"));

}  // namespace
}  // namespace ftune::trainer
