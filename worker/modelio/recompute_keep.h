// What a checkpointed decoder layer keeps of its forward beyond its input,
// so that its recompute in backward skips those GEMMs: shared by the memory
// plan (memory_plan.h), which counts the kept bytes, and the model
// (worker/trainer/recompute.h), which keeps them. No LibTorch.
#ifndef FTUNE_WORKER_MODELIO_RECOMPUTE_KEEP_H_
#define FTUNE_WORKER_MODELIO_RECOMPUTE_KEEP_H_

#include <string>

namespace ftune::trainer {

enum class RecomputeKeep {
  kNothing = 0,  // the whole layer recomputes (classic activation checkpointing)
  // The MLP's down projection output: per byte kept the costliest GEMM to
  // recompute (its inner dimension is the intermediate size).
  kDownProj = 1,
  // Every frozen projection's GEMM output (q/k/v, o, gate/up, down): only
  // the norms, RoPE, SwiGLU, attention and LoRA's small products recompute.
  kAllProjections = 2,
};

// "nothing" | "down_proj" | "projections".
inline const char* RecomputeKeepName(RecomputeKeep keep) {
  switch (keep) {
    case RecomputeKeep::kNothing:
      return "nothing";
    case RecomputeKeep::kDownProj:
      return "down_proj";
    case RecomputeKeep::kAllProjections:
      return "projections";
  }
  return "unknown";
}

// The inverse of RecomputeKeepName; false for an unknown name.
inline bool ParseRecomputeKeep(const std::string& name, RecomputeKeep* keep) {
  for (RecomputeKeep k :
       {RecomputeKeep::kNothing, RecomputeKeep::kDownProj, RecomputeKeep::kAllProjections}) {
    if (name == RecomputeKeepName(k)) {
      *keep = k;
      return true;
    }
  }
  return false;
}

}  // namespace ftune::trainer

#endif  // FTUNE_WORKER_MODELIO_RECOMPUTE_KEEP_H_
