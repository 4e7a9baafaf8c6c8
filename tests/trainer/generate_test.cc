// Generation (generate.h, LlamaModel::ForwardCached):
// - greedy ids equal transformers' generate(do_sample=False) on the golden
//   tiny models, with and without their adapters, with and without a stop
//   id, and the logits of every step equal transformers' within 1e-4
//   (tests/golden/generate, made by its make_golden.py);
// - the KV-cache forward gives the logits of the full forward for the same
//   prefix, for a prefill, a chunk appended to a filled cache, and single
//   steps, on dense and NF4 bases;
// - an NF4 base quantized at load and the same model written as a
//   bitsandbytes 4-bit directory generate the same ids and logits;
// - sampling: transformers' warpers on hand-computed cases, a seed
//   reproduces the ids, another seed changes them;
// - bad options are refused with the flag and value in the message.
#include <ATen/ATen.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "model_test_util.h"
#include "temp_dir.h"
#include "worker/modelio/safetensors.h"
#include "worker/trainer/bnb_checkpoint.h"
#include "worker/trainer/generate.h"
#include "worker/trainer/weights.h"

namespace ftune::trainer {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using json = nlohmann::json;
using testing::GoldenDir;
using testing::LoadGoldenModel;
using testing::MaxAbsDiff;

const std::string kGenerateDir = FTUNE_GOLDEN_GENERATE_DIR;

json GoldenCases() {
  std::ifstream in(kGenerateDir + "/golden_generate.json");
  std::stringstream ss;
  ss << in.rdbuf();
  return json::parse(ss.str());
}

ModelOptions CpuOptions() { return DefaultModelOptions(c10::Device(c10::kCPU)); }

// One model per (name, adapter), loaded once.
const LlamaModel& GoldenModel(const std::string& name, bool adapter) {
  static std::map<std::string, std::unique_ptr<LlamaModel>> models;
  const std::string key = name + (adapter ? "+adapter" : "");
  auto it = models.find(key);
  if (it == models.end()) {
    it = models.emplace(key, LoadGoldenModel(name, CpuOptions(), adapter)).first;
  }
  return *it->second;
}

at::Tensor Ids(const std::vector<int64_t>& ids) {
  return at::tensor(ids, at::TensorOptions().dtype(at::kLong)).view({1, -1});
}

TEST(GenerateGoldenTest, GreedyIdsAndLogitsEqualTransformers) {
  const json doc = GoldenCases();
  auto file = SafetensorsFile::Open(kGenerateDir + "/golden_generate.safetensors");
  ASSERT_TRUE(file.ok()) << file.status().ToString();
  ASSERT_EQ(doc["cases"].size(), 24u);
  int64_t stopped = 0;
  for (const json& c : doc["cases"]) {
    const std::string name = c["name"];
    SCOPED_TRACE(name);
    const LlamaModel& model = GoldenModel(c["model"], c["adapter"]);
    const std::vector<int64_t> prompt = c["prompt"];
    const std::vector<int64_t> want = c["new_ids"];
    GenerateOptions options;
    options.max_new_tokens = c["max_new_tokens"];
    if (!c["eos_token_id"].is_null()) options.stop_ids = {c["eos_token_id"].get<int64_t>()};
    std::vector<int64_t> streamed;
    auto r = Generate(model, prompt, options, [&](int64_t id) { streamed.push_back(id); });
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    EXPECT_EQ(r->ids, want);
    EXPECT_EQ(streamed, want);
    EXPECT_EQ(r->prompt_tokens, static_cast<int64_t>(prompt.size()));
    const bool stop = !c["eos_token_id"].is_null();
    EXPECT_EQ(r->stop_reason, stop ? StopReason::kStopId : StopReason::kMaxNewTokens);
    stopped += stop && static_cast<int64_t>(want.size()) < options.max_new_tokens;

    // Step by step: the logits transformers computed at each generated
    // position, fed the golden ids.
    auto golden = ReadTensorAsStored(**file, c["logits"].get<std::string>());
    ASSERT_TRUE(golden.ok()) << golden.status().ToString();
    ASSERT_EQ(golden->size(0), static_cast<int64_t>(want.size()));
    c10::InferenceMode inference;
    KvCache cache = model.NewKvCache(1, prompt.size() + want.size());
    at::Tensor logits = model.ForwardCached(Ids(prompt), &cache)[0];
    for (size_t t = 0; t < want.size(); ++t) {
      EXPECT_LT(MaxAbsDiff(logits, (*golden)[t]), 1e-4) << "step " << t;
      logits = model.ForwardCached(Ids({want[t]}), &cache)[0];
    }
  }
  EXPECT_EQ(stopped, 12);  // every stop case ended before max_new_tokens
}

// Logits of the last position of ids[0..end) from the full forward.
at::Tensor FullLastLogits(const LlamaModel& model, const std::vector<int64_t>& ids, size_t end) {
  std::vector<int64_t> prefix(ids.begin(), ids.begin() + end);
  return model.Logits(Ids(prefix), at::Tensor())[0][end - 1];
}

void ExpectCacheMatchesFullForward(const LlamaModel& model) {
  const std::vector<int64_t> ids = {5, 17, 99, 3, 64, 8, 120, 33, 41, 7, 90, 12,
                                    56, 2, 77, 101, 19, 44, 61, 25};
  c10::NoGradGuard no_grad;
  KvCache cache = model.NewKvCache(1, ids.size());
  // Prefill 7, then a chunk of 5 onto the filled cache (a mask offset by
  // the cached length), then one at a time.
  std::vector<std::pair<size_t, size_t>> calls = {{0, 7}, {7, 12}};
  for (size_t i = 12; i < ids.size(); ++i) calls.push_back({i, i + 1});
  for (const auto& [begin, end] : calls) {
    std::vector<int64_t> chunk(ids.begin() + begin, ids.begin() + end);
    at::Tensor cached = model.ForwardCached(Ids(chunk), &cache)[0];
    EXPECT_EQ(cache.length, static_cast<int64_t>(end));
    const at::Tensor full = FullLastLogits(model, ids, end);
    EXPECT_LT(MaxAbsDiff(cached, full), 2e-5) << "positions " << begin << ".." << end - 1;
    EXPECT_EQ(cached.argmax().item<int64_t>(), full.argmax().item<int64_t>());
  }
}

TEST(KvCacheTest, CachedForwardEqualsFullForward) {
  for (const char* name : {"llama2_tiny", "llama3_tiny"}) {
    for (bool adapter : {false, true}) {
      SCOPED_TRACE(std::string(name) + (adapter ? "+adapter" : ""));
      ExpectCacheMatchesFullForward(GoldenModel(name, adapter));
    }
  }
  ModelOptions nf4 = CpuOptions();
  nf4.quantize_base = true;
  SCOPED_TRACE("llama3_tiny NF4 + adapter");
  ExpectCacheMatchesFullForward(*LoadGoldenModel("llama3_tiny", nf4, true));
}

TEST(KvCacheTest, RefusesMisuse) {
  const LlamaModel& model = GoldenModel("llama2_tiny", false);
  KvCache cache = model.NewKvCache(1, 4);
  EXPECT_THROW(model.ForwardCached(Ids({1, 2, 3, 4, 5}), &cache), c10::Error);  // over capacity
  EXPECT_THROW(model.ForwardCached(at::ones({2, 1}, at::kLong), &cache), c10::Error);  // rows
  model.ForwardCached(Ids({1, 2, 3}), &cache);
  try {
    model.ForwardCached(Ids({4, 5}), &cache);
    FAIL() << "no error past the capacity";
  } catch (const c10::Error& e) {
    EXPECT_THAT(e.what_without_backtrace(), HasSubstr("capacity 4"));
  }
}

TEST(GenerateNf4Test, QuantizedAtLoadEqualsBitsandbytesDirectory) {
  const std::string dir = testutil::SharedTempDir("generate_test") + "/llama2_tiny_bnb";
  QuantizeModelOptions q;
  q.compute_dtype = "float32";
  ASSERT_TRUE(QuantizeModelDirectory(GoldenDir() + "/llama2_tiny", dir, q).ok());
  ModelOptions nf4 = CpuOptions();
  nf4.quantize_base = true;
  std::unique_ptr<LlamaModel> at_load = LoadGoldenModel("llama2_tiny", nf4, true);
  auto from_dir = LoadModelDirectory(dir, CpuOptions());
  ASSERT_TRUE(from_dir.ok()) << from_dir.status().ToString();
  ASSERT_TRUE((*from_dir)->LoadAdapter(GoldenDir() + "/llama2_tiny_adapter").ok());
  GenerateOptions options;
  options.max_new_tokens = 24;
  for (const std::vector<int64_t>& prompt :
       std::vector<std::vector<int64_t>>{{53}, {57, 104, 78, 124, 39}}) {
    auto a = Generate(*at_load, prompt, options);
    auto b = Generate(**from_dir, prompt, options);
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_EQ(a->ids, b->ids);
    EXPECT_EQ(a->ids.size(), 24u);
    // The NF4 model is not the dense one: its logits differ from the
    // dense model's by quantization error, not by rounding.
    c10::NoGradGuard no_grad;
    const at::Tensor l_nf4 = (*from_dir)->Logits(Ids(prompt), at::Tensor());
    const at::Tensor l_at_load = at_load->Logits(Ids(prompt), at::Tensor());
    EXPECT_EQ(MaxAbsDiff(l_nf4, l_at_load), 0.0);
    EXPECT_GT(MaxAbsDiff(l_nf4, GoldenModel("llama2_tiny", true).Logits(Ids(prompt), at::Tensor())),
              1e-3);
  }
}

std::vector<float> Values(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return std::vector<float>(c.data_ptr<float>(), c.data_ptr<float>() + c.numel());
}

TEST(SamplingTest, WarpersAsTransformersAppliesThem) {
  const float inf = std::numeric_limits<float>::infinity();
  const at::Tensor logits = at::tensor(std::vector<float>{1, 4, 2, 5, 3});
  SamplingOptions o;
  o.top_k = 0;
  o.temperature = 2.0;
  EXPECT_THAT(Values(WarpLogits(logits, o)), ElementsAre(0.5f, 2.0f, 1.0f, 2.5f, 1.5f));
  // top-k after temperature: the 3 largest stay, the rest -inf.
  o.top_k = 3;
  EXPECT_THAT(Values(WarpLogits(logits, o)), ElementsAre(-inf, 2.0f, -inf, 2.5f, 1.5f));
  // Ties with the k-th largest stay.
  o = SamplingOptions();
  o.temperature = 1.0;
  o.top_k = 1;
  EXPECT_THAT(Values(WarpLogits(at::tensor(std::vector<float>{1, 3, 3, 2}), o)),
              ElementsAre(-inf, 3.0f, 3.0f, -inf));
  // top-p over probabilities 0.1, 0.2, 0.3, 0.4 (ascending cumsum 0.1, 0.3,
  // 0.6, 1.0): removed where cumsum <= 1 - top_p.
  const at::Tensor p = at::log(at::tensor(std::vector<float>{0.2f, 0.4f, 0.1f, 0.3f}));
  o.top_k = 0;
  o.top_p = 0.75;  // removes 0.1 only
  EXPECT_THAT(Values(WarpLogits(p, o)),
              ElementsAre(std::log(0.2f), std::log(0.4f), -inf, std::log(0.3f)));
  o.top_p = 0.5;  // removes 0.1 and 0.2
  EXPECT_THAT(Values(WarpLogits(p, o)), ElementsAre(-inf, std::log(0.4f), -inf, std::log(0.3f)));
  o.top_p = 0.01;  // the most likely always stays
  EXPECT_THAT(Values(WarpLogits(p, o)), ElementsAre(-inf, std::log(0.4f), -inf, -inf));
  // Order: top-k before top-p. With k = 3 the 0.1 token goes first, the
  // rest renormalize to 2/9, 4/9, 3/9 (cumsum 0.22, 0.56, 1): top_p 0.6
  // then removes 2/9 as well.
  o.top_k = 3;
  o.top_p = 0.6;
  EXPECT_THAT(Values(WarpLogits(p, o)), ElementsAre(-inf, std::log(0.4f), -inf, std::log(0.3f)));
}

TEST(SamplingTest, DrawsFollowTheWarpedDistribution) {
  SamplingOptions o;
  o.temperature = 1.0;
  o.top_k = 0;
  o.top_p = 0.75;  // 0.1 removed: 0.2/0.9, 0.4/0.9, 0, 0.3/0.9
  o.seed = 11;
  TokenSampler sampler(o);
  const at::Tensor p = at::log(at::tensor(std::vector<float>{0.2f, 0.4f, 0.1f, 0.3f}));
  std::vector<int64_t> counts(4, 0);
  const int n = 20000;
  for (int i = 0; i < n; ++i) ++counts[sampler.Next(p)];
  EXPECT_EQ(counts[2], 0);
  EXPECT_NEAR(counts[0] / double(n), 0.2 / 0.9, 0.015);
  EXPECT_NEAR(counts[1] / double(n), 0.4 / 0.9, 0.015);
  EXPECT_NEAR(counts[3] / double(n), 0.3 / 0.9, 0.015);
}

TEST(SamplingTest, SeedReproducesIds) {
  const LlamaModel& model = GoldenModel("llama2_tiny", true);
  GenerateOptions options;
  options.max_new_tokens = 24;
  options.sampling.temperature = 1.5;
  options.sampling.top_k = 40;
  options.sampling.top_p = 0.95;
  auto run = [&](uint64_t seed) {
    options.sampling.seed = seed;
    auto r = Generate(model, {57, 104, 78}, options);
    EXPECT_TRUE(r.ok());
    return r.ok() ? r->ids : std::vector<int64_t>();
  };
  const std::vector<int64_t> a = run(7);
  EXPECT_EQ(a.size(), 24u);
  EXPECT_EQ(run(7), a);
  EXPECT_NE(run(8), a);
  // Sampling is not greedy here.
  options.sampling.temperature = 0;
  EXPECT_NE(run(7), a);
}

TEST(GenerateTest, RefusesBadOptions) {
  const LlamaModel& model = GoldenModel("llama2_tiny", false);
  auto error = [&](GenerateOptions o, std::vector<int64_t> prompt = {5}) {
    auto r = Generate(model, prompt, o);
    EXPECT_FALSE(r.ok());
    return r.ok() ? std::string() : r.status().ToString();
  };
  GenerateOptions o;
  o.max_new_tokens = 0;
  EXPECT_THAT(error(o), HasSubstr("--max-new-tokens (0) must be >= 1"));
  o = GenerateOptions();
  o.sampling.top_p = 1.5;
  EXPECT_THAT(error(o), HasSubstr("--top-p (1.5) must be in (0, 1]"));
  o.sampling.top_p = 0;
  EXPECT_THAT(error(o), HasSubstr("--top-p (0) must be in (0, 1]"));
  o = GenerateOptions();
  o.sampling.temperature = -1;
  EXPECT_THAT(error(o), HasSubstr("--temperature (-1) must be >= 0"));
  o = GenerateOptions();
  o.sampling.top_k = -3;
  EXPECT_THAT(error(o), HasSubstr("--top-k (-3)"));
  EXPECT_THAT(error(GenerateOptions(), {5, 128}), HasSubstr("prompt id [1] = 128 is outside"));
  EXPECT_THAT(error(GenerateOptions(), {}), HasSubstr("no tokens"));
  o = GenerateOptions();
  o.max_new_tokens = 300;  // max_position_embeddings 256
  EXPECT_THAT(error(o), HasSubstr("max_position_embeddings (256)"));
}

}  // namespace
}  // namespace ftune::trainer
