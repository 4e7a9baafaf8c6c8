// The Llama decoder (LlamaForCausalLM) over plain tensors, with LoRA.
//
// Functional style: the model owns its tensors and LoraLinear layers and
// runs them with ATen ops; there are no nn::Modules. Every step computes
// what transformers' modeling_llama.py computes, in the same order and
// precision, so fp32 results agree with it to rounding:
//   embedding -> per layer [RMSNorm -> attention (q/k/v + LoRA, RoPE in
//   rotate_half layout, GQA by repeating kv heads, causal mask) -> o_proj ->
//   residual -> RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> lm_head.
// The same decoder serves Mistral and Qwen2 (llama_config.h): Qwen2's q/k/v
// projections add their frozen biases (LoraLinear::bias, lora.h), and a
// Mistral sliding window is honoured by refusing sequences longer than it.
// RMSNorm computes in fp32 and casts back before the weight (HF's
// LlamaRMSNorm); RoPE's cos/sin are computed in fp32 from the config's
// inverse frequencies (llama3/linear scaling included, llama_config.h) and
// cast to the compute dtype.
//
// Packed sequences: a new document starts wherever a position id is not the
// previous one plus 1 (transformers' rule for packed batches, e.g. position
// ids restarting at 0). Attention never crosses a document boundary, and the
// loss never asks a token to predict the first token of the next document.
//
// Attention: on CUDA in bf16/fp16, flash attention's variable-length path:
// every document of every row is one sequence (offsets from the position
// ids), causal within it, so packed rows need no (s x s) mask, and the
// kv heads are shared by their query groups without being copied; q/k/v
// stay in the projections' (batch, seq, heads, head_dim) layout. Otherwise
// LibTorch's scaled_dot_product_attention where this LibTorch has it
// (>= 2.1), else an exact math path (HF's eager attention): a batch with
// no document boundary uses is_causal, a packed batch passes the
// block-diagonal causal mask, kv heads are repeated as HF's repeat_kv.
//
// Fused kernels (bf16 on CUDA, ModelOptions::fused_kernels): RMSNorm, the
// residual add before the second one, SwiGLU and RoPE run as single kernels
// (fused_ops.h) with the op chains' roundings; they keep bf16 inputs for
// backward instead of fp32 copies. With NF4 bases and no adapter dropout,
// q/k/v and gate/up each run as one GEMM with the LoRA A rows appended
// (fused_projection.h). fp32 and the CPU use the chains.
//
// Precision: ModelOptions::dtype is the compute dtype of activations and of
// the frozen weights (fp32 on the CPU, bf16 on CUDA); LoRA adapters are fp32
// always. Embeddings, norms and lm_head are frozen like the base linears.
//
// Memory: the loss never materializes (tokens x vocab) logits (loss.h), and
// per-layer activation checkpointing keeps only each layer's input and
// recomputes the layer in backward (with the RNG state restored, so LoRA
// dropout masks are the same).
//
// FSDP units (fsdp.h): unit 0 is the embedding, unit 1 + i decoder layer i,
// unit L + 1 the final norm and lm_head. With UnitHooks installed, the
// forward asks for each unit right before it computes and hands it back
// right after; the checkpointed backward asks again for each layer in
// reverse order and hands it back once the layer's gradients are computed.
// The head unit, the last of the forward and the first of the backward,
// stays resident from the forward to the end of its backward (as FSDP keeps
// its root), or is handed back at the end of Logits/Loss/TokenLogProbs when
// no backward follows. Without hooks every tensor is resident, as before.
// Hooks report collective failures by throwing (c10::Error), like every
// tensor error inside a forward or backward.
//
// Thread-safety: without hooks, forwards only read the model; several
// threads may run them at once. With hooks, one thread at a time (the hooks
// drive collectives). Attaching adapters or changing options needs
// exclusive access.
#ifndef FTUNE_WORKER_TRAINER_MODEL_H_
#define FTUNE_WORKER_TRAINER_MODEL_H_

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "worker/modelio/llama_config.h"
#include "worker/trainer/lora.h"
#include "worker/trainer/nf4_linear.h"
#include "worker/trainer/recompute.h"
#include "ftune/status.h"
#include "worker/trainer/weights.h"

namespace ftune::trainer {

enum class AttentionImpl {
  kAuto,  // SDPA where this LibTorch has it, else math
  kMath,  // HF's eager attention, exact
  kSdpa,  // scaled_dot_product_attention (LibTorch >= 2.1 only)
};

struct ModelOptions {
  c10::Device device = c10::Device(c10::DeviceType::CPU);
  c10::ScalarType dtype = c10::ScalarType::Float;  // compute dtype
  bool activation_checkpointing = false;
  // With activation_checkpointing: how many layers (the first ones) are
  // checkpointed; -1 = all. The others keep their activations for backward.
  int64_t checkpoint_layers = -1;
  // What a checkpointed layer keeps of its forward so its recompute skips
  // those GEMMs (recompute.h); gradients are the same for every choice.
  RecomputeKeep recompute_keep = RecomputeKeep::kNothing;
  // How many of the layers that are not checkpointed (the first ones after
  // the checkpointed) keep their NF4 projections' dequantized weights from
  // forward to backward, whose backward then dequantizes nothing: one
  // dequantization per weight and step instead of two, for the weights' bf16
  // bytes (KeepDequantizedWeights, nf4_linear.h). Gradients are the same.
  int64_t dequantized_kept_layers = 0;
  // LoRA's product in fp32 also when the compute dtype is 16-bit (PEFT
  // without autocast); by default it runs in the compute dtype (lora.h).
  bool lora_fp32_compute = false;
  // bf16 on CUDA: RMSNorm (with the residual add before the second one),
  // SwiGLU and RoPE as fused kernels (fused_ops.h); false keeps the LibTorch
  // op chains they replace.
  bool fused_kernels = true;
  // With fused_kernels on CUDA: the loss's log-softmax and gradient as one
  // kernel over each chunk's bf16 logits (FusedCrossEntropyRows,
  // fused_ops.h) instead of the fp32 chain.
  bool fused_loss = false;
  int64_t loss_chunk_tokens = 1024;
  AttentionImpl attention = AttentionImpl::kAuto;
  // NF4 base weights for all 7 projections of every layer, quantized at load
  // time on options.device (bitsandbytes' load_in_4bit); embeddings, norms
  // and lm_head stay dense. See nf4_linear.h.
  bool quantize_base = false;
  Nf4Options nf4;
  // LoadShardedModel only: instead of reading safetensors, each rank
  // generates its own elements of every frozen tensor on options.device,
  // exactly the weights `ftune-rank init-model --seed random_seed` writes for
  // the directory's config.json (init_model.h). For benchmarks of shapes
  // whose bf16 weights do not fit a disk (a 70B model is 141 GB).
  bool random_weights = false;
  uint64_t random_seed = 0;
};

// fp32 on the CPU, bf16 on CUDA (the precision policy).
ModelOptions DefaultModelOptions(c10::Device device);

struct DecoderLayer {
  at::Tensor input_layernorm;           // (hidden)
  at::Tensor post_attention_layernorm;  // (hidden)
  std::unique_ptr<LoraLinear> q_proj, k_proj, v_proj, o_proj;
  std::unique_ptr<LoraLinear> gate_proj, up_proj, down_proj;

  // By HF module name ("q_proj", ...); nullptr for an unknown name.
  LoraLinear* Module(const std::string& name);
  const LoraLinear* Module(const std::string& name) const;
};

// When a unit is handed back (UnitHooks::Release).
enum class UnitPhase {
  kForward,      // after its forward, a backward will follow
  kForwardOnly,  // after its forward, no backward (no grad, or the embedding)
  kBackward,     // after its backward
};

// FSDP's gather/release points in the model (fsdp.h implements them).
class UnitHooks {
 public:
  virtual ~UnitHooks() = default;
  // Makes the unit's frozen tensors resident; a no-op when they are.
  virtual void Gather(int64_t unit, UnitPhase phase) = 0;
  // The unit is not needed until its next Gather; the hooks decide whether
  // to free it (reshard_after_forward).
  virtual void Release(int64_t unit, UnitPhase phase) = 0;
  // The unit the forward (or backward) needs next: where a device backend
  // starts the gather on a separate stream. No-op by default.
  virtual void Prefetch(int64_t unit, UnitPhase phase) {}
};

// What a batch's position ids and labels imply, computed on the host from
// their CPU copies (LlamaModel::HostLayout) so that a training step need not
// wait for the device to learn it: where the documents start (flash
// attention's sequence offsets) and which targets the loss counts. Tensors
// on the model's device.
struct BatchLayout {
  at::Tensor cu_seqlens;       // (documents + 1) int32: offsets in batch * seq
  at::Tensor loss_rows;        // (num_loss_tokens) int64: flattened (b, s - 1) indices
  int64_t num_loss_tokens = 0;
};

struct LossOutput {
  at::Tensor loss_sum;     // () fp32, sum of -log p(target), differentiable
  int64_t num_tokens = 0;  // targets counted in loss_sum
  // loss_sum / num_tokens (loss_sum itself when no token counts).
  at::Tensor Mean() const;
};

struct NamedTensor {
  std::string name;
  at::Tensor tensor;
};

// Keys and values of the positions a sequence has seen so far, per layer,
// for incremental decoding (LlamaModel::ForwardCached, generate.h). Each
// layer's tensors are allocated once for `capacity` positions and filled in
// place; keys are stored after RoPE, before the kv heads are repeated for
// their query groups, so a cache costs
// 2 * layers * batch * kv_heads * capacity * head_dim elements of the
// compute dtype. Not thread-safe: one sequence (batch) decodes at a time.
struct KvCache {
  std::vector<at::Tensor> keys;    // per layer (batch, kv_heads, capacity, head_dim)
  std::vector<at::Tensor> values;  // per layer (batch, kv_heads, capacity, head_dim)
  int64_t length = 0;              // positions 0 .. length - 1 are filled
  int64_t capacity() const { return keys.empty() ? 0 : keys[0].size(2); }
};

class LlamaModel {
 public:
  // Returns a tensor by HF name in any dtype on any device, or a Status.
  using TensorSource = std::function<Result<at::Tensor>(const std::string& name)>;

  // An HF model directory: config.json + model.safetensors or a sharded
  // index; BF16/F16/F32 weights converted to options.dtype on options.device.
  static Result<std::unique_ptr<LlamaModel>> Load(const std::string& dir,
                                                  const ModelOptions& options);
  // A projection's frozen base layer by HF weight name and (out, in), for
  // checkpoints that store it in another form (pre-quantized NF4,
  // bnb_checkpoint.h); on the options' device, computing in options.dtype.
  using BaseLinearSource = std::function<Result<std::unique_ptr<BaseLinear>>(
      const std::string& name, int64_t out_features, int64_t in_features)>;

  // The same from any source of tensors (tests, random-weight benchmarks).
  // `source_name` names it in errors. With `bases`, the 7 projections come
  // from it instead of `tensors`.
  static Result<std::unique_ptr<LlamaModel>> Build(const LlamaConfig& config,
                                                   const TensorSource& tensors,
                                                   const ModelOptions& options,
                                                   const std::string& source_name,
                                                   const BaseLinearSource& bases = nullptr);

  // A model with every frozen tensor absent (FSDP): the 7 projections of
  // each layer come from `bases` (typically not yet materialized), the
  // embedding, norms and lm_head are undefined until the sharding engine
  // sets them through the mutable_* accessors. Validates like Build.
  static Result<std::unique_ptr<LlamaModel>> BuildUnmaterialized(
      const LlamaConfig& config, const ModelOptions& options, const std::string& source_name,
      const BaseLinearSource& bases);

  const LlamaConfig& config() const { return config_; }
  const ModelOptions& options() const { return options_; }
  void set_activation_checkpointing(bool on) { options_.activation_checkpointing = on; }
  void set_loss_chunk_tokens(int64_t n);
  void set_attention(AttentionImpl impl);

  // Fresh adapters on config.target_modules of every layer (A seeded per
  // module, B zeros). Replaces adapters already attached.
  Status AttachLora(const LoraConfig& config);
  // A PEFT adapter: every target of every layer must be present with the
  // right shapes, and every tensor of the file must be used.
  Status AttachAdapter(const PeftAdapter& adapter);
  Status LoadAdapter(const std::string& dir);
  // Writes the attached adapters as a PEFT adapter directory
  // (WritePeftAdapter); FAILED_PRECONDITION without adapters.
  Status SaveAdapter(const std::string& dir, const std::string& base_model_name_or_path) const;
  // The LoRA config last attached (meaningful only when has_lora()).
  const LoraConfig& lora_config() const { return lora_config_; }
  bool has_lora() const { return has_lora_; }

  // Trainable tensors with PEFT's saved names, ordered by layer, then
  // q, k, v, o, gate, up, down, then A before B.
  std::vector<NamedTensor> LoraParameters() const;

  // input_ids (batch, seq) int64; position_ids (batch, seq) int64 or
  // undefined (0..seq-1 in every row). Returns the final-norm hidden states
  // (batch, seq, hidden) in the compute dtype. `training` enables LoRA
  // dropout. With unit hooks the head unit stays resident afterwards, so
  // the caller can apply lm_head(); ReleaseHead() (or the backward) hands it
  // back.
  at::Tensor Hidden(const at::Tensor& input_ids, const at::Tensor& position_ids,
                    bool training) const;
  // (batch, seq, vocab) fp32. Materializes every logit: for tests and small
  // inputs; training uses Loss.
  at::Tensor Logits(const at::Tensor& input_ids, const at::Tensor& position_ids) const;
  // Causal-LM loss with HF's label convention: labels (batch, seq) int64,
  // labels[t] is predicted from position t - 1, -100 ignored; targets that
  // start a new document are ignored too.
  // With `layout` (HostLayout of the same batch) nothing in it is derived
  // from the device tensors again: no host synchronization.
  LossOutput Loss(const at::Tensor& input_ids, const at::Tensor& position_ids,
                  const at::Tensor& labels, bool training,
                  const BatchLayout* layout = nullptr) const;
  // The layout of a batch from CPU position ids and labels (batch, seq)
  // int64; checks the labels (-100 or in [0, vocab)) on the host.
  BatchLayout HostLayout(const at::Tensor& position_ids, const at::Tensor& labels) const;
  // The number of targets Loss counts for these labels: what transformers
  // calls num_items_in_batch, needed before the forwards of an accumulated
  // step so every micro-batch can be scaled by the step's token count.
  static int64_t CountLossTokens(const at::Tensor& labels, const at::Tensor& position_ids);
  // log p(input_ids[t + 1] | ..t), (batch, seq - 1) fp32, no autograd; NaN
  // where t + 1 starts a new document.
  at::Tensor TokenLogProbs(const at::Tensor& input_ids, const at::Tensor& position_ids) const;

  // --- Incremental decoding (inference only: no grad, no unit hooks).
  // An empty cache for `batch` rows and up to `capacity` positions, on the
  // model's device in the compute dtype.
  KvCache NewKvCache(int64_t batch, int64_t capacity) const;
  // Runs input_ids (batch, n) int64 at positions cache->length ..
  // cache->length + n - 1, attending to every cached position and causally
  // among themselves, appends their keys and values to the cache and returns
  // the logits of the last position, (batch, vocab) fp32. A prefill is one
  // call with the whole prompt, a decode step one call with n = 1; the
  // logits are those Logits() gives for the same prefix (to rounding: the
  // matmuls have other shapes). Position ids are plain 0, 1, ... (one
  // document per row). Where LayerForward uses the fused kernels (bf16 on
  // CUDA), so does this.
  at::Tensor ForwardCached(const at::Tensor& input_ids, KvCache* cache) const;

  // Frozen tensors; undefined in a sharded model while their unit is not
  // gathered (FsdpUnits::GatherUnit).
  const at::Tensor& embed_tokens() const { return embed_tokens_; }  // (vocab, hidden)
  const at::Tensor& lm_head() const { return lm_head_; }            // (vocab, hidden)
  const at::Tensor& final_norm() const { return norm_; }            // (hidden)
  const at::Tensor& inv_freq() const { return inv_freq_; }          // (head_dim / 2) fp32
  const std::vector<DecoderLayer>& layers() const { return layers_; }
  std::vector<DecoderLayer>& mutable_layers() { return layers_; }

  // --- FSDP units (see the file comment).
  static constexpr int64_t kEmbeddingUnit = 0;
  static int64_t LayerUnit(int64_t layer) { return layer + 1; }
  int64_t head_unit() const { return config_.num_hidden_layers + 1; }
  int64_t num_units() const { return config_.num_hidden_layers + 2; }
  // Installs (or, with nullptr, removes) the hooks; the model owns them.
  void set_unit_hooks(std::shared_ptr<UnitHooks> hooks) { hooks_ = std::move(hooks); }
  UnitHooks* unit_hooks() const { return hooks_.get(); }
  // Hands the head unit back after Hidden when no backward follows (Logits,
  // Loss and TokenLogProbs do it themselves). No-op without hooks.
  void ReleaseHead() const;
  // For the sharding engine only, between forwards: where it puts (views of)
  // gathered tensors. With tied embeddings lm_head is the embedding; the
  // engine sets both.
  at::Tensor& mutable_embed_tokens() { return embed_tokens_; }
  at::Tensor& mutable_final_norm() { return norm_; }
  at::Tensor& mutable_lm_head() { return lm_head_; }

  // One decoder layer; public for the checkpointing autograd function.
  struct AttentionContext;
  at::Tensor LayerForward(int64_t layer, const at::Tensor& h, const AttentionContext& ctx,
                          bool training) const;

 private:
  LlamaModel(LlamaConfig config, ModelOptions options);

  static Status ValidateBuild(const LlamaConfig& config, const ModelOptions& options,
                              const std::string& source_name);
  // Hidden with the head unit left resident; *boundary says whether the
  // head is released by the backward (a boundary node was inserted).
  at::Tensor HiddenKeepHead(const at::Tensor& input_ids, const at::Tensor& pos, bool training,
                            bool* boundary, const BatchLayout* layout = nullptr) const;
  at::Tensor CheckedPositions(const at::Tensor& input_ids, const at::Tensor& position_ids) const;
  AttentionContext MakeAttentionContext(const at::Tensor& position_ids,
                                        const BatchLayout* layout) const;
  at::Tensor Attention(const DecoderLayer& layer, const at::Tensor& x, const AttentionContext& ctx,
                       bool training) const;
  // The cached counterparts of LayerForward / Attention (ForwardCached).
  at::Tensor LayerForwardCached(int64_t layer, const at::Tensor& h, const at::Tensor& cos,
                                const at::Tensor& sin, KvCache* cache) const;
  at::Tensor AttentionCached(int64_t layer, const at::Tensor& x, const at::Tensor& cos,
                             const at::Tensor& sin, KvCache* cache) const;
  bool UseSdpa() const;
  // Flash attention (varlen, GQA without K/V copies, no mask): CUDA with a
  // 16-bit compute dtype and a head_dim it supports, attention auto or sdpa.
  bool UseFlash() const;
  // Whether the fused kernels run for activation x (ModelOptions::fused_kernels).
  bool Fused(const at::Tensor& x) const;

  LlamaConfig config_;
  ModelOptions options_;
  at::Tensor embed_tokens_;  // (vocab, hidden)
  at::Tensor norm_;          // (hidden)
  at::Tensor lm_head_;       // (vocab, hidden); the embedding itself when tied
  at::Tensor inv_freq_;      // (head_dim / 2) fp32 on the device
  std::vector<DecoderLayer> layers_;
  LoraConfig lora_config_;
  bool has_lora_ = false;
  std::shared_ptr<UnitHooks> hooks_;
};

// Per-forward attention inputs shared by all layers.
struct LlamaModel::AttentionContext {
  // Flash layout (batch, seq, 1, head_dim) when `flash`, else
  // (batch, 1, seq, head_dim); compute dtype.
  at::Tensor cos;
  at::Tensor sin;
  // Flash attention over the documents of all rows (see UseFlash): their
  // offsets in the flattened (batch * seq) tokens, int32 (num_docs + 1).
  bool flash = false;
  at::Tensor cu_seqlens;
  // (batch, 1, seq, seq) bool, true = may attend; undefined when the batch is
  // plain causal and SDPA runs (is_causal needs no mask).
  at::Tensor allowed;
  bool plain_causal = true;  // no document boundary in the batch
};

}  // namespace ftune::trainer

#endif  // FTUNE_WORKER_TRAINER_MODEL_H_
