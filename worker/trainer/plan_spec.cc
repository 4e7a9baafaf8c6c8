#include "worker/trainer/plan_spec.h"

#include "jobspec.h"

namespace ftune::trainer {

MemoryPlanOptions MemoryPlanOptionsFromSpec(const v1::JobSpec& spec_in, int world_size) {
  v1::JobSpec spec = spec_in;
  ApplyJobSpecDefaults(&spec);
  MemoryPlanOptions o;
  o.world_size = world_size > 0 ? world_size : spec.resources().num_ranks();
  o.micro_batch_size = spec.training().per_device_train_batch_size();
  o.seq_len = spec.training().max_seq_len();
  o.lora_r = spec.lora().r();
  o.target_modules.assign(spec.lora().target_modules().begin(),
                          spec.lora().target_modules().end());
  o.offload_params = spec.fsdp().offload_params();
  o.prefetch = spec.fsdp().has_prefetch() ? spec.fsdp().prefetch() : true;
  o.random_weights = spec.model().random_weights();
  o.activation_checkpointing = spec.training().gradient_checkpointing();
  o.reshard_after_forward = spec.fsdp().reshard_after_forward();
  o.quantize_base = spec.quantization().load_in_4bit();
  o.nf4_blocksize = spec.quantization().blocksize();
  o.double_quant = spec.quantization().bnb_4bit_use_double_quant();
  return o;
}

Result<MemoryPlan> PlanJob(const v1::JobSpec& spec, int world_size, const LlamaConfig* config) {
  const MemoryPlanOptions options = MemoryPlanOptionsFromSpec(spec, world_size);
  if (config != nullptr) return PlanMemory(*config, options);
  FTUNE_TRAINER_ASSIGN_OR_RETURN(
      LlamaConfig from_file, LoadLlamaConfig(spec.model().model_name_or_path() + "/config.json"));
  return PlanMemory(from_file, options);
}

}  // namespace ftune::trainer
