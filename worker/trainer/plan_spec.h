// The memory plan of a job spec: JobSpec keys -> MemoryPlanOptions ->
// PlanMemory (memory_plan.h). One mapping for `ftune-rank plan` and for the
// coordinator, which places jobs only on slots the plan fits (LibTorch-free).
//
// Thread-safety: free functions; any thread.
#ifndef FTUNE_WORKER_TRAINER_PLAN_SPEC_H_
#define FTUNE_WORKER_TRAINER_PLAN_SPEC_H_

#include "ftune/v1/job.pb.h"
#include "worker/trainer/llama_config.h"
#include "worker/trainer/memory_plan.h"
#include "worker/trainer/status.h"

namespace ftune::trainer {

// Options of a spec with defaults applied; world_size 0 = resources.num_ranks.
MemoryPlanOptions MemoryPlanOptionsFromSpec(const v1::JobSpec& spec, int world_size);

// The plan for the model's config.json (`model_name_or_path`/config.json), or
// for `config` when given (a preset shape). NOT_FOUND naming the file when
// the config cannot be read.
Result<MemoryPlan> PlanJob(const v1::JobSpec& spec, int world_size,
                           const LlamaConfig* config = nullptr);

}  // namespace ftune::trainer

#endif  // FTUNE_WORKER_TRAINER_PLAN_SPEC_H_
