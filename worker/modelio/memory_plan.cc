// Per-rank memory plan; see memory_plan.h for what is counted and why.
#include "worker/modelio/memory_plan.h"

#include <algorithm>
#include <cstdio>
#include <set>

namespace ftune::trainer {
namespace {

constexpr int64_t kNestedBlocks = 256;  // bitsandbytes' double-quant block (kernels/nf4.h)

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t RoundUp(int64_t a, int64_t m) { return CeilDiv(a, m) * m; }

struct Projection {
  const char* name;
  int64_t out, in;
};

std::vector<Projection> Projections(const LlamaConfig& c) {
  const int64_t h = c.hidden_size, i = c.intermediate_size;
  return {{"q_proj", c.q_size(), h},   {"k_proj", c.kv_size(), h}, {"v_proj", c.kv_size(), h},
          {"o_proj", h, c.q_size()},   {"gate_proj", i, h},        {"up_proj", i, h},
          {"down_proj", h, i}};
}

std::string Gib(int64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.2f GiB", static_cast<double>(bytes) / (1LL << 30));
  return buf;
}

}  // namespace

Status MemoryPlanOptions::Validate() const {
  auto bad = [](const std::string& field, int64_t v, const std::string& want) {
    return InvalidArgumentError(field + " (" + std::to_string(v) + ") must be " + want);
  };
  if (world_size < 1) return bad("world_size", world_size, ">= 1");
  if (micro_batch_size < 1) return bad("per_device_train_batch_size", micro_batch_size, ">= 1");
  if (seq_len < 1) return bad("max_seq_length", seq_len, ">= 1");
  if (lora_r < 1) return bad("lora r", lora_r, ">= 1");
  if (nf4_blocksize < 64 || nf4_blocksize > 4096 || (nf4_blocksize & (nf4_blocksize - 1)) != 0) {
    return bad("bnb_4bit_blocksize", nf4_blocksize, "a power of two in [64, 4096]");
  }
  if (compute_dtype_bytes != 2 && compute_dtype_bytes != 4) {
    return bad("compute dtype bytes", compute_dtype_bytes, "2 or 4");
  }
  if (file_dtype_bytes != 2 && file_dtype_bytes != 4) {
    return bad("checkpoint dtype bytes", file_dtype_bytes, "2 or 4");
  }
  if (loss_chunk_tokens < 1) return bad("loss_chunk_tokens", loss_chunk_tokens, ">= 1");
  if (dequantized_kept_layers < 0) {
    return bad("dequantized_kept_layers", dequantized_kept_layers, ">= 0");
  }
  static const std::set<std::string> kKnown = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                               "gate_proj", "up_proj", "down_proj"};
  for (const std::string& m : target_modules) {
    if (kKnown.count(m) == 0) {
      return InvalidArgumentError("target_modules: '" + m + "' is not a Llama projection");
    }
  }
  return OkStatus();
}

namespace {

// The smallest power of two >= n (0 for n <= 0).
int64_t PowerOfTwoCeil(int64_t n) {
  if (n <= 0) return 0;
  int64_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

}  // namespace

int64_t Nf4ShardBytes(int64_t numel, int64_t blocksize, bool double_quant, int world) {
  const int64_t nb = CeilDiv(numel, blocksize);
  const int64_t per_rank =
      std::max<int64_t>(1, RoundUp(CeilDiv(nb, world), double_quant ? kNestedBlocks : 1));
  const int64_t packed = per_rank * blocksize / 2;
  const int64_t absmax = per_rank * (double_quant ? 1 : 4);
  const int64_t absmax2 = double_quant ? per_rank / kNestedBlocks * 4 : 0;
  return packed + absmax + absmax2;
}

std::string MemoryPlan::ToString() const {
  std::string s = "device peak " + Gib(device_peak_bytes) + "\n";
  for (const auto& [name, bytes] : device_items) s += "  " + name + ": " + Gib(bytes) + "\n";
  s += "host peak " + Gib(host_peak_bytes) + "\n";
  for (const auto& [name, bytes] : host_items) s += "  " + name + ": " + Gib(bytes) + "\n";
  return s;
}

Result<MemoryPlan> PlanMemory(const LlamaConfig& c, const MemoryPlanOptions& o) {
  FTUNE_RETURN_IF_ERROR(o.Validate());
  if (c.hidden_size < 1 || c.intermediate_size < 1 || c.num_hidden_layers < 1 ||
      c.num_attention_heads < 1 || c.num_key_value_heads < 1 || c.head_dim < 1 ||
      c.vocab_size < 1) {
    return InvalidArgumentError("PlanMemory: the model config has a non-positive dimension");
  }
  const int w = o.world_size;
  const int64_t cb = o.compute_dtype_bytes;
  const int64_t h = c.hidden_size, inter = c.intermediate_size, L = c.num_hidden_layers;
  const int64_t q = c.q_size(), kv = c.kv_size();
  const int64_t T = o.micro_batch_size * o.seq_len;  // tokens per micro-batch
  std::set<std::string> targets(o.target_modules.begin(), o.target_modules.end());
  if (targets.empty()) {
    for (const Projection& p : Projections(c)) targets.insert(p.name);
  }
  auto dense_shard = [&](int64_t numel) { return CeilDiv(numel, w) * cb; };

  // Frozen shards and gathered sizes, per unit.
  int64_t layer_shard = 2 * dense_shard(h);  // the two norms
  // Qwen2's q/k/v biases: dense elements of the layer's unit (never NF4).
  if (c.has_qkv_bias()) layer_shard += dense_shard(q) + 2 * dense_shard(kv);
  if (c.attention_bias) layer_shard += dense_shard(h);  // o_proj's
  int64_t largest_projection = 0;
  for (const Projection& p : Projections(c)) {
    const int64_t n = p.out * p.in;
    largest_projection = std::max(largest_projection, n);
    layer_shard += o.quantize_base ? Nf4ShardBytes(n, o.nf4_blocksize, o.double_quant, w)
                                   : dense_shard(n);
  }
  const int64_t layer_gathered = layer_shard * w;
  const int64_t embed_shard = dense_shard(c.vocab_size * h);
  const int64_t head_shard = dense_shard(h) + (c.tie_word_embeddings ? 0 : embed_shard);
  const int64_t frozen = L * layer_shard + embed_shard + head_shard;
  // The head unit in use holds norm + lm_head (the embedding itself when tied).
  // With one rank and the shards on the device a unit's gathered layout is
  // its shard itself (no copy), so gathering costs nothing beyond the frozen
  // shards; offloaded shards are copied in before every use, also with one.
  const bool copied_in = w > 1 || o.offload_params;
  const int64_t head_gathered = copied_in ? (dense_shard(h) + embed_shard) * w : 0;

  // LoRA: adapters whole on every rank, flat shards 1/W.
  int64_t lora = 0;
  for (const Projection& p : Projections(c)) {
    if (targets.count(p.name)) lora += o.lora_r * (p.in + p.out);
  }
  lora *= L;
  const int64_t lora_full = lora * 4;                  // fp32 adapters
  const int64_t lora_shard = CeilDiv(lora, w) * 4;     // one fp32 shard-sized vector
  // At the device peak (backward, or the loss) the shard's gradient does not
  // exist yet: ReduceGradients makes it after backward, ZeroGrad drops it.
  const int64_t optimizer_at_peak = 3 * lora_shard;

  // One layer's saved activations (see memory_plan.h), bytes.
  const int64_t r = o.lora_r;
  int64_t saved = 0;
  // Flash's varlen path (16-bit) reads the kv heads in place and writes its
  // output in the projections' layout; SDPA gets repeated k/v and its
  // output is transposed back.
  const bool varlen_flash = o.flash_attention && cb == 2;
  if (varlen_flash) {
    // Counted from the layer as it runs in 16 bits (8B shape, seq 2048 on an
    // H100: 0.35 GiB per layer kept, as planned): each RMSNorm keeps its
    // fp32 input copy and its output; RoPE's products keep only cos/sin
    // (they need no gradient), flash attention q and k after RoPE and v.
    // Fused kernels: each RMSNorm keeps its bf16 input (and an fp32 per
    // row), SwiGLU its two inputs (below).
    saved += 2 * T * h * ((o.fused_kernels ? cb : 4) + cb);  // two RMSNorms
    saved += T * (q + 2 * kv) * cb;                    // q, k (after RoPE), v
  } else {
    saved += 2 * T * h * (2 * 4 + 2 * cb);             // two RMSNorms: fp32 stats + outputs
    saved += T * (q + 2 * kv) * cb;                    // q, k, v projections
    saved += T * (q + kv) * cb * 3;                    // RoPE: inputs, rotated halves, outputs
  }
  if (!varlen_flash) saved += 2 * T * q * cb;          // k, v repeated to every head (GQA)
  saved += (varlen_flash ? 1 : 2) * T * q * cb;        // attention output (+ transposed copy)
  const bool fused_mlp = varlen_flash && o.fused_kernels;
  // Whether p's adapter A rows ride in a fused q/k/v or gate/up GEMM (its
  // buffer and output gain r rows / columns).
  const auto fused_adapter = [&](const Projection& p) {
    const std::string name = p.name;
    return fused_mlp && name != "o_proj" && name != "down_proj" && targets.count(name) > 0;
  };
  saved += (fused_mlp ? 3 : 4) * T * inter * cb;       // gate, up, (silu(gate),) product
  for (const Projection& p : Projections(c)) {
    if (!targets.count(p.name)) continue;
    // fp32: the input cast + A's output; 16-bit: A's output in the compute
    // dtype (the input is the base layer's). Dropout keeps its output and mask.
    saved += cb == 4 ? T * (p.in + r) * 4 : T * r * cb;
    if (o.lora_dropout) saved += T * p.in * (cb + 1);
  }
  if (!o.flash_attention) {
    saved += 2 * o.micro_batch_size * c.num_attention_heads * o.seq_len * o.seq_len * cb;
  }
  const int64_t working = static_cast<int64_t>(saved * (1.0 + o.activation_grad_factor));
  const int64_t num_checkpointed =
      !o.activation_checkpointing ? 0
      : o.checkpoint_layers < 0   ? L
                                  : std::min<int64_t>(o.checkpoint_layers, L);
  const int64_t num_kept = L - num_checkpointed;       // layers keeping their activations
  const int64_t checkpoints = num_checkpointed * T * h * cb;  // checkpointed layers' inputs
  // What each checkpointed layer keeps for its recompute (NF4 bases only):
  // the GEMM outputs, with the adapters' x A^T columns in the fused GEMMs'.
  int64_t kept_per_layer = 0;
  if (o.quantize_base && o.recompute_keep == RecomputeKeep::kDownProj) {
    kept_per_layer = T * h * cb;
  } else if (o.quantize_base && o.recompute_keep == RecomputeKeep::kAllProjections) {
    int64_t columns = 0;
    for (const Projection& p : Projections(c)) {
      columns += p.out;
      if (fused_adapter(p)) columns += r;
    }
    kept_per_layer = T * columns * cb;
  }
  const int64_t kept_outputs = num_checkpointed * kept_per_layer;
  // Layers not checkpointed that keep their dequantized weights for
  // backward: the weights in the compute dtype, with the adapters' A rows in
  // the fused q/k/v and gate/up buffers.
  const int64_t num_dense_kept =
      o.quantize_base ? std::clamp<int64_t>(o.dequantized_kept_layers, 0, num_kept) : 0;
  int64_t layer_dense = 0;      // one layer's projection weights, elements
  int64_t fused_a_rows = 0;     // the A rows in its fused buffers, elements
  for (const Projection& p : Projections(c)) {
    layer_dense += p.out * p.in;
    if (fused_adapter(p)) fused_a_rows += r * p.in;
  }
  const int64_t dense_kept = num_dense_kept * (layer_dense + fused_a_rows) * cb;
  // Scratch: one dequantized projection, or while a checkpointed layer's
  // backward runs, all of its projections (its recompute keeps them, nf4_linear.h);
  // the loss chunk's logits + grad.
  // Fused projections (16-bit varlen path with the fused kernels) dequantize
  // q/k/v and gate/up each into one buffer.
  const int64_t largest_dequant =
      fused_mlp ? std::max({largest_projection, (q + 2 * kv) * h, 2 * inter * h})
                : largest_projection;
  const int64_t dequant =
      !o.quantize_base ? 0 : (num_checkpointed > 0 ? layer_dense : largest_dequant) * cb;
  const int64_t loss_chunk = std::min(o.loss_chunk_tokens, T) * c.vocab_size * 4 * 2;
  const int64_t hidden_grads = 2 * T * h * 4;          // grad of the residual stream (fp32 in flight)

  MemoryPlan plan;
  plan.frozen_shard_bytes = frozen;
  plan.lora_params = lora;
  auto& dev = plan.device_items;
  if (!o.offload_params) dev.push_back({"frozen shards", frozen});
  // A decoder layer's gather stages every rank's shard (rank-major) before
  // the copy-out, so while the next layer is gathered it exists twice
  // (fsdp.h; the embedding and head units are gathered without staging).
  const int64_t staging = w > 1 ? layer_gathered : 0;
  const int64_t gathered_layers =
      !copied_in ? 0
                 : (o.reshard_after_forward || w == 1 ? std::min<int64_t>(2, L) * layer_gathered
                                                      : L * layer_gathered) +
                       staging;
  // The peak is in the backward of the first layers (every checkpoint
  // input alive) or at the loss (head unit gathered); the loss-time peak
  // also holds the checkpoints and the gathered head.
  const int64_t layer_time = gathered_layers + working + dequant;
  const int64_t head_time = head_gathered + loss_chunk +
                            (o.reshard_after_forward || w == 1 ? 0 : L * layer_gathered) + hidden_grads;
  if (layer_time >= head_time) {
    dev.push_back({o.reshard_after_forward
                       ? "gathered units (current + prefetch) + a gather's staging"
                       : "gathered units (all layers, SHARD_GRAD_OP) + a gather's staging",
                   gathered_layers});
    dev.push_back({"layer working set (recompute + grads)", working});
    dev.push_back({"dequantized projection", dequant});
  } else {
    dev.push_back({"gathered head unit (norm + lm_head)", head_gathered});
    if (!o.reshard_after_forward && w > 1) {
      dev.push_back({"gathered layers (SHARD_GRAD_OP)", L * layer_gathered});
    }
    dev.push_back({"loss chunk logits + grad", loss_chunk});
    dev.push_back({"hidden-state grads", hidden_grads});
  }
  if (num_checkpointed > 0) dev.push_back({"checkpointed layer inputs", checkpoints});
  if (kept_outputs > 0) {
    dev.push_back({std::string("GEMM outputs kept for the recompute (") +
                       RecomputeKeepName(o.recompute_keep) + ")",
                   kept_outputs});
  }
  if (num_kept > 0) {
    dev.push_back({num_checkpointed > 0 ? "activations of the layers not checkpointed"
                                        : "all layers' activations",
                   num_kept * saved});
    // Autograd keeps the gathered unit those layers saved (a copy only
    // when units are copied in).
    if (copied_in && (o.reshard_after_forward || w == 1)) {
      dev.push_back({"gathered units kept for backward", num_kept * layer_gathered});
    }
  }
  if (dense_kept > 0) dev.push_back({"dequantized weights kept for backward", dense_kept});
  dev.push_back({"LoRA adapters (whole) + their grads", 2 * lora_full});
  if (!o.offload_params) dev.push_back({"LoRA shard + AdamW moments", optimizer_at_peak});
  // With several ranks each layer's reduced gradient span is added into a
  // shard-sized accumulator on the communicator's device during backward
  // (kept there with offload too: a host copy per layer would sync).
  if (w > 1) dev.push_back({"reduced LoRA gradient accumulator", lora_shard});
  int64_t allocated = 0;
  for (const auto& it : dev) allocated += it.second;
  // What the caching allocator holds beyond the live tensors. With the NCCL
  // prefetch, units gathered on the second stream live in that stream's own
  // pool: about four decoder layers (current, prefetched, one being freed,
  // a staging buffer) and half the head unit, plus each offloaded shard's
  // copy in; otherwise a fragmentation margin.
  const bool comm_pool = w > 1 && o.prefetch;
  const int64_t slack =
      comm_pool ? 4 * layer_gathered + head_gathered / 2 + (o.offload_params ? 3 * layer_shard : 0)
                : static_cast<int64_t>(allocated * o.device_fragmentation) + o.device_slack_bytes;
  dev.push_back({comm_pool ? "prefetch stream's allocator pool" : "allocator fragmentation margin",
                 slack});
  dev.push_back({"CUDA context + cuBLAS workspace", o.device_runtime_bytes});
  if (w > 1) dev.push_back({"NCCL buffers", o.nccl_runtime_bytes});
  int64_t device = 0;
  for (const auto& it : dev) device += it.second;
  plan.device_peak_bytes = device;

  // Host: offloaded state, or the loading peak (shards are built on the
  // device, one tensor's share read through the host at a time).
  auto& host = plan.host_items;
  host.push_back({"runtime (libraries, process)", o.host_runtime_bytes});
  if (w > 1) host.push_back({"NCCL host buffers", o.nccl_host_bytes});
  // AttachLora initializes the adapters on the host (PEFT's init on the CPU
  // generator, fp32) before they move to the device.
  host.push_back({"LoRA adapters initialized on the host (fp32)", lora_full});
  const int64_t largest_dense = std::max(largest_projection, c.vocab_size * h);
  // Random weights are generated on the device: nothing passes the host.
  const int64_t read_part =
      o.random_weights ? 0 : CeilDiv(largest_dense, w) * o.file_dtype_bytes;
  // Pinned host memory comes from LibTorch's caching host allocator, which
  // rounds every block up to a power of two: each unit's shard is one block
  // (a 70B layer's 0.41 GiB NF4 shard pins 0.5 GiB). Measured on one H100
  // with offload: 70B 51.8 GiB RSS for 49.6 GiB planned, 8B 8.6 for 8.3.
  const int64_t pinned_frozen = L * PowerOfTwoCeil(layer_shard) + PowerOfTwoCeil(embed_shard) +
                                PowerOfTwoCeil(head_shard);
  // Of the offloaded LoRA state the shard and its gradient cross to the
  // device and are pinned; the AdamW moments stay plain host memory.
  const int64_t pinned_optimizer = 2 * PowerOfTwoCeil(lora_shard) + 2 * lora_shard;
  plan.loading_host_peak_bytes = o.host_runtime_bytes + (w > 1 ? o.nccl_host_bytes : 0) +
                                 read_part + (o.offload_params ? pinned_frozen : 0);
  if (o.offload_params) {
    host.push_back({"offloaded frozen shards (pinned)", pinned_frozen});
    host.push_back({"offloaded LoRA shard + grad (pinned) + AdamW moments", pinned_optimizer});
  }
  if (read_part > 0) host.push_back({"loading: one tensor's share in the file dtype", read_part});
  int64_t total_host = 0;
  for (const auto& it : host) total_host += it.second;
  plan.host_peak_bytes = total_host;
  return plan;
}

double RecomputeCost(const LlamaConfig& config, const MemoryPlanOptions& options,
                     int64_t checkpoint_layers, RecomputeKeep keep) {
  const double T = static_cast<double>(options.micro_batch_size * options.seq_len);
  double gemm = 0, down = 0;
  for (const Projection& p : Projections(config)) {
    const double flops = 2.0 * T * static_cast<double>(p.out) * static_cast<double>(p.in);
    gemm += flops;
    if (std::string(p.name) == "down_proj") down = flops;
  }
  double kept = 0;
  if (options.quantize_base && keep == RecomputeKeep::kDownProj) kept = down;
  if (options.quantize_base && keep == RecomputeKeep::kAllProjections) kept = gemm;
  const int64_t n = std::clamp<int64_t>(checkpoint_layers, 0, config.num_hidden_layers);
  return static_cast<double>(n) * (gemm - kept + kNonGemmRecomputeShare * gemm);
}

double DequantizeSaving(const LlamaConfig& config, const MemoryPlanOptions& options,
                        int64_t dequantized_kept_layers) {
  if (!options.quantize_base) return 0;
  double weights = 0;
  for (const Projection& p : Projections(config)) {
    weights += static_cast<double>(p.out) * static_cast<double>(p.in);
  }
  const int64_t n = std::clamp<int64_t>(dequantized_kept_layers, 0, config.num_hidden_layers);
  return static_cast<double>(n) * kDequantizeFlopsPerWeight * weights;
}

Result<CheckpointChoice> ChooseCheckpointLayers(const LlamaConfig& config,
                                                MemoryPlanOptions options, int64_t budget_bytes,
                                                bool allocator_budget) {
  if (budget_bytes <= 0) {
    return InvalidArgumentError("ChooseCheckpointLayers: the budget (" +
                                std::to_string(budget_bytes) + " bytes) must be > 0");
  }
  const int64_t outside_allocator =
      allocator_budget ? options.device_runtime_bytes +
                             (options.world_size > 1 ? options.nccl_runtime_bytes : 0)
                       : 0;
  const auto limit = static_cast<int64_t>(0.9 * static_cast<double>(budget_bytes));
  options.activation_checkpointing = true;
  // Keeping GEMM outputs only applies to NF4 bases.
  std::vector<RecomputeKeep> keeps = {RecomputeKeep::kNothing};
  if (options.quantize_base) {
    keeps.push_back(RecomputeKeep::kDownProj);
    keeps.push_back(RecomputeKeep::kAllProjections);
  }
  const auto fits = [&](const MemoryPlan& plan) {
    return plan.device_peak_bytes - outside_allocator <= limit;
  };
  CheckpointChoice best;
  double best_cost = 0;
  for (int64_t n = 0; n <= config.num_hidden_layers; ++n) {
    for (RecomputeKeep keep : keeps) {
      if (n == 0 && keep != RecomputeKeep::kNothing) continue;  // nothing to keep
      options.checkpoint_layers = n;
      options.recompute_keep = keep;
      options.dequantized_kept_layers = 0;
      FTUNE_ASSIGN_OR_RETURN(MemoryPlan plan, PlanMemory(config, options));
      if (!fits(plan)) continue;
      // The most layers not checkpointed that can keep their dequantized
      // weights as well (the peak grows with their count): a bisection.
      int64_t dense = 0;
      if (options.quantize_base) {
        int64_t lo = 0, hi = config.num_hidden_layers - n;
        while (lo < hi) {
          const int64_t mid = (lo + hi + 1) / 2;
          options.dequantized_kept_layers = mid;
          FTUNE_ASSIGN_OR_RETURN(MemoryPlan with, PlanMemory(config, options));
          if (fits(with)) {
            lo = mid;
          } else {
            hi = mid - 1;
          }
        }
        dense = lo;
        if (dense > 0) {
          options.dequantized_kept_layers = dense;
          FTUNE_ASSIGN_OR_RETURN(plan, PlanMemory(config, options));
        }
      }
      const double cost =
          RecomputeCost(config, options, n, keep) - DequantizeSaving(config, options, dense);
      if (!best.fits || cost < best_cost ||
          (cost == best_cost && plan.device_peak_bytes < best.plan.device_peak_bytes)) {
        best.checkpoint_layers = n;
        best.recompute_keep = keep;
        best.dequantized_kept_layers = dense;
        best.fits = true;
        best.plan = std::move(plan);
        best_cost = cost;
      }
    }
  }
  if (best.fits) return best;
  // Nothing fits: every layer checkpointed, keeping nothing (the least memory).
  options.checkpoint_layers = config.num_hidden_layers;
  options.recompute_keep = RecomputeKeep::kNothing;
  options.dequantized_kept_layers = 0;
  FTUNE_ASSIGN_OR_RETURN(best.plan, PlanMemory(config, options));
  best.checkpoint_layers = config.num_hidden_layers;
  best.recompute_keep = RecomputeKeep::kNothing;
  best.dequantized_kept_layers = 0;
  return best;
}

}  // namespace ftune::trainer
