// The tiny preset, as the README demo makes it (tokenizer trained on
// examples/data/instructions.jsonl, vocab 1024), loads in the LibTorch
// engine dense and NF4-quantized, gives finite logits and an initial loss
// near ln(vocab), and a LoRA on it learns: a few AdamW steps on one packed
// 256-token row of the demo data lower the loss. Prints the CPU time of one
// forward + backward of that row (the demo's unit of work).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>
#include <ftw.h>
#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "worker/data/tokenizer.h"
#include "worker/modelio/init_model.h"
#include "worker/trainer/model.h"
#include "worker/trainer/optim.h"
#include "temp_dir.h"

namespace ftune::trainer {
namespace {

// mkdtemp + nftw: no std::filesystem next to the pip LibTorch (file_util.h).
class TempDir : public testutil::TempDir {
 public:
  TempDir() : testutil::TempDir("ftune_init_model_torch_test") {}
};

constexpr int64_t kSeqLen = 256;
const char kCorpus[] = FTUNE_SOURCE_DIR "/examples/data/instructions.jsonl";

// The demo model, written once for every test of this file.
class TinyModelTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    InitModelOptions o;
    o.out_dir = dir_->path() + "/tiny";
    o.preset = "tiny";
    o.tokenizer_corpus = kCorpus;
    o.vocab_size = 1024;
    o.seed = 0;
    status_ = new Status(InitModel(o));
  }
  static void TearDownTestSuite() {
    delete dir_;
    delete status_;
  }
  void SetUp() override { ASSERT_TRUE(status_->ok()) << status_->ToString(); }
  static std::string ModelDir() { return dir_->path() + "/tiny"; }

  // Demo records rendered in the Llama 3 chat format and packed into one
  // (1, 256) row, as the data pipeline packs them.
  static at::Tensor PackedRow() {
    auto tok = data::Tokenizer::Load(ModelDir());
    if (!tok.ok()) throw std::runtime_error(tok.status().ToString());
    std::ifstream in(kCorpus);
    std::string line;
    std::vector<int64_t> ids;
    while (static_cast<int64_t>(ids.size()) < kSeqLen && std::getline(in, line)) {
      std::string text = "<|begin_of_text|>";
      const nlohmann::json record = nlohmann::json::parse(line);
      for (const auto& m : record.at("messages")) {
        text += "<|start_header_id|>" + m["role"].get<std::string>() + "<|end_header_id|>\n\n" +
                m["content"].get<std::string>() + "<|eot_id|>";
      }
      for (int32_t id : (*tok)->Encode(text, false)) ids.push_back(id);
    }
    ids.resize(kSeqLen);
    return at::tensor(ids, at::kLong).view({1, kSeqLen});
  }

  static TempDir* dir_;
  static Status* status_;
};
TempDir* TinyModelTest::dir_ = nullptr;
Status* TinyModelTest::status_ = nullptr;

TEST_F(TinyModelTest, LoadsAndStartsNearUniform) {
  auto model = LlamaModel::Load(ModelDir(), DefaultModelOptions(c10::kCPU));
  ASSERT_TRUE(model.ok()) << model.status().ToString();
  EXPECT_EQ((*model)->config().vocab_size, 1024);
  EXPECT_EQ((*model)->layers().size(), 4u);

  const at::Tensor ids = PackedRow();
  c10::NoGradGuard no_grad;  // c10's, as in tests/trainer (LibTorch 1.13 and 2.x)
  const at::Tensor logits = (*model)->Logits(ids.narrow(1, 0, 64), at::Tensor());
  EXPECT_EQ(logits.sizes(), at::IntArrayRef({1, 64, 1024}));
  EXPECT_TRUE(at::isfinite(logits).all().item<bool>());
  // Logits of std LmHeadStd(256) sqrt(256) = sqrt(1/2): the loss starts at
  // about ln(V) + 1/4.
  const double logit_std = logits.std().item<double>();
  EXPECT_GT(logit_std, 0.6);
  EXPECT_LT(logit_std, 0.8);
  const double loss = (*model)->Loss(ids, at::Tensor(), ids, false).Mean().item<double>();
  std::printf("tiny preset: initial loss %.4f, ln(1024) + 1/4 = %.4f, logit std %.3f\n", loss,
              std::log(1024.0) + 0.25, logit_std);
  EXPECT_NEAR(loss, std::log(1024.0) + 0.25, 0.3);
}

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

struct RunResult {
  std::vector<double> losses;
  double median_ms = 0;  // forward + backward, the first step excluded
  double first_ms = 0;
};

// `steps` AdamW steps of a LoRA r16 on every projection over one row.
RunResult TrainOnRow(const std::string& dir, bool nf4, int steps, const at::Tensor& ids) {
  ModelOptions options = DefaultModelOptions(c10::kCPU);
  options.quantize_base = nf4;
  auto model = LlamaModel::Load(dir, options);
  if (!model.ok()) throw std::runtime_error(model.status().ToString());
  LoraConfig lora;
  lora.r = 16;
  lora.lora_alpha = 32;
  Status st = (*model)->AttachLora(lora);
  if (!st.ok()) throw std::runtime_error(st.ToString());
  std::vector<at::Tensor> params;
  for (auto& p : (*model)->LoraParameters()) params.push_back(p.tensor);
  AdamWOptions adam;
  adam.lr = 2e-3;
  adam.weight_decay = 0.0;
  AdamW opt(params, adam);
  RunResult r;
  std::vector<double> ms;
  for (int step = 0; step < steps; ++step) {
    const auto start = std::chrono::steady_clock::now();
    at::Tensor mean = (*model)->Loss(ids, at::Tensor(), ids, /*training=*/true).Mean();
    mean.backward();
    ms.push_back(1e3 * Seconds(start));
    r.losses.push_back(mean.item<double>());
    opt.Step(adam.lr);
    opt.ZeroGrad();
  }
  r.first_ms = ms[0];
  std::vector<double> rest(ms.begin() + 1, ms.end());
  std::sort(rest.begin(), rest.end());
  r.median_ms = rest.empty() ? ms[0] : rest[rest.size() / 2];
  return r;
}

TEST_F(TinyModelTest, Nf4LoraLearnsAndTimesOneRow) {
  const at::Tensor ids = PackedRow();
  const RunResult nf4 = TrainOnRow(ModelDir(), /*nf4=*/true, 6, ids);
  const RunResult dense = TrainOnRow(ModelDir(), /*nf4=*/false, 3, ids);
  std::printf(
      "tiny preset, LoRA r16 on all 7 projections, fp32 CPU, %d intra-op threads, one "
      "%lld-token row, forward + backward: NF4 base median %.0f ms (first %.0f ms), dense "
      "base median %.0f ms; NF4 loss %.4f -> %.4f over %zu AdamW steps at lr 2e-3\n",
      at::get_num_threads(), static_cast<long long>(kSeqLen), nf4.median_ms, nf4.first_ms,
      dense.median_ms, nf4.losses.front(), nf4.losses.back(), nf4.losses.size());
  for (double l : nf4.losses) EXPECT_TRUE(std::isfinite(l));
  // Memorizing one row: the LoRA must move the loss well below its start.
  EXPECT_LT(nf4.losses.back(), nf4.losses.front() - 0.5);
  // The NF4 model is the dense one up to quantization error.
  EXPECT_NEAR(nf4.losses.front(), dense.losses.front(), 0.05);
}

}  // namespace
}  // namespace ftune::trainer
