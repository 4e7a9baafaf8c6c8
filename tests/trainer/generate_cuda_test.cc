// Generation on CUDA (label gpu; skips without a CUDA device):
// - fp32 on the GPU: greedy ids equal transformers' golden ids (the same
//   data as generate_test on the CPU);
// - bf16 with NF4 bases and an adapter (the fused kernels' path): the cached
//   forward agrees with the full forward to bf16 rounding, and generation
//   runs end to end.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "model_test_util.h"
#include "worker/trainer/generate.h"

namespace ftune::trainer {
namespace {

using testing::LoadGoldenModel;

at::Tensor Ids(const std::vector<int64_t>& ids, c10::Device device) {
  return at::tensor(ids, at::TensorOptions().dtype(at::kLong)).view({1, -1}).to(device);
}

TEST(GenerateCudaTest, Fp32GreedyIdsEqualTransformers) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  std::ifstream in(std::string(FTUNE_GOLDEN_GENERATE_DIR) + "/golden_generate.json");
  const nlohmann::json doc = nlohmann::json::parse(in);
  ModelOptions o = DefaultModelOptions(c10::Device(c10::kCUDA, 0));
  o.dtype = at::kFloat;
  for (const auto& c : doc["cases"]) {
    SCOPED_TRACE(c["name"].get<std::string>());
    auto model = LoadGoldenModel(c["model"], o, c["adapter"]);
    GenerateOptions g;
    g.max_new_tokens = c["max_new_tokens"];
    if (!c["eos_token_id"].is_null()) g.stop_ids = {c["eos_token_id"].get<int64_t>()};
    auto r = Generate(*model, c["prompt"].get<std::vector<int64_t>>(), g);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(r->ids, c["new_ids"].get<std::vector<int64_t>>());
  }
}

TEST(GenerateCudaTest, Bf16Nf4CachedForwardAgreesWithFullForward) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  const c10::Device cuda(c10::kCUDA, 0);
  ModelOptions o = DefaultModelOptions(cuda);  // bf16
  o.quantize_base = true;
  for (const char* name : {"llama2_tiny", "llama3_tiny"}) {
    SCOPED_TRACE(name);
    auto model = LoadGoldenModel(name, o, /*with_adapter=*/true);
    const std::vector<int64_t> ids = {5, 17, 99, 3, 64, 8, 120, 33, 41, 7, 90, 12, 56, 2, 77};
    c10::InferenceMode inference;
    KvCache cache = model->NewKvCache(1, ids.size());
    const at::Tensor full = model->Logits(Ids(ids, cuda), at::Tensor())[0].cpu();  // (s, vocab)
    const double scale = full.abs().max().item<double>();
    model->ForwardCached(Ids({ids.begin(), ids.begin() + 6}, cuda), &cache);
    for (size_t t = 6; t < ids.size(); ++t) {
      const at::Tensor step = model->ForwardCached(Ids({ids[t]}, cuda), &cache)[0].cpu();
      EXPECT_LT(testing::MaxAbsDiff(step, full[t]) / scale, 3e-2) << "position " << t;
    }
    GenerateOptions g;
    g.max_new_tokens = 16;
    auto r = Generate(*model, {53, 9, 77}, g);
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(r->ids.size(), 16u);
  }
}

}  // namespace
}  // namespace ftune::trainer
