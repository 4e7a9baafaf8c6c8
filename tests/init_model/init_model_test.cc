// init-model's directories (LibTorch-free): config.json parses with ftune's
// LlamaConfig parser into the preset's shapes, the safetensors hold every
// HF weight with the right shape and dtype, values follow the documented
// generator (checked against an independent Python rendering of it), bytes
// are a function of the seed alone (not of sharding or threads), sharded
// output has a valid index, the tokenizer loads and agrees with config.json,
// and bad options are errors that say what to change.
#include <ftw.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tokenizer_test_data.h"
#include "worker/data/tokenizer.h"
#include "worker/modelio/init_model.h"
#include "worker/modelio/llama_config.h"
#include "worker/modelio/safetensors.h"
#include "temp_dir.h"

namespace ftune::trainer {
namespace {

class TempDir : public testutil::TempDir {
 public:
  TempDir() : testutil::TempDir("ftune_init_model_test") {}
};

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

bool Exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

// A small corpus of every record kind the reader takes.
std::string WriteCorpus(const std::string& dir) {
  const std::string path = dir + "/corpus.jsonl";
  std::ofstream out(path);
  for (int i = 0; i < 30; ++i) {
    nlohmann::json m = {
        {"messages",
         {{{"role", "system"}, {"content", "You are a helpful assistant."}},
          {{"role", "user"}, {"content", "What is " + std::to_string(i) + " plus 12?"}},
          {{"role", "assistant"}, {"content", std::to_string(i) + " + 12 = " +
                                                  std::to_string(i + 12) + "."}}}}};
    out << m.dump() << "\n";
  }
  out << "\n";
  out << nlohmann::json({{"text", "The quick brown fox jumps over the lazy dog."}}).dump()
      << "\n";
  out << nlohmann::json({{"prompt", "Reverse 'abc':"}, {"completion", " cba"}}).dump() << "\n";
  return path;
}

InitModelOptions TinyOptions(const std::string& out, const std::string& corpus) {
  InitModelOptions o;
  o.out_dir = out;
  o.preset = "tiny";
  o.tokenizer_corpus = corpus;
  o.vocab_size = 512;
  o.seed = 0;
  o.num_threads = 1;
  return o;
}

TEST(InitModelTest, TinyDirectoryLoadsWithTheRightShapes) {
  TempDir tmp;
  const std::string corpus = WriteCorpus(tmp.path());
  const std::string out = tmp.path() + "/model/sub";  // created with parents
  InitModelOptions options = TinyOptions(out, corpus);
  std::vector<std::string> progress;
  options.progress = [&](const std::string& m) { progress.push_back(m); };
  Status st = InitModel(options);
  ASSERT_TRUE(st.ok()) << st.ToString();
  ASSERT_FALSE(progress.empty());
  EXPECT_NE(progress.back().find("wrote"), std::string::npos);

  auto config = LoadLlamaConfig(out);
  ASSERT_TRUE(config.ok()) << config.status().ToString();
  EXPECT_EQ(config->hidden_size, 256);
  EXPECT_EQ(config->intermediate_size, 688);
  EXPECT_EQ(config->num_hidden_layers, 4);
  EXPECT_EQ(config->num_attention_heads, 8);
  EXPECT_EQ(config->num_key_value_heads, 4);
  EXPECT_EQ(config->head_dim, 32);
  EXPECT_EQ(config->vocab_size, 512);
  EXPECT_EQ(config->rope_theta, 500000.0);
  EXPECT_EQ(config->rms_norm_eps, 1e-5);
  EXPECT_EQ(config->rope_scaling.type, RopeType::kDefault);
  EXPECT_FALSE(config->tie_word_embeddings);
  EXPECT_EQ(config->torch_dtype, ModelDtype::kBFloat16);
  // NF4 quantizes blocks of 64 elements: every projection must fill them.
  for (int64_t n : {config->hidden_size * config->q_size(), config->hidden_size * config->kv_size(),
                    config->hidden_size * config->intermediate_size}) {
    EXPECT_EQ(n % 64, 0) << n;
  }

  // The tokenizer agrees with config.json.
  auto tok = data::Tokenizer::Load(out);
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  EXPECT_EQ((*tok)->vocab_size(), config->vocab_size);
  EXPECT_EQ(config->bos_token_id, (*tok)->bos_id());
  EXPECT_EQ(config->eos_token_ids,
            std::vector<int64_t>({*(*tok)->TokenToId("<|end_of_text|>"), *(*tok)->eos_id()}));
  const std::string sample = "What is 7 plus 12? 7 + 12 = 19.";
  EXPECT_EQ((*tok)->Decode((*tok)->Encode(sample, false), false), sample);

  auto model = SafetensorsModel::OpenDirectory(out);
  ASSERT_TRUE(model.ok()) << model.status().ToString();
  EXPECT_FALSE(Exists(out + "/model.safetensors.index.json"));
  const std::vector<WeightSpec> specs = LlamaWeightSpecs(*config);
  EXPECT_EQ(specs.size(), 2u + 4u * 9u + 1u);
  EXPECT_EQ(model.value()->num_tensors(), specs.size());
  uint64_t params = 0;
  for (const WeightSpec& spec : specs) {
    auto ref = model.value()->Find(spec.name);
    ASSERT_TRUE(ref.ok()) << ref.status().ToString();
    EXPECT_EQ(ref->info->dtype, Dtype::kBF16) << spec.name;
    EXPECT_EQ(ref->info->shape, spec.shape) << spec.name;
    params += ref->info->num_elements();
  }
  EXPECT_EQ(static_cast<int64_t>(params), config->NumParameters());
  EXPECT_EQ(model.value()->Find("model.layers.3.mlp.down_proj.weight")->info->shape,
            std::vector<uint64_t>({256, 688}));
  EXPECT_EQ(model.value()->Find("model.layers.0.self_attn.k_proj.weight")->info->shape,
            std::vector<uint64_t>({128, 256}));
  EXPECT_EQ(model.value()->Find("lm_head.weight")->info->shape,
            std::vector<uint64_t>({512, 256}));

  // Norms are exactly 1; projections are N(0, 0.02^2), lm_head
  // N(0, 1 / (2 hidden)).
  for (const WeightSpec& spec : specs) {
    EXPECT_EQ(spec.stddev, spec.is_norm                  ? 0.0
                           : spec.name == "lm_head.weight" ? 1.0 / std::sqrt(512.0)
                                                           : 0.02)
        << spec.name;
  }
  auto data = model.value()->Data("model.layers.2.post_attention_layernorm.weight");
  ASSERT_TRUE(data.ok());
  const auto* norm = reinterpret_cast<const uint16_t*>(data->data);
  for (int i = 0; i < 256; ++i) ASSERT_EQ(norm[i], 0x3F80) << i;
  for (const auto& [name, want_std] :
       std::vector<std::pair<std::string, double>>{{"model.layers.1.mlp.gate_proj.weight", 0.02},
                                                   {"lm_head.weight", LmHeadStd(256)}}) {
    auto tensor = model.value()->Data(name);
    ASSERT_TRUE(tensor.ok());
    const auto* g = reinterpret_cast<const uint16_t*>(tensor->data);
    const size_t n = tensor->size / 2;
    double sum = 0, sum_sq = 0;
    for (size_t i = 0; i < n; ++i) {
      uint32_t bits = static_cast<uint32_t>(g[i]) << 16;
      float f;
      std::memcpy(&f, &bits, sizeof(f));
      ASSERT_TRUE(std::isfinite(f));
      sum += f;
      sum_sq += static_cast<double>(f) * f;
      ASSERT_EQ(g[i], InitNormalBf16(0, name, i, want_std)) << name << " " << i;
    }
    const double mean = sum / n;
    const double stddev = std::sqrt(sum_sq / n - mean * mean);
    EXPECT_NEAR(mean, 0.0, 0.05 * want_std) << name;
    EXPECT_NEAR(stddev, want_std, 0.025 * want_std) << name;
  }
}

// The generator is the one the header specifies: these values come from
// an independent Python rendering of its formulas (splitmix64, FNV-1a,
// Box-Muller in double, float, bf16 round-to-nearest-even).
TEST(InitModelTest, GeneratorMatchesItsSpecification) {
  const std::vector<uint16_t> embed = {0x3cdf, 0xbcd0, 0x3cfc, 0x3d0a, 0x3d25, 0x398e};
  for (size_t i = 0; i < embed.size(); ++i) {
    EXPECT_EQ(InitNormalBf16(0, "model.embed_tokens.weight", i), embed[i]) << i;
  }
  EXPECT_EQ(InitNormalBf16(0, "model.embed_tokens.weight", 1000001), 0xbd4a);
  const std::vector<uint16_t> down = {0xbc4a, 0x3cf5, 0xbcf5, 0x3c97, 0xbaff, 0x3c43};
  for (size_t i = 0; i < down.size(); ++i) {
    EXPECT_EQ(InitNormalBf16(7, "model.layers.3.mlp.down_proj.weight", i), down[i]) << i;
  }
  EXPECT_EQ(InitNormalBf16(7, "model.layers.3.mlp.down_proj.weight", 1000001), 0xbc77);
  // lm_head of the tiny preset: std 1 / sqrt(2 * 256).
  EXPECT_EQ(LmHeadStd(256), 1.0 / std::sqrt(512.0));
  const std::vector<uint16_t> head = {0xbcab, 0xbd65, 0xbd9f, 0xbced, 0x3c89, 0xbd0c};
  for (size_t i = 0; i < head.size(); ++i) {
    EXPECT_EQ(InitNormalBf16(3, "lm_head.weight", i, LmHeadStd(256)), head[i]) << i;
  }
  EXPECT_EQ(InitNormalBf16(3, "lm_head.weight", 262143, LmHeadStd(256)), 0x3d0a);
}

TEST(InitModelTest, BytesDependOnTheSeedOnly) {
  TempDir tmp;
  const std::string corpus = WriteCorpus(tmp.path());
  InitModelOptions a = TinyOptions(tmp.path() + "/a", corpus);
  InitModelOptions b = TinyOptions(tmp.path() + "/b", corpus);
  b.num_threads = 3;  // threads split chunks differently; bytes must not change
  InitModelOptions c = TinyOptions(tmp.path() + "/c", corpus);
  c.seed = 1;
  ASSERT_TRUE(InitModel(a).ok());
  ASSERT_TRUE(InitModel(b).ok());
  ASSERT_TRUE(InitModel(c).ok());
  for (const char* f : {"config.json", "model.safetensors", "tokenizer.json",
                        "tokenizer_config.json"}) {
    EXPECT_EQ(ReadAll(a.out_dir + "/" + f), ReadAll(b.out_dir + "/" + f)) << f;
  }
  EXPECT_NE(ReadAll(a.out_dir + "/model.safetensors"), ReadAll(c.out_dir + "/model.safetensors"));
  EXPECT_EQ(ReadAll(a.out_dir + "/tokenizer.json"), ReadAll(c.out_dir + "/tokenizer.json"));
}

TEST(InitModelTest, ChunkSizeAndThreadsDoNotChangeTheBytes) {
  TempDir tmp;
  auto config = InitModelPresetConfig("tiny", 512);
  ASSERT_TRUE(config.ok());
  config->num_hidden_layers = 2;
  std::string reference;
  // (chunk elements, threads): odd chunk starts, chunks split over threads.
  for (const auto& [chunk, threads] : std::vector<std::pair<uint64_t, int>>{
           {kInitChunkElements, 1}, {1001, 1}, {140001, 3}, {65536 * 2, 2}}) {
    const std::string dir = tmp.path() + "/c" + std::to_string(chunk) + "_" +
                            std::to_string(threads);
    ASSERT_EQ(::mkdir(dir.c_str(), 0755), 0);
    Status st = WriteRandomLlamaWeights(dir, *config, 5, 5'000'000'000, threads, nullptr, chunk);
    ASSERT_TRUE(st.ok()) << st.ToString();
    const std::string bytes = ReadAll(dir + "/model.safetensors");
    ASSERT_GT(bytes.size(), 2'000'000u);
    if (reference.empty()) {
      reference = bytes;
    } else {
      EXPECT_TRUE(bytes == reference) << "chunk " << chunk << ", " << threads << " threads";
    }
  }
  EXPECT_FALSE(WriteRandomLlamaWeights(tmp.path(), *config, 5, 1000, 1, nullptr, 0).ok());
}

TEST(InitModelTest, ShardedOutputHasAValidIndexAndTheSameTensors) {
  TempDir tmp;
  const std::string corpus = WriteCorpus(tmp.path());
  InitModelOptions single = TinyOptions(tmp.path() + "/single", corpus);
  InitModelOptions sharded = TinyOptions(tmp.path() + "/sharded", corpus);
  sharded.max_shard_bytes = 1'500'000;  // ~1.4 MB per layer: several shards
  sharded.num_layers_override = 3;
  single.num_layers_override = 3;
  ASSERT_TRUE(InitModel(single).ok());
  Status st = InitModel(sharded);
  ASSERT_TRUE(st.ok()) << st.ToString();

  EXPECT_FALSE(Exists(sharded.out_dir + "/model.safetensors"));
  const std::string index_text = ReadAll(sharded.out_dir + "/model.safetensors.index.json");
  auto index = ParseSafetensorsIndex(index_text, "index");
  ASSERT_TRUE(index.ok()) << index.status().ToString();
  std::set<std::string> files;
  for (const auto& [name, file] : index->weight_map) files.insert(file);
  EXPECT_GE(files.size(), 3u);
  EXPECT_EQ(*files.begin(), "model-00001-of-0000" + std::to_string(files.size()) + ".safetensors");

  auto a = SafetensorsModel::OpenDirectory(single.out_dir);
  auto b = SafetensorsModel::OpenDirectory(sharded.out_dir);
  ASSERT_TRUE(a.ok() && b.ok()) << b.status().ToString();
  ASSERT_EQ(a.value()->TensorNames(), b.value()->TensorNames());
  uint64_t total = 0;
  for (const std::string& name : a.value()->TensorNames()) {
    auto x = a.value()->Data(name);
    auto y = b.value()->Data(name);
    ASSERT_TRUE(x.ok() && y.ok());
    ASSERT_EQ(x->size, y->size);
    EXPECT_EQ(std::memcmp(x->data, y->data, x->size), 0) << name;
    total += x->size;
  }
  EXPECT_EQ(b.value()->index_total_size(), total);
  // Each shard stays under the limit unless one tensor alone exceeds it.
  for (const auto& shard : b.value()->shards()) {
    EXPECT_LE(shard->header().data_bytes, sharded.max_shard_bytes) << shard->path();
  }
  auto config = LoadLlamaConfig(sharded.out_dir);
  ASSERT_TRUE(config.ok());
  EXPECT_EQ(config->num_hidden_layers, 3);
}

TEST(InitModelTest, PresetsHaveTheLlama3Shapes) {
  auto b8 = InitModelPresetConfig("llama3-8b", 1024);
  ASSERT_TRUE(b8.ok());
  EXPECT_EQ(b8->vocab_size, 128256);
  EXPECT_EQ(b8->NumParameters(), 8'030'261'248);  // Meta-Llama-3-8B
  EXPECT_EQ(b8->rope_scaling.type, RopeType::kDefault);
  EXPECT_EQ(b8->max_position_embeddings, 8192);
  auto b70 = InitModelPresetConfig("llama3-70b", 128256);
  ASSERT_TRUE(b70.ok());
  EXPECT_EQ(b70->hidden_size, 8192);
  EXPECT_EQ(b70->intermediate_size, 28672);
  EXPECT_EQ(b70->num_hidden_layers, 80);
  EXPECT_EQ(b70->num_attention_heads, 64);
  EXPECT_EQ(b70->num_key_value_heads, 8);
  EXPECT_EQ(b70->NumParameters(), 70'553'706'496);  // Meta-Llama-3-70B
  auto b31 = InitModelPresetConfig("llama3.1-70b", 1024);
  ASSERT_TRUE(b31.ok());
  EXPECT_EQ(b31->rope_scaling.type, RopeType::kLlama3);
  EXPECT_EQ(b31->max_position_embeddings, 131072);

  // config.json round-trips through the parser, rope_scaling included.
  b31->bos_token_id = 128000;
  b31->eos_token_ids = {128001, 128009};
  auto parsed = ParseLlamaConfig(LlamaConfigToJson(*b31), "config.json");
  ASSERT_TRUE(parsed.ok()) << parsed.status().ToString();
  EXPECT_EQ(parsed->NumParameters(), b31->NumParameters());
  EXPECT_EQ(parsed->rope_scaling.type, RopeType::kLlama3);
  EXPECT_EQ(parsed->rope_scaling.factor, 8.0);
  EXPECT_EQ(parsed->rope_scaling.original_max_position_embeddings, 8192);
  EXPECT_EQ(parsed->bos_token_id, 128000);
  EXPECT_EQ(parsed->eos_token_ids, std::vector<int64_t>({128001, 128009}));
  EXPECT_EQ(RopeInverseFrequencies(*parsed), RopeInverseFrequencies(*b31));
  const nlohmann::json j = nlohmann::json::parse(LlamaConfigToJson(*b31));
  EXPECT_EQ(j["architectures"], nlohmann::json::array({"LlamaForCausalLM"}));
  EXPECT_EQ(j["model_type"], "llama");
  EXPECT_EQ(j["torch_dtype"], "bfloat16");

  auto bad = InitModelPresetConfig("llama4", 1024);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("unknown preset \"llama4\""), std::string::npos);
  EXPECT_NE(bad.status().message().find("tiny, llama3-8b"), std::string::npos);
}

TEST(InitModelTest, PresetsOfTheOtherFamiliesHaveThePublishedShapes) {
  // Parameter counts of the published checkpoints (their safetensors sizes
  // over 2 bytes), with the tokenizer smaller than the real vocabulary.
  const std::vector<std::pair<std::string, int64_t>> expected = {
      {"llama3.2-1b", 1'235'814'400},  {"llama3.2-3b", 3'212'749'824},
      {"mistral-7b-v0.3", 7'248'023'552}, {"qwen2.5-0.5b", 494'032'768},
      {"qwen2.5-1.5b", 1'543'714'304}, {"qwen2.5-3b", 3'085'938'688},
      {"qwen2.5-7b", 7'615'616'512},   {"qwen2.5-14b", 14'770'033'664},
      {"qwen2.5-32b", 32'763'876'352}, {"qwen2.5-72b", 72'706'203'648}};
  for (const auto& [name, params] : expected) {
    auto c = InitModelPresetConfig(name, 1000);
    ASSERT_TRUE(c.ok()) << name << ": " << c.status().ToString();
    EXPECT_EQ(c->NumParameters(), params) << name;
    // config.json means the same to the parser, family included.
    auto parsed = ParseLlamaConfig(LlamaConfigToJson(*c), name + "/config.json");
    ASSERT_TRUE(parsed.ok()) << name << ": " << parsed.status().ToString();
    EXPECT_EQ(parsed->family, c->family) << name;
    EXPECT_EQ(parsed->NumParameters(), params) << name;
    EXPECT_EQ(parsed->head_dim, c->head_dim) << name;
    EXPECT_EQ(parsed->tie_word_embeddings, c->tie_word_embeddings) << name;
    EXPECT_FALSE(parsed->sliding_window.has_value()) << name;
    EXPECT_EQ(RopeInverseFrequencies(*parsed), RopeInverseFrequencies(*c)) << name;
  }
  auto l32 = InitModelPresetConfig("llama3.2-1b", 1000);
  EXPECT_TRUE(l32->tie_word_embeddings);
  EXPECT_EQ(l32->rope_scaling.type, RopeType::kLlama3);
  EXPECT_EQ(l32->rope_scaling.factor, 32.0);
  EXPECT_EQ(l32->head_dim, 64);
  auto q = InitModelPresetConfig("qwen2.5-7b", 1000);
  EXPECT_EQ(q->family, ModelFamily::kQwen2);
  EXPECT_TRUE(q->qkv_bias);
  EXPECT_FALSE(q->tie_word_embeddings);
  const nlohmann::json qj = nlohmann::json::parse(LlamaConfigToJson(*q));
  EXPECT_EQ(qj["architectures"], nlohmann::json::array({"Qwen2ForCausalLM"}));
  EXPECT_EQ(qj["model_type"], "qwen2");
  EXPECT_EQ(qj["use_sliding_window"], false);
  EXPECT_FALSE(qj.contains("attention_bias"));  // Qwen2Config has no such key
  const nlohmann::json mj =
      nlohmann::json::parse(LlamaConfigToJson(*InitModelPresetConfig("mistral-7b-v0.3", 1)));
  EXPECT_EQ(mj["model_type"], "mistral");
  EXPECT_TRUE(mj["sliding_window"].is_null());
  // The q/k/v biases are tensors of their own, after their weights.
  std::vector<std::string> names;
  for (const WeightSpec& w : LlamaWeightSpecs(*InitModelPresetConfig("qwen2.5-0.5b", 1))) {
    if (w.name.rfind("model.layers.0.self_attn.", 0) == 0) names.push_back(w.name);
  }
  EXPECT_EQ(names, std::vector<std::string>({
                       "model.layers.0.self_attn.q_proj.weight",
                       "model.layers.0.self_attn.q_proj.bias",
                       "model.layers.0.self_attn.k_proj.weight",
                       "model.layers.0.self_attn.k_proj.bias",
                       "model.layers.0.self_attn.v_proj.weight",
                       "model.layers.0.self_attn.v_proj.bias",
                       "model.layers.0.self_attn.o_proj.weight"}));
}

TEST(InitModelTest, CopiesARealTokenizer) {
  std::string missing;
  const std::string dir = data::test_data::TokenizerDir("llama3_1", &missing);
  if (dir.empty()) GTEST_SKIP() << missing;
  TempDir tmp;
  InitModelOptions o;
  o.out_dir = tmp.path() + "/m";
  o.tokenizer_dir = dir;
  o.num_layers_override = 1;
  o.num_threads = 1;
  Status st = InitModel(o);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_EQ(ReadAll(o.out_dir + "/tokenizer.json"), ReadAll(dir + "/tokenizer.json"));
  auto config = LoadLlamaConfig(o.out_dir);
  ASSERT_TRUE(config.ok());
  EXPECT_EQ(config->vocab_size, 128256);
  EXPECT_EQ(config->bos_token_id, 128000);
  EXPECT_EQ(config->eos_token_ids, std::vector<int64_t>({128001, 128009}));
}

TEST(InitModelTest, BadOptionsAreErrorsThatSayWhatToChange) {
  TempDir tmp;
  const std::string corpus = WriteCorpus(tmp.path());
  InitModelOptions o = TinyOptions(tmp.path() + "/m", corpus);

  InitModelOptions both = o;
  both.tokenizer_dir = tmp.path();
  Status st = InitModel(both);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("exactly one of tokenizer_corpus"), std::string::npos);

  InitModelOptions preset = o;
  preset.preset = "huge";
  st = InitModel(preset);
  EXPECT_NE(st.message().find("unknown preset \"huge\""), std::string::npos) << st.ToString();
  EXPECT_FALSE(Exists(o.out_dir));  // nothing written for a bad preset

  InitModelOptions vocab = o;
  vocab.vocab_size = 10;
  st = InitModel(vocab);
  EXPECT_NE(st.message().find("vocab_size (10)"), std::string::npos) << st.ToString();

  const std::string bad_corpus = tmp.path() + "/bad.jsonl";
  std::ofstream(bad_corpus) << "{\"text\": \"ok\"}\n{\"text\": 3}\n";
  InitModelOptions line = o;
  line.tokenizer_corpus = bad_corpus;
  st = InitModel(line);
  EXPECT_NE(st.message().find(bad_corpus + ":2: \"text\" is not a string"), std::string::npos)
      << st.ToString();

  ASSERT_TRUE(InitModel(o).ok());
  st = InitModel(o);  // the directory now holds a model
  EXPECT_EQ(st.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(st.message().find("already holds a model"), std::string::npos);
}

}  // namespace
}  // namespace ftune::trainer
