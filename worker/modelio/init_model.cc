// See init_model.h.
#include "worker/modelio/init_model.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <thread>
#include <utility>

#include <nlohmann/json.hpp>

#include "kernels/random_init_math.h"
#include "worker/data/bpe_trainer.h"
#include "worker/data/tokenizer.h"
#include "ftune/file_util.h"
#include "worker/modelio/safetensors.h"

namespace ftune::trainer {
namespace {

using ordered_json = nlohmann::ordered_json;

constexpr double kInitStd = 0.02;
constexpr int64_t kLlama3Vocab = 128256;
constexpr uint16_t kBf16One = 0x3F80;
// Corpus and tokenizer files larger than this are refused: the corpus is
// for a small demo tokenizer, and a real tokenizer.json is ~9 MB.
constexpr uint64_t kMaxCorpusBytes = uint64_t{1} << 30;
constexpr uint64_t kMaxTokenizerFileBytes = uint64_t{512} << 20;
constexpr uint64_t kProgressEveryBytes = uint64_t{1} << 30;

using kernels::random_init::FloatToBf16;
using kernels::random_init::NormalPair;
using kernels::random_init::SplitMix64;

uint64_t Fnv1a64(const std::string& s) {
  uint64_t h = 0xCBF29CE484222325ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 0x100000001B3ull;
  }
  return h;
}

// Elements [begin, end) of a tensor into out (bf16 bits).
void FillNormal(uint64_t key, double stddev, uint64_t begin, uint64_t end, uint16_t* out) {
  uint64_t i = begin;
  float a, b;
  if (i < end && (i & 1)) {
    NormalPair(key, i / 2, stddev, &a, &b);
    *out++ = FloatToBf16(b);
    ++i;
  }
  for (; i + 1 < end; i += 2) {
    NormalPair(key, i / 2, stddev, &a, &b);
    *out++ = FloatToBf16(a);
    *out++ = FloatToBf16(b);
  }
  if (i < end) {
    NormalPair(key, i / 2, stddev, &a, &b);
    *out++ = FloatToBf16(a);
  }
}

std::string FormatGB(uint64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.2f GB", static_cast<double>(bytes) / 1e9);
  return buf;
}

bool PathExists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

// mkdir -p.
Status MakeDirs(const std::string& dir) {
  if (dir.empty()) return InvalidArgumentError("init-model: --out (out_dir) is empty");
  std::string partial;
  size_t pos = 0;
  while (pos != std::string::npos) {
    pos = dir.find('/', pos + 1);
    partial = dir.substr(0, pos);
    if (partial.empty()) continue;
    if (::mkdir(partial.c_str(), 0755) != 0 && errno != EEXIST) {
      return InternalError("init-model: cannot create directory " + partial + ": " +
                           ErrnoMessage(errno));
    }
  }
  struct stat st;
  if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return InvalidArgumentError("init-model: out_dir " + dir + " is not a directory");
  }
  return OkStatus();
}

void Report(const InitModelOptions& options, const std::string& message) {
  if (options.progress) options.progress(message);
}

// The strings of a JSONL corpus: message contents (and roles), text,
// prompt and completion.
Result<std::vector<std::string>> ReadCorpus(const std::string& path) {
  FTUNE_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path, kMaxCorpusBytes));
  std::vector<std::string> corpus;
  std::istringstream in(text);
  std::string line;
  int64_t line_no = 0;
  const auto bad = [&](const std::string& what) {
    return InvalidArgumentError(path + ":" + std::to_string(line_no) + ": " + what +
                                " (the tokenizer corpus is JSONL: one object per line with "
                                "\"messages\", \"text\" or \"prompt\"/\"completion\")");
  };
  while (std::getline(in, line)) {
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json record;
    try {
      record = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      return bad(std::string("not JSON: ") + e.what());
    }
    if (!record.is_object()) return bad("not a JSON object");
    bool used = false;
    if (auto it = record.find("messages"); it != record.end()) {
      if (!it->is_array()) return bad("\"messages\" is not a list");
      for (const auto& m : *it) {
        if (!m.is_object() || !m.contains("role") || !m.contains("content") ||
            !m["role"].is_string() || !m["content"].is_string()) {
          return bad("a message is not {\"role\": string, \"content\": string}");
        }
        corpus.push_back(m["role"].get<std::string>());
        corpus.push_back(m["content"].get<std::string>());
      }
      used = true;
    }
    for (const char* key : {"text", "prompt", "completion"}) {
      if (auto it = record.find(key); it != record.end()) {
        if (!it->is_string()) return bad(std::string("\"") + key + "\" is not a string");
        corpus.push_back(it->get<std::string>());
        used = true;
      }
    }
    if (!used) return bad("no \"messages\", \"text\", \"prompt\" or \"completion\" field");
  }
  if (corpus.empty()) {
    return InvalidArgumentError(path + ": the tokenizer corpus holds no records");
  }
  return corpus;
}

// What the model needs to know of the tokenizer it was written with.
struct TokenizerInfo {
  int64_t vocab_size = 0;
  std::optional<int64_t> bos_id;
  std::vector<int64_t> eos_ids;
};

Result<TokenizerInfo> WriteTrainedTokenizer(const InitModelOptions& options) {
  FTUNE_ASSIGN_OR_RETURN(std::vector<std::string> corpus,
                                 ReadCorpus(options.tokenizer_corpus));
  data::BpeTrainerOptions bpe;
  bpe.vocab_size = options.vocab_size;
  Result<data::TokenizerFiles> files = data::TrainLlama3Tokenizer(corpus, bpe);
  if (!files.ok()) {
    return Status(files.status().code(),
                  "init-model: training the tokenizer on " + options.tokenizer_corpus + ": " +
                      files.status().message());
  }
  FTUNE_RETURN_IF_ERROR(
      WriteFileAtomically(options.out_dir + "/tokenizer.json", files->tokenizer_json));
  FTUNE_RETURN_IF_ERROR(WriteFileAtomically(options.out_dir + "/tokenizer_config.json",
                                                    files->tokenizer_config_json));
  Report(options, "tokenizer: byte-level BPE with " + std::to_string(files->vocab_size) +
                      " ids trained on " + std::to_string(corpus.size()) + " strings of " +
                      options.tokenizer_corpus);
  TokenizerInfo info;
  info.vocab_size = files->vocab_size;
  info.bos_id = files->bos_id;
  info.eos_ids = {files->end_of_text_id, files->eos_id};
  return info;
}

Result<TokenizerInfo> CopyTokenizer(const InitModelOptions& options) {
  const std::string& src = options.tokenizer_dir;
  if (!PathExists(src + "/tokenizer.json")) {
    return NotFoundError("init-model: tokenizer_dir " + src +
                         " has no tokenizer.json (pass a directory holding an HF tokenizer, "
                         "or a corpus to train one on)");
  }
  // Load it first: a tokenizer ftune cannot read would make a useless model.
  Result<std::unique_ptr<data::Tokenizer>> tok = data::Tokenizer::Load(src);
  if (!tok.ok()) {
    return Status(tok.status().code(), "init-model: tokenizer_dir " + src + ": " +
                                           tok.status().message());
  }
  for (const char* name : {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}) {
    const std::string from = src + "/" + name;
    if (!PathExists(from)) continue;
    FTUNE_ASSIGN_OR_RETURN(std::string bytes,
                                   ReadFileToString(from, kMaxTokenizerFileBytes));
    FTUNE_RETURN_IF_ERROR(WriteFileAtomically(options.out_dir + "/" + name, bytes));
  }
  TokenizerInfo info;
  info.vocab_size = (*tok)->vocab_size();
  if ((*tok)->bos_id()) info.bos_id = *(*tok)->bos_id();
  // Llama 3 Instruct lists <|end_of_text|> and the config's EOS (<|eot_id|>).
  if (auto eot = (*tok)->TokenToId(data::kEndOfText)) info.eos_ids.push_back(*eot);
  if (auto eos = (*tok)->eos_id();
      eos && std::find(info.eos_ids.begin(), info.eos_ids.end(), *eos) == info.eos_ids.end()) {
    info.eos_ids.push_back(*eos);
  }
  Report(options, "tokenizer: copied from " + src + " (" + std::to_string(info.vocab_size) +
                      " ids)");
  return info;
}

// One output file and the tensors in it.
struct ShardPlan {
  std::string file;
  std::vector<size_t> specs;  // indices into the WeightSpec list
  uint64_t bytes = 0;
};

uint64_t NumElements(const WeightSpec& spec) {
  uint64_t n = 1;
  for (uint64_t d : spec.shape) n *= d;
  return n;
}

// Elements [begin, end) of a tensor into out, split over num_threads.
void FillChunk(const WeightSpec& spec, uint64_t key, int num_threads, uint64_t begin,
               uint64_t end, uint16_t* out) {
  const uint64_t count = end - begin;
  if (spec.is_norm) {
    std::fill(out, out + count, kBf16One);
    return;
  }
  // Small chunks are not worth a thread each.
  const uint64_t threads = std::max<uint64_t>(
      1, std::min<uint64_t>(static_cast<uint64_t>(num_threads), count / 65536));
  if (threads == 1) {
    FillNormal(key, spec.stddev, begin, end, out);
    return;
  }
  std::vector<std::thread> pool;
  const uint64_t per = (count + threads - 1) / threads;
  for (uint64_t t = 0; t < threads; ++t) {
    const uint64_t b = std::min(count, t * per);
    const uint64_t e = std::min(count, b + per);
    if (b < e) pool.emplace_back(FillNormal, key, spec.stddev, begin + b, begin + e, out + b);
  }
  for (std::thread& th : pool) th.join();
}

// Streams one tensor's bf16 bytes into the writer, chunk by chunk, the
// next chunk being generated while the current one is written (disk and
// generator overlap: on a 70B model each takes minutes).
Status WriteTensor(const WeightSpec& spec, uint64_t seed, int num_threads,
                   uint64_t chunk_elements, std::vector<uint16_t> buffers[2],
                   AtomicFileWriter* writer) {
  const uint64_t n = NumElements(spec);
  if (n == 0) return OkStatus();
  const uint64_t key = InitTensorKey(seed, spec.name);
  const auto fill = [&](int which, uint64_t begin) {
    const uint64_t end = std::min(n, begin + chunk_elements);
    buffers[which].resize(end - begin);
    FillChunk(spec, key, num_threads, begin, end, buffers[which].data());
  };
  fill(0, 0);
  int current = 0;
  for (uint64_t begin = 0; begin < n; begin += chunk_elements) {
    const uint64_t next = begin + chunk_elements;
    std::thread ahead;
    if (next < n) ahead = std::thread(fill, 1 - current, next);
    const Status written =
        writer->Append(buffers[current].data(), buffers[current].size() * sizeof(uint16_t));
    if (ahead.joinable()) ahead.join();
    FTUNE_RETURN_IF_ERROR(written);
    current = 1 - current;
  }
  return OkStatus();
}

}  // namespace

const std::vector<std::string>& InitModelPresets() {
  static const std::vector<std::string> presets = {
      "tiny",          "llama3-8b",     "llama3.1-8b",   "llama3-70b",    "llama3.1-70b",
      "llama3.2-1b",   "llama3.2-3b",   "mistral-7b-v0.3", "qwen2.5-0.5b", "qwen2.5-1.5b",
      "qwen2.5-3b",    "qwen2.5-7b",    "qwen2.5-14b",   "qwen2.5-32b",   "qwen2.5-72b"};
  return presets;
}

namespace {

// The shapes of the published checkpoints, from their config.json files on
// the Hugging Face Hub:
//   meta-llama/Meta-Llama-3-8B, Meta-Llama-3-70B, Llama-3.1-8B, Llama-3.1-70B,
//   Llama-3.2-1B, Llama-3.2-3B;
//   mistralai/Mistral-7B-v0.3;
//   Qwen/Qwen2.5-0.5B, -1.5B, -3B, -7B, -14B, -32B, -72B (the Instruct
//   variants share the shapes).
struct Preset {
  const char* name;
  ModelFamily family;
  int64_t hidden, intermediate, layers, heads, kv_heads, head_dim, vocab, max_positions;
  double rope_theta, rms_norm_eps;
  bool tied;
  double llama3_factor;  // 0: no rope_scaling
};

constexpr int64_t kQwenVocabSmall = 151936;  // 0.5B-3B
constexpr int64_t kQwenVocabLarge = 152064;  // 7B-72B

constexpr Preset kPresets[] = {
    {"llama3-8b", ModelFamily::kLlama, 4096, 14336, 32, 32, 8, 128, kLlama3Vocab, 8192, 500000.0, 1e-5, false, 0},
    {"llama3.1-8b", ModelFamily::kLlama, 4096, 14336, 32, 32, 8, 128, kLlama3Vocab, 131072, 500000.0, 1e-5, false, 8.0},
    {"llama3-70b", ModelFamily::kLlama, 8192, 28672, 80, 64, 8, 128, kLlama3Vocab, 8192, 500000.0, 1e-5, false, 0},
    {"llama3.1-70b", ModelFamily::kLlama, 8192, 28672, 80, 64, 8, 128, kLlama3Vocab, 131072, 500000.0, 1e-5, false, 8.0},
    {"llama3.2-1b", ModelFamily::kLlama, 2048, 8192, 16, 32, 8, 64, kLlama3Vocab, 131072, 500000.0, 1e-5, true, 32.0},
    {"llama3.2-3b", ModelFamily::kLlama, 3072, 8192, 28, 24, 8, 128, kLlama3Vocab, 131072, 500000.0, 1e-5, true, 32.0},
    {"mistral-7b-v0.3", ModelFamily::kMistral, 4096, 14336, 32, 32, 8, 128, 32768, 32768, 1000000.0, 1e-5, false, 0},
    {"qwen2.5-0.5b", ModelFamily::kQwen2, 896, 4864, 24, 14, 2, 64, kQwenVocabSmall, 32768, 1000000.0, 1e-6, true, 0},
    {"qwen2.5-1.5b", ModelFamily::kQwen2, 1536, 8960, 28, 12, 2, 128, kQwenVocabSmall, 131072, 1000000.0, 1e-6, true, 0},
    {"qwen2.5-3b", ModelFamily::kQwen2, 2048, 11008, 36, 16, 2, 128, kQwenVocabSmall, 32768, 1000000.0, 1e-6, true, 0},
    {"qwen2.5-7b", ModelFamily::kQwen2, 3584, 18944, 28, 28, 4, 128, kQwenVocabLarge, 131072, 1000000.0, 1e-6, false, 0},
    {"qwen2.5-14b", ModelFamily::kQwen2, 5120, 13824, 48, 40, 8, 128, kQwenVocabLarge, 131072, 1000000.0, 1e-5, false, 0},
    {"qwen2.5-32b", ModelFamily::kQwen2, 5120, 27648, 64, 40, 8, 128, kQwenVocabLarge, 131072, 1000000.0, 1e-5, false, 0},
    {"qwen2.5-72b", ModelFamily::kQwen2, 8192, 29568, 80, 64, 8, 128, kQwenVocabLarge, 131072, 1000000.0, 1e-5, false, 0},
};

}  // namespace

Result<LlamaConfig> InitModelPresetConfig(const std::string& preset,
                                          int64_t tokenizer_vocab_size) {
  if (tokenizer_vocab_size < 1) {
    return InvalidArgumentError("init-model: tokenizer vocab size (" +
                                std::to_string(tokenizer_vocab_size) + ") must be >= 1");
  }
  LlamaConfig c;
  c.torch_dtype = ModelDtype::kBFloat16;
  if (preset == "tiny") {
    c.rope_theta = 500000.0;
    c.rms_norm_eps = 1e-5;
    c.max_position_embeddings = 8192;
    c.hidden_size = 256;
    c.intermediate_size = 688;
    c.num_hidden_layers = 4;
    c.num_attention_heads = 8;
    c.num_key_value_heads = 4;
    c.head_dim = 32;
    c.vocab_size = tokenizer_vocab_size;
    return c;
  }
  for (const Preset& p : kPresets) {
    if (preset != p.name) continue;
    c.family = p.family;
    c.hidden_size = p.hidden;
    c.intermediate_size = p.intermediate;
    c.num_hidden_layers = p.layers;
    c.num_attention_heads = p.heads;
    c.num_key_value_heads = p.kv_heads;
    c.head_dim = p.head_dim;
    // The real embedding shape; a larger tokenizer grows it.
    c.vocab_size = std::max(p.vocab, tokenizer_vocab_size);
    c.max_position_embeddings = p.max_positions;
    c.rope_theta = p.rope_theta;
    c.rms_norm_eps = p.rms_norm_eps;
    c.tie_word_embeddings = p.tied;
    c.qkv_bias = p.family == ModelFamily::kQwen2;
    if (p.llama3_factor > 0) {
      c.rope_scaling.type = RopeType::kLlama3;
      c.rope_scaling.factor = p.llama3_factor;
      c.rope_scaling.low_freq_factor = 1.0;
      c.rope_scaling.high_freq_factor = 4.0;
      c.rope_scaling.original_max_position_embeddings = 8192;
    }
    return c;
  }
  std::string names;
  for (const std::string& p : InitModelPresets()) names += (names.empty() ? "" : ", ") + p;
  return InvalidArgumentError("init-model: unknown preset \"" + preset + "\" (presets: " + names +
                              ")");
}

std::string LlamaConfigToJson(const LlamaConfig& c) {
  const bool llama = c.family == ModelFamily::kLlama;
  const bool qwen2 = c.family == ModelFamily::kQwen2;
  ordered_json j = ordered_json::object();
  j["architectures"] = ordered_json::array(
      {llama ? "LlamaForCausalLM" : qwen2 ? "Qwen2ForCausalLM" : "MistralForCausalLM"});
  if (llama) j["attention_bias"] = c.attention_bias;
  j["attention_dropout"] = 0.0;
  if (c.bos_token_id) j["bos_token_id"] = *c.bos_token_id;
  if (c.eos_token_ids.size() == 1) {
    j["eos_token_id"] = c.eos_token_ids[0];
  } else if (!c.eos_token_ids.empty()) {
    j["eos_token_id"] = c.eos_token_ids;
  }
  if (!qwen2) j["head_dim"] = c.head_dim;  // Qwen2 configs derive it
  j["hidden_act"] = "silu";
  j["hidden_size"] = c.hidden_size;
  j["initializer_range"] = kInitStd;
  j["intermediate_size"] = c.intermediate_size;
  j["max_position_embeddings"] = c.max_position_embeddings;
  if (qwen2) j["max_window_layers"] = c.num_hidden_layers;
  if (llama) j["mlp_bias"] = c.mlp_bias;
  j["model_type"] = std::string(ModelFamilyName(c.family));
  j["num_attention_heads"] = c.num_attention_heads;
  j["num_hidden_layers"] = c.num_hidden_layers;
  j["num_key_value_heads"] = c.num_key_value_heads;
  if (c.pad_token_id) j["pad_token_id"] = *c.pad_token_id;
  if (llama) j["pretraining_tp"] = 1;
  j["rms_norm_eps"] = c.rms_norm_eps;
  switch (c.rope_scaling.type) {
    case RopeType::kDefault:
      j["rope_scaling"] = nullptr;
      break;
    case RopeType::kLinear:
      j["rope_scaling"] = {{"factor", c.rope_scaling.factor}, {"rope_type", "linear"}};
      break;
    case RopeType::kLlama3:
      j["rope_scaling"] = {
          {"factor", c.rope_scaling.factor},
          {"high_freq_factor", c.rope_scaling.high_freq_factor},
          {"low_freq_factor", c.rope_scaling.low_freq_factor},
          {"original_max_position_embeddings", c.rope_scaling.original_max_position_embeddings},
          {"rope_type", "llama3"}};
      break;
  }
  j["rope_theta"] = c.rope_theta;
  if (qwen2) {
    j["sliding_window"] = c.max_position_embeddings;  // as published; off below
  } else if (c.family == ModelFamily::kMistral) {
    j["sliding_window"] = c.sliding_window ? ordered_json(*c.sliding_window) : ordered_json(nullptr);
  }
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["torch_dtype"] = std::string(ModelDtypeName(c.torch_dtype));
  j["use_cache"] = true;
  if (qwen2) j["use_sliding_window"] = false;
  j["vocab_size"] = c.vocab_size;
  return j.dump(2) + "\n";
}

std::vector<WeightSpec> LlamaWeightSpecs(const LlamaConfig& c) {
  using U = uint64_t;
  const U hidden = c.hidden_size, inter = c.intermediate_size, q = c.q_size(),
          kv = c.kv_size(), vocab = c.vocab_size;
  std::vector<WeightSpec> specs;
  const double w = kInitStd;
  specs.push_back({"model.embed_tokens.weight", {vocab, hidden}, false, w});
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    specs.push_back({p + "input_layernorm.weight", {hidden}, true});
    // Qwen2's q/k/v biases follow their weights, in state-dict order (HF
    // zero-initializes biases; random ones exercise the path).
    for (const auto& [proj, out] : {std::pair<const char*, U>{"q_proj", q}, {"k_proj", kv},
                                    {"v_proj", kv}}) {
      specs.push_back({p + "self_attn." + proj + ".weight", {out, hidden}, false, w});
      if (c.has_qkv_bias()) specs.push_back({p + "self_attn." + proj + ".bias", {out}, false, w});
    }
    specs.push_back({p + "self_attn.o_proj.weight", {hidden, q}, false, w});
    specs.push_back({p + "post_attention_layernorm.weight", {hidden}, true});
    specs.push_back({p + "mlp.gate_proj.weight", {inter, hidden}, false, w});
    specs.push_back({p + "mlp.up_proj.weight", {inter, hidden}, false, w});
    specs.push_back({p + "mlp.down_proj.weight", {hidden, inter}, false, w});
  }
  specs.push_back({"model.norm.weight", {hidden}, true});
  if (!c.tie_word_embeddings) {
    specs.push_back({"lm_head.weight", {vocab, hidden}, false, LmHeadStd(c.hidden_size)});
  }
  return specs;
}

double LmHeadStd(int64_t hidden_size) {
  return 1.0 / std::sqrt(2.0 * static_cast<double>(hidden_size));
}

uint64_t InitTensorKey(uint64_t seed, const std::string& name) {
  return SplitMix64(seed ^ Fnv1a64(name));
}

void FillInitWeight(const WeightSpec& spec, uint64_t seed, uint64_t begin, uint64_t end,
                    uint16_t* out, int num_threads) {
  if (end <= begin) return;
  if (num_threads <= 0) num_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  FillChunk(spec, InitTensorKey(seed, spec.name), num_threads, begin, end, out);
}

float InitNormal(uint64_t seed, const std::string& name, uint64_t index, double stddev) {
  float a, b;
  NormalPair(InitTensorKey(seed, name), index / 2, stddev, &a, &b);
  return (index & 1) ? b : a;
}

uint16_t InitNormalBf16(uint64_t seed, const std::string& name, uint64_t index, double stddev) {
  return FloatToBf16(InitNormal(seed, name, index, stddev));
}

Status WriteRandomLlamaWeights(const std::string& dir, const LlamaConfig& config,
                               uint64_t seed, uint64_t max_shard_bytes, int num_threads,
                               const std::function<void(const std::string&)>& progress,
                               uint64_t chunk_elements) {
  if (max_shard_bytes == 0) {
    return InvalidArgumentError("init-model: max_shard_bytes must be > 0");
  }
  if (chunk_elements == 0) {
    return InvalidArgumentError("init-model: chunk_elements must be > 0");
  }
  if (num_threads <= 0) num_threads = static_cast<int>(std::thread::hardware_concurrency());
  num_threads = std::max(1, num_threads);
  const std::vector<WeightSpec> specs = LlamaWeightSpecs(config);

  // Greedy shards in module order, as transformers' save_pretrained does.
  std::vector<ShardPlan> shards(1);
  uint64_t total = 0;
  for (size_t i = 0; i < specs.size(); ++i) {
    const uint64_t bytes = NumElements(specs[i]) * sizeof(uint16_t);
    if (!shards.back().specs.empty() && shards.back().bytes + bytes > max_shard_bytes) {
      shards.emplace_back();
    }
    shards.back().specs.push_back(i);
    shards.back().bytes += bytes;
    total += bytes;
  }
  const bool sharded = shards.size() > 1;
  for (size_t s = 0; s < shards.size(); ++s) {
    char name[64];
    std::snprintf(name, sizeof(name), "model-%05zu-of-%05zu.safetensors", s + 1, shards.size());
    shards[s].file = sharded ? name : kSafetensorsSingleName;
  }

  // PlanSafetensors wants a non-null data pointer per tensor; it never reads
  // it (the bytes are streamed below), so one dummy byte serves them all.
  static const uint8_t kUnread = 0;
  const std::map<std::string, std::string> metadata = {{"format", "pt"}};
  std::vector<uint16_t> buffers[2];
  uint64_t written = 0;
  int last_percent = -1;
  for (const ShardPlan& shard : shards) {
    std::vector<TensorToWrite> tensors;
    for (size_t i : shard.specs) {
      tensors.push_back({specs[i].name, Dtype::kBF16, specs[i].shape, &kUnread,
                         NumElements(specs[i]) * sizeof(uint16_t)});
    }
    FTUNE_ASSIGN_OR_RETURN(
        SafetensorsStream stream, BeginSafetensors(dir + "/" + shard.file, tensors, metadata));
    for (size_t t : stream.order) {
      const WeightSpec& spec = specs[shard.specs[t]];
      FTUNE_RETURN_IF_ERROR(
          WriteTensor(spec, seed, num_threads, chunk_elements, buffers, stream.writer.get()));
      written += tensors[t].num_bytes;
      const int percent = static_cast<int>(100.0 * static_cast<double>(written) /
                                           static_cast<double>(total));
      // Every 5% for models worth waiting for; small ones report once.
      if (progress && total >= kProgressEveryBytes && percent / 5 != last_percent / 5) {
        progress("weights: " + FormatGB(written) + " / " + FormatGB(total) + " (" +
                 std::to_string(percent) + "%)");
      }
      last_percent = percent;
    }
    FTUNE_RETURN_IF_ERROR(stream.writer->Commit());
  }

  if (progress) {
    progress("weights: " + FormatGB(total) + " in " + std::to_string(specs.size()) +
             " tensors, " + std::to_string(shards.size()) + " file(s)");
  }
  const std::string index_path = dir + "/" + kSafetensorsIndexName;
  if (sharded) {
    // Keys sorted as transformers writes them (json.dumps(sort_keys=True)).
    nlohmann::json weight_map = nlohmann::json::object();
    for (const ShardPlan& shard : shards) {
      for (size_t i : shard.specs) weight_map[specs[i].name] = shard.file;
    }
    nlohmann::json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
    FTUNE_RETURN_IF_ERROR(WriteFileAtomically(index_path, index.dump(2) + "\n"));
  } else if (PathExists(index_path) && ::unlink(index_path.c_str()) != 0) {
    // A stale index (from an interrupted earlier run) would win over
    // model.safetensors at load.
    return InternalError("init-model: cannot remove the stale " + index_path + ": " +
                         ErrnoMessage(errno));
  }
  return OkStatus();
}

Status InitModel(const InitModelOptions& options) {
  if (options.tokenizer_corpus.empty() == options.tokenizer_dir.empty()) {
    return InvalidArgumentError(
        "init-model: give exactly one of tokenizer_corpus (--tokenizer-corpus FILE: a JSONL "
        "file to train a BPE tokenizer on) and tokenizer_dir (a directory holding a "
        "tokenizer.json to copy)");
  }
  if (options.num_layers_override < 0) {
    return InvalidArgumentError("init-model: num_layers_override (" +
                                std::to_string(options.num_layers_override) +
                                ") must be >= 0 (0 keeps the preset's)");
  }
  // Check the preset before writing anything.
  FTUNE_RETURN_IF_ERROR(InitModelPresetConfig(options.preset, 1).status());
  FTUNE_RETURN_IF_ERROR(MakeDirs(options.out_dir));
  if (PathExists(options.out_dir + "/config.json")) {
    return FailedPreconditionError("init-model: " + options.out_dir +
                                   " already holds a model (config.json); choose another "
                                   "directory or delete it");
  }

  Result<TokenizerInfo> tok = options.tokenizer_corpus.empty() ? CopyTokenizer(options)
                                                               : WriteTrainedTokenizer(options);
  if (!tok.ok()) return tok.status();

  FTUNE_ASSIGN_OR_RETURN(LlamaConfig config,
                                 InitModelPresetConfig(options.preset, tok->vocab_size));
  if (options.num_layers_override > 0) config.num_hidden_layers = options.num_layers_override;
  config.bos_token_id = tok->bos_id;
  config.eos_token_ids = tok->eos_ids;
  const std::string config_json = LlamaConfigToJson(config);
  // The config must mean to ftune what we meant.
  FTUNE_ASSIGN_OR_RETURN(LlamaConfig parsed,
                                 ParseLlamaConfig(config_json, options.out_dir + "/config.json"));
  if (parsed.NumParameters() != config.NumParameters()) {
    return InternalError("init-model: config.json does not parse back to the preset");
  }
  Report(options, "model: preset " + options.preset + ", " +
                      std::to_string(config.num_hidden_layers) + " layers, hidden " +
                      std::to_string(config.hidden_size) + ", vocab " +
                      std::to_string(config.vocab_size) + ", " +
                      std::to_string(config.NumParameters()) + " parameters (bf16, " +
                      FormatGB(static_cast<uint64_t>(config.NumParameters()) * 2) + ")");
  if (options.write_weights) {
    FTUNE_RETURN_IF_ERROR(WriteRandomLlamaWeights(options.out_dir, config, options.seed,
                                                          options.max_shard_bytes,
                                                          options.num_threads, options.progress));
  }
  // Last: a directory with a config.json is complete.
  FTUNE_RETURN_IF_ERROR(
      WriteFileAtomically(options.out_dir + "/config.json", config_json));
  Report(options, "wrote " + options.out_dir);
  return OkStatus();
}

}  // namespace ftune::trainer
