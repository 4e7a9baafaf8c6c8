#include "worker/modelio/llama_config.h"

#include <sys/stat.h>

#include <cmath>
#include <limits>
#include <utility>

#include <nlohmann/json.hpp>

#include "ftune/file_util.h"

namespace ftune::trainer {
namespace {

using Json = nlohmann::json;

// Sanity limits far above any Llama (405B: hidden 16384, 126 layers, 128
// heads; the largest vocabularies ~256k). They keep every derived product,
// e.g. NumParameters(), inside int64 for any accepted config.
constexpr int64_t kMaxWidth = int64_t{1} << 22;  // a dimension or vocabulary
constexpr int64_t kMaxCount = int64_t{1} << 12;  // layers, heads

std::string Brief(const Json& value) {
  std::string s = value.dump(-1, ' ', false, Json::error_handler_t::replace);
  if (s.size() > 80) s = s.substr(0, 77) + "...";
  return s;
}

// Typed, validated access to one JSON object; `prefix` is prepended to keys
// in messages ("rope_scaling.").
class ObjectReader {
 public:
  ObjectReader(const Json& object, std::string source, std::string prefix)
      : object_(object), source_(std::move(source)), prefix_(std::move(prefix)) {}

  // nullptr when absent or null: transformers treats both as "not given".
  const Json* Get(const char* key) const {
    const auto it = object_.find(key);
    if (it == object_.end() || it->is_null()) return nullptr;
    return &*it;
  }

  Status Error(const char* key, const Json& value, const std::string& what) const {
    return InvalidArgumentError(source_ + ": " + prefix_ + key + " (" + Brief(value) + ") " +
                                what);
  }
  Status Missing(const char* key) const {
    return InvalidArgumentError(source_ + ": " + prefix_ + key + " is required but missing");
  }

  // An integer in [min_value, max_value]; absent keeps *out unless required.
  Status Int(const char* key, bool required, int64_t min_value, int64_t* out,
             int64_t max_value = std::numeric_limits<int64_t>::max()) const {
    const Json* v = Get(key);
    if (v == nullptr) return required ? Missing(key) : OkStatus();
    if (v->is_number_unsigned()) {
      const uint64_t u = v->get<uint64_t>();
      if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return Error(key, *v, "is too large");
      }
      *out = static_cast<int64_t>(u);
    } else if (v->is_number_integer()) {
      *out = v->get<int64_t>();
    } else {
      return Error(key, *v, "must be an integer");
    }
    if (*out < min_value) {
      return Error(key, *v, min_value == 1 ? "must be a positive integer"
                                           : "must be >= " + std::to_string(min_value));
    }
    if (*out > max_value) {
      return Error(key, *v, "must be <= " + std::to_string(max_value));
    }
    return OkStatus();
  }

  // A finite number > 0 (every float this config holds is a positive scale).
  Status Positive(const char* key, bool required, double* out) const {
    const Json* v = Get(key);
    if (v == nullptr) return required ? Missing(key) : OkStatus();
    if (!v->is_number()) return Error(key, *v, "must be a number");
    const double d = v->get<double>();
    if (!std::isfinite(d) || d <= 0) return Error(key, *v, "must be a finite number > 0");
    *out = d;
    return OkStatus();
  }

  Status Bool(const char* key, bool* out) const {
    const Json* v = Get(key);
    if (v == nullptr) return OkStatus();
    if (!v->is_boolean()) return Error(key, *v, "must be true or false");
    *out = v->get<bool>();
    return OkStatus();
  }

  Status String(const char* key, std::optional<std::string>* out) const {
    const Json* v = Get(key);
    if (v == nullptr) return OkStatus();
    if (!v->is_string()) return Error(key, *v, "must be a string");
    *out = v->get<std::string>();
    return OkStatus();
  }

  // A token id: an integer, or null.
  Status TokenId(const char* key, std::optional<int64_t>* out) const {
    const Json* v = Get(key);
    if (v == nullptr) return OkStatus();
    if (!IsInt64(*v)) return Error(key, *v, "must be an integer token id or null");
    *out = v->get<int64_t>();
    return OkStatus();
  }

  static bool IsInt64(const Json& v) {
    return v.is_number_integer() &&
           (!v.is_number_unsigned() ||
            v.get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()));
  }

  const std::string& source() const { return source_; }

 private:
  const Json& object_;
  std::string source_;
  std::string prefix_;
};

Status ParseRope(const Json& config, const std::string& source, LlamaConfig* out) {
  ObjectReader top(config, source, "");
  // transformers: rope_parameters = rope_scaling or rope_parameters; an
  // empty dict is falsy there too.
  const Json* rope = nullptr;
  const char* rope_key = nullptr;
  for (const char* key : {"rope_scaling", "rope_parameters"}) {
    const Json* v = top.Get(key);
    if (v == nullptr) continue;
    if (!v->is_object()) return top.Error(key, *v, "must be an object or null");
    if (!v->empty()) {
      rope = v;
      rope_key = key;
      break;
    }
  }
  FTUNE_RETURN_IF_ERROR(top.Positive("rope_theta", false, &out->rope_theta));
  if (rope == nullptr) return OkStatus();

  ObjectReader r(*rope, source, std::string(rope_key) + ".");
  // v5 keeps rope_theta inside rope_parameters; it wins over the top level.
  FTUNE_RETURN_IF_ERROR(r.Positive("rope_theta", false, &out->rope_theta));
  std::optional<std::string> type;
  const char* type_key = r.Get("rope_type") != nullptr ? "rope_type" : "type";
  FTUNE_RETURN_IF_ERROR(r.String(type_key, &type));
  const std::string t = type.value_or("default");
  RopeScaling& s = out->rope_scaling;
  if (t == "default") {
    s = RopeScaling{};
    return OkStatus();
  }
  if (t == "linear") {
    s.type = RopeType::kLinear;
    return r.Positive("factor", true, &s.factor);
  }
  if (t == "llama3") {
    s.type = RopeType::kLlama3;
    FTUNE_RETURN_IF_ERROR(r.Positive("factor", true, &s.factor));
    FTUNE_RETURN_IF_ERROR(r.Positive("low_freq_factor", true, &s.low_freq_factor));
    FTUNE_RETURN_IF_ERROR(r.Positive("high_freq_factor", true, &s.high_freq_factor));
    FTUNE_RETURN_IF_ERROR(r.Int("original_max_position_embeddings", true, 1,
                                        &s.original_max_position_embeddings));
    if (!(s.high_freq_factor > s.low_freq_factor)) {
      // The smoothing divides by (high - low).
      return r.Error("high_freq_factor", *r.Get("high_freq_factor"),
                     "must be greater than low_freq_factor (" + Brief(*r.Get("low_freq_factor")) +
                         ")");
    }
    return OkStatus();
  }
  const Json& tv = *r.Get(type_key);
  if (t == "dynamic") {
    return r.Error(type_key, tv,
                   "is not supported: dynamic NTK scaling recomputes the frequencies from the "
                   "sequence length at run time; supported are default, linear and llama3");
  }
  return r.Error(type_key, tv, "is not supported; supported are default, linear and llama3");
}

}  // namespace

std::string_view RopeTypeName(RopeType type) {
  switch (type) {
    case RopeType::kDefault: return "default";
    case RopeType::kLinear: return "linear";
    case RopeType::kLlama3: return "llama3";
  }
  return "?";
}

std::string_view ModelFamilyName(ModelFamily family) {
  switch (family) {
    case ModelFamily::kLlama: return "llama";
    case ModelFamily::kMistral: return "mistral";
    case ModelFamily::kQwen2: return "qwen2";
  }
  return "?";
}

std::string SupportedModelTypes() { return "llama, mistral, qwen2"; }

std::string_view ModelDtypeName(ModelDtype dtype) {
  switch (dtype) {
    case ModelDtype::kFloat32: return "float32";
    case ModelDtype::kFloat16: return "float16";
    case ModelDtype::kBFloat16: return "bfloat16";
  }
  return "?";
}

int64_t LlamaConfig::NumParameters() const {
  const int64_t h = hidden_size;
  int64_t layer = h * q_size() + 2 * h * kv_size() + q_size() * h  // q, k, v, o
                  + 3 * h * intermediate_size                      // gate, up, down
                  + 2 * h;                                         // two RMSNorms
  if (attention_bias) layer += q_size() + 2 * kv_size() + h;
  if (qkv_bias && !attention_bias) layer += q_size() + 2 * kv_size();
  if (mlp_bias) layer += 2 * intermediate_size + h;
  const int64_t embed = vocab_size * h;
  return embed + num_hidden_layers * layer + h + (tie_word_embeddings ? 0 : embed);
}

Result<LlamaConfig> ParseLlamaConfig(std::string_view json_text, std::string_view source) {
  const std::string src(source);
  Json j;
  try {
    j = Json::parse(json_text.begin(), json_text.end());
  } catch (const Json::exception& e) {
    return InvalidArgumentError(src + ": not valid JSON: " + e.what());
  }
  if (!j.is_object()) return InvalidArgumentError(src + ": must be a JSON object");
  ObjectReader r(j, src, "");
  LlamaConfig c;

  std::optional<std::string> model_type;
  FTUNE_RETURN_IF_ERROR(r.String("model_type", &model_type));
  if (!model_type || *model_type == "llama") {
    c.family = ModelFamily::kLlama;
  } else if (*model_type == "mistral") {
    c.family = ModelFamily::kMistral;
  } else if (*model_type == "qwen2") {
    c.family = ModelFamily::kQwen2;
  } else {
    return r.Error("model_type", *r.Get("model_type"),
                   "is not supported; supported model types are " + SupportedModelTypes());
  }
  FTUNE_RETURN_IF_ERROR(r.Int("hidden_size", true, 1, &c.hidden_size, kMaxWidth));
  FTUNE_RETURN_IF_ERROR(
      r.Int("intermediate_size", true, 1, &c.intermediate_size, kMaxWidth));
  FTUNE_RETURN_IF_ERROR(
      r.Int("num_hidden_layers", true, 1, &c.num_hidden_layers, kMaxCount));
  FTUNE_RETURN_IF_ERROR(
      r.Int("num_attention_heads", true, 1, &c.num_attention_heads, kMaxCount));
  FTUNE_RETURN_IF_ERROR(r.Int("vocab_size", true, 1, &c.vocab_size, kMaxWidth));
  c.num_key_value_heads = c.num_attention_heads;
  FTUNE_RETURN_IF_ERROR(
      r.Int("num_key_value_heads", false, 1, &c.num_key_value_heads, kMaxCount));
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    return r.Error("num_key_value_heads", *r.Get("num_key_value_heads"),
                   "must divide num_attention_heads (" + std::to_string(c.num_attention_heads) +
                       ")");
  }
  if (r.Get("head_dim") != nullptr) {
    FTUNE_RETURN_IF_ERROR(r.Int("head_dim", false, 1, &c.head_dim, kMaxWidth));
  } else {
    if (c.hidden_size % c.num_attention_heads != 0) {
      return r.Error("hidden_size", *r.Get("hidden_size"),
                     "must be divisible by num_attention_heads (" +
                         std::to_string(c.num_attention_heads) + ") when head_dim is not given");
    }
    c.head_dim = c.hidden_size / c.num_attention_heads;
  }
  if (c.q_size() > kMaxWidth) {
    return InvalidArgumentError(src + ": num_attention_heads (" +
                                std::to_string(c.num_attention_heads) + ") x head_dim (" +
                                std::to_string(c.head_dim) + ") must be <= " +
                                std::to_string(kMaxWidth));
  }
  if (c.head_dim % 2 != 0) {
    return InvalidArgumentError(src + ": head_dim (" + std::to_string(c.head_dim) +
                                ") must be even: RoPE rotates pairs of dimensions");
  }
  FTUNE_RETURN_IF_ERROR(
      r.Int("max_position_embeddings", false, 1, &c.max_position_embeddings));
  FTUNE_RETURN_IF_ERROR(r.Positive("rms_norm_eps", false, &c.rms_norm_eps));
  FTUNE_RETURN_IF_ERROR(r.Bool("tie_word_embeddings", &c.tie_word_embeddings));
  if (c.family == ModelFamily::kLlama) {
    // Only LlamaConfig has these keys; Mistral's and Qwen2's modules ignore them.
    FTUNE_RETURN_IF_ERROR(r.Bool("attention_bias", &c.attention_bias));
    FTUNE_RETURN_IF_ERROR(r.Bool("mlp_bias", &c.mlp_bias));
  }
  if (c.family == ModelFamily::kQwen2) {
    c.qkv_bias = true;  // Qwen2Attention: bias=True on q/k/v, False on o
    bool use_sliding_window = false;
    FTUNE_RETURN_IF_ERROR(r.Bool("use_sliding_window", &use_sliding_window));
    if (use_sliding_window) {
      return r.Error("use_sliding_window", *r.Get("use_sliding_window"),
                     "is not supported: ftune attends over the whole sequence; Qwen2 / Qwen2.5 "
                     "checkpoints as published set it to false");
    }
    // transformers v5 also writes the per-layer kinds it derived from it.
    if (const Json* types = r.Get("layer_types")) {
      if (!types->is_array()) return r.Error("layer_types", *types, "must be a list");
      for (const Json& t : *types) {
        if (!t.is_string() || t.get<std::string>() != "full_attention") {
          return r.Error("layer_types", *types,
                         "is not supported: only full_attention layers are implemented");
        }
      }
    }
  }
  if (c.family == ModelFamily::kMistral) {
    // MistralConfig(sliding_window=4096) when the key is absent; null = none.
    const auto it = j.find("sliding_window");
    if (it == j.end()) {
      c.sliding_window = 4096;
    } else if (!it->is_null()) {
      int64_t window = 0;
      FTUNE_RETURN_IF_ERROR(r.Int("sliding_window", false, 1, &window));
      c.sliding_window = window;
    }
  }

  std::optional<std::string> act;
  FTUNE_RETURN_IF_ERROR(r.String("hidden_act", &act));
  if (act && *act != "silu") {
    return r.Error("hidden_act", *r.Get("hidden_act"),
                   "is not supported: the Llama MLP here is SwiGLU (silu)");
  }
  if (const Json* prf = r.Get("partial_rotary_factor")) {
    if (!prf->is_number() || prf->get<double>() != 1.0) {
      return r.Error("partial_rotary_factor", *prf, "is not supported (only 1.0)");
    }
  }

  // transformers v5 renamed torch_dtype to dtype.
  const char* dtype_key = r.Get("dtype") != nullptr ? "dtype" : "torch_dtype";
  std::optional<std::string> dtype;
  FTUNE_RETURN_IF_ERROR(r.String(dtype_key, &dtype));
  if (dtype) {
    if (*dtype == "bfloat16") {
      c.torch_dtype = ModelDtype::kBFloat16;
    } else if (*dtype == "float16") {
      c.torch_dtype = ModelDtype::kFloat16;
    } else if (*dtype == "float32") {
      c.torch_dtype = ModelDtype::kFloat32;
    } else {
      return r.Error(dtype_key, *r.Get(dtype_key), "must be bfloat16, float16 or float32");
    }
  }

  FTUNE_RETURN_IF_ERROR(r.TokenId("bos_token_id", &c.bos_token_id));
  FTUNE_RETURN_IF_ERROR(r.TokenId("pad_token_id", &c.pad_token_id));
  if (const Json* eos = r.Get("eos_token_id")) {
    if (ObjectReader::IsInt64(*eos)) {
      c.eos_token_ids.push_back(eos->get<int64_t>());
    } else if (eos->is_array()) {
      for (const Json& id : *eos) {
        if (!ObjectReader::IsInt64(id)) {
          return r.Error("eos_token_id", *eos, "must be a token id or a list of token ids");
        }
        c.eos_token_ids.push_back(id.get<int64_t>());
      }
    } else {
      return r.Error("eos_token_id", *eos, "must be a token id or a list of token ids");
    }
  }

  FTUNE_RETURN_IF_ERROR(ParseRope(j, src, &c));
  return c;
}

Result<LlamaConfig> LoadLlamaConfig(const std::string& path) {
  std::string file = path;
  struct stat st;
  if (::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) {
    file = path + (path.empty() || path.back() == '/' ? "" : "/") + "config.json";
  }
  FTUNE_ASSIGN_OR_RETURN(std::string text, ReadFileToString(file, 16u << 20));
  return ParseLlamaConfig(text, file);
}

std::vector<float> RopeInverseFrequencies(int64_t head_dim, double rope_theta,
                                          const RopeScaling& scaling) {
  // Comments give the torch expression each line reproduces; each line is
  // one fp32 torch op (see the header for pow).
  const int64_t n = head_dim <= 0 ? 0 : (head_dim + 1) / 2;  // arange(0, dim, 2)
  std::vector<float> inv(static_cast<size_t>(n));
  const float dim = static_cast<float>(head_dim);
  const float base = static_cast<float>(rope_theta);
  for (int64_t i = 0; i < n; ++i) {
    const float e = static_cast<float>(2 * i) / dim;  // arange(...).float() / dim
    const float p = static_cast<float>(std::pow(static_cast<double>(base),
                                                static_cast<double>(e)));  // base ** e
    inv[i] = 1.0f / p;  // 1.0 / t == t.reciprocal() * 1.0
  }
  if (scaling.type == RopeType::kLinear) {
    const float factor = static_cast<float>(scaling.factor);
    for (float& f : inv) f = f / factor;  // inv_freq /= factor
  } else if (scaling.type == RopeType::kLlama3) {
    const double old_context = static_cast<double>(scaling.original_max_position_embeddings);
    // Python floats, cast to fp32 by torch where they meet an fp32 tensor.
    const float low_wavelen = static_cast<float>(old_context / scaling.low_freq_factor);
    const float high_wavelen = static_cast<float>(old_context / scaling.high_freq_factor);
    const float two_pi = static_cast<float>(2 * M_PI);
    const float factor = static_cast<float>(scaling.factor);
    const float low = static_cast<float>(scaling.low_freq_factor);
    const float old_f = static_cast<float>(old_context);
    const float span = static_cast<float>(scaling.high_freq_factor - scaling.low_freq_factor);
    for (float& f : inv) {
      const float wavelen = (1.0f / f) * two_pi;  // 2 * math.pi / inv_freq
      // torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
      const float llama = wavelen > low_wavelen ? f / factor : f;
      // (old_context_len / wavelen - low_freq_factor) / (high - low)
      const float ratio = (1.0f / wavelen) * old_f;
      const float smooth = (ratio - low) / span;
      // (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
      const float a = (1.0f - smooth) * llama;
      const float b = a / factor;
      const float c = smooth * llama;
      const float smoothed = b + c;
      const bool medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
      f = medium ? smoothed : llama;
    }
  }
  return inv;
}

}  // namespace ftune::trainer
