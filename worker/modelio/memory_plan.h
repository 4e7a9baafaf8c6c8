// PlanMemory: per-rank peak device and host memory of an FSDP + QLoRA job,
// predicted from the model shape and the job's options (`ftune-rank
// plan`; the options come from RunConfig, worker/config/run_config.h). Pure arithmetic, no LibTorch, so the coordinator can place and
// refuse jobs with it.
//
// What it counts, per rank (world W), mirroring fsdp.h and model.h:
//   frozen shards   every unit's shard: per projection NF4 packed bytes +
//                   uint8 absmax + fp32 absmax2 per 256 blocks, split at
//                   256-block boundaries and padded to W pieces exactly as
//                   Nf4ShardGeometry does; norms, Qwen2's q/k/v biases,
//                   embedding and lm_head (none when tied) in the compute
//                   dtype split by elements. On the device, or
//                   on the host (pinned) with offload_params.
//   gathered units  the unit in use plus the one being prefetched (two
//                   decoder layers), or every decoder layer from forward to
//                   backward without reshard_after_forward, plus one layer
//                   of staging while a gather copies out (more than one rank);
//                   the embedding or head unit (dense, vocab x hidden) while
//                   it is in use.
//   LoRA            the whole adapters (fp32) stay on every rank, their full
//                   fp32 gradients exist from backward to ReduceGradients;
//                   the flat shard, its gradient and AdamW's two moments are
//                   1/W of the flat vector each (on the host with offload).
//   activations     a checkpointed layer keeps its input (batch x seq x
//                   hidden, compute dtype) and the GEMM outputs its
//                   recompute_keep names (recompute_keep.h), plus one
//                   layer's recompute
//                   working set in backward; a layer that is not keeps its
//                   whole working set (and its gathered unit when units are
//                   copied in). The working set counts the tensors autograd
//                   saves in model.h's layer (norm outputs and their fp32
//                   statistics, q/k/v before and after RoPE, attention
//                   output, MLP gate/up/activation/product, LoRA's A outputs
//                   and, in fp32 compute, its input casts) and the gradients
//                   alive at its peak (activation_grad_factor of it).
//                   Those of dequantized_kept_layers also keep their
//                   projections' dequantized weights.
//   scratch         the dequantized weight of the largest projection
//                   (forward and backward each dequantize it once), the
//                   loss's chunk of fp32 logits and their gradient, and with
//                   math attention the (heads x seq x seq) scores.
//   runtime         the CUDA context/cuBLAS workspace and NCCL's buffers
//                   (device) and the process' libraries (host), as
//                   constants below.
//   allocator       with the NCCL prefetch, the second stream's pool (the
//                   units gathered there cannot serve the compute stream's
//                   allocations); otherwise a fragmentation margin.
// The peak is at the loss (head unit gathered, a chunk of fp32 logits) or in
// a layer's backward, whichever is larger. The constants were fitted on
// H200 runs of the Llama 3 8B and 70B shapes on 1, 2 and 4 GPUs, with and
// without offload (tests/gpu/bench.sh; figures in the README), where the
// device peak (allocator peak + memory outside the allocator, as nvidia-smi
// shows it) came within 10% of the plan.
//
// Thread-safety: pure functions of their arguments.
#ifndef FTUNE_WORKER_TRAINER_MEMORY_PLAN_H_
#define FTUNE_WORKER_TRAINER_MEMORY_PLAN_H_

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "worker/modelio/llama_config.h"
#include "worker/modelio/recompute_keep.h"
#include "ftune/status.h"

namespace ftune::trainer {

struct MemoryPlanOptions {
  int world_size = 1;
  int64_t micro_batch_size = 1;
  int64_t seq_len = 2048;
  int64_t lora_r = 16;
  // HF module names; every projection when empty.
  std::vector<std::string> target_modules;
  bool offload_params = false;  // frozen shards + LoRA shard + AdamW state on the host
  bool activation_checkpointing = true;
  // With activation_checkpointing: how many layers are checkpointed, -1 =
  // all; the others keep their activations (and, when units are copied in,
  // their gathered unit) from forward to backward.
  int64_t checkpoint_layers = -1;
  // What each checkpointed layer keeps of its forward for the recompute
  // (NF4 bases only; recompute_keep.h): those GEMM outputs stay alive from
  // the layer's forward to its backward.
  RecomputeKeep recompute_keep = RecomputeKeep::kNothing;
  // How many of the layers not checkpointed keep their projections'
  // dequantized weights (compute dtype) from forward to backward (NF4 bases
  // only; model.h): one dequantization per weight and step instead of two.
  int64_t dequantized_kept_layers = 0;
  bool lora_dropout = false;  // lora_dropout > 0: each adapter keeps its dropped input
  bool reshard_after_forward = true;
  bool quantize_base = true;  // NF4 projections (QLoRA); else dense in the compute dtype
  int64_t nf4_blocksize = 64;
  bool double_quant = true;
  int compute_dtype_bytes = 2;  // bf16 on CUDA
  int file_dtype_bytes = 2;     // bf16 checkpoints
  int64_t loss_chunk_tokens = 1024;
  // Flash attention: no (seq x seq) scores kept; with a 16-bit compute
  // dtype the varlen path, which shares kv heads without copies (model.h).
  bool flash_attention = true;
  // With the 16-bit varlen path: RMSNorm, SwiGLU and RoPE as fused kernels,
  // which keep bf16 inputs instead of fp32 copies and no silu(gate), and
  // q/k/v and gate/up dequantized into one buffer each (model.h).
  bool fused_kernels = true;
  bool prefetch = true;         // NCCL prefetch on a second stream (its own allocator pool)
  bool random_weights = false;  // model.random_weights: nothing read through the host
  // Runtime constants (see the file comment), measured on H200 ranks with
  // LibTorch 2.11 / CUDA 13 (README, "Memory plan").
  int64_t device_runtime_bytes = 768LL << 20;   // CUDA context + cuBLAS workspace (0.75 GiB)
  int64_t nccl_runtime_bytes = 840LL << 20;     // NCCL's buffers with more than one rank
  int64_t host_runtime_bytes = 1331LL << 20;    // LibTorch + CUDA libraries, process (1.3 GiB)
  int64_t nccl_host_bytes = 154LL << 20;        // NCCL's host side with more than one rank
  double device_fragmentation = 0.03;           // caching allocator slack (no prefetch pool)...
  int64_t device_slack_bytes = 256LL << 20;     // ...plus this
  double activation_grad_factor = 0.0;          // gradients alive at the backward peak / saved

  // INVALID_ARGUMENT naming the field: "world_size (0) must be >= 1".
  Status Validate() const;
};

struct MemoryPlan {
  int64_t device_peak_bytes = 0;
  int64_t host_peak_bytes = 0;
  // Named parts of each total, largest effects first as computed.
  std::vector<std::pair<std::string, int64_t>> device_items;
  std::vector<std::pair<std::string, int64_t>> host_items;
  // Useful single figures.
  int64_t frozen_shard_bytes = 0;      // this rank's frozen shards
  int64_t lora_params = 0;             // adapter elements, all layers
  int64_t loading_host_peak_bytes = 0; // LoadShardedModel's peak on the host

  bool FitsDevice(int64_t device_bytes) const { return device_peak_bytes <= device_bytes; }
  // One line per item and the totals, in GiB.
  std::string ToString() const;
};

Result<MemoryPlan> PlanMemory(const LlamaConfig& config, const MemoryPlanOptions& options);

// Automatic checkpointing: among the plans that fit `budget_bytes` with
// headroom (the device peak at most 90% of it), the one with the least
// estimated extra work (RecomputeCost, less DequantizeSaving): how many
// layers are checkpointed, what each keeps for its recompute, and how many
// of the others keep their dequantized weights for backward; every layer
// checkpointed, keeping nothing, when none fits. With `allocator_budget` the budget caps
// the caching allocator only (fsdp.device_memory_limit), so the CUDA
// context and NCCL's buffers are not counted against it.
struct CheckpointChoice {
  int64_t checkpoint_layers = 0;  // of config.num_hidden_layers
  RecomputeKeep recompute_keep = RecomputeKeep::kNothing;
  int64_t dequantized_kept_layers = 0;  // of the layers not checkpointed
  bool fits = false;              // false: every layer checkpointed and still over
  MemoryPlan plan;                // the plan of that choice
};
Result<CheckpointChoice> ChooseCheckpointLayers(const LlamaConfig& config,
                                                MemoryPlanOptions options, int64_t budget_bytes,
                                                bool allocator_budget);

// The estimated time one step spends recomputing `checkpoint_layers` layers
// that each keep `keep`, in units of GEMM FLOPs: the projections' GEMMs not
// kept, plus the layer's other work (attention, norms, RoPE, SwiGLU, LoRA)
// as a fixed share of its GEMMs (kNonGemmRecomputeShare). Only for ranking
// the choices; 0 for no checkpointed layer.
double RecomputeCost(const LlamaConfig& config, const MemoryPlanOptions& options,
                     int64_t checkpoint_layers, RecomputeKeep keep);
// On an H100 (Llama-3-8B shape, seq 2048) the recompute of all 32 layers took
// 58 ms of a step, of which the forward GEMMs at the step's GEMM rate are
// about 40 ms: the rest is about 0.45 of the GEMM time.
inline constexpr double kNonGemmRecomputeShare = 0.45;

// What `dequantized_kept_layers` layers keeping their dequantized weights
// save per step, in the same units as RecomputeCost: one dequantization of
// each of their NF4 projections (0 for dense bases). A dequantization pass
// is memory-bound (4 bits read, 16 written per weight) while the GEMMs grow
// with the tokens: on an H100 the 8B layers' 7e9 weights took 7 ms to
// dequantize (the trace: 15 ms for two passes), as long as about 700 GEMM
// FLOPs per weight at the step's GEMM rate.
double DequantizeSaving(const LlamaConfig& config, const MemoryPlanOptions& options,
                        int64_t dequantized_kept_layers);
inline constexpr double kDequantizeFlopsPerWeight = 700.0;

// Bytes of one rank's shard of an NF4 tensor of `numel` elements split over
// `world` ranks (packed + absmax + absmax2 pieces, padded as fsdp.h does).
int64_t Nf4ShardBytes(int64_t numel, int64_t blocksize, bool double_quant, int world);

}  // namespace ftune::trainer

#endif  // FTUNE_WORKER_TRAINER_MEMORY_PLAN_H_
