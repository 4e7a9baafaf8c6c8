// Component tests of the Llama + LoRA engine on small random models: packed
// sequence isolation, frozen base weights, LoRA semantics (identity at init,
// scaling, rsLoRA, dropout, merging), activation checkpointing with dropout,
// the chunked loss against ATen's cross_entropy, and loading HF/PEFT files
// (BF16 conversion, tied embeddings, error messages).
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "model_test_util.h"
#include "temp_dir.h"
#include "worker/modelio/llama_config.h"
#include "worker/trainer/lora.h"
#include "worker/trainer/loss.h"
#include "worker/trainer/model.h"
#include "worker/modelio/safetensors.h"
#include "worker/trainer/torch_compat.h"
#include "worker/trainer/weights.h"

namespace ftune::trainer {
namespace {

using ::testing::HasSubstr;
using testing::ComputeLossAndGrads;
using testing::MaxAbsDiff;

constexpr const char* kTinyConfig = R"({
  "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 40,
  "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
  "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
  "tie_word_embeddings": %TIE%, "torch_dtype": "bfloat16"})";

LlamaConfig TinyConfig(bool tie) {
  std::string text = kTinyConfig;
  text.replace(text.find("%TIE%"), 5, tie ? "true" : "false");
  auto c = ParseLlamaConfig(text, "tiny");
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  return c.value();
}

// HF-named random weights with magnitudes that make every term matter.
std::map<std::string, at::Tensor> RandomWeights(const LlamaConfig& c, uint64_t seed) {
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(seed);
  auto randn = [&](std::vector<int64_t> shape, double std) {
    return at::normal(0.0, std, shape, g);
  };
  const int64_t h = c.hidden_size, i = c.intermediate_size;
  std::map<std::string, at::Tensor> w;
  w["model.embed_tokens.weight"] = randn({c.vocab_size, h}, 0.5);
  w["model.norm.weight"] = 1 + randn({h}, 0.1);
  if (!c.tie_word_embeddings) w["lm_head.weight"] = randn({c.vocab_size, h}, 0.1);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    w[p + "input_layernorm.weight"] = 1 + randn({h}, 0.1);
    w[p + "post_attention_layernorm.weight"] = 1 + randn({h}, 0.1);
    w[p + "self_attn.q_proj.weight"] = randn({c.q_size(), h}, 0.1);
    w[p + "self_attn.k_proj.weight"] = randn({c.kv_size(), h}, 0.1);
    w[p + "self_attn.v_proj.weight"] = randn({c.kv_size(), h}, 0.1);
    w[p + "self_attn.o_proj.weight"] = randn({h, c.q_size()}, 0.1);
    w[p + "mlp.gate_proj.weight"] = randn({i, h}, 0.1);
    w[p + "mlp.up_proj.weight"] = randn({i, h}, 0.1);
    w[p + "mlp.down_proj.weight"] = randn({h, i}, 0.1);
  }
  return w;
}

std::unique_ptr<LlamaModel> BuildModel(const LlamaConfig& c,
                                       const std::map<std::string, at::Tensor>& w,
                                       ModelOptions o = DefaultModelOptions(c10::kCPU)) {
  auto m = LlamaModel::Build(
      c,
      [&](const std::string& name) -> Result<at::Tensor> {
        auto it = w.find(name);
        if (it == w.end()) return NotFoundError("tensor '" + name + "' not in the test map");
        return it->second;
      },
      o, "test weights");
  EXPECT_TRUE(m.ok()) << m.status().ToString();
  return std::move(m).value();
}

std::unique_ptr<LlamaModel> TinyModel(bool tie = false, ModelOptions o = DefaultModelOptions(c10::kCPU)) {
  LlamaConfig c = TinyConfig(tie);
  return BuildModel(c, RandomWeights(c, 7), o);
}

// Random B so the adapter path changes outputs and A gets gradients.
void RandomizeB(LlamaModel& m, uint64_t seed) {
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(seed);
  c10::NoGradGuard no_grad;
  for (auto& p : m.LoraParameters()) {
    if (p.name.find("lora_B") != std::string::npos) {
      p.tensor.copy_(at::normal(0.0, 0.1, p.tensor.sizes(), g));
    }
  }
}

at::Tensor Ids(std::vector<int64_t> v) {
  return at::tensor(v, at::kLong).unsqueeze(0);  // (1, seq)
}

// Fresh directories, removed after the last test (inside main, not from an
// exit handler, so nothing runs during static destruction).
std::vector<std::unique_ptr<testutil::TempDir>>& TempDirs() {
  static auto* dirs = new std::vector<std::unique_ptr<testutil::TempDir>>();
  return *dirs;
}

class TempDirCleanup : public ::testing::Environment {
 public:
  void TearDown() override { TempDirs().clear(); }
};
::testing::Environment* const kTempDirCleanup =
    ::testing::AddGlobalTestEnvironment(new TempDirCleanup);

std::string NewTempDir() {
  TempDirs().push_back(std::make_unique<testutil::TempDir>("ftune_model_test"));
  return TempDirs().back()->path();
}

// Seeds the CPU generator only: at::manual_seed would also initialise every
// CUDA device's generator, which these CPU tests have no reason to touch.
void SeedCpu(uint64_t seed) {
  at::Generator gen = at::globalContext().defaultGenerator(c10::DeviceType::CPU);
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_current_seed(seed);
}

void WriteText(const std::string& path, const std::string& text) {
  std::ofstream f(path);
  f << text;
}

// --- packed sequences --------------------------------------------------

TEST(PackedSequences, DocumentsDoNotSeeEachOther) {
  for (AttentionImpl impl : {AttentionImpl::kMath, AttentionImpl::kSdpa}) {
    if (impl == AttentionImpl::kSdpa && !compat::kHasSdpa) continue;
    auto m = TinyModel();
    m->set_attention(impl);
    ASSERT_TRUE(m->AttachLora(LoraConfig{}).ok());
    RandomizeB(*m, 3);
    c10::NoGradGuard no_grad;
    const at::Tensor doc1 = Ids({5, 9, 1, 33, 2}), doc2 = Ids({7, 7, 12, 30, 4, 0, 39});
    const at::Tensor pos = Ids({0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6});
    at::Tensor packed = m->Logits(at::cat({doc1, doc2}, 1), pos);  // (1, 12, vocab)
    at::Tensor alone1 = m->Logits(doc1, at::Tensor());
    at::Tensor alone2 = m->Logits(doc2, at::Tensor());
    EXPECT_LT(MaxAbsDiff(packed.slice(1, 0, 5), alone1), 1e-5);
    EXPECT_LT(MaxAbsDiff(packed.slice(1, 5), alone2), 1e-5);
    // Other tokens in document 1 change nothing in document 2.
    at::Tensor other = m->Logits(at::cat({Ids({1, 2, 3, 4, 6}), doc2}, 1), pos);
    EXPECT_LT(MaxAbsDiff(other.slice(1, 5), packed.slice(1, 5)), 1e-6);
    // Without the restart the second half does see the first: the mask is
    // what separates them.
    at::Tensor joined = m->Logits(at::cat({doc1, doc2}, 1), at::Tensor());
    EXPECT_GT(MaxAbsDiff(joined.slice(1, 5), alone2), 1e-3);
  }
}

TEST(PackedSequences, AnyPositionJumpStartsADocument) {
  auto m = TinyModel();
  c10::NoGradGuard no_grad;
  // A row that starts mid-document (positions 3, 4, 5), then a new one.
  const at::Tensor ids = Ids({5, 9, 1, 7, 7, 12});
  at::Tensor packed = m->Logits(ids, Ids({3, 4, 5, 0, 1, 2}));
  at::Tensor second = m->Logits(ids.slice(1, 3), at::Tensor());
  EXPECT_LT(MaxAbsDiff(packed.slice(1, 3), second), 1e-5);
  at::Tensor first = m->Logits(ids.slice(1, 0, 3), Ids({3, 4, 5}));
  EXPECT_LT(MaxAbsDiff(packed.slice(1, 0, 3), first), 1e-5);
}

TEST(PackedSequences, LossIsTheSumOverDocuments) {
  auto m = TinyModel();
  ASSERT_TRUE(m->AttachLora(LoraConfig{}).ok());
  RandomizeB(*m, 4);
  const at::Tensor doc1 = Ids({5, 9, 1, 33, 2}), doc2 = Ids({7, 7, 12, 30, 4, 0, 39});
  const at::Tensor ids = at::cat({doc1, doc2}, 1);
  // Labels equal to the inputs: the first token of document 2 must still
  // not be predicted from the end of document 1.
  LossOutput packed = m->Loss(ids, Ids({0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6}), ids, false);
  LossOutput l1 = m->Loss(doc1, at::Tensor(), doc1, false);
  LossOutput l2 = m->Loss(doc2, at::Tensor(), doc2, false);
  EXPECT_EQ(packed.num_tokens, 4 + 6);
  EXPECT_NEAR(packed.loss_sum.item<double>(),
              l1.loss_sum.item<double>() + l2.loss_sum.item<double>(), 1e-4);
  // -100 labels are skipped.
  at::Tensor labels = ids.clone();
  labels[0][2] = -100;
  labels[0][11] = -100;
  EXPECT_EQ(m->Loss(ids, at::Tensor(), labels, false).num_tokens, 11 - 2);
}

// The host-side layout (what a training step uses to avoid syncs) gives the
// loss exactly what the device path derives: same targets, same sum, same
// gradients; and it checks the labels on the host.
TEST(PackedSequences, HostLayoutGivesTheSameLossAndGradients) {
  auto m = TinyModel();
  ASSERT_TRUE(m->AttachLora(LoraConfig{}).ok());
  RandomizeB(*m, 4);
  const at::Tensor ids = at::cat({Ids({5, 9, 1, 33, 2, 8}), Ids({7, 7, 12, 30, 4, 0})}, 0);
  const at::Tensor pos = at::cat({Ids({0, 1, 2, 0, 1, 2}), Ids({3, 4, 5, 6, 0, 1})}, 0);
  at::Tensor labels = ids.clone();
  labels[1][3] = -100;
  const BatchLayout layout = m->HostLayout(pos, labels);
  EXPECT_EQ(layout.cu_seqlens.sizes(), (std::vector<int64_t>{5}));
  EXPECT_EQ(layout.cu_seqlens[1].item<int>(), 3);   // row 0's second document
  EXPECT_EQ(layout.cu_seqlens[3].item<int>(), 10);  // row 1's second document
  EXPECT_EQ(layout.cu_seqlens[4].item<int>(), 12);
  auto loss_and_grads = [&](const BatchLayout* l) {
    for (const NamedTensor& p : m->LoraParameters()) p.tensor.mutable_grad() = at::Tensor();
    LossOutput out = m->Loss(ids, pos, labels, /*training=*/true, l);
    out.loss_sum.backward();
    std::vector<at::Tensor> grads;
    for (const NamedTensor& p : m->LoraParameters()) grads.push_back(p.tensor.grad().clone());
    return std::make_pair(out, grads);
  };
  auto [with, with_grads] = loss_and_grads(&layout);
  auto [without, without_grads] = loss_and_grads(nullptr);
  EXPECT_EQ(with.num_tokens, without.num_tokens);
  EXPECT_EQ(with.num_tokens, 2 * 5 - 2 - 1);  // two documents start mid-row, one -100
  EXPECT_EQ(with.loss_sum.item<double>(), without.loss_sum.item<double>());
  ASSERT_EQ(with_grads.size(), without_grads.size());
  for (size_t i = 0; i < with_grads.size(); ++i) EXPECT_TRUE(with_grads[i].equal(without_grads[i]));
  at::Tensor bad = labels.clone();
  bad[0][4] = 1000000;
  try {
    m->HostLayout(pos, bad);
    FAIL() << "an out-of-range label was accepted";
  } catch (const c10::Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("labels must be -100 or in [0, "));
  }
}

// --- LoRA -----------------------------------------------------------------

TEST(Lora, FreshAdapterIsTheIdentityAndOnlyAdaptersTrain) {
  auto m = TinyModel(/*tie=*/true);
  const at::Tensor ids = Ids({3, 1, 4, 1, 5, 9, 2, 6});
  at::Tensor base;
  {
    c10::NoGradGuard no_grad;
    base = m->Logits(ids, at::Tensor());
  }
  LoraConfig cfg;
  cfg.seed = 42;
  ASSERT_TRUE(m->AttachLora(cfg).ok());
  EXPECT_EQ(m->LoraParameters().size(), 2u * 7u * 2u);
  {
    c10::NoGradGuard no_grad;
    EXPECT_TRUE(at::equal(m->Logits(ids, at::Tensor()), base));  // B = 0
  }
  // Tied: lm_head is the embedding itself, not a copy.
  EXPECT_TRUE(m->lm_head().is_same(m->embed_tokens()));

  auto r = ComputeLossAndGrads(*m, ids, at::Tensor(), ids);
  for (const auto& [name, g] : r.grads) {
    // PEFT's init: with B = 0 only B receives gradient in the first step.
    if (name.find("lora_A") != std::string::npos) {
      EXPECT_EQ(g.abs().max().item<float>(), 0.0f) << name;
    } else {
      EXPECT_GT(g.abs().max().item<float>(), 0.0f) << name;
    }
  }
  auto frozen = [](const at::Tensor& t) { return !t.requires_grad() && !t.grad().defined(); };
  EXPECT_TRUE(frozen(m->embed_tokens()));
  EXPECT_TRUE(frozen(m->final_norm()));
  for (const DecoderLayer& l : m->layers()) {
    EXPECT_TRUE(frozen(l.input_layernorm));
    EXPECT_TRUE(frozen(l.post_attention_layernorm));
    for (const char* name : {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                             "down_proj"}) {
      EXPECT_TRUE(frozen(static_cast<const DenseLinear&>(l.Module(name)->base()).weight()));
      EXPECT_TRUE(l.Module(name)->adapter().a.requires_grad());
    }
  }
}

TEST(Lora, SeededInitIsDeterministicAndPerModule) {
  auto m1 = TinyModel(), m2 = TinyModel(), m3 = TinyModel();
  LoraConfig cfg;
  cfg.seed = 5;
  ASSERT_TRUE(m1->AttachLora(cfg).ok());
  ASSERT_TRUE(m2->AttachLora(cfg).ok());
  cfg.seed = 6;
  ASSERT_TRUE(m3->AttachLora(cfg).ok());
  auto p1 = m1->LoraParameters(), p2 = m2->LoraParameters(), p3 = m3->LoraParameters();
  ASSERT_EQ(p1.size(), p2.size());
  EXPECT_TRUE(at::equal(p1[0].tensor, p2[0].tensor));
  EXPECT_FALSE(at::equal(p1[0].tensor, p3[0].tensor));
  // Each module draws its own stream: q_proj of layers 0 and 1 differ.
  EXPECT_EQ(p1[0].name, PeftLoraName(0, "q_proj", "lora_A"));
  EXPECT_EQ(p1[14].name, PeftLoraName(1, "q_proj", "lora_A"));
  EXPECT_FALSE(at::equal(p1[0].tensor, p1[14].tensor));
  // Bounds of kaiming_uniform(a = sqrt(5)): 1 / sqrt(in).
  EXPECT_LE(p1[0].tensor.abs().max().item<double>(), 1.0 / std::sqrt(32.0));
  EXPECT_NE(LoraModuleSeed(1, 0, "q_proj"), LoraModuleSeed(1, 0, "k_proj"));
  EXPECT_NE(LoraModuleSeed(1, 0, "q_proj"), LoraModuleSeed(1, 1, "q_proj"));
}

TEST(Lora, ScalingAndRsLora) {
  LoraConfig c;
  EXPECT_DOUBLE_EQ(c.Scaling(), 2.0);
  c.use_rslora = true;
  EXPECT_DOUBLE_EQ(c.Scaling(), 16.0 / std::sqrt(8.0));

  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(1);
  at::Tensor w = at::normal(0.0, 0.1, {6, 5}, g);  // (out, in)
  LoraLinear lin(std::make_unique<DenseLinear>(w));
  c.r = 3;
  LoraAdapter ad = NewLoraAdapter(c, 5, 6, 9, c10::kCPU);
  ad.b = at::normal(0.0, 0.1, {6, 3}, g);
  lin.Attach(ad);
  at::Tensor x = at::normal(0.0, 1.0, {2, 4, 5}, g);  // (batch, seq, in)
  c10::NoGradGuard no_grad;
  const double s = 16.0 / std::sqrt(3.0);
  at::Tensor want = at::matmul(x, w.t()) + at::matmul(at::matmul(x, ad.a.t()), ad.b.t()) * s;
  EXPECT_LT(MaxAbsDiff(lin.Forward(x, false), want), 1e-6);
  // The merged weight computes the same.
  EXPECT_LT(MaxAbsDiff(at::matmul(x, lin.MergedWeight(at::kFloat).t()), want), 1e-5);
}

TEST(Lora, DropoutOnlyWhileTrainingAndCheckpointReplaysIt) {
  auto m = TinyModel();
  LoraConfig cfg;
  cfg.lora_dropout = 0.5;
  ASSERT_TRUE(m->AttachLora(cfg).ok());
  RandomizeB(*m, 8);
  const at::Tensor ids = Ids({3, 1, 4, 1, 5, 9, 2, 6, 5, 3});
  {
    c10::NoGradGuard no_grad;
    at::Tensor a = m->Hidden(ids, at::Tensor(), /*training=*/false);
    at::Tensor b = m->Hidden(ids, at::Tensor(), /*training=*/false);
    EXPECT_TRUE(at::equal(a, b));
    SeedCpu(1);
    at::Tensor t1 = m->Hidden(ids, at::Tensor(), /*training=*/true);
    EXPECT_GT(MaxAbsDiff(t1, a), 1e-4);
  }
  // Same seed, with and without checkpointing: backward recomputes the
  // layers with the dropout masks of the forward, so gradients agree.
  SeedCpu(123);
  auto plain = ComputeLossAndGrads(*m, ids, at::Tensor(), ids);
  m->set_activation_checkpointing(true);
  SeedCpu(123);
  auto ckpt = ComputeLossAndGrads(*m, ids, at::Tensor(), ids);
  EXPECT_EQ(plain.loss, ckpt.loss);
  for (const auto& [name, g] : plain.grads) {
    EXPECT_LT(MaxAbsDiff(g, ckpt.grads.at(name)), 1e-6) << name;
  }
  // And a different seed gives different masks.
  SeedCpu(124);
  EXPECT_NE(ComputeLossAndGrads(*m, ids, at::Tensor(), ids).loss, plain.loss);
}

TEST(Lora, ConfigValidationNamesTheValue) {
  LoraConfig c;
  EXPECT_TRUE(c.Validate().ok());
  c.r = 0;
  EXPECT_THAT(c.Validate().message(), HasSubstr("lora r (0) must be >= 1"));
  c = LoraConfig{};
  c.lora_alpha = -1;
  EXPECT_THAT(c.Validate().message(), HasSubstr("lora_alpha (-1)"));
  c = LoraConfig{};
  c.lora_dropout = 1.0;
  EXPECT_THAT(c.Validate().message(), HasSubstr("lora_dropout (1)"));
  c = LoraConfig{};
  c.target_modules = {"q_proj", "lm_head"};
  EXPECT_THAT(c.Validate().message(), HasSubstr("unknown module 'lm_head'"));
  auto m = TinyModel();
  EXPECT_EQ(m->AttachLora(c).code(), StatusCode::kInvalidArgument);
}

TEST(Lora, OnlyConfiguredTargetsGetAdapters) {
  auto m = TinyModel();
  LoraConfig c;
  c.target_modules = {"q_proj", "v_proj"};
  ASSERT_TRUE(m->AttachLora(c).ok());
  auto params = m->LoraParameters();
  ASSERT_EQ(params.size(), 2u * 2u * 2u);
  EXPECT_EQ(params[2].name, PeftLoraName(0, "v_proj", "lora_A"));
  EXPECT_FALSE(m->layers()[0].Module("o_proj")->has_adapter());
}

// --- chunked loss ----------------------------------------------------------

TEST(ChunkedCrossEntropy, MatchesATenIncludingWeightGradient) {
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(11);
  at::Tensor h0 = at::normal(0.0, 1.0, {13, 8}, g);
  at::Tensor w0 = at::normal(0.0, 0.5, {21, 8}, g);
  at::Tensor t = at::randint(0, 21, {13}, g, at::TensorOptions().dtype(at::kLong));
  at::Tensor h1 = h0.clone().set_requires_grad(true), w1 = w0.clone().set_requires_grad(true);
  at::Tensor ref = at::cross_entropy_loss(at::matmul(h1, w1.t()), t, {}, at::Reduction::Sum);
  ref.backward();
  for (int64_t chunk : {1, 4, 13, 100}) {
    at::Tensor h2 = h0.clone().set_requires_grad(true), w2 = w0.clone().set_requires_grad(true);
    at::Tensor got = ChunkedCrossEntropySum(h2, w2, t, chunk);
    (got * 0.5).backward();  // a non-unit upstream gradient
    EXPECT_NEAR(got.item<double>(), ref.item<double>(), 1e-4) << chunk;
    EXPECT_LT(MaxAbsDiff(h2.grad(), h1.grad() * 0.5), 1e-5) << chunk;
    EXPECT_LT(MaxAbsDiff(w2.grad(), w1.grad() * 0.5), 1e-5) << chunk;
  }
  // lm_head frozen (the LoRA case): the gradient is computed in the
  // forward and only scaled in backward; the same numbers.
  for (int64_t chunk : {1, 4, 13, 100}) {
    at::Tensor h3 = h0.clone().set_requires_grad(true);
    at::Tensor got = ChunkedCrossEntropySum(h3, w0, t, chunk);
    EXPECT_NEAR(got.item<double>(), ref.item<double>(), 1e-4) << chunk;
    (got * 0.5).backward();
    EXPECT_LT(MaxAbsDiff(h3.grad(), h1.grad() * 0.5), 1e-5) << chunk;
  }
  at::Tensor lp = ChunkedTargetLogProbs(h0, w0, t, 5);
  EXPECT_NEAR(-lp.sum().item<double>(), ref.item<double>(), 1e-4);
}

// bf16 with the fused loss kernel (its CPU reference here): the loss and
// hidden's gradient of the fp32 chain on the same bf16 logits.
TEST(ChunkedCrossEntropy, FusedBf16MatchesTheChain) {
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(12);
  const at::Tensor h0 = at::normal(0.0, 1.0, {37, 64}, g).to(at::kBFloat16);
  const at::Tensor w = at::normal(0.0, 0.5, {500, 64}, g).to(at::kBFloat16);
  const at::Tensor t = at::randint(0, 500, {37}, g, at::TensorOptions().dtype(at::kLong));
  at::Tensor h1 = h0.clone().set_requires_grad(true);
  at::Tensor want = ChunkedCrossEntropySum(h1, w, t, 16, /*fused=*/false);
  (want * 0.5).backward();
  for (int64_t chunk : {1, 16, 100}) {
    at::Tensor h2 = h0.clone().set_requires_grad(true);
    at::Tensor got = ChunkedCrossEntropySum(h2, w, t, chunk, /*fused=*/true);
    EXPECT_NEAR(got.item<double>(), want.item<double>(), 1e-5 * want.item<double>()) << chunk;
    (got * 0.5).backward();
    const double scale = h1.grad().to(at::kFloat).abs().max().item<double>();
    EXPECT_LE(MaxAbsDiff(h2.grad().to(at::kFloat), h1.grad().to(at::kFloat)), 0.02 * scale)
        << chunk;
  }
  // The fused kernel only serves the frozen-head path: with lm_head
  // trained the chain runs, whatever the flag says.
  at::Tensor w2 = w.clone().set_requires_grad(true);
  at::Tensor h3 = h0.clone().set_requires_grad(true);
  at::Tensor both = ChunkedCrossEntropySum(h3, w2, t, 16, /*fused=*/true);
  EXPECT_NEAR(both.item<double>(), want.item<double>(), 1e-5 * want.item<double>());
}

TEST(ChunkedCrossEntropy, ChecksShapes) {
  at::Tensor h = at::zeros({4, 8}), w = at::zeros({10, 7});
  at::Tensor t = at::zeros({4}, at::kLong);
  try {
    ChunkedCrossEntropySum(h, w, t, 2);
    FAIL() << "mismatched hidden accepted";
  } catch (const c10::Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("does not fit lm_head weight"));
  }
}

// --- loading -------------------------------------------------------------------

// Writes a model directory with BF16 weights like a real checkpoint.
std::string WriteBf16Model(const LlamaConfig& c, const std::map<std::string, at::Tensor>& w,
                           bool tie, const std::string& skip = "") {
  const std::string dir = NewTempDir();
  std::string cfg = kTinyConfig;
  cfg.replace(cfg.find("%TIE%"), 5, tie ? "true" : "false");
  WriteText(dir + "/config.json", cfg);
  std::vector<at::Tensor> keep;
  std::vector<TensorToWrite> out;
  for (const auto& [name, t] : w) {
    if (name == skip) continue;
    keep.push_back(t.to(at::kBFloat16).contiguous());
    TensorToWrite tw;
    tw.name = name;
    tw.dtype = Dtype::kBF16;
    for (int64_t s : t.sizes()) tw.shape.push_back(static_cast<uint64_t>(s));
    tw.data = keep.back().data_ptr();
    tw.num_bytes = keep.back().nbytes();
    out.push_back(tw);
  }
  Status s = WriteSafetensors(dir + "/model.safetensors", out);
  EXPECT_TRUE(s.ok()) << s.ToString();
  return dir;
}

TEST(Loading, Bf16CheckpointBecomesFp32OnTheCpu) {
  LlamaConfig c = TinyConfig(false);
  auto w = RandomWeights(c, 3);
  const std::string dir = WriteBf16Model(c, w, false);
  auto m = LlamaModel::Load(dir, DefaultModelOptions(c10::kCPU));
  ASSERT_TRUE(m.ok()) << m.status().ToString();
  const at::Tensor& q = static_cast<const DenseLinear&>(
                            m.value()->layers()[1].q_proj->base()).weight();
  EXPECT_EQ(q.scalar_type(), at::kFloat);
  EXPECT_TRUE(at::equal(q, w["model.layers.1.self_attn.q_proj.weight"].to(at::kBFloat16).to(at::kFloat)));
  EXPECT_TRUE(at::equal(m.value()->lm_head(), w["lm_head.weight"].to(at::kBFloat16).to(at::kFloat)));
  // The loaded model computes what the same (rounded) weights compute.
  std::map<std::string, at::Tensor> rounded;
  for (const auto& [k, v] : w) rounded[k] = v.to(at::kBFloat16).to(at::kFloat);
  auto ref = BuildModel(c, rounded);
  c10::NoGradGuard no_grad;
  EXPECT_TRUE(at::equal(m.value()->Logits(Ids({1, 2, 3}), at::Tensor()),
                        ref->Logits(Ids({1, 2, 3}), at::Tensor())));
}

// The tiny config as another family: "qwen2" (q/k/v biases) or "mistral"
// with a sliding window.
LlamaConfig TinyFamilyConfig(const std::string& extra) {
  std::string text = kTinyConfig;
  text.replace(text.find("%TIE%"), 5, "true");
  text.insert(text.size() - 1, ", " + extra);
  auto c = ParseLlamaConfig(text, "tiny");
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  return c.value();
}

TEST(Families, Qwen2BiasesAreAddedFrozenAndKeptDenseOverNf4) {
  const LlamaConfig llama = TinyConfig(/*tie=*/true);
  const LlamaConfig qwen = TinyFamilyConfig(R"("model_type": "qwen2")");
  ASSERT_TRUE(qwen.qkv_bias);
  auto w = RandomWeights(llama, 5);
  const at::Tensor ids = Ids({3, 1, 4, 1, 5, 9, 2, 6});
  // Without its biases a Qwen2 config is refused, naming the tensor.
  auto missing = LlamaModel::Build(
      qwen, [&](const std::string& n) -> Result<at::Tensor> {
        auto it = w.find(n);
        if (it == w.end()) return NotFoundError("tensor '" + n + "' not in the test map");
        return it->second;
      },
      DefaultModelOptions(c10::kCPU), "weights");
  ASSERT_FALSE(missing.ok());
  EXPECT_THAT(missing.status().message(), HasSubstr("model.layers.0.self_attn.q_proj.bias"));
  // Zero biases: the Llama computation exactly.
  for (int64_t l = 0; l < qwen.num_hidden_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".self_attn.";
    w[p + "q_proj.bias"] = at::zeros({qwen.q_size()});
    w[p + "k_proj.bias"] = at::zeros({qwen.kv_size()});
    w[p + "v_proj.bias"] = at::zeros({qwen.kv_size()});
  }
  auto plain = BuildModel(llama, w);
  auto zero = BuildModel(qwen, w);
  c10::NoGradGuard no_grad;
  EXPECT_TRUE(at::equal(zero->Logits(ids, at::Tensor()), plain->Logits(ids, at::Tensor())));
  // A v bias b shifts every attention output by b (softmax rows sum to 1),
  // so o_proj's input moves by exactly b: check one layer's v path directly.
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(9);
  w["model.layers.0.self_attn.v_proj.bias"] = at::normal(0.0, 0.5, {qwen.kv_size()}, g);
  w["model.layers.1.self_attn.q_proj.bias"] = at::normal(0.0, 0.5, {qwen.q_size()}, g);
  auto biased = BuildModel(qwen, w);
  const LoraLinear& v = *biased->layers()[0].v_proj;
  EXPECT_TRUE(v.has_bias());
  EXPECT_FALSE(biased->layers()[0].o_proj->has_bias());  // Qwen2: none on o_proj
  const at::Tensor x = at::randn({2, 3, qwen.hidden_size}, g);
  const at::Tensor want =
      at::linear(x, static_cast<const DenseLinear&>(v.base()).weight()) +
      w["model.layers.0.self_attn.v_proj.bias"];
  EXPECT_LT(MaxAbsDiff(v.Forward(x, false), want), 1e-6);
  EXPECT_GT(MaxAbsDiff(biased->Logits(ids, at::Tensor()), plain->Logits(ids, at::Tensor())), 1e-3);
  EXPECT_FALSE(v.bias().requires_grad());
  // NF4 base weights: the bias stays in the compute dtype, unquantized.
  ModelOptions q = DefaultModelOptions(c10::kCPU);
  q.quantize_base = true;
  auto nf4 = BuildModel(qwen, w, q);
  EXPECT_TRUE(at::equal(nf4->layers()[0].v_proj->bias(), w["model.layers.0.self_attn.v_proj.bias"]));
}

TEST(Families, Qwen2LoraSavesNoBiasesAndTrainsOnlyAdapters) {
  const LlamaConfig qwen = TinyFamilyConfig(R"("model_type": "qwen2")");
  auto w = RandomWeights(qwen, 5);
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(4);
  for (int64_t l = 0; l < qwen.num_hidden_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".self_attn.";
    w[p + "q_proj.bias"] = at::normal(0.0, 0.5, {qwen.q_size()}, g);
    w[p + "k_proj.bias"] = at::normal(0.0, 0.5, {qwen.kv_size()}, g);
    w[p + "v_proj.bias"] = at::normal(0.0, 0.5, {qwen.kv_size()}, g);
  }
  auto m = BuildModel(qwen, w);
  ASSERT_TRUE(m->AttachLora(LoraConfig{}).ok());
  RandomizeB(*m, 3);
  for (const NamedTensor& p : m->LoraParameters()) {
    EXPECT_EQ(p.name.find("bias"), std::string::npos) << p.name;  // bias="none"
  }
  const at::Tensor ids = Ids({3, 1, 4, 1, 5, 9, 2, 6});
  auto r = ComputeLossAndGrads(*m, ids, at::Tensor(), ids);
  EXPECT_EQ(r.grads.size(), 2u * 7u * 2u);
  for (const DecoderLayer& l : m->layers()) {
    for (const LoraLinear* p : {l.q_proj.get(), l.k_proj.get(), l.v_proj.get()}) {
      EXPECT_FALSE(p->bias().requires_grad());
      EXPECT_FALSE(p->bias().grad().defined());
    }
  }
}

TEST(Families, MistralSlidingWindowLongerSequencesAreRefused) {
  const LlamaConfig c = TinyFamilyConfig(R"("model_type": "mistral", "sliding_window": 8)");
  ASSERT_EQ(c.sliding_window, std::optional<int64_t>(8));
  auto m = BuildModel(c, RandomWeights(c, 2));
  c10::NoGradGuard no_grad;
  // Within the window the model is the Llama one.
  auto llama = BuildModel(TinyConfig(true), RandomWeights(c, 2));
  const at::Tensor eight = Ids({1, 2, 3, 4, 5, 6, 7, 8});
  EXPECT_TRUE(at::equal(m->Logits(eight, at::Tensor()), llama->Logits(eight, at::Tensor())));
  try {
    m->Logits(Ids({1, 2, 3, 4, 5, 6, 7, 8, 9}), at::Tensor());
    FAIL() << "a sequence longer than the window must be refused";
  } catch (const c10::Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("sequence length 9 exceeds the model's sliding_window (8)"));
  }
}

TEST(Loading, MissingTensorIsNamed) {
  LlamaConfig c = TinyConfig(false);
  const std::string dir = WriteBf16Model(c, RandomWeights(c, 3), false,
                                         "model.layers.1.mlp.up_proj.weight");
  auto m = LlamaModel::Load(dir, DefaultModelOptions(c10::kCPU));
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), StatusCode::kNotFound);
  EXPECT_THAT(m.status().message(), HasSubstr("model.layers.1.mlp.up_proj.weight"));
}

TEST(Loading, WrongShapeIsNamed) {
  LlamaConfig c = TinyConfig(false);
  auto w = RandomWeights(c, 3);
  w["model.layers.0.self_attn.k_proj.weight"] = at::zeros({32, 32});  // GQA wants (16, 32)
  auto m = LlamaModel::Build(
      c, [&](const std::string& n) -> Result<at::Tensor> { return w.at(n); },
      DefaultModelOptions(c10::kCPU), "weights");
  ASSERT_FALSE(m.ok());
  EXPECT_THAT(m.status().message(),
              HasSubstr("'model.layers.0.self_attn.k_proj.weight' has shape [32, 32] but the "
                        "config implies [16, 32]"));
}

TEST(Loading, AdapterErrors) {
  auto m = TinyModel();
  PeftAdapter ad;
  ad.config.target_modules = {"q_proj"};
  Status s = m->AttachAdapter(ad);
  EXPECT_EQ(s.code(), StatusCode::kNotFound);
  EXPECT_THAT(s.message(), HasSubstr(PeftLoraName(0, "q_proj", "lora_A")));
  for (int64_t l = 0; l < 2; ++l) {
    ad.tensors[PeftLoraName(l, "q_proj", "lora_A")] = at::zeros({8, 32});
    ad.tensors[PeftLoraName(l, "q_proj", "lora_B")] = at::zeros({32, 8});
  }
  EXPECT_TRUE(m->AttachAdapter(ad).ok());
  ad.tensors[PeftLoraName(1, "q_proj", "lora_B")] = at::zeros({32, 4});
  EXPECT_THAT(m->AttachAdapter(ad).message(), HasSubstr("has shape [32, 4]"));
  ad.tensors[PeftLoraName(1, "q_proj", "lora_B")] = at::zeros({32, 8});
  ad.tensors["base_model.model.lm_head.lora_A.weight"] = at::zeros({8, 32});
  EXPECT_THAT(m->AttachAdapter(ad).message(), HasSubstr("does not belong"));

  const std::string dir = NewTempDir();
  WriteText(dir + "/adapter_config.json",
            R"({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_dora": true,
                "target_modules": ["q_proj"]})");
  auto read = ReadPeftAdapter(dir);
  ASSERT_FALSE(read.ok());
  EXPECT_THAT(read.status().message(), HasSubstr("use_dora is not supported"));
  WriteText(dir + "/adapter_config.json",
            R"({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": "all-linear"})");
  read = ReadPeftAdapter(dir);  // no adapter_model.safetensors
  ASSERT_FALSE(read.ok());
  EXPECT_EQ(read.status().code(), StatusCode::kNotFound);
}

TEST(Loading, PeftAdapterFromTheGoldenDirectory) {
  auto read = ReadPeftAdapter(testing::GoldenDir() + "/llama3_tiny_adapter");
  ASSERT_TRUE(read.ok()) << read.status().ToString();
  EXPECT_EQ(read->config.r, 8);
  EXPECT_DOUBLE_EQ(read->config.lora_alpha, 16);
  EXPECT_EQ(read->config.target_modules.size(), 7u);
  EXPECT_EQ(read->tensors.size(), 28u);
  EXPECT_EQ(read->tensors.at(PeftLoraName(1, "down_proj", "lora_A")).sizes(),
            (std::vector<int64_t>{8, 160}));
}

// What peft's save_pretrained wrote for the golden adapter, ftune writes
// byte for byte after loading it, and reads back unchanged.
TEST(Loading, SavedAdapterIsByteIdenticalToPeft) {
  for (const std::string model : {"llama3_tiny", "llama2_tiny"}) {
    auto m = testing::LoadGoldenModel(model, DefaultModelOptions(c10::kCPU), true);
    const std::string dir = NewTempDir() + "/adapter";
    Status s = m->SaveAdapter(dir, "meta-llama/Llama-3.1-8B");
    ASSERT_TRUE(s.ok()) << s.ToString();
    auto slurp = [](const std::string& p) {
      std::ifstream f(p, std::ios::binary);
      return std::string(std::istreambuf_iterator<char>(f), {});
    };
    const std::string golden =
        slurp(testing::GoldenDir() + "/" + model + "_adapter/adapter_model.safetensors");
    ASSERT_FALSE(golden.empty());
    EXPECT_TRUE(slurp(dir + "/adapter_model.safetensors") == golden) << model;
    auto back = ReadPeftAdapter(dir);
    ASSERT_TRUE(back.ok()) << back.status().ToString();
    EXPECT_EQ(back->base_model_name_or_path, "meta-llama/Llama-3.1-8B");
    EXPECT_EQ(back->config.r, 8);
    EXPECT_DOUBLE_EQ(back->config.Scaling(), 2.0);
    EXPECT_EQ(back->tensors.size(), 28u);
  }
  auto fresh = TinyModel();
  EXPECT_EQ(fresh->SaveAdapter(NewTempDir(), "x").code(), StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace ftune::trainer
