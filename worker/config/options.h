// The trainer's option structs, without LibTorch: the engine takes them
// (LlamaModel::AttachLora, ShardedLora/FSDP units, AdamW), RunConfig
// (run_config.h) holds them, and the memory plan is derived from the same
// values. Each struct validates itself; errors name the field and value.
//
// Thread-safety: values.
#ifndef FTUNE_WORKER_CONFIG_OPTIONS_H_
#define FTUNE_WORKER_CONFIG_OPTIONS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "ftune/status.h"

namespace ftune::trainer {

// PEFT LoraConfig fields ftune honours. bias is always "none" and
// fan_in_fan_out false (Llama's nn.Linear layout).
struct LoraConfig {
  int64_t r = 8;
  double lora_alpha = 16.0;
  double lora_dropout = 0.0;
  bool use_rslora = false;
  // HF module names (last path component): q_proj, k_proj, v_proj, o_proj,
  // gate_proj, up_proj, down_proj.
  std::vector<std::string> target_modules = DefaultTargetModules();
  uint64_t seed = 0;  // A's initialisation

  // Every Llama projection: the job spec's list (proto/jobspec.h), not a copy.
  static std::vector<std::string> DefaultTargetModules();
  double Scaling() const;  // alpha / r or alpha / sqrt(r)
  // INVALID_ARGUMENT naming the field and value: "lora r (0) must be >= 1".
  Status Validate() const;
};

// Where FSDP keeps what, and when it gathers. torch FSDP's meanings:
//   reshard_after_forward  FULL_SHARD (true): a unit is freed after its
//                          forward and gathered again for its backward;
//                          SHARD_GRAD_OP and NO_SHARD (false): it stays
//                          gathered from forward to backward.
//   offload_params         CPUOffload(offload_params=True): the frozen NF4
//                          shards, the LoRA shard (fp32 master values), its
//                          gradient shard and both AdamW moments live in
//                          host memory (pinned on CUDA); the AdamW step and
//                          clipping run on the host; a unit's shard is
//                          copied to the device just before its gather and
//                          the updated LoRA shard just before the adapters'
//                          all-gather. No effect on CPU ranks, whose device
//                          memory is host memory.
//   prefetch               gather the next unit while the current one
//                          computes (torch's forward_prefetch +
//                          BACKWARD_PRE). NCCL: on a second CUDA stream.
//                          Gloo: on a background thread, which pays only
//                          with spare cores (on a 2-core machine with 2
//                          ranks a step got 15% slower). Ignored with one
//                          rank. RunConfig resolves the spec's unset value:
//                          on for CUDA ranks, off for CPU ranks.
struct FsdpOptions {
  bool reshard_after_forward = true;
  bool offload_params = false;
  bool prefetch = false;
};

// torch.optim.AdamW's hyper-parameters (HF TrainingArguments names in the
// messages).
struct AdamWOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;

  // INVALID_ARGUMENT naming the field: "adam_beta2 (1) must be in [0, 1)".
  Status Validate() const;
};

// A number as the option messages print it ("0.0002", "1e-08").
std::string OptionValue(double v);

}  // namespace ftune::trainer

#endif  // FTUNE_WORKER_CONFIG_OPTIONS_H_
