// The memory plan of a job: a resolved JobSpec -> RunConfig (for GPU ranks)
// -> PlanMemory (worker/modelio/memory_plan.h). The plan reads the same
// resolved options the engine runs with (RunConfig::plan), so the two
// cannot disagree on what a key means. One entry point for `ftune-rank
// plan` and for the coordinator, which places jobs only on slots the plan
// fits (LibTorch-free).
//
// Thread-safety: free functions; any thread.
#ifndef FTUNE_WORKER_CONFIG_PLAN_SPEC_H_
#define FTUNE_WORKER_CONFIG_PLAN_SPEC_H_

#include "ftune/status.h"
#include "ftune/v1/job.pb.h"
#include "worker/modelio/llama_config.h"
#include "worker/modelio/memory_plan.h"

namespace ftune::trainer {

// The plan on GPU ranks for the model's config.json
// (`model_name_or_path`/config.json), or for `config` when given (a preset
// shape). `spec` must be resolved (ResolveJobSpec); world_size 0 means
// resources.num_ranks. NOT_FOUND naming the file when the config cannot be
// read.
Result<MemoryPlan> PlanJob(const v1::JobSpec& spec, int world_size,
                           const LlamaConfig* config = nullptr);

}  // namespace ftune::trainer

#endif  // FTUNE_WORKER_CONFIG_PLAN_SPEC_H_
