#include "worker/config/plan_spec.h"

#include "worker/config/run_config.h"

namespace ftune::trainer {

Result<MemoryPlan> PlanJob(const v1::JobSpec& spec, int world_size, const LlamaConfig* config) {
  FTUNE_ASSIGN_OR_RETURN(RunConfig run, MakeRunConfig(spec, DeviceKind::kCuda, world_size));
  if (config != nullptr) return PlanMemory(*config, run.plan);
  FTUNE_ASSIGN_OR_RETURN(LlamaConfig from_file, LoadLlamaConfig(run.model.dir + "/config.json"));
  return PlanMemory(from_file, run.plan);
}

}  // namespace ftune::trainer
