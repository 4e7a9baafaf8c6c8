// `ftune-rank score` on CUDA (label gpu; skipped without a CUDA device): fp32
// on the GPU must meet the CPU bound against the golden logits, and the
// command's own CUDA mode (bf16 weights and activations, the engine's default
// on CUDA: DefaultModelOptions) must give the peft loss within the bf16 loss
// tolerance model_cuda_test uses.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <string>
#include <vector>

#include "model_test_util.h"
#include "temp_dir.h"
#include "worker/trainer/score.h"
#include "worker/trainer/torch_compat.h"

namespace ftune::trainer {
namespace {

using testing::GoldenDir;
using testing::GoldenFile;
using testing::LoadGoldenModel;

constexpr double kFp32LogProbAbs = 1e-4;
constexpr double kBf16LossRel = 2e-2;  // as model_cuda_test's bf16 loss bound

std::vector<int64_t> Row(const at::Tensor& t) {
  at::Tensor c = t.to(at::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

class CudaScoreTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (!at::hasCUDA()) {
      GTEST_SKIP() << "no CUDA device visible to LibTorch " << compat::TorchVersion();
    }
  }
};

TEST_P(CudaScoreTest, Fp32OnTheGpuMatchesTheGoldenLogits) {
  GoldenFile golden(GetParam());
  ModelOptions o = DefaultModelOptions(c10::Device(c10::kCUDA, 0));
  o.dtype = c10::ScalarType::Float;
  auto model = LoadGoldenModel(GetParam(), o, /*with_adapter=*/true);
  const at::Tensor ids = golden.Get("a.input_ids"), labels = golden.Get("a.labels");
  std::vector<ScoreSequence> seqs;
  for (int64_t b = 0; b < ids.size(0); ++b) seqs.push_back({b + 1, Row(ids[b]), Row(labels[b])});
  Result<ScoreReport> r = ScoreSequences(*model, seqs);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  const at::Tensor lsm = at::log_softmax(golden.Get("a.logits").to(at::kDouble), -1);
  double worst = 0;
  for (size_t b = 0; b < seqs.size(); ++b) {
    for (size_t t = 0; t + 1 < seqs[b].labels.size(); ++t) {
      const auto& got = r->sequences[b].logprobs[t];
      const int64_t target = seqs[b].labels[t + 1];
      ASSERT_EQ(got.has_value(), target != -100) << "row " << b << " position " << t;
      if (!got) continue;
      const double want = lsm[static_cast<int64_t>(b)][static_cast<int64_t>(t)][target].item<double>();
      worst = std::max(worst, std::abs(*got - want));
    }
  }
  std::printf("PARITY score cuda fp32 %s logprobs max-abs=%.3g\n", GetParam().c_str(), worst);
  EXPECT_LT(worst, kFp32LogProbAbs);
}

TEST_P(CudaScoreTest, Bf16CommandMatchesThePeftLoss) {
  GoldenFile golden(GetParam());
  const at::Tensor ids = golden.Get("a.input_ids"), labels = golden.Get("a.labels");
  ScoreOptions o;
  o.model_dir = GoldenDir() + "/" + GetParam();
  o.adapter_dir = o.model_dir + "_adapter";
  o.device = "cuda";
  o.tokens_path = testutil::SharedTempDir("rank_score_cuda_test") + "/" + GetParam() + ".jsonl";
  {
    std::ofstream f(o.tokens_path);
    for (int64_t b = 0; b < ids.size(0); ++b) {
      f << nlohmann::json{{"input_ids", Row(ids[b])}, {"labels", Row(labels[b])}}.dump() << "\n";
    }
  }
  Result<std::string> out = RunScore(o);
  ASSERT_TRUE(out.ok()) << out.status().ToString();
  const nlohmann::json doc = nlohmann::json::parse(*out);
  EXPECT_EQ(doc["dtype"], "bfloat16");
  const double ref = golden.Get("a.loss").item<double>();
  const double rel = std::abs(doc["mean_loss"].get<double>() - ref) / ref;
  std::printf("PARITY score cuda bf16 %s mean_loss=%.6f peft fp32=%.6f rel=%.3g\n",
              GetParam().c_str(), doc["mean_loss"].get<double>(), ref, rel);
  EXPECT_LT(rel, kBf16LossRel);
}

INSTANTIATE_TEST_SUITE_P(TinyLlamas, CudaScoreTest, ::testing::Values("llama3_tiny", "llama2_tiny"));

}  // namespace
}  // namespace ftune::trainer
