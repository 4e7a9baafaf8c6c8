// Parity of the Llama + LoRA engine with transformers + peft (fp32, CPU).
//
// The reference numbers come from tests/golden/model/make_golden.py, run on
// the GPU host with transformers, peft and torch (versions in each golden
// file's metadata). Bounds (fp32 against fp32): logits max-abs < 1e-4; loss and
// every LoRA gradient within 1e-4 relative (max |g - ref| / max |ref| per
// tensor). Each check prints a PARITY line with the measured numbers.
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <string>

#include "model_test_util.h"
#include "worker/trainer/lora.h"
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

constexpr double kLogitsMaxAbs = 1e-4;
constexpr double kRel = 1e-4;

class GoldenModelTest : public ::testing::TestWithParam<std::string> {
 protected:
  GoldenModelTest() : golden_(GetParam()) {}

  std::unique_ptr<LlamaModel> Model(bool with_adapter, AttentionImpl attention = AttentionImpl::kAuto,
                                    bool checkpointing = false) {
    ModelOptions o = DefaultModelOptions(c10::kCPU);
    o.attention = attention;
    o.activation_checkpointing = checkpointing;
    return LoadGoldenModel(GetParam(), o, with_adapter);
  }

  // Loss and every gradient of `prefix` ("a" or "p") against the golden file.
  void ExpectLossAndGrads(const LossAndGrads& got, const std::string& prefix,
                          const std::string& what) {
    const double ref = golden_.Get(prefix + ".loss").item<double>();
    const double loss_rel = std::abs(got.loss - ref) / std::abs(ref);
    std::printf("PARITY %s %s loss ftune=%.8f ref=%.8f rel=%.3g\n", GetParam().c_str(),
                what.c_str(), got.loss, ref, loss_rel);
    EXPECT_LT(loss_rel, kRel) << what;
    double worst = 0, worst_l2 = 0;
    std::string worst_name;
    for (const auto& [name, g] : got.grads) {
      at::Tensor r = golden_.Get(prefix + ".grad." + name);
      ASSERT_EQ(g.sizes(), r.sizes()) << name;
      const double rel = RelDiff(g, r);
      EXPECT_LT(rel, kRel) << what << " gradient " << name;
      worst_l2 = std::max(worst_l2, RelL2(g, r));
      if (rel > worst) worst = rel, worst_name = name;
    }
    std::printf("PARITY %s %s lora grads n=%zu worst max-rel=%.3g (%s) worst l2-rel=%.3g\n",
                GetParam().c_str(), what.c_str(), got.grads.size(), worst, worst_name.c_str(),
                worst_l2);
    EXPECT_EQ(got.grads.size(), 2u * 7u * 2u);  // A and B x 7 targets x 2 layers
  }

  GoldenFile golden_;
};

TEST_P(GoldenModelTest, RopeInverseFrequenciesMatchTransformers) {
  auto m = Model(false);
  at::Tensor ref = golden_.Get("inv_freq");
  const double rel = (m->inv_freq().to(at::kDouble) - ref.to(at::kDouble)).abs().div(ref.to(at::kDouble)).max().item<double>();
  std::printf("PARITY %s inv_freq max-rel=%.3g\n", GetParam().c_str(), rel);
  EXPECT_LT(rel, 1e-6);
}

TEST_P(GoldenModelTest, BaseModelLogits) {
  auto m = Model(false);
  c10::NoGradGuard no_grad;
  at::Tensor logits = m->Logits(golden_.Get("a.input_ids"), at::Tensor());
  at::Tensor ref = golden_.Get("a.base_logits");
  ASSERT_EQ(logits.sizes(), ref.sizes());
  const double d = MaxAbsDiff(logits, ref);
  std::printf("PARITY %s base logits max-abs=%.3g (max |ref| %.3g)\n", GetParam().c_str(), d,
              ref.abs().max().item<double>());
  EXPECT_LT(d, kLogitsMaxAbs);
}

TEST_P(GoldenModelTest, AdapterLogitsLossAndGradients) {
  for (AttentionImpl impl : {AttentionImpl::kMath, AttentionImpl::kSdpa}) {
    if (impl == AttentionImpl::kSdpa && !compat::kHasSdpa) continue;
    const std::string what = impl == AttentionImpl::kMath ? "batch/math" : "batch/sdpa";
    auto m = Model(true, impl);
    {
      c10::NoGradGuard no_grad;
      at::Tensor logits = m->Logits(golden_.Get("a.input_ids"), at::Tensor());
      const double d = MaxAbsDiff(logits, golden_.Get("a.logits"));
      std::printf("PARITY %s %s logits max-abs=%.3g\n", GetParam().c_str(), what.c_str(), d);
      EXPECT_LT(d, kLogitsMaxAbs) << what;
    }
    LossAndGrads got = ComputeLossAndGrads(*m, golden_.Get("a.input_ids"), at::Tensor(),
                                           golden_.Get("a.labels"));
    ExpectLossAndGrads(got, "a", what);
  }
}

// Three documents packed in one row with position ids restarting at 0; the
// reference ran each document on its own, so this checks that nothing
// crosses a document boundary, in attention or in the loss.
TEST_P(GoldenModelTest, PackedSequencesLogitsLossAndGradients) {
  for (AttentionImpl impl : {AttentionImpl::kMath, AttentionImpl::kSdpa}) {
    if (impl == AttentionImpl::kSdpa && !compat::kHasSdpa) continue;
    const std::string what = impl == AttentionImpl::kMath ? "packed/math" : "packed/sdpa";
    auto m = Model(true, impl);
    const at::Tensor ids = golden_.Get("p.input_ids"), pos = golden_.Get("p.position_ids");
    {
      c10::NoGradGuard no_grad;
      const double d = MaxAbsDiff(m->Logits(ids, pos), golden_.Get("p.logits"));
      std::printf("PARITY %s %s logits max-abs=%.3g\n", GetParam().c_str(), what.c_str(), d);
      EXPECT_LT(d, kLogitsMaxAbs) << what;
    }
    ExpectLossAndGrads(ComputeLossAndGrads(*m, ids, pos, golden_.Get("p.labels")), "p", what);
  }
}

TEST_P(GoldenModelTest, ActivationCheckpointingGivesTheSameGradients) {
  auto m = Model(true, AttentionImpl::kAuto, /*checkpointing=*/true);
  LossAndGrads got = ComputeLossAndGrads(*m, golden_.Get("p.input_ids"),
                                         golden_.Get("p.position_ids"), golden_.Get("p.labels"));
  ExpectLossAndGrads(got, "p", "packed/checkpointed");
  m->set_activation_checkpointing(false);
  LossAndGrads plain = ComputeLossAndGrads(*m, golden_.Get("p.input_ids"),
                                           golden_.Get("p.position_ids"), golden_.Get("p.labels"));
  for (const auto& [name, g] : got.grads) {
    // Same ops in the same order: recomputation changes nothing.
    EXPECT_TRUE(at::equal(g, plain.grads.at(name))) << name;
  }
}

TEST_P(GoldenModelTest, LossDoesNotDependOnTheChunkSize) {
  auto m = Model(true);
  const at::Tensor ids = golden_.Get("a.input_ids"), labels = golden_.Get("a.labels");
  LossAndGrads ref = ComputeLossAndGrads(*m, ids, at::Tensor(), labels);
  for (int64_t chunk : {1, 7, 4096}) {
    m->set_loss_chunk_tokens(chunk);
    LossAndGrads got = ComputeLossAndGrads(*m, ids, at::Tensor(), labels);
    EXPECT_EQ(got.num_tokens, ref.num_tokens);
    EXPECT_NEAR(got.loss, ref.loss, 1e-6 * std::abs(ref.loss)) << "chunk " << chunk;
    for (const auto& [name, g] : got.grads) {
      EXPECT_LT(RelDiff(g, ref.grads.at(name)), 1e-5) << "chunk " << chunk << " " << name;
    }
  }
  ExpectLossAndGrads(ref, "a", "batch/chunk1024");
}

TEST_P(GoldenModelTest, TokenLogProbsAgreeWithTheLoss) {
  auto m = Model(true);
  const at::Tensor ids = golden_.Get("p.input_ids"), pos = golden_.Get("p.position_ids");
  at::Tensor lp = m->TokenLogProbs(ids, pos);  // (1, 31)
  ASSERT_EQ(lp.sizes(), (std::vector<int64_t>{1, 31}));
  // Targets opening documents 2 and 3 (positions 10 and 23) are not scored.
  EXPECT_TRUE(std::isnan(lp[0][9].item<float>()));
  EXPECT_TRUE(std::isnan(lp[0][22].item<float>()));
  at::Tensor labels = golden_.Get("p.labels").slice(1, 1);
  at::Tensor valid = (labels != -100) & lp.isnan().logical_not();
  const double mean = -lp.masked_select(valid).to(at::kDouble).mean().item<double>();
  const double ref = golden_.Get("p.loss").item<double>();
  EXPECT_LT(std::abs(mean - ref) / ref, kRel);
}

INSTANTIATE_TEST_SUITE_P(TinyModels, GoldenModelTest,
                         ::testing::Values("llama3_tiny", "llama2_tiny", "qwen2_tiny",
                                           "mistral_tiny"));

TEST(LoraInit, KaimingUniformMatchesTorchBitForBit) {
  GoldenFile golden("llama3_tiny");
  at::Tensor ref = golden.Get("init.kaiming_a");  // torch.manual_seed(1234), (8, 64)
  at::Tensor a = KaimingUniformA(8, 64, 1234);
  std::printf("PARITY kaiming_uniform(seed 1234) max-abs=%.3g (LibTorch %s)\n",
              MaxAbsDiff(a, ref), compat::TorchVersion());
  EXPECT_TRUE(at::equal(a, ref));
}

}  // namespace
}  // namespace ftune::trainer
