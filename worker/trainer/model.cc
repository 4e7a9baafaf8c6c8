// Llama decoder forward/backward; see model.h for the design.
#include "worker/trainer/model.h"
#include "worker/trainer/fused_ops.h"
#include "worker/trainer/fused_projection.h"
#include "worker/trainer/profiler.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <sstream>
#include <utility>

#include "worker/trainer/loss.h"
#include "worker/trainer/torch_compat.h"

namespace ftune::trainer {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// transformers' LlamaRMSNorm: fp32 statistics, cast back before the weight.
at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor xf = x.to(at::kFloat);                     // (..., hidden)
  at::Tensor variance = xf.pow(2).mean({-1}, /*keepdim=*/true);
  xf = xf * at::rsqrt(variance + eps);
  return weight * xf.to(x.scalar_type());
}

// HF's rotate_half: (x1, x2) -> (-x2, x1) over the two halves of head_dim.
at::Tensor RotateHalf(const at::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return at::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
}

// x * cos + rotate_half(x) * sin, as one kernel when `fused` (fused_ops.h).
at::Tensor ApplyRope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                     bool fused) {
  return fused ? FusedRope(x, cos, sin) : x * cos + RotateHalf(x) * sin;
}

// (batch, kv_heads, seq, head_dim) -> (batch, kv_heads * groups, seq, head_dim),
// each kv head repeated for its group of query heads (HF's repeat_kv).
at::Tensor RepeatKv(const at::Tensor& x, int64_t groups) {
  if (groups == 1) return x;
  const int64_t b = x.size(0), kv = x.size(1), s = x.size(2), d = x.size(3);
  return x.unsqueeze(2).expand({b, kv, groups, s, d}).reshape({b, kv * groups, s, d});
}

// True where token t starts a new document: its position id is not the
// previous one plus 1 (t = 0 always starts one). (batch, seq) bool.
at::Tensor DocumentStarts(const at::Tensor& position_ids) {
  at::Tensor starts = at::ones_like(position_ids, position_ids.options().dtype(at::kBool));
  if (position_ids.size(1) > 1) {
    starts.slice(1, 1).copy_(position_ids.slice(1, 1) != position_ids.slice(1, 0, -1) + 1);
  }
  return starts;
}

// Flash attention's cumulative sequence lengths of the flattened batch:
// every document start, then the token count. Each row starts a document,
// so documents never cross rows. (documents + 1) int32.
at::Tensor CuSeqlens(const at::Tensor& starts) {
  at::Tensor offsets = starts.reshape({-1}).nonzero().squeeze(1).to(at::kInt);  // (docs)
  return at::cat({offsets, at::full({1}, starts.numel(), offsets.options())});
}

// The flattened (b, s - 1) indices of the positions that have a loss
// target: position t predicts labels[t + 1], except ignored targets and
// targets that open a new document (predicted across the boundary).
at::Tensor LossRows(const at::Tensor& labels, const at::Tensor& starts) {
  const at::Tensor valid =
      (labels.slice(1, 1) != kIgnoreIndex) & starts.slice(1, 1).logical_not();  // (b, s - 1)
  return valid.reshape({-1}).nonzero().squeeze(1);                                // (n)
}

void CheckTargets(const at::Tensor& t, int64_t vocab_size) {
  TORCH_CHECK(t.numel() == 0 ||
                  (t.min().item<int64_t>() >= 0 && t.max().item<int64_t>() < vocab_size),
              "labels must be -100 or in [0, ", vocab_size, ")");
}

// The layer recomputed in backward (activation checkpointing). Forward runs
// the layer without building a graph and keeps only its input; backward
// re-runs it with grad enabled from the same RNG state and differentiates.
struct CheckpointedLayer : public torch::autograd::Function<CheckpointedLayer> {
  // params: the layer's LoRA tensors, so autograd routes their gradients
  // through this node. model/ctx travel as integers: they are not tensors,
  // and the model outlives every backward of its forwards.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h, at::TensorList params,
                            int64_t model_ptr, int64_t layer, int64_t attn_ptr, bool training) {
    const auto* model = reinterpret_cast<const LlamaModel*>(model_ptr);
    const auto& actx = *reinterpret_cast<const LlamaModel::AttentionContext*>(attn_ptr);
    ctx->saved_data["model"] = model_ptr;
    ctx->saved_data["layer"] = layer;
    ctx->saved_data["training"] = training;
    ctx->saved_data["num_params"] = static_cast<int64_t>(params.size());
    ctx->saved_data["cos"] = actx.cos;
    ctx->saved_data["sin"] = actx.sin;
    ctx->saved_data["has_mask"] = actx.allowed.defined();
    if (actx.allowed.defined()) ctx->saved_data["allowed"] = actx.allowed;
    ctx->saved_data["plain_causal"] = actx.plain_causal;
    ctx->saved_data["flash"] = actx.flash;
    if (actx.flash) ctx->saved_data["cu_seqlens"] = actx.cu_seqlens;
    // Dropout draws from the device's default generator; backward must see
    // the same stream to recompute the same masks.
    at::Generator gen = at::globalContext().defaultGenerator(h.device());
    {
      std::lock_guard<std::mutex> lock(gen.mutex());
      ctx->saved_data["rng"] = gen.get_state();
    }
    // Selective recompute: the GEMM outputs the options keep, for the
    // recompute to take back (recompute.h).
    GemmOutputStash stash(model->options().recompute_keep);
    at::Tensor out;
    {
      RecordGemmOutputs record(&stash);
      out = model->LayerForward(layer, h, actx, training);
    }
    stash.CheckUnmodified();
    std::vector<at::Tensor> saved = {h};
    saved.insert(saved.end(), stash.outputs().begin(), stash.outputs().end());
    ctx->save_for_backward(saved);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list saved = ctx->get_saved_variables();
    const at::Tensor h = saved[0];
    const auto* model = reinterpret_cast<const LlamaModel*>(ctx->saved_data["model"].toInt());
    const int64_t layer = ctx->saved_data["layer"].toInt();
    const bool training = ctx->saved_data["training"].toBool();
    const int64_t num_params = ctx->saved_data["num_params"].toInt();
    LlamaModel::AttentionContext actx;
    actx.cos = ctx->saved_data["cos"].toTensor();
    actx.sin = ctx->saved_data["sin"].toTensor();
    if (ctx->saved_data["has_mask"].toBool()) actx.allowed = ctx->saved_data["allowed"].toTensor();
    actx.plain_causal = ctx->saved_data["plain_causal"].toBool();
    actx.flash = ctx->saved_data["flash"].toBool();
    if (actx.flash) actx.cu_seqlens = ctx->saved_data["cu_seqlens"].toTensor();

    at::Generator gen = at::globalContext().defaultGenerator(h.device());
    at::Tensor current_rng;
    {
      std::lock_guard<std::mutex> lock(gen.mutex());
      current_rng = gen.get_state();
      gen.set_state(ctx->saved_data["rng"].toTensor());
    }
    at::Tensor x = h.detach();
    x.set_requires_grad(true);
    UnitHooks* hooks = model->unit_hooks();
    const int64_t unit = LlamaModel::LayerUnit(layer);
    if (hooks != nullptr) {
      hooks->Gather(unit, UnitPhase::kBackward);
      if (layer > 0) hooks->Prefetch(LlamaModel::LayerUnit(layer - 1), UnitPhase::kBackward);
    }
    at::Tensor out;
    {
      GemmOutputStash stash(model->options().recompute_keep,
                            std::vector<at::Tensor>(saved.begin() + 1, saved.end()));
      saved.clear();
      at::AutoGradMode enable(true);
      // The backward below follows at once: keep each dequantized weight
      // for it rather than dequantizing a third time.
      KeepDequantizedWeights keep;
      ReplayGemmOutputs replay(&stash);
      out = model->LayerForward(layer, x, actx, training);
      stash.CheckAllTaken();
    }
    {
      std::lock_guard<std::mutex> lock(gen.mutex());
      gen.set_state(current_rng);
    }

    // The layer's LoRA tensors in the order forward received them.
    variable_list inputs{x};
    const DecoderLayer& dl = model->layers()[layer];
    for (const char* name : {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                             "down_proj"}) {
      const LoraLinear* m = dl.Module(name);
      if (m->has_adapter()) {
        inputs.push_back(m->adapter().a);
        inputs.push_back(m->adapter().b);
      }
    }
    TORCH_CHECK(static_cast<int64_t>(inputs.size()) == num_params + 1,
                "checkpointed layer ", layer, ": adapters changed between forward (", num_params,
                " tensors) and backward (", inputs.size() - 1, ")");
    variable_list grads = torch::autograd::grad({out}, inputs, {grad_outputs[0]},
                                                /*retain_graph=*/false, /*create_graph=*/false,
                                                /*allow_unused=*/true);
    out = at::Tensor();
    if (hooks != nullptr) hooks->Release(unit, UnitPhase::kBackward);
    variable_list result;
    result.push_back(ctx->needs_input_grad(0) ? grads[0] : at::Tensor());
    for (int64_t i = 0; i < num_params; ++i) result.push_back(grads[i + 1]);
    // model_ptr, layer, attn_ptr, training.
    for (int i = 0; i < 4; ++i) result.emplace_back();
    return result;
  }
};

// Identity on the hidden states entering the head unit; its backward runs
// once the head's backward (final norm, lm_head in the loss) is done, and
// hands the head unit back then.
struct HeadBoundary : public torch::autograd::Function<HeadBoundary> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h, int64_t model_ptr) {
    ctx->saved_data["model"] = model_ptr;
    return h.view_as(h);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto* model = reinterpret_cast<const LlamaModel*>(ctx->saved_data["model"].toInt());
    if (model->unit_hooks() != nullptr) {
      model->unit_hooks()->Release(model->head_unit(), UnitPhase::kBackward);
    }
    return {grad_outputs[0], at::Tensor()};
  }
};

const char* const kModules[] = {"q_proj", "k_proj", "v_proj", "o_proj",
                                "gate_proj", "up_proj", "down_proj"};

}  // namespace

ModelOptions DefaultModelOptions(c10::Device device) {
  ModelOptions o;
  o.device = device;
  o.dtype = device.is_cuda() ? c10::ScalarType::BFloat16 : c10::ScalarType::Float;
  return o;
}

LoraLinear* DecoderLayer::Module(const std::string& name) {
  return const_cast<LoraLinear*>(static_cast<const DecoderLayer*>(this)->Module(name));
}

const LoraLinear* DecoderLayer::Module(const std::string& name) const {
  if (name == "q_proj") return q_proj.get();
  if (name == "k_proj") return k_proj.get();
  if (name == "v_proj") return v_proj.get();
  if (name == "o_proj") return o_proj.get();
  if (name == "gate_proj") return gate_proj.get();
  if (name == "up_proj") return up_proj.get();
  if (name == "down_proj") return down_proj.get();
  return nullptr;
}

at::Tensor LossOutput::Mean() const {
  return num_tokens > 0 ? loss_sum / static_cast<double>(num_tokens) : loss_sum;
}

LlamaModel::LlamaModel(LlamaConfig config, ModelOptions options)
    : config_(std::move(config)), options_(options) {}

void LlamaModel::set_loss_chunk_tokens(int64_t n) {
  TORCH_CHECK(n >= 1, "loss_chunk_tokens (", n, ") must be >= 1");
  options_.loss_chunk_tokens = n;
}

void LlamaModel::set_attention(AttentionImpl impl) {
  TORCH_CHECK(impl != AttentionImpl::kSdpa || compat::kHasSdpa,
              "scaled_dot_product_attention is not available in LibTorch ",
              compat::TorchVersion());
  options_.attention = impl;
}

bool LlamaModel::UseSdpa() const {
  switch (options_.attention) {
    case AttentionImpl::kMath: return false;
    case AttentionImpl::kSdpa: return true;
    case AttentionImpl::kAuto: return compat::kHasSdpa;
  }
  return false;
}

bool LlamaModel::Fused(const at::Tensor& x) const {
  return options_.fused_kernels && x.is_cuda() && FusedOpsApply(x);
}

bool LlamaModel::UseFlash() const {
  if (!compat::kHasFlashVarlen || !options_.device.is_cuda()) return false;
  if (options_.attention == AttentionImpl::kMath) return false;
  if (options_.dtype != at::kBFloat16 && options_.dtype != at::kHalf) return false;
  return config_.head_dim % 8 == 0 && config_.head_dim <= 256;
}

Result<std::unique_ptr<LlamaModel>> LlamaModel::Load(const std::string& dir,
                                                     const ModelOptions& options) {
  FTUNE_ASSIGN_OR_RETURN(LlamaConfig config, LoadLlamaConfig(dir));
  FTUNE_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsModel> st,
                                 SafetensorsModel::OpenDirectory(dir));
  const SafetensorsModel* stp = st.get();
  const c10::ScalarType dtype = options.dtype;
  const c10::Device device = options.device;
  TensorSource source = [stp, dtype, device](const std::string& name) {
    return ReadTensor(*stp, name, dtype, device);
  };
  return Build(config, source, options, st->source());
}

Status LlamaModel::ValidateBuild(const LlamaConfig& config, const ModelOptions& options,
                                 const std::string& source_name) {
  if (config.attention_bias || config.mlp_bias) {
    return InvalidArgumentError(source_name +
                                ": attention_bias/mlp_bias are not supported (no Llama uses them)");
  }
  if (config.head_dim % 2 != 0) {
    return InvalidArgumentError(source_name + ": head_dim (" + std::to_string(config.head_dim) +
                                ") must be even for RoPE");
  }
  if (options.loss_chunk_tokens < 1) {
    return InvalidArgumentError("loss_chunk_tokens (" +
                                std::to_string(options.loss_chunk_tokens) + ") must be >= 1");
  }
  if (options.attention == AttentionImpl::kSdpa && !compat::kHasSdpa) {
    return InvalidArgumentError(std::string("attention sdpa needs LibTorch >= 2.1, this is ") +
                                compat::TorchVersion());
  }
  return OkStatus();
}

Result<std::unique_ptr<LlamaModel>> LlamaModel::BuildUnmaterialized(
    const LlamaConfig& config, const ModelOptions& options, const std::string& source_name,
    const BaseLinearSource& bases) {
  FTUNE_RETURN_IF_ERROR(ValidateBuild(config, options, source_name));
  if (!bases) return InvalidArgumentError(source_name + ": BuildUnmaterialized needs `bases`");
  std::unique_ptr<LlamaModel> m(new LlamaModel(config, options));
  const int64_t h = config.hidden_size, inter = config.intermediate_size;
  m->layers_.resize(config.num_hidden_layers);
  for (int64_t i = 0; i < config.num_hidden_layers; ++i) {
    DecoderLayer& l = m->layers_[i];
    const std::string p = "model.layers." + std::to_string(i) + ".";
    const struct {
      std::unique_ptr<LoraLinear>* slot;
      const char* name;
      int64_t out, in;
    } projections[] = {
        {&l.q_proj, "self_attn.q_proj.weight", config.q_size(), h},
        {&l.k_proj, "self_attn.k_proj.weight", config.kv_size(), h},
        {&l.v_proj, "self_attn.v_proj.weight", config.kv_size(), h},
        {&l.o_proj, "self_attn.o_proj.weight", h, config.q_size()},
        {&l.gate_proj, "mlp.gate_proj.weight", inter, h},
        {&l.up_proj, "mlp.up_proj.weight", inter, h},
        {&l.down_proj, "mlp.down_proj.weight", h, inter},
    };
    for (const auto& pr : projections) {
      FTUNE_ASSIGN_OR_RETURN(std::unique_ptr<BaseLinear> base,
                                     bases(p + pr.name, pr.out, pr.in));
      if (base == nullptr || base->out_features() != pr.out || base->in_features() != pr.in) {
        return InvalidArgumentError(source_name + ": base layer '" + p + pr.name +
                                    "' does not have the shape the config implies (" +
                                    std::to_string(pr.out) + ", " + std::to_string(pr.in) + ")");
      }
      *pr.slot = std::make_unique<LoraLinear>(std::move(base));
    }
    if (config.has_qkv_bias()) {
      for (LoraLinear* m : {l.q_proj.get(), l.k_proj.get(), l.v_proj.get()}) m->set_has_bias(true);
    }
  }
  const std::vector<float> inv = RopeInverseFrequencies(config);
  m->inv_freq_ = at::tensor(inv, at::TensorOptions().dtype(at::kFloat)).to(options.device);
  return m;
}

Result<std::unique_ptr<LlamaModel>> LlamaModel::Build(const LlamaConfig& config,
                                                      const TensorSource& tensors,
                                                      const ModelOptions& options,
                                                      const std::string& source_name,
                                                      const BaseLinearSource& bases) {
  FTUNE_RETURN_IF_ERROR(ValidateBuild(config, options, source_name));
  std::unique_ptr<LlamaModel> m(new LlamaModel(config, options));
  const auto opts = at::TensorOptions().dtype(options.dtype).device(options.device);
  // Reads one frozen tensor and checks its shape against the config.
  auto load = [&](const std::string& name, std::vector<int64_t> shape) -> Result<at::Tensor> {
    FTUNE_ASSIGN_OR_RETURN(at::Tensor t, tensors(name));
    FTUNE_RETURN_IF_ERROR(CheckShape(t, shape, source_name, name));
    t = t.to(opts).detach().contiguous();
    t.set_requires_grad(false);
    return t;
  };
  auto linear = [&](const std::string& name, int64_t out,
                    int64_t in) -> Result<std::unique_ptr<LoraLinear>> {
    if (bases) {
      FTUNE_ASSIGN_OR_RETURN(std::unique_ptr<BaseLinear> base, bases(name, out, in));
      if (base->out_features() != out || base->in_features() != in) {
        return InvalidArgumentError(source_name + ": base layer '" + name + "' is (" +
                                    std::to_string(base->out_features()) + ", " +
                                    std::to_string(base->in_features()) +
                                    ") but the config implies (" + std::to_string(out) + ", " +
                                    std::to_string(in) + ")");
      }
      return std::make_unique<LoraLinear>(std::move(base));
    }
    FTUNE_ASSIGN_OR_RETURN(at::Tensor w, load(name, {out, in}));
    if (options.quantize_base) {
      // Quantized from the weight in the compute dtype on the device, as
      // transformers quantizes a load_in_4bit weight after casting it to
      // torch_dtype; the dense copy is freed when `w` goes out of scope.
      return std::make_unique<LoraLinear>(Nf4Linear::Quantize(w, options.nf4));
    }
    return std::make_unique<LoraLinear>(std::make_unique<DenseLinear>(std::move(w)));
  };

  const int64_t h = config.hidden_size, inter = config.intermediate_size;
  FTUNE_ASSIGN_OR_RETURN(m->embed_tokens_,
                                 load("model.embed_tokens.weight", {config.vocab_size, h}));
  FTUNE_ASSIGN_OR_RETURN(m->norm_, load("model.norm.weight", {h}));
  if (config.tie_word_embeddings) {
    // transformers ties lm_head to the embedding whether or not the file
    // also carries an lm_head.weight.
    m->lm_head_ = m->embed_tokens_;
  } else {
    FTUNE_ASSIGN_OR_RETURN(m->lm_head_, load("lm_head.weight", {config.vocab_size, h}));
  }
  m->layers_.resize(config.num_hidden_layers);
  for (int64_t i = 0; i < config.num_hidden_layers; ++i) {
    DecoderLayer& l = m->layers_[i];
    const std::string p = "model.layers." + std::to_string(i) + ".";
    FTUNE_ASSIGN_OR_RETURN(l.input_layernorm, load(p + "input_layernorm.weight", {h}));
    FTUNE_ASSIGN_OR_RETURN(l.post_attention_layernorm,
                                   load(p + "post_attention_layernorm.weight", {h}));
    FTUNE_ASSIGN_OR_RETURN(l.q_proj, linear(p + "self_attn.q_proj.weight", config.q_size(), h));
    FTUNE_ASSIGN_OR_RETURN(l.k_proj, linear(p + "self_attn.k_proj.weight", config.kv_size(), h));
    FTUNE_ASSIGN_OR_RETURN(l.v_proj, linear(p + "self_attn.v_proj.weight", config.kv_size(), h));
    FTUNE_ASSIGN_OR_RETURN(l.o_proj, linear(p + "self_attn.o_proj.weight", h, config.q_size()));
    FTUNE_ASSIGN_OR_RETURN(l.gate_proj, linear(p + "mlp.gate_proj.weight", inter, h));
    FTUNE_ASSIGN_OR_RETURN(l.up_proj, linear(p + "mlp.up_proj.weight", inter, h));
    FTUNE_ASSIGN_OR_RETURN(l.down_proj, linear(p + "mlp.down_proj.weight", h, inter));
    if (config.has_qkv_bias()) {
      // Qwen2: dense, in the compute dtype, also over NF4 weights.
      const struct {
        LoraLinear* m;
        const char* name;
      } biased[] = {{l.q_proj.get(), "self_attn.q_proj.bias"},
                    {l.k_proj.get(), "self_attn.k_proj.bias"},
                    {l.v_proj.get(), "self_attn.v_proj.bias"}};
      for (const auto& b : biased) {
        FTUNE_ASSIGN_OR_RETURN(at::Tensor bias, load(p + b.name, {b.m->out_features()}));
        b.m->set_bias(std::move(bias));
      }
    }
  }
  const std::vector<float> inv = RopeInverseFrequencies(config);
  m->inv_freq_ = at::tensor(inv, at::TensorOptions().dtype(at::kFloat)).to(options.device);
  return m;
}

Status LlamaModel::AttachLora(const LoraConfig& lora) {
  FTUNE_RETURN_IF_ERROR(lora.Validate());
  for (int64_t i = 0; i < static_cast<int64_t>(layers_.size()); ++i) {
    for (const char* name : kModules) layers_[i].Module(name)->Detach();
    for (const std::string& name : lora.target_modules) {
      LoraLinear* m = layers_[i].Module(name);
      m->Attach(NewLoraAdapter(lora, m->in_features(), m->out_features(),
                               LoraModuleSeed(lora.seed, i, name), options_.device));
      m->set_fp32_compute(options_.lora_fp32_compute);
    }
  }
  lora_config_ = lora;
  has_lora_ = true;
  return OkStatus();
}

Status LlamaModel::AttachAdapter(const PeftAdapter& adapter) {
  FTUNE_RETURN_IF_ERROR(adapter.config.Validate());
  // Check everything before touching the model, so a bad adapter leaves the
  // model as it was.
  std::vector<std::vector<LoraAdapter>> staged(layers_.size());
  size_t used = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(layers_.size()); ++i) {
    for (const std::string& name : adapter.config.target_modules) {
      const LoraLinear* m = layers_[i].Module(name);
      LoraAdapter ad;
      for (const char* kind : {"lora_A", "lora_B"}) {
        const std::string key = PeftLoraName(i, name, kind);
        auto it = adapter.tensors.find(key);
        if (it == adapter.tensors.end()) {
          return NotFoundError("PEFT adapter: tensor '" + key + "' is missing");
        }
        const bool is_a = kind[5] == 'A';
        const std::vector<int64_t> want =
            is_a ? std::vector<int64_t>{adapter.config.r, m->in_features()}
                 : std::vector<int64_t>{m->out_features(), adapter.config.r};
        FTUNE_RETURN_IF_ERROR(CheckShape(it->second, want, "PEFT adapter", key));
        (is_a ? ad.a : ad.b) =
            it->second.to(at::TensorOptions().dtype(at::kFloat).device(options_.device)).clone();
        ++used;
      }
      ad.scaling = adapter.config.Scaling();
      ad.dropout = adapter.config.lora_dropout;
      staged[i].push_back(std::move(ad));
    }
  }
  if (used != adapter.tensors.size()) {
    for (const auto& [key, t] : adapter.tensors) {
      bool known = false;
      for (int64_t i = 0; i < static_cast<int64_t>(layers_.size()) && !known; ++i) {
        for (const std::string& name : adapter.config.target_modules) {
          known = known || key == PeftLoraName(i, name, "lora_A") ||
                  key == PeftLoraName(i, name, "lora_B");
        }
      }
      if (!known) {
        return InvalidArgumentError("PEFT adapter: tensor '" + key +
                                    "' does not belong to this model's LoRA targets");
      }
    }
  }
  for (int64_t i = 0; i < static_cast<int64_t>(layers_.size()); ++i) {
    for (const char* name : kModules) layers_[i].Module(name)->Detach();
    for (size_t k = 0; k < adapter.config.target_modules.size(); ++k) {
      LoraLinear* m = layers_[i].Module(adapter.config.target_modules[k]);
      m->Attach(std::move(staged[i][k]));
      m->set_fp32_compute(options_.lora_fp32_compute);
    }
  }
  lora_config_ = adapter.config;
  has_lora_ = true;
  return OkStatus();
}

Status LlamaModel::LoadAdapter(const std::string& dir) {
  FTUNE_ASSIGN_OR_RETURN(PeftAdapter adapter, ReadPeftAdapter(dir));
  return AttachAdapter(adapter);
}

Status LlamaModel::SaveAdapter(const std::string& dir,
                               const std::string& base_model_name_or_path) const {
  if (!has_lora_) return FailedPreconditionError("SaveAdapter: no LoRA adapter is attached");
  std::map<std::string, at::Tensor> tensors;
  for (const NamedTensor& p : LoraParameters()) tensors[p.name] = p.tensor;
  return WritePeftAdapter(dir, lora_config_, tensors, base_model_name_or_path);
}

std::vector<NamedTensor> LlamaModel::LoraParameters() const {
  std::vector<NamedTensor> out;
  for (int64_t i = 0; i < static_cast<int64_t>(layers_.size()); ++i) {
    for (const char* name : kModules) {
      const LoraLinear* m = layers_[i].Module(name);
      if (!m->has_adapter()) continue;
      out.push_back({PeftLoraName(i, name, "lora_A"), m->adapter().a});
      out.push_back({PeftLoraName(i, name, "lora_B"), m->adapter().b});
    }
  }
  return out;
}

at::Tensor LlamaModel::CheckedPositions(const at::Tensor& input_ids,
                                        const at::Tensor& position_ids) const {
  TORCH_CHECK(input_ids.dim() == 2 && input_ids.size(1) >= 1,
              "input_ids must be (batch, seq), got ", input_ids.sizes());
  TORCH_CHECK(input_ids.scalar_type() == at::kLong, "input_ids must be int64, got ",
              input_ids.scalar_type());
  TORCH_CHECK(input_ids.device() == options_.device, "input_ids on ", input_ids.device(),
              " but the model is on ", options_.device);
  // Within the window, sliding-window attention is plain causal attention.
  TORCH_CHECK(!config_.sliding_window || input_ids.size(1) <= *config_.sliding_window,
              "sequence length ", input_ids.size(1), " exceeds the model's sliding_window (",
              config_.sliding_window.value_or(0),
              "): ftune attends over whole sequences, without a sliding window; use max_seq_len <= ",
              config_.sliding_window.value_or(0));
  if (!position_ids.defined()) {
    return at::arange(input_ids.size(1), input_ids.options()).unsqueeze(0).expand_as(input_ids);
  }
  TORCH_CHECK(position_ids.sizes() == input_ids.sizes(), "position_ids ", position_ids.sizes(),
              " must match input_ids ", input_ids.sizes());
  TORCH_CHECK(position_ids.scalar_type() == at::kLong && position_ids.device() == options_.device,
              "position_ids must be int64 on ", options_.device);
  return position_ids;
}

LlamaModel::AttentionContext LlamaModel::MakeAttentionContext(const at::Tensor& position_ids,
                                                              const BatchLayout* layout) const {
  AttentionContext ctx;
  // RoPE as LlamaRotaryEmbedding: fp32 angles pos * inv_freq, duplicated
  // over both halves, cos/sin in fp32, then cast to the compute dtype.
  at::Tensor freqs = position_ids.to(at::kFloat).unsqueeze(-1) * inv_freq_;  // (b, s, hd/2)
  at::Tensor emb = at::cat({freqs, freqs}, -1);                              // (b, s, hd)
  ctx.flash = UseFlash();
  const int64_t head_axis = ctx.flash ? 2 : 1;  // (b, s, 1, hd) or (b, 1, s, hd)
  ctx.cos = emb.cos().to(options_.dtype).unsqueeze(head_axis);
  ctx.sin = emb.sin().to(options_.dtype).unsqueeze(head_axis);

  const at::Tensor starts = DocumentStarts(position_ids);  // (b, s)
  const int64_t s = position_ids.size(1);
  if (ctx.flash) {
    ctx.plain_causal = false;
    if (layout != nullptr) {
      ctx.cu_seqlens = layout->cu_seqlens;
      return ctx;
    }
    ctx.cu_seqlens = CuSeqlens(starts);
    return ctx;
  }
  ctx.plain_causal = !starts.slice(1, 1).any().item<bool>();
  if (ctx.plain_causal && UseSdpa()) return ctx;
  at::Tensor causal = at::ones({s, s}, position_ids.options().dtype(at::kBool)).tril();  // (s, s)
  if (ctx.plain_causal) {
    ctx.allowed = causal.view({1, 1, s, s});
  } else {
    at::Tensor doc = starts.to(at::kLong).cumsum(1);                         // (b, s)
    at::Tensor same = doc.unsqueeze(2) == doc.unsqueeze(1);                  // (b, s, s)
    ctx.allowed = (same & causal).unsqueeze(1);                              // (b, 1, s, s)
  }
  return ctx;
}

at::Tensor LlamaModel::Attention(const DecoderLayer& layer, const at::Tensor& x,
                                 const AttentionContext& ctx, bool training) const {
  FTUNE_RANGE("ftune::attention");
  GemmSiteScope site(GemmSite::kAttention);  // q/k/v and o (recompute.h)
  const int64_t b = x.size(0), s = x.size(1);
  const int64_t nh = config_.num_attention_heads, nkv = config_.num_key_value_heads;
  const int64_t hd = config_.head_dim;
  const double scale = std::pow(static_cast<double>(hd), -0.5);  // HF: head_dim ** -0.5
  if (ctx.flash) {
    // (b, s, heads * hd) -> (b * s, heads, hd): the projections' layout.
    const bool fused = Fused(x);
    const std::vector<at::Tensor> qkv = LoraProjections(
        {layer.q_proj.get(), layer.k_proj.get(), layer.v_proj.get()}, x, training, fused);
    const at::Tensor q = ApplyRope(qkv[0].view({b, s, nh, hd}), ctx.cos, ctx.sin, fused);
    const at::Tensor k = ApplyRope(qkv[1].view({b, s, nkv, hd}), ctx.cos, ctx.sin, fused);
    const at::Tensor v = qkv[2].view({b * s, nkv, hd});
    at::Tensor out = compat::FlashAttentionVarlen(q.view({b * s, nh, hd}), k.view({b * s, nkv, hd}),
                                                  v, ctx.cu_seqlens, s, scale);  // (b * s, nh, hd)
    return layer.o_proj->Forward(out.view({b, s, nh * hd}), training);
  }
  // (b, s, heads * hd) -> (b, heads, s, hd)
  at::Tensor q = layer.q_proj->Forward(x, training).view({b, s, nh, hd}).transpose(1, 2);
  at::Tensor k = layer.k_proj->Forward(x, training).view({b, s, nkv, hd}).transpose(1, 2);
  at::Tensor v = layer.v_proj->Forward(x, training).view({b, s, nkv, hd}).transpose(1, 2);
  q = ApplyRope(q, ctx.cos, ctx.sin, /*fused=*/false);
  k = ApplyRope(k, ctx.cos, ctx.sin, /*fused=*/false);
  k = RepeatKv(k, config_.num_kv_groups());  // (b, nh, s, hd)
  v = RepeatKv(v, config_.num_kv_groups());

  at::Tensor out;  // (b, nh, s, hd)
  if (UseSdpa()) {
    out = compat::ScaledDotProductAttention(q, k, v, ctx.plain_causal ? at::Tensor() : ctx.allowed,
                                            ctx.plain_causal, scale);
  } else {
    // HF eager: scores * scaling, masked, fp32 softmax cast back, @ v.
    at::Tensor w = at::matmul(q, k.transpose(2, 3)) * scale;  // (b, nh, s, s)
    w = w.masked_fill(ctx.allowed.logical_not(), std::numeric_limits<float>::lowest());
    w = at::softmax(w, -1, at::kFloat).to(q.scalar_type());
    out = at::matmul(w, v);
  }
  out = out.transpose(1, 2).contiguous().view({b, s, nh * hd});  // (b, s, nh * hd)
  return layer.o_proj->Forward(out, training);
}

at::Tensor LlamaModel::LayerForward(int64_t layer, const at::Tensor& h, const AttentionContext& ctx,
                                    bool training) const {
  FTUNE_RANGE("ftune::layer_forward");
  const DecoderLayer& l = layers_[layer];
  const double eps = config_.rms_norm_eps;
  if (Fused(h) && !l.input_layernorm.requires_grad() &&
      !l.post_attention_layernorm.requires_grad()) {
    // The same ops as below, fused: norm; attention; residual add + norm;
    // SwiGLU; residual add.
    at::Tensor x = FusedRmsNorm(h, l.input_layernorm, eps);  // (b, s, hidden)
    auto [out, x2] = FusedAddRmsNorm(h, Attention(l, x, ctx, training),
                                     l.post_attention_layernorm, eps);
    at::Tensor act;
    {
      GemmSiteScope site(GemmSite::kMlpIn);
      act = GateUpSwiglu(*l.gate_proj, *l.up_proj, x2, training, /*fuse=*/true);
    }
    GemmSiteScope site(GemmSite::kDownProj);
    return out + l.down_proj->Forward(act, training);  // (b, s, hidden)
  }
  at::Tensor x = RmsNorm(h, l.input_layernorm, eps);  // (b, s, hidden)
  at::Tensor out = h + Attention(l, x, ctx, training);
  x = RmsNorm(out, l.post_attention_layernorm, eps);
  at::Tensor act;
  {
    GemmSiteScope site(GemmSite::kMlpIn);
    act = at::silu(l.gate_proj->Forward(x, training)) * l.up_proj->Forward(x, training);
  }
  GemmSiteScope site(GemmSite::kDownProj);
  return out + l.down_proj->Forward(act, training);  // (b, s, hidden)
}

at::Tensor LlamaModel::Hidden(const at::Tensor& input_ids, const at::Tensor& position_ids,
                              bool training) const {
  bool boundary = false;
  return HiddenKeepHead(input_ids, position_ids, training, &boundary);
}

void LlamaModel::ReleaseHead() const {
  if (hooks_) hooks_->Release(head_unit(), UnitPhase::kForwardOnly);
}

at::Tensor LlamaModel::HiddenKeepHead(const at::Tensor& input_ids, const at::Tensor& position_ids,
                                      bool training, bool* boundary,
                                      const BatchLayout* layout) const {
  *boundary = false;
  const at::Tensor pos = CheckedPositions(input_ids, position_ids);
  const AttentionContext ctx = MakeAttentionContext(pos, layout);
  const bool grad = at::GradMode::is_enabled();
  // Layers are handed back after their forward with kForward when a
  // backward will follow (it re-gathers them), kForwardOnly otherwise.
  const UnitPhase after_forward = grad ? UnitPhase::kForward : UnitPhase::kForwardOnly;
  UnitHooks* hooks = hooks_.get();
  if (hooks != nullptr) {
    hooks->Gather(kEmbeddingUnit, UnitPhase::kForward);
    if (!layers_.empty()) hooks->Prefetch(LayerUnit(0), UnitPhase::kForward);
  }
  at::Tensor h = at::embedding(embed_tokens_, input_ids);  // (b, s, hidden)
  // The embedding is frozen and its input is ids: nothing of it is needed
  // in backward.
  if (hooks != nullptr) hooks->Release(kEmbeddingUnit, UnitPhase::kForwardOnly);
  const int64_t num_checkpointed =
      !(options_.activation_checkpointing && grad) ? 0
      : options_.checkpoint_layers < 0             ? static_cast<int64_t>(layers_.size())
                                                   : options_.checkpoint_layers;
  for (int64_t i = 0; i < static_cast<int64_t>(layers_.size()); ++i) {
    const bool checkpoint = i < num_checkpointed;
    if (hooks != nullptr) {
      hooks->Gather(LayerUnit(i), UnitPhase::kForward);
      hooks->Prefetch(i + 1 < static_cast<int64_t>(layers_.size()) ? LayerUnit(i + 1) : head_unit(),
                      UnitPhase::kForward);
    }
    if (!checkpoint) {
      // Without checkpointing autograd keeps references to the gathered
      // tensors it saved, so backward needs no re-gather (and a released
      // unit's memory lives until then).
      std::optional<KeepDequantizedWeights> keep_dense;
      if (grad && i < num_checkpointed + options_.dequantized_kept_layers) keep_dense.emplace();
      h = LayerForward(i, h, ctx, training);
      if (hooks != nullptr) hooks->Release(LayerUnit(i), after_forward);
      continue;
    }
    std::vector<at::Tensor> params;
    for (const char* name : kModules) {
      const LoraLinear* m = layers_[i].Module(name);
      if (m->has_adapter()) {
        params.push_back(m->adapter().a);
        params.push_back(m->adapter().b);
      }
    }
    h = CheckpointedLayer::apply(h, at::TensorList(params), reinterpret_cast<int64_t>(this), i,
                                 reinterpret_cast<int64_t>(&ctx), training);
    if (hooks != nullptr) hooks->Release(LayerUnit(i), after_forward);
  }
  if (hooks != nullptr) {
    hooks->Gather(head_unit(), UnitPhase::kForward);
    if (grad && h.requires_grad()) {
      h = HeadBoundary::apply(h, reinterpret_cast<int64_t>(this));
      *boundary = true;
    }
  }
  if (Fused(h) && !norm_.requires_grad()) return FusedRmsNorm(h, norm_, config_.rms_norm_eps);
  return RmsNorm(h, norm_, config_.rms_norm_eps);
}

at::Tensor LlamaModel::Logits(const at::Tensor& input_ids, const at::Tensor& position_ids) const {
  bool boundary = false;
  at::Tensor logits =
      at::linear(HiddenKeepHead(input_ids, position_ids, /*training=*/false, &boundary), lm_head_)
          .to(at::kFloat);
  if (!boundary) ReleaseHead();
  return logits;
}

BatchLayout LlamaModel::HostLayout(const at::Tensor& position_ids,
                                   const at::Tensor& labels) const {
  TORCH_CHECK(position_ids.device().is_cpu() && labels.device().is_cpu() &&
                  position_ids.scalar_type() == at::kLong && labels.scalar_type() == at::kLong &&
                  position_ids.dim() == 2 && labels.sizes() == position_ids.sizes(),
              "HostLayout: position ids ", position_ids.sizes(), " and labels ", labels.sizes(),
              " must be (batch, seq) int64 on the CPU");
  const at::Tensor starts = DocumentStarts(position_ids);  // (b, s)
  BatchLayout l;
  l.cu_seqlens = CuSeqlens(starts);
  const at::Tensor rows = LossRows(labels, starts);  // (n)
  CheckTargets(labels.slice(1, 1).reshape({-1}).index_select(0, rows), config_.vocab_size);
  l.num_loss_tokens = rows.size(0);
  // Pageable copies: queued on the stream without waiting for it.
  l.cu_seqlens = l.cu_seqlens.to(options_.device);
  l.loss_rows = rows.to(options_.device);
  return l;
}

LossOutput LlamaModel::Loss(const at::Tensor& input_ids, const at::Tensor& position_ids,
                            const at::Tensor& labels, bool training,
                            const BatchLayout* layout) const {
  const at::Tensor pos = CheckedPositions(input_ids, position_ids);
  TORCH_CHECK(labels.sizes() == input_ids.sizes(), "labels ", labels.sizes(),
              " must match input_ids ", input_ids.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.device() == options_.device,
              "labels must be int64 on ", options_.device);
  const int64_t s = input_ids.size(1), hidden = config_.hidden_size;
  bool boundary = false;
  at::Tensor h = HiddenKeepHead(input_ids, pos, training, &boundary, layout);  // (b, s, hidden)
  // Targets as LossRows picks them (HostLayout did it on the host, and
  // checked them, when a layout is given).
  const at::Tensor rows = layout != nullptr ? layout->loss_rows : LossRows(labels, DocumentStarts(pos));
  const at::Tensor t = labels.slice(1, 1).reshape({-1}).index_select(0, rows);  // (n)
  if (layout == nullptr) CheckTargets(t, config_.vocab_size);
  at::Tensor hs = h.slice(1, 0, s - 1).reshape({-1, hidden}).index_select(0, rows);  // (n, hidden)
  LossOutput out;
  out.loss_sum = ChunkedCrossEntropySum(hs, lm_head_, t, options_.loss_chunk_tokens,
                                        options_.fused_loss && Fused(hs));
  out.num_tokens = layout != nullptr ? layout->num_loss_tokens : rows.size(0);
  if (!boundary) ReleaseHead();
  return out;
}

int64_t LlamaModel::CountLossTokens(const at::Tensor& labels, const at::Tensor& position_ids) {
  TORCH_CHECK(labels.dim() == 2, "labels must be (batch, seq), got ", labels.sizes());
  at::Tensor valid = labels.slice(1, 1) != kIgnoreIndex;  // (b, s - 1)
  if (position_ids.defined()) {
    TORCH_CHECK(position_ids.sizes() == labels.sizes(), "position_ids ", position_ids.sizes(),
                " must match labels ", labels.sizes());
    valid = valid & DocumentStarts(position_ids).slice(1, 1).logical_not();
  }
  return valid.sum().item<int64_t>();
}

at::Tensor LlamaModel::TokenLogProbs(const at::Tensor& input_ids,
                                     const at::Tensor& position_ids) const {
  c10::NoGradGuard no_grad;
  const at::Tensor pos = CheckedPositions(input_ids, position_ids);
  const int64_t b = input_ids.size(0), s = input_ids.size(1), hidden = config_.hidden_size;
  bool boundary = false;
  at::Tensor h = HiddenKeepHead(input_ids, pos, /*training=*/false, &boundary);
  at::Tensor lp = ChunkedTargetLogProbs(h.slice(1, 0, s - 1).reshape({-1, hidden}), lm_head_,
                                        input_ids.slice(1, 1).reshape({-1}),
                                        options_.loss_chunk_tokens)
                      .view({b, s - 1});  // (b, s - 1)
  ReleaseHead();
  return lp.masked_fill(DocumentStarts(pos).slice(1, 1), std::numeric_limits<float>::quiet_NaN());
}

// --- Incremental decoding with a KV cache (model.h, KvCache). The same
// operations as LayerForward / Attention on the new positions only; the
// keys and values of earlier positions come from the cache.

KvCache LlamaModel::NewKvCache(int64_t batch, int64_t capacity) const {
  TORCH_CHECK(batch >= 1 && capacity >= 1, "NewKvCache: batch (", batch, ") and capacity (",
              capacity, ") must be >= 1");
  KvCache cache;
  const auto opts = at::TensorOptions().dtype(options_.dtype).device(options_.device);
  for (size_t i = 0; i < layers_.size(); ++i) {
    cache.keys.push_back(
        at::empty({batch, config_.num_key_value_heads, capacity, config_.head_dim}, opts));
    cache.values.push_back(at::empty_like(cache.keys.back()));
  }
  return cache;
}

at::Tensor LlamaModel::ForwardCached(const at::Tensor& input_ids, KvCache* cache) const {
  TORCH_CHECK(hooks_ == nullptr, "ForwardCached needs a resident model (no FSDP unit hooks)");
  TORCH_CHECK(cache != nullptr && cache->keys.size() == layers_.size(),
              "ForwardCached: the cache was not made by this model's NewKvCache");
  TORCH_CHECK(input_ids.dim() == 2 && input_ids.size(1) >= 1 && input_ids.scalar_type() == at::kLong,
              "ForwardCached: input_ids must be (batch, n) int64, got ", input_ids.sizes(), " ",
              input_ids.scalar_type());
  TORCH_CHECK(input_ids.device() == options_.device, "input_ids on ", input_ids.device(),
              " but the model is on ", options_.device);
  const int64_t b = input_ids.size(0), n = input_ids.size(1), start = cache->length;
  TORCH_CHECK(cache->keys[0].size(0) == b, "ForwardCached: the cache holds ",
              cache->keys[0].size(0), " rows, input_ids ", b);
  TORCH_CHECK(start + n <= cache->capacity(), "ForwardCached: positions ", start, "..",
              start + n - 1, " exceed the cache's capacity ", cache->capacity());
  c10::NoGradGuard no_grad;
  // RoPE tables of the new positions, as MakeAttentionContext computes them.
  at::Tensor pos = at::arange(start, start + n, input_ids.options()).unsqueeze(0);  // (1, n)
  at::Tensor freqs = pos.to(at::kFloat).unsqueeze(-1) * inv_freq_;                 // (1, n, hd/2)
  at::Tensor emb = at::cat({freqs, freqs}, -1);                                     // (1, n, hd)
  const at::Tensor cos = emb.cos().to(options_.dtype).unsqueeze(2);                 // (1, n, 1, hd)
  const at::Tensor sin = emb.sin().to(options_.dtype).unsqueeze(2);
  at::Tensor h = at::embedding(embed_tokens_, input_ids);  // (b, n, hidden)
  for (int64_t i = 0; i < static_cast<int64_t>(layers_.size()); ++i) {
    h = LayerForwardCached(i, h, cos, sin, cache);
  }
  cache->length = start + n;
  at::Tensor last = RmsNorm(h.select(1, n - 1), norm_, config_.rms_norm_eps);  // (b, hidden)
  return at::linear(last, lm_head_).to(at::kFloat);                            // (b, vocab)
}

at::Tensor LlamaModel::LayerForwardCached(int64_t layer, const at::Tensor& h, const at::Tensor& cos,
                                          const at::Tensor& sin, KvCache* cache) const {
  const DecoderLayer& l = layers_[layer];
  const double eps = config_.rms_norm_eps;
  if (Fused(h)) {
    // LayerForward's fused kernels (bf16 on CUDA), as training computes.
    at::Tensor x = FusedRmsNorm(h, l.input_layernorm, eps);  // (b, n, hidden)
    auto [out, x2] = FusedAddRmsNorm(h, AttentionCached(layer, x, cos, sin, cache),
                                     l.post_attention_layernorm, eps);
    return out + l.down_proj->Forward(
                     GateUpSwiglu(*l.gate_proj, *l.up_proj, x2, false, /*fuse=*/true), false);
  }
  at::Tensor x = RmsNorm(h, l.input_layernorm, eps);  // (b, n, hidden)
  at::Tensor out = h + AttentionCached(layer, x, cos, sin, cache);
  x = RmsNorm(out, l.post_attention_layernorm, eps);
  at::Tensor mlp = l.down_proj->Forward(
      at::silu(l.gate_proj->Forward(x, false)) * l.up_proj->Forward(x, false), false);
  return out + mlp;
}

at::Tensor LlamaModel::AttentionCached(int64_t layer, const at::Tensor& x, const at::Tensor& cos,
                                       const at::Tensor& sin, KvCache* cache) const {
  const DecoderLayer& l = layers_[layer];
  const int64_t b = x.size(0), n = x.size(1), start = cache->length, total = start + n;
  const int64_t nh = config_.num_attention_heads, nkv = config_.num_key_value_heads;
  const int64_t hd = config_.head_dim;
  const double scale = std::pow(static_cast<double>(hd), -0.5);
  const bool fused = Fused(x);
  const std::vector<at::Tensor> qkv =  // (b, n, heads * hd) each
      LoraProjections({l.q_proj.get(), l.k_proj.get(), l.v_proj.get()}, x, false, fused);
  // RoPE in the (b, n, heads, hd) layout, then (b, heads, n, hd).
  at::Tensor q = ApplyRope(qkv[0].view({b, n, nh, hd}), cos, sin, fused).transpose(1, 2);
  at::Tensor k = ApplyRope(qkv[1].view({b, n, nkv, hd}), cos, sin, fused).transpose(1, 2);
  const at::Tensor v = qkv[2].view({b, n, nkv, hd}).transpose(1, 2);
  cache->keys[layer].slice(2, start, total).copy_(k);
  cache->values[layer].slice(2, start, total).copy_(v);
  at::Tensor keys = RepeatKv(cache->keys[layer].slice(2, 0, total), config_.num_kv_groups());
  at::Tensor values = RepeatKv(cache->values[layer].slice(2, 0, total), config_.num_kv_groups());
  // Query i (position start + i) may attend to key j when j <= start + i:
  // no mask for one query, plain causal for a prefill from an empty cache.
  at::Tensor allowed;  // (n, total) bool, undefined when nothing is masked
  if (n > 1) {
    allowed = at::ones({n, total}, x.options().dtype(at::kBool)).tril(start);
  }
  at::Tensor out;  // (b, nh, n, hd)
  if (UseSdpa()) {
    const bool causal = n > 1 && start == 0;
    out = compat::ScaledDotProductAttention(
        q, keys, values, allowed.defined() && !causal ? allowed.view({1, 1, n, total}) : at::Tensor(),
        causal, scale);
  } else {
    // HF eager, as Attention computes it.
    at::Tensor w = at::matmul(q, keys.transpose(2, 3)) * scale;  // (b, nh, n, total)
    if (allowed.defined()) {
      w = w.masked_fill(allowed.logical_not().view({1, 1, n, total}),
                        std::numeric_limits<float>::lowest());
    }
    w = at::softmax(w, -1, at::kFloat).to(q.scalar_type());
    out = at::matmul(w, values);
  }
  out = out.transpose(1, 2).contiguous().view({b, n, nh * hd});  // (b, n, nh * hd)
  return l.o_proj->Forward(out, false);
}

}  // namespace ftune::trainer
