// Tests of the Llama config parser and RoPE frequencies
// (worker/modelio/llama_config.h): the Llama 2 / 3 / 3.1 fixtures of
// tests/trainer/data, both RoPE spellings, defaults, every validation error
// (naming key and value), and the inverse frequencies checked against the
// formulas evaluated in double and, bit for bit, against transformers' own
// (data/rope_golden.json, made by data/make_reference_data.py).
#include "worker/modelio/llama_config.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <unistd.h>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace ftune::trainer {
namespace {

using ::testing::HasSubstr;

std::string DataPath(const std::string& name) {
  return std::string(FTUNE_TRAINER_TEST_DATA) + "/" + name;
}

LlamaConfig LoadFixture(const std::string& name) {
  Result<LlamaConfig> c = LoadLlamaConfig(DataPath(name));
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  return c.ok() ? *c : LlamaConfig{};
}

// ------------------------------------------------------------- fixtures

TEST(LlamaConfigTest, Llama3_8bMatchesReferenceShapes) {
  const LlamaConfig c = LoadFixture("llama3_8b_config.json");
  EXPECT_EQ(c.hidden_size, 4096);
  EXPECT_EQ(c.intermediate_size, 14336);
  EXPECT_EQ(c.num_hidden_layers, 32);
  EXPECT_EQ(c.num_attention_heads, 32);
  EXPECT_EQ(c.num_key_value_heads, 8);
  EXPECT_EQ(c.vocab_size, 128256);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.num_kv_groups(), 4);
  EXPECT_EQ(c.q_size(), 4096);
  EXPECT_EQ(c.kv_size(), 1024);
  EXPECT_EQ(c.rope_theta, 500000.0);
  EXPECT_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.max_position_embeddings, 8192);
  EXPECT_EQ(c.rope_scaling.type, RopeType::kDefault);  // "rope_scaling": null
  EXPECT_EQ(c.torch_dtype, ModelDtype::kBFloat16);
  EXPECT_EQ(c.bos_token_id, std::optional<int64_t>(128000));
  EXPECT_EQ(c.eos_token_ids, std::vector<int64_t>{128001});
  EXPECT_FALSE(c.pad_token_id.has_value());
  EXPECT_EQ(c.NumParameters(), 8030261248);  // "8B"
}

TEST(LlamaConfigTest, Llama3_1_70bMatchesReferenceShapes) {
  const LlamaConfig c = LoadFixture("llama3_1_70b_config.json");
  EXPECT_EQ(c.hidden_size, 8192);
  EXPECT_EQ(c.intermediate_size, 28672);
  EXPECT_EQ(c.num_hidden_layers, 80);
  EXPECT_EQ(c.num_attention_heads, 64);
  EXPECT_EQ(c.num_key_value_heads, 8);
  EXPECT_EQ(c.vocab_size, 128256);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.rope_theta, 500000.0);
  EXPECT_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.rope_scaling.type, RopeType::kLlama3);
  EXPECT_EQ(c.rope_scaling.factor, 8.0);
  EXPECT_EQ(c.rope_scaling.low_freq_factor, 1.0);
  EXPECT_EQ(c.rope_scaling.high_freq_factor, 4.0);
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 8192);
  EXPECT_EQ(c.NumParameters(), 70553706496);  // "70B"
}

TEST(LlamaConfigTest, Llama3_1InstructListsThreeEosTokens) {
  const LlamaConfig c = LoadFixture("llama3_1_8b_instruct_config.json");
  EXPECT_EQ(c.eos_token_ids, (std::vector<int64_t>{128001, 128008, 128009}));
  EXPECT_EQ(c.max_position_embeddings, 131072);
  EXPECT_EQ(c.rope_scaling.type, RopeType::kLlama3);
}

TEST(LlamaConfigTest, RopeParametersSpellingMeansTheSame) {
  const LlamaConfig old_style = LoadFixture("llama3_1_8b_instruct_config.json");
  const LlamaConfig new_style = LoadFixture("llama3_1_8b_rope_parameters_config.json");
  EXPECT_EQ(new_style.rope_theta, 500000.0);  // only inside rope_parameters
  EXPECT_EQ(new_style.rope_scaling.type, RopeType::kLlama3);
  EXPECT_EQ(new_style.rope_scaling.factor, old_style.rope_scaling.factor);
  EXPECT_EQ(new_style.rope_scaling.low_freq_factor, old_style.rope_scaling.low_freq_factor);
  EXPECT_EQ(new_style.rope_scaling.high_freq_factor, old_style.rope_scaling.high_freq_factor);
  EXPECT_EQ(new_style.rope_scaling.original_max_position_embeddings,
            old_style.rope_scaling.original_max_position_embeddings);
  EXPECT_EQ(new_style.torch_dtype, ModelDtype::kBFloat16);  // from "dtype"
  EXPECT_EQ(new_style.head_dim, 128);
  EXPECT_EQ(RopeInverseFrequencies(new_style), RopeInverseFrequencies(old_style));
  EXPECT_EQ(new_style.NumParameters(), old_style.NumParameters());
}

TEST(LlamaConfigTest, Llama2DefaultsRopeThetaAndUsesFullAttentionHeads) {
  const LlamaConfig c = LoadFixture("llama2_7b_config.json");
  EXPECT_EQ(c.rope_theta, 10000.0);  // absent from the file
  EXPECT_EQ(c.num_key_value_heads, 32);
  EXPECT_EQ(c.num_kv_groups(), 1);
  EXPECT_EQ(c.vocab_size, 32000);
  EXPECT_EQ(c.torch_dtype, ModelDtype::kFloat16);
  EXPECT_EQ(c.NumParameters(), 6738415616);  // "7B"
}

TEST(LlamaConfigTest, LoadsFromDirectoryAndReportsMissingFile) {
  const std::filesystem::path dir =
      std::filesystem::absolute("llama_config_test_dir_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  std::filesystem::copy_file(DataPath("llama3_8b_config.json"), dir / "config.json",
                             std::filesystem::copy_options::overwrite_existing);
  Result<LlamaConfig> c = LoadLlamaConfig(dir.string());
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  std::filesystem::remove_all(dir);
  Result<LlamaConfig> missing = LoadLlamaConfig(dir.string());
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr(dir.string()));
}

// ------------------------------------------------------------- defaults

constexpr char kMinimal[] =
    R"({"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2,
        "num_attention_heads": 8, "vocab_size": 1000)";

Result<LlamaConfig> ParseWith(const std::string& extra) {
  return ParseLlamaConfig(std::string(kMinimal) + extra + "}", "cfg.json");
}

TEST(LlamaConfigTest, Qwen2_5_0_5bHasQkvBiasesAndTiedEmbeddings) {
  const LlamaConfig c = LoadFixture("qwen2_5_0_5b_config.json");
  EXPECT_EQ(c.family, ModelFamily::kQwen2);
  EXPECT_TRUE(c.qkv_bias);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_TRUE(c.has_qkv_bias());
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.kv_size(), 128);
  EXPECT_EQ(c.rope_theta, 1000000.0);
  EXPECT_EQ(c.rms_norm_eps, 1e-6);
  // use_sliding_window false: the window in the file means nothing.
  EXPECT_FALSE(c.sliding_window.has_value());
  // Qwen's "0.49B": embedding + 24 x (projections + q/k/v biases + norms) + norm.
  EXPECT_EQ(c.NumParameters(), 494032768);
}

TEST(LlamaConfigTest, Mistral7bV03IsTheLlamaArchitectureWithoutAWindow) {
  const LlamaConfig c = LoadFixture("mistral_7b_v0_3_config.json");
  EXPECT_EQ(c.family, ModelFamily::kMistral);
  EXPECT_FALSE(c.has_qkv_bias());
  EXPECT_FALSE(c.sliding_window.has_value());  // "sliding_window": null
  EXPECT_EQ(c.vocab_size, 32768);
  EXPECT_EQ(c.rope_theta, 1000000.0);
  EXPECT_EQ(c.NumParameters(), 7248023552);  // "7.25B"
  // MistralConfig's default window applies when the key is absent.
  Result<LlamaConfig> d = ParseLlamaConfig(
      R"({"model_type": "mistral", "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 10})",
      "cfg");
  ASSERT_TRUE(d.ok()) << d.status().ToString();
  EXPECT_EQ(d->sliding_window, std::optional<int64_t>(4096));
}

TEST(LlamaConfigTest, DefaultsFollowTransformersLlamaConfig) {
  Result<LlamaConfig> c = ParseWith("");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->num_key_value_heads, 8);
  EXPECT_EQ(c->head_dim, 32);
  EXPECT_EQ(c->rope_theta, 10000.0);
  EXPECT_EQ(c->rms_norm_eps, 1e-6);
  EXPECT_EQ(c->max_position_embeddings, 2048);
  EXPECT_FALSE(c->tie_word_embeddings);
  EXPECT_FALSE(c->attention_bias);
  EXPECT_FALSE(c->mlp_bias);
  EXPECT_EQ(c->torch_dtype, ModelDtype::kFloat32);
  EXPECT_EQ(c->rope_scaling.type, RopeType::kDefault);
  EXPECT_TRUE(c->eos_token_ids.empty());
  // Nulls mean "not given", as in transformers.
  c = ParseWith(R"(, "num_key_value_heads": null, "head_dim": null, "rope_scaling": {})");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->num_key_value_heads, 8);
  EXPECT_EQ(c->head_dim, 32);
}

TEST(LlamaConfigTest, ExplicitHeadDimAndTiedEmbeddingsAndBiases) {
  Result<LlamaConfig> c = ParseWith(
      R"(, "head_dim": 64, "num_key_value_heads": 2, "tie_word_embeddings": true,
         "attention_bias": true, "mlp_bias": true)");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->head_dim, 64);
  EXPECT_EQ(c->q_size(), 512);
  EXPECT_EQ(c->kv_size(), 128);
  // embed + layers * (q,k,v,o + mlp + norms + biases) + norm, no lm_head.
  const int64_t layer = 256 * 512 + 2 * 256 * 128 + 512 * 256 + 3 * 256 * 688 + 2 * 256 +
                        (512 + 2 * 128 + 256) + (2 * 688 + 256);
  EXPECT_EQ(c->NumParameters(), 1000 * 256 + 2 * layer + 256);
}

TEST(LlamaConfigTest, RopeScalingTypeAliasAndLinear) {
  Result<LlamaConfig> c = ParseWith(R"(, "rope_scaling": {"type": "linear", "factor": 4})");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->rope_scaling.type, RopeType::kLinear);
  EXPECT_EQ(c->rope_scaling.factor, 4.0);
  // rope_scaling wins over rope_parameters, as `rope_scaling or rope_parameters`.
  c = ParseWith(
      R"(, "rope_scaling": {"rope_type": "linear", "factor": 2.0},
         "rope_parameters": {"rope_type": "default", "rope_theta": 1.0})");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->rope_scaling.type, RopeType::kLinear);
  EXPECT_EQ(c->rope_theta, 10000.0);
  // rope_parameters' rope_theta wins over the top-level one.
  c = ParseWith(R"(, "rope_theta": 7.0, "rope_parameters": {"rope_type": "default",
                   "rope_theta": 123456.0})");
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  EXPECT_EQ(c->rope_theta, 123456.0);
}

// ------------------------------------------------------------- errors

struct BadConfig {
  const char* name;
  std::string json;                   // full text
  std::vector<std::string> expected;  // substrings of the message
};

std::string Minimal(const std::string& extra) { return std::string(kMinimal) + extra + "}"; }

std::vector<BadConfig> BadConfigs() {
  return {
      {"NotJson", "{\"hidden_size\": ", {"not valid JSON"}},
      {"NotObject", "[1, 2]", {"must be a JSON object"}},
      {"MissingHiddenSize",
       R"({"intermediate_size": 1, "num_hidden_layers": 1, "num_attention_heads": 1,
           "vocab_size": 1})",
       {"hidden_size is required but missing"}},
      {"HiddenSizeString",
       R"({"hidden_size": "4096", "intermediate_size": 1, "num_hidden_layers": 1,
           "num_attention_heads": 1, "vocab_size": 1})",
       {"hidden_size (\"4096\") must be an integer"}},
      {"HiddenSizeFraction",
       R"({"hidden_size": 4096.5, "intermediate_size": 1, "num_hidden_layers": 1,
           "num_attention_heads": 1, "vocab_size": 1})",
       {"hidden_size (4096.5) must be an integer"}},
      {"ZeroHeads",
       R"({"hidden_size": 64, "intermediate_size": 1, "num_hidden_layers": 1,
           "num_attention_heads": 0, "vocab_size": 1})",
       {"num_attention_heads (0) must be a positive integer"}},
      {"NegativeLayers",
       R"({"hidden_size": 64, "intermediate_size": 1, "num_hidden_layers": -3,
           "num_attention_heads": 1, "vocab_size": 1})",
       {"num_hidden_layers (-3) must be a positive integer"}},
      {"HugeHiddenSize",
       R"({"hidden_size": 17179869184, "intermediate_size": 1, "num_hidden_layers": 1,
           "num_attention_heads": 1, "vocab_size": 1})",
       {"hidden_size (17179869184) must be <= 4194304"}},
      {"HugeQueryWidth", Minimal(R"(, "head_dim": 1048576)"),
       {"num_attention_heads (8) x head_dim (1048576) must be <= 4194304"}},
      {"TokenIdPastInt64", Minimal(R"(, "pad_token_id": 18446744073709551615)"),
       {"pad_token_id (18446744073709551615) must be an integer token id"}},
      {"KvHeadsDoNotDivide", Minimal(R"(, "num_key_value_heads": 3)"),
       {"num_key_value_heads (3) must divide num_attention_heads (8)"}},
      {"HiddenNotDivisible",
       R"({"hidden_size": 100, "intermediate_size": 1, "num_hidden_layers": 1,
           "num_attention_heads": 8, "vocab_size": 1})",
       {"hidden_size (100) must be divisible by num_attention_heads (8)"}},
      {"OddHeadDim", Minimal(R"(, "head_dim": 33)"), {"head_dim (33) must be even"}},
      {"NegativeEps", Minimal(R"(, "rms_norm_eps": -1e-05)"),
       {"rms_norm_eps (-1e-05) must be a finite number > 0"}},
      {"ThetaString", Minimal(R"(, "rope_theta": "big")"), {"rope_theta (\"big\") must be a number"}},
      {"TieNotBool", Minimal(R"(, "tie_word_embeddings": "yes")"),
       {"tie_word_embeddings (\"yes\") must be true or false"}},
      {"GeluActivation", Minimal(R"(, "hidden_act": "gelu")"),
       {"hidden_act (\"gelu\") is not supported"}},
      {"OtherModelType", Minimal(R"(, "model_type": "gemma")"),
       {"model_type (\"gemma\") is not supported; supported model types are llama, mistral, qwen2"}},
      {"QwenSlidingWindow", Minimal(R"(, "model_type": "qwen2", "use_sliding_window": true)"),
       {"use_sliding_window (true) is not supported"}},
      {"QwenSlidingLayer",
       Minimal(R"(, "model_type": "qwen2", "layer_types": ["full_attention", "sliding_attention"])"),
       {"layer_types ([\"full_attention\",\"sliding_attention\"]) is not supported"}},
      {"MistralWindowNotInt", Minimal(R"(, "model_type": "mistral", "sliding_window": "4k")"),
       {"sliding_window (\"4k\") must be an integer"}},
      {"UnknownDtype", Minimal(R"(, "torch_dtype": "int8")"),
       {"torch_dtype (\"int8\") must be bfloat16, float16 or float32"}},
      {"BadEos", Minimal(R"(, "eos_token_id": ["x"])"),
       {"eos_token_id ([\"x\"]) must be a token id or a list of token ids"}},
      {"BadBos", Minimal(R"(, "bos_token_id": 1.5)"), {"bos_token_id (1.5) must be an integer"}},
      {"PartialRotary", Minimal(R"(, "partial_rotary_factor": 0.5)"),
       {"partial_rotary_factor (0.5) is not supported"}},
      {"RopeScalingNotObject", Minimal(R"(, "rope_scaling": 5)"),
       {"rope_scaling (5) must be an object or null"}},
      {"DynamicRope", Minimal(R"(, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0})"),
       {"rope_scaling.rope_type (\"dynamic\") is not supported: dynamic NTK"}},
      {"YarnRope", Minimal(R"(, "rope_parameters": {"rope_type": "yarn", "factor": 4.0})"),
       {"rope_parameters.rope_type (\"yarn\") is not supported"}},
      {"OldTypeKeyDynamic", Minimal(R"(, "rope_scaling": {"type": "dynamic", "factor": 2.0})"),
       {"rope_scaling.type (\"dynamic\") is not supported"}},
      {"Llama3MissingLowFreq",
       Minimal(R"(, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})"),
       {"rope_scaling.low_freq_factor is required but missing"}},
      {"Llama3HighNotAboveLow",
       Minimal(R"(, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 1.0, "original_max_position_embeddings": 8192})"),
       {"rope_scaling.high_freq_factor (1.0) must be greater than low_freq_factor (1.0)"}},
      {"Llama3FractionalContext",
       Minimal(R"(, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192.5})"),
       {"rope_scaling.original_max_position_embeddings (8192.5) must be an integer"}},
      {"LinearZeroFactor", Minimal(R"(, "rope_parameters": {"rope_type": "linear", "factor": 0})"),
       {"rope_parameters.factor (0) must be a finite number > 0"}},
      {"LinearMissingFactor", Minimal(R"(, "rope_scaling": {"type": "linear"})"),
       {"rope_scaling.factor is required but missing"}},
  };
}

class BadConfigTest : public ::testing::TestWithParam<BadConfig> {};

TEST_P(BadConfigTest, IsInvalidArgumentNamingKeyAndValue) {
  const BadConfig& c = GetParam();
  Result<LlamaConfig> r = ParseLlamaConfig(c.json, "/models/x/config.json");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("/models/x/config.json: "));
  for (const std::string& s : c.expected) EXPECT_THAT(r.status().message(), HasSubstr(s));
}

INSTANTIATE_TEST_SUITE_P(LlamaConfig, BadConfigTest, ::testing::ValuesIn(BadConfigs()),
                         [](const auto& info) { return std::string(info.param.name); });

// ------------------------------------------------------------- RoPE

int64_t UlpDistance(float a, float b) {
  int32_t ia;
  int32_t ib;
  std::memcpy(&ia, &a, 4);
  std::memcpy(&ib, &b, 4);
  // Both positive here: bit patterns order like the values.
  return std::llabs(static_cast<int64_t>(ia) - static_cast<int64_t>(ib));
}

// The exponent 2i/dim as torch has it (an fp32 division) widened to double;
// the rest of each formula is evaluated in double.
double Exponent(int64_t i, int64_t dim) {
  return static_cast<double>(static_cast<float>(2 * i) / static_cast<float>(dim));
}

double DefaultInvFreq(int64_t i, int64_t dim, double theta) {
  return 1.0 / std::pow(theta, Exponent(i, dim));
}

// transformers' llama3 rope_scaling: wavelen = 2*pi/f;
// wavelen > old/low -> f/factor; wavelen < old/high -> f;
// otherwise s = (old/wavelen - low)/(high - low), f' = (1 - s) * f / factor + s * f.
double Llama3InvFreq(double f, const RopeScaling& s) {
  const double old = static_cast<double>(s.original_max_position_embeddings);
  const double wavelen = 2 * M_PI / f;
  if (wavelen > old / s.low_freq_factor) return f / s.factor;
  if (wavelen < old / s.high_freq_factor) return f;
  const double smooth = (old / wavelen - s.low_freq_factor) /
                        (s.high_freq_factor - s.low_freq_factor);
  return (1 - smooth) * f / s.factor + smooth * f;
}

TEST(RopeTest, DefaultFrequenciesWithinOneUlpOfDouble) {
  for (const auto& [dim, theta] : std::vector<std::pair<int64_t, double>>{
           {128, 500000.0}, {128, 10000.0}, {64, 10000.0}, {96, 1e6}, {16, 10000.0}}) {
    const std::vector<float> inv = RopeInverseFrequencies(dim, theta, RopeScaling{});
    ASSERT_EQ(inv.size(), static_cast<size_t>(dim / 2));
    EXPECT_EQ(inv[0], 1.0f);
    for (int64_t i = 0; i < dim / 2; ++i) {
      const float expected = static_cast<float>(DefaultInvFreq(i, dim, theta));
      EXPECT_LE(UlpDistance(inv[i], expected), 1)
          << "dim " << dim << " theta " << theta << " i " << i << ": " << inv[i] << " vs "
          << expected;
      if (i > 0) {
        EXPECT_LT(inv[i], inv[i - 1]);
      }
    }
  }
}

TEST(RopeTest, LinearScalingDividesEveryFrequency) {
  RopeScaling linear;
  linear.type = RopeType::kLinear;
  linear.factor = 4.0;
  const std::vector<float> base = RopeInverseFrequencies(128, 10000.0, RopeScaling{});
  const std::vector<float> scaled = RopeInverseFrequencies(128, 10000.0, linear);
  ASSERT_EQ(scaled.size(), base.size());
  for (size_t i = 0; i < base.size(); ++i) {
    EXPECT_EQ(scaled[i], base[i] / 4.0f);  // one fp32 division, as `inv_freq /= factor`
    EXPECT_LE(UlpDistance(scaled[i], static_cast<float>(DefaultInvFreq(i, 128, 10000.0) / 4)), 1);
  }
}

TEST(RopeTest, Llama3ScalingMatchesTheFormulaInEachBand) {
  const LlamaConfig c = LoadFixture("llama3_1_8b_instruct_config.json");
  const std::vector<float> base = RopeInverseFrequencies(c.head_dim, c.rope_theta, RopeScaling{});
  const std::vector<float> inv = RopeInverseFrequencies(c);
  ASSERT_EQ(inv.size(), 64u);
  int high = 0;
  int medium = 0;
  int low = 0;
  for (size_t i = 0; i < inv.size(); ++i) {
    const double f = DefaultInvFreq(static_cast<int64_t>(i), 128, 500000.0);
    const double expected = Llama3InvFreq(f, c.rope_scaling);
    const double wavelen = 2 * M_PI / f;
    if (wavelen < 8192.0 / 4.0) {
      ++high;
      EXPECT_EQ(inv[i], base[i]) << i;  // high frequencies untouched
      EXPECT_LE(UlpDistance(inv[i], static_cast<float>(expected)), 1) << i;
    } else if (wavelen > 8192.0) {
      ++low;
      EXPECT_EQ(inv[i], base[i] / 8.0f) << i;  // low frequencies / factor
      EXPECT_LE(UlpDistance(inv[i], static_cast<float>(expected)), 1) << i;
    } else {
      ++medium;
      EXPECT_GT(inv[i], base[i] / 8.0f) << i;
      EXPECT_LT(inv[i], base[i]) << i;
      // A chain of ~10 fp32 operations; 2e-6 relative is a few ulps.
      EXPECT_NEAR(inv[i], expected, 2e-6 * expected) << i;
    }
  }
  // For theta 500000 and 128 dims: i <= 28 keep, 29..34 blend, >= 35 divide.
  EXPECT_EQ(high, 29);
  EXPECT_EQ(medium, 6);
  EXPECT_EQ(low, 29);
}

TEST(RopeTest, BitIdenticalToTransformersOnCpu) {
  std::ifstream in(DataPath("rope_golden.json"));
  const nlohmann::json golden = nlohmann::json::parse(in);
  int cases = 0;
  for (const auto& [name, c] : golden["cases"].items()) {
    ASSERT_FALSE(c.contains("error")) << name << ": " << c["error"];
    Result<LlamaConfig> config = ParseLlamaConfig(c["config"].dump(), name);
    ASSERT_TRUE(config.ok()) << config.status().ToString();
    const std::vector<float> inv = RopeInverseFrequencies(*config);
    const std::vector<uint32_t> bits = c["inv_freq_f32_bits"].get<std::vector<uint32_t>>();
    ASSERT_EQ(inv.size(), bits.size()) << name;
    for (size_t i = 0; i < inv.size(); ++i) {
      uint32_t ours;
      std::memcpy(&ours, &inv[i], 4);
      EXPECT_EQ(ours, bits[i]) << name << " i=" << i << " (transformers "
                               << golden["versions"]["transformers"] << ")";
    }
    ++cases;
  }
  EXPECT_EQ(cases, 6);
}

TEST(RopeTest, Llama3SmallModelExercisesEveryBand) {
  // A tiny Llama-3-like test model: 16-dim heads, theta 10000, context 64.
  RopeScaling s;
  s.type = RopeType::kLlama3;
  s.factor = 8.0;
  s.low_freq_factor = 1.0;
  s.high_freq_factor = 4.0;
  s.original_max_position_embeddings = 64;
  const std::vector<float> inv = RopeInverseFrequencies(16, 10000.0, s);
  ASSERT_EQ(inv.size(), 8u);
  int bands[3] = {0, 0, 0};
  for (size_t i = 0; i < inv.size(); ++i) {
    const double f = DefaultInvFreq(static_cast<int64_t>(i), 16, 10000.0);
    const double wavelen = 2 * M_PI / f;
    ++bands[wavelen < 16 ? 0 : wavelen > 64 ? 2 : 1];
    EXPECT_NEAR(inv[i], Llama3InvFreq(f, s), 2e-6 * Llama3InvFreq(f, s)) << i;
  }
  EXPECT_GT(bands[0], 0);
  EXPECT_GT(bands[1], 0);
  EXPECT_GT(bands[2], 0);
}

}  // namespace
}  // namespace ftune::trainer
