// Llama-architecture model configuration (HF config.json for Llama 2, 3,
// 3.1, 3.2, Mistral and Qwen2 / Qwen2.5) and the RoPE inverse frequencies
// it implies.
//
// Families (config "model_type"; absent means llama):
//   llama    LlamaConfig / LlamaForCausalLM.
//   mistral  MistralConfig: the Llama decoder with an optional sliding
//            window. MistralConfig's default window is 4096 when the key is
//            absent; Mistral 7B v0.3 writes null (none). A window is kept in
//            `sliding_window` and a sequence longer than it is refused where
//            the model runs (ftune attends over whole sequences only).
//   qwen2    Qwen2Config: biases on q_proj/k_proj/v_proj (not o_proj), as
//            Qwen2Attention always has them (`qkv_bias`); defaults as
//            Qwen2Config (rope_theta 10000, rms_norm_eps 1e-6).
//            `use_sliding_window: true` is refused (no windowed attention); with
//            false, sliding_window / max_window_layers mean nothing.
//   Anything else is an error naming the supported model types.
//
// Parsing follows transformers' LlamaConfig, so a config means here what it
// means there:
//   * required (no silent Llama-2-7B defaults for shapes): hidden_size,
//     intermediate_size, num_hidden_layers, num_attention_heads, vocab_size;
//   * defaults as LlamaConfig: num_key_value_heads = num_attention_heads,
//     head_dim = hidden_size / num_attention_heads, rope_theta = 10000,
//     rms_norm_eps = 1e-6, max_position_embeddings = 2048,
//     tie_word_embeddings = attention_bias = mlp_bias = false,
//     hidden_act = "silu", dtype float32 when neither "torch_dtype" nor the
//     newer "dtype" is given ("dtype" wins when both are);
//   * RoPE parameters come from "rope_scaling" when it is a non-null object,
//     else from the newer "rope_parameters" (transformers v5), exactly as
//     `rope_parameters = rope_scaling or rope_parameters` there; the type is
//     "rope_type", or the older "type", or "default"; rope_theta is taken
//     from inside that object when present (v5 keeps it there), else from the
//     top level.
//   * RoPE types: "default" and "llama3" (Llama 3.1) and "linear" (Llama 2
//     long-context fine-tunes: the frequencies divided by factor) are
//     handled. "dynamic" is rejected: its frequencies change with the
//     sequence length at run time, which a training engine with a fixed
//     frequency table does not reproduce; "yarn", "longrope" and others are
//     rejected too. A partial_rotary_factor other than 1 is rejected (no
//     Llama uses it, and transformers would honour it).
// Sizes are also bounded far above any real Llama (widths and vocabulary
// <= 2^22, layers and heads <= 2^12) so that no derived product overflows.
// Every validation error is INVALID_ARGUMENT naming the source, the key and
// the offending value: "config.json: num_key_value_heads (5) must divide
// num_attention_heads (32)".
//
// Thread-safety: plain values and pure functions.
#ifndef FTUNE_WORKER_TRAINER_LLAMA_CONFIG_H_
#define FTUNE_WORKER_TRAINER_LLAMA_CONFIG_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ftune/status.h"

namespace ftune::trainer {

enum class RopeType { kDefault, kLinear, kLlama3 };
std::string_view RopeTypeName(RopeType type);

struct RopeScaling {
  RopeType type = RopeType::kDefault;
  double factor = 1.0;  // linear, llama3
  // llama3 only.
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

// The dtype the checkpoint's weights are stored in (config "torch_dtype").
enum class ModelDtype { kFloat32, kFloat16, kBFloat16 };
std::string_view ModelDtypeName(ModelDtype dtype);  // "bfloat16", ...

enum class ModelFamily { kLlama, kMistral, kQwen2 };
// "llama", "mistral", "qwen2": the config's model_type.
std::string_view ModelFamilyName(ModelFamily family);
// The model types ParseLlamaConfig accepts, for messages: "llama, mistral, qwen2".
std::string SupportedModelTypes();

struct LlamaConfig {
  ModelFamily family = ModelFamily::kLlama;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;
  int64_t head_dim = 0;
  int64_t vocab_size = 0;
  int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // Llama: biases on q, k, v and o
  bool mlp_bias = false;
  bool qkv_bias = false;        // Qwen2: biases on q, k and v only
  // Mistral's attention window; nullopt = none (or a Qwen2 window that
  // use_sliding_window leaves off).
  std::optional<int64_t> sliding_window;
  ModelDtype torch_dtype = ModelDtype::kFloat32;
  std::optional<int64_t> bos_token_id;
  std::vector<int64_t> eos_token_ids;  // Llama 3.1 instruct lists three
  std::optional<int64_t> pad_token_id;

  // Derived shapes.
  int64_t q_size() const { return num_attention_heads * head_dim; }     // q_proj out
  int64_t kv_size() const { return num_key_value_heads * head_dim; }    // k/v_proj out
  int64_t num_kv_groups() const { return num_attention_heads / num_key_value_heads; }
  // True when q/k/v_proj carry a bias (qkv_bias, or attention_bias).
  bool has_qkv_bias() const { return qkv_bias || attention_bias; }
  // Parameters of the ForCausalLM model (embedding, layers, final norm,
  // lm_head unless tied; biases when enabled): 8,030,261,248 for Llama 3 8B,
  // 494,032,768 for Qwen2.5 0.5B.
  int64_t NumParameters() const;
};

// Parses config.json text; `source` names it in errors.
Result<LlamaConfig> ParseLlamaConfig(std::string_view json_text, std::string_view source);
// Reads and parses a config.json, or <dir>/config.json when path is a
// directory.
Result<LlamaConfig> LoadLlamaConfig(const std::string& path);

// RoPE inverse frequencies, head_dim / 2 of them, in fp32 as transformers
// computes them with torch on CPU (rotary embedding init,
// `_compute_{default,linear_scaling,llama3}_parameters`):
//   e_i      = float(2i) / float(dim)                        fp32 division
//   inv_i    = 1 / float(theta)^e_i                          fp32
//   linear:    inv_i / float(factor)
//   llama3:    wavelen = reciprocal(inv) * float(2*pi)        (torch's
//              `scalar / tensor` is reciprocal-then-multiply), compared with
//              float(old/low) and float(old/high); low band inv / factor;
//              medium band s = (reciprocal(wavelen) * old - low) / (high - low),
//              ((1 - s) * inv) / factor + s * inv — every step one fp32
//              operation in torch's order, never fused (this file is built
//              with -ffp-contract=off).
// The one step that could differ from torch in the last bit is pow: it is
// computed in double and rounded once here, while torch CPU uses SLEEF's powf
// (error bound 1 ulp) in its vector loop. On the configs of
// tests/trainer/data/rope_golden.json (Llama 3.1 8B, Llama 2 7B, linear,
// tiny llama3, 96-dim heads) the result is bit-identical to transformers
// 5.17 / torch 2.11 on CPU. (On CUDA torch divides by a CPU scalar as a
// multiplication by its reciprocal, so GPU-built tables may differ by an ulp.)
std::vector<float> RopeInverseFrequencies(int64_t head_dim, double rope_theta,
                                          const RopeScaling& scaling);
inline std::vector<float> RopeInverseFrequencies(const LlamaConfig& config) {
  return RopeInverseFrequencies(config.head_dim, config.rope_theta, config.rope_scaling);
}

}  // namespace ftune::trainer

#endif  // FTUNE_WORKER_TRAINER_LLAMA_CONFIG_H_
