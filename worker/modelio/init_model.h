// Writes a Llama-architecture model directory with random weights, in the
// layout transformers and ftune load (an HF "model dir"):
//   config.json                  LlamaForCausalLM, MistralForCausalLM or
//                                Qwen2ForCausalLM with that class's fields
//   model.safetensors            or, above max_shard_bytes,
//   model-0000i-of-0000n.safetensors + model.safetensors.index.json
//   tokenizer.json, tokenizer_config.json
// The README demo trains a LoRA on the "tiny" preset on CPU; the Llama 3,
// 3.1, 3.2, Mistral and Qwen2.5 presets give GPU hosts models of the real
// shapes to measure memory and speed on, without downloading the weights.
//
// Weights (fully specified, so anyone can regenerate the same bytes):
//   * norms (input_layernorm, post_attention_layernorm, model.norm) are 1;
//   * lm_head is N(0, std^2) with std = LmHeadStd(hidden) = 1/sqrt(2 hidden),
//     every other tensor N(0, 0.02^2) (HF's initializer_range); element i
//     of tensor `name` is InitNormal(seed, name, i, std):
//       key      = SplitMix64(seed ^ Fnv1a64(name))
//       x_n      = SplitMix64(key + (n + 1) * 0x9E3779B97F4A7C15)
//       u1       = ((x_{2p} >> 11) + 1) * 2^-53          in (0, 1]
//       u2       = (x_{2p+1} >> 11) * 2^-53              in [0, 1)
//       r        = sqrt(-2 ln u1),  t = 2 pi u2          (double)
//     element 2p = std r cos t and element 2p+1 = std r sin t (double),
//     rounded to float and then to bf16 (round to nearest even). Each element
//     depends only on (seed, name, index): the bytes do not change with
//     the sharding, the thread count or the order tensors are written in.
//     (libm's log/cos/sin may differ in the last double bit between
//     platforms, which moves a bf16 value only in astronomically rare
//     cases.)
//   Why lm_head differs: the final RMSNorm (weight 1) gives the hidden
//   state RMS 1, so the logits start as N(0, std^2 hidden) = N(0, 1/2) for
//   every preset and the loss at ln(vocab) + 1/4 (7.18 for the tiny
//   preset's 1024 ids; 7.21 measured on a demo data row). lm_head, norms and
//   embeddings stay frozen under LoRA, so lm_head's scale also caps what a
//   LoRA can reach: the largest logit, from a hidden state aligned with one
//   row, is std hidden = sqrt(hidden / 2) (11.3 for tiny). With 0.02 it
//   would be 5.1 for tiny, and the demo's eval loss stalled at 5.40 after
//   80 steps instead of 4.32 (2 ranks, examples/tiny-qlora.yaml); for the
//   8B / 70B shapes 0.02 would start the loss 0.8 / 1.6 above ln(vocab).
//
// Memory: tensors are generated in chunks of at most kInitChunkElements
// straight into the output file (a 70B model never sits in RAM: two chunks,
// 64 MiB, are), by num_threads threads per chunk, the next chunk while the
// current one is written. Measured here: 59M elements/s per generator
// thread (about 17 ns each), so a 70B model (141 GB) needs about 80 s of
// generation on 16 cores, overlapped with its disk writes.
//
// Tokenizer: trained on a corpus (worker/data/bpe_trainer.h: byte-level
// BPE, Llama 3 special tokens and chat template) or copied from a directory
// holding a real one. The model's vocab_size is the tokenizer's for "tiny";
// the Llama 3 presets keep 128256 rows (the real embedding shape) when the
// tokenizer is smaller, the extra rows being never-used ids, as Llama 3's
// reserved tokens are.
//
// Files are written atomically, config.json last: a directory with a
// config.json is complete. InitModel refuses an out_dir that already holds a
// config.json.
//
// No LibTorch and no std::filesystem (it links into ftune-rank, next to pip
// LibTorch; see file_util.h).
//
// Thread-safety: InitModel may run on several threads at once for different
// out_dirs; the progress callback is called from the calling thread only.
#ifndef FTUNE_WORKER_TRAINER_INIT_MODEL_H_
#define FTUNE_WORKER_TRAINER_INIT_MODEL_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "worker/modelio/llama_config.h"
#include "ftune/status.h"

namespace ftune::trainer {

struct InitModelOptions {
  std::string out_dir;
  // One of InitModelPresets(): "tiny", "llama3-8b", "llama3.1-8b",
  // "llama3-70b", "llama3.1-70b", "llama3.2-1b", ..., "qwen2.5-72b".
  std::string preset = "tiny";
  // JSONL file of "messages" / "text" / "prompt"+"completion" records whose
  // strings the BPE tokenizer is trained on...
  std::string tokenizer_corpus;
  // ...or a directory whose tokenizer.json (and tokenizer_config.json,
  // special_tokens_map.json when present) are copied. Exactly one of the two.
  std::string tokenizer_dir;
  // Ids of a trained tokenizer (256 bytes + merges + special tokens).
  int64_t vocab_size = 1024;
  uint64_t seed = 0;
  // > 0: this many decoder layers instead of the preset's.
  int num_layers_override = 0;
  // Called with one-line progress messages ("weights: 3.2 / 16.1 GB").
  std::function<void(const std::string&)> progress;
  // Above this many bytes of weights the model is sharded (HF's default
  // max_shard_size "5GB").
  uint64_t max_shard_bytes = 5'000'000'000;
  // Generator threads; 0 = the machine's hardware concurrency.
  int num_threads = 0;
  // false: config.json and the tokenizer only, for jobs with
  // model.random_weights, which build these same weights on their devices.
  bool write_weights = true;
};

// Writes the model directory; see the file comment. Errors name the
// offending option, file or line and say what to change.
Status InitModel(const InitModelOptions& options);

// The preset names, in the order the help text lists them.
const std::vector<std::string>& InitModelPresets();

// A preset's config for a tokenizer of `tokenizer_vocab_size` ids (bos/eos
// ids left unset); INVALID_ARGUMENT naming the presets for an unknown name.
//   tiny:        hidden 256, 4 layers, 8 heads (head_dim 32), 4 kv heads,
//                intermediate 688, rope_theta 500000, max positions 8192,
//                rms_norm_eps 1e-5, untied, bf16; vocab = tokenizer's.
//   llama3-8b:   Meta-Llama-3-8B (its config.json), max positions 8192;
//   llama3.1-8b: the same with llama3 rope_scaling (factor 8, low 1,
//                high 4, original 8192) and 131072 positions;
//   llama3-70b, llama3.1-70b: likewise for 70B;
//   llama3.2-1b, llama3.2-3b: Llama 3.2 (tied embeddings, llama3
//                rope_scaling factor 32);
//   mistral-7b-v0.3: Mistral 7B v0.3 (vocab 32768, rope_theta 1e6, no
//                sliding window);
//   qwen2.5-0.5b, -1.5b, -3b (tied), -7b, -14b, -32b, -72b: Qwen2.5 (q/k/v
//                biases, rope_theta 1e6).
//   Shapes as the published config.json files (sources in init_model.cc);
//   the vocab is max(the checkpoint's, the tokenizer's).
Result<LlamaConfig> InitModelPresetConfig(const std::string& preset,
                                          int64_t tokenizer_vocab_size);

// config.json text for a config (the keys of its family's HF config class,
// sorted as transformers writes them).
std::string LlamaConfigToJson(const LlamaConfig& config);

// The HF weight names and shapes of a config, in module order (embedding,
// layers, final norm, lm_head unless tied).
struct WeightSpec {
  std::string name;
  std::vector<uint64_t> shape;
  bool is_norm = false;  // initialized to 1
  double stddev = 0;     // of the normal init (not norms)
};
std::vector<WeightSpec> LlamaWeightSpecs(const LlamaConfig& config);

// Element `index` of a non-norm tensor with the given std, before the bf16
// rounding (see the file comment); and the bf16 bits InitModel writes for
// it (WeightSpec::stddev is the std InitModel uses).
float InitNormal(uint64_t seed, const std::string& name, uint64_t index, double stddev = 0.02);
uint16_t InitNormalBf16(uint64_t seed, const std::string& name, uint64_t index,
                        double stddev = 0.02);
// The per-tensor key of the draws (the file comment's `key`).
uint64_t InitTensorKey(uint64_t seed, const std::string& name);
// Elements [begin, end) of `spec`'s tensor as InitModel writes them (bf16
// bits: 1 for norms, else the normal draws), on num_threads threads (<= 0:
// hardware concurrency). The bytes do not depend on the range split.
void FillInitWeight(const WeightSpec& spec, uint64_t seed, uint64_t begin, uint64_t end,
                    uint16_t* out, int num_threads = 1);
// lm_head's std: 1 / sqrt(2 hidden_size), in double.
double LmHeadStd(int64_t hidden_size);

// Elements generated per chunk; the writer holds two chunks (2 bytes each).
inline constexpr uint64_t kInitChunkElements = uint64_t{1} << 24;

// Writes the weights of `config` (bf16) into dir as model.safetensors or
// shards + index, as InitModel does. Exposed for tools that bring their own
// config.json and tokenizer. num_threads <= 0: hardware concurrency. The
// chunk size changes memory and speed only, never the bytes.
Status WriteRandomLlamaWeights(const std::string& dir, const LlamaConfig& config,
                               uint64_t seed, uint64_t max_shard_bytes, int num_threads,
                               const std::function<void(const std::string&)>& progress,
                               uint64_t chunk_elements = kInitChunkElements);

}  // namespace ftune::trainer

#endif  // FTUNE_WORKER_TRAINER_INIT_MODEL_H_
