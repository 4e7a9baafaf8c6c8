// StepProfiler: traces a range of optimizer steps with LibTorch's profiler
// (CPU ops, and CUDA kernels on GPU ranks) into a Chrome/Perfetto trace,
// <dir>/rank-<r>-steps-<first>-<last>.trace.json, one per rank. Open it in
// https://ui.perfetto.dev or chrome://tracing (docs/performance.md).
//
// The engine marks its phases with named ranges (FTUNE_RANGE below), which
// appear in the trace beside the ops they contain:
//   ftune::step            one optimizer step
//   ftune::layer_forward   a decoder layer's forward (also when recomputed)
//   ftune::attention       its attention
//   ftune::lora            a LoRA adapter's forward
//   ftune::nf4_dequantize  an NF4 weight expanded for a GEMM
//   ftune::loss            the chunked lm_head + cross-entropy
//   ftune::fsdp_gather     a unit's all-gather (or copy-in)
//   ftune::reduce_gradients, ftune::gather_lora, ftune::optimizer
//
// Writing the trace: LibTorch 2.x writes Kineto's own trace (with CUDA
// kernels and memcpys); a LibTorch built without Kineto (Debian's 1.13)
// collects the same events, which are written here as Chrome trace JSON.
//
// Thread-safety: one per rank, used by the training thread.
#ifndef FTUNE_WORKER_TRAINER_PROFILER_H_
#define FTUNE_WORKER_TRAINER_PROFILER_H_

#include <ATen/record_function.h>

#include <array>
#include <cstdint>
#include <memory>
#include <string>

#include "ftune/status.h"

// A named range in the trace for the rest of the enclosing scope; a flag
// test when no profiler runs. LibTorch's RECORD_USER_SCOPE names its guard
// `guard`, which collides with CUDA guards of the same name; this one is
// named after the line.
#define FTUNE_RANGE_IMPL_(var, name)                   \
  at::RecordFunction var(at::RecordScope::USER_SCOPE); \
  if (var.isActive()) var.before(name)
#define FTUNE_RANGE(name) FTUNE_RANGE_IMPL_(FTUNE_CONCAT_(ftune_range_, __LINE__), name)

namespace ftune::trainer {

class EventSink;

// The step's phases as StepMetrics reports them.
enum class StepPhase { kForward = 0, kBackward = 1, kOptimizer = 2 };
inline constexpr int kNumStepPhases = 3;

// Time of a step's phases without a host sync inside the step: on CUDA each
// Mark records an event on the current stream and Seconds() reads the
// intervals once the last one has completed (the step's end, which the
// loss already waits for); on the CPU, host clock readings. Each Mark
// charges the time since the previous mark (or Start) to its phase, so a
// phase may be marked several times per step (micro-batches).
class PhaseTimer {
 public:
  explicit PhaseTimer(bool cuda);
  ~PhaseTimer();
  PhaseTimer(const PhaseTimer&) = delete;
  PhaseTimer& operator=(const PhaseTimer&) = delete;

  void Start();
  void Mark(StepPhase phase);
  // Seconds per phase since Start, indexed by StepPhase.
  std::array<double, kNumStepPhases> Seconds();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

class StepProfiler {
 public:
  // Traces optimizer steps [first, last] (1-based); does nothing when first
  // is 0. `cuda` adds the CUDA activity. `events` (not owned) gets an INFO
  // line naming each trace written.
  StepProfiler(int64_t first, int64_t last, std::string dir, int rank, bool cuda,
               EventSink* events);
  ~StepProfiler();
  StepProfiler(const StepProfiler&) = delete;
  StepProfiler& operator=(const StepProfiler&) = delete;

  // Before optimizer step `step` (1-based) runs: starts at `first`.
  Status BeginStep(int64_t step);
  // After it ran: at `last`, stops and writes the trace.
  Status EndStep(int64_t step);
  // The loop ended (or stopped) inside the range: writes what was traced.
  Status Finish();

  bool active() const { return active_; }

 private:
  Status StopAndWrite(int64_t last_step);

  int64_t first_, last_;
  std::string dir_;
  int rank_;
  bool cuda_;
  EventSink* events_;
  bool active_ = false;
  int64_t started_ = 0;      // the first step traced
  int64_t last_traced_ = 0;  // the last step that ended while tracing
};

}  // namespace ftune::trainer

#endif  // FTUNE_WORKER_TRAINER_PROFILER_H_
