// RunConfig: everything a rank does with a job, derived once from a resolved
// job spec (proto/jobspec.h's LoadJobSpec / ResolveJobSpec). It holds every
// option struct the engine, the data pipeline and the memory plan take, so
// no other code reads the spec's training keys or applies its own defaults:
//
//   JobSpec key                          -> RunConfig field
//   model.model_name_or_path             -> model.dir, data.tokenizer_dir
//   model.random_weights(_seed)          -> model.random_weights, .random_seed
//   dataset.*, training.max_seq_len,
//     training.packing, training.seed    -> data (DatasetOptions)
//   lora.*, training.seed                -> lora (LoraConfig)
//   quantization.load_in_4bit, blocksize,
//     bnb_4bit_use_double_quant          -> model.quantize_base, .nf4_blocksize, .double_quant
//   quantization.bnb_4bit_compute_dtype  -> model.compute_dtype (CUDA; CPU ranks compute in fp32)
//   quantization.bnb_4bit_quant_type     -> validated only: nf4 is the one type
//   fsdp.sharding_strategy,
//     reshard_after_forward              -> fsdp.reshard_after_forward
//   fsdp.offload_params                  -> fsdp.offload_params
//   fsdp.prefetch                        -> fsdp.prefetch (unset: on for CUDA, off for CPU)
//   training.learning_rate, adam_*,
//     weight_decay                       -> adam (AdamWOptions)
//   training.* (steps, schedule, logging,
//     eval, saving, clipping, batch)     -> training
//   training.gradient_checkpointing      -> model.activation_checkpointing, .checkpointing_auto
//                                           (unset: auto on CUDA, off on CPU)
//   fsdp.device_memory_limit_bytes       -> model.device_memory_limit_bytes
//   training.profile_steps               -> training.profile_first, .profile_last
//   training.report_to                   -> training.report_to_tensorboard
//   name                                 -> training.run_name (the TensorBoard run)
//   everything above                     -> plan (MemoryPlanOptions)
// The control-plane keys (labels, priority, max_restarts, output_dir,
// resources.*) are the coordinator's and the agent's; run_config_test walks
// every JobSpec field and fails on one that reaches neither.
//
// Thread-safety: values and pure functions.
#ifndef FTUNE_WORKER_CONFIG_RUN_CONFIG_H_
#define FTUNE_WORKER_CONFIG_RUN_CONFIG_H_

#include <cstdint>
#include <string>

#include "ftune/status.h"
#include "ftune/v1/job.pb.h"
#include "worker/config/options.h"
#include "worker/data/prepare.h"
#include "worker/modelio/memory_plan.h"

namespace ftune::trainer {

enum class DeviceKind { kCpu, kCuda };

// The model as the engine builds it (ModelOptions is derived from this plus
// the rank's device; see train.cc).
struct ModelSettings {
  std::string dir;                        // HF model directory (or a bnb 4-bit one)
  bool random_weights = false;
  uint64_t random_seed = 0;
  bool quantize_base = true;              // NF4 base projections
  int64_t nf4_blocksize = 64;
  bool double_quant = true;
  std::string compute_dtype = "bfloat16"; // bfloat16 | float16 | float32 on CUDA
  bool activation_checkpointing = false;
  // With activation_checkpointing: the first checkpoint_layers decoder
  // layers recompute in backward, -1 = all of them.
  int64_t checkpoint_layers = -1;
  // gradient_checkpointing unset on a GPU rank: the rank picks
  // checkpoint_layers from its memory plan and its device memory
  // (ChooseCheckpointLayers); until then every layer is checkpointed, which
  // is also what the coordinator places the job by.
  bool checkpointing_auto = false;
  // fsdp.device_memory_limit_bytes: the rank's allocator cap and the budget
  // of automatic checkpointing; 0 = the whole device.
  int64_t device_memory_limit_bytes = 0;
};

// The step loop's schedule and bookkeeping (HF TrainingArguments).
struct TrainingSettings {
  int64_t per_device_train_batch_size = 8;
  int64_t gradient_accumulation_steps = 1;
  int64_t max_steps = 0;                  // 0: from num_train_epochs
  double num_train_epochs = 3;
  std::string lr_scheduler_type = "linear";
  double learning_rate = 5e-5;
  int64_t warmup_steps = 0;
  double warmup_ratio = 0;
  double max_grad_norm = 1.0;             // 0: no clipping
  int64_t logging_steps = 1;
  int64_t eval_steps = 0;
  int64_t save_steps = 500;               // 0: no periodic checkpoints
  int save_total_limit = 0;
  uint64_t seed = 42;                     // data order, LoRA init, dropout
  int64_t profile_first = 0;              // optimizer steps traced, 1-based,
  int64_t profile_last = -1;              // inclusive; none when first is 0
  bool report_to_tensorboard = false;     // rank 0 writes <output_dir>/runs/<run_name>/
  std::string run_name;                   // the job's name; may be empty
};

struct RunConfig {
  DeviceKind device = DeviceKind::kCpu;
  int world_size = 1;
  ModelSettings model;
  data::DatasetOptions data;
  LoraConfig lora;
  FsdpOptions fsdp;
  AdamWOptions adam;
  TrainingSettings training;
  MemoryPlanOptions plan;
};

// The one derivation. `spec` must be resolved (ResolveJobSpec); a spec that
// is not valid is INVALID_ARGUMENT listing its problems. world_size 0 means
// resources.num_ranks.
Result<RunConfig> MakeRunConfig(const v1::JobSpec& spec, DeviceKind device, int world_size = 0);

// Every option as "section.field = value" lines, sorted as declared: the
// rank logs it at start (what will run, after defaults), and the spec-key
// walk in run_config_test compares it.
std::string DescribeRunConfig(const RunConfig& config);

}  // namespace ftune::trainer

#endif  // FTUNE_WORKER_CONFIG_RUN_CONFIG_H_
