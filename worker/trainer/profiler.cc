#include "worker/trainer/profiler.h"

#include <torch/csrc/autograd/profiler_kineto.h>
#include <torch/version.h>
#if defined(FTUNE_TRAIN_CUDA)
#include <ATen/cuda/CUDAEvent.h>
#endif

#include <algorithm>
#include <chrono>
#include <set>
#include <sstream>
#include <utility>

#include <nlohmann/json.hpp>

#include "ftune/file_util.h"
#include "worker/trainer/events.h"

namespace ftune::trainer {
namespace {

namespace prof = torch::autograd::profiler;
using torch::profiler::impl::ActivityType;
using torch::profiler::impl::ProfilerConfig;
using torch::profiler::impl::ProfilerState;

std::set<ActivityType> Activities(bool cuda) {
  std::set<ActivityType> a{ActivityType::CPU};
  if (cuda) a.insert(ActivityType::CUDA);
  return a;
}

ProfilerConfig Config() {
  // KINETO: ops with their shapes off (cheap), no memory or stack records.
  return ProfilerConfig(ProfilerState::KINETO, /*report_input_shapes=*/false,
                        /*profile_memory=*/false, /*with_stack=*/false, /*with_flops=*/false,
                        /*with_modules=*/false);
}

#if TORCH_VERSION_MAJOR < 2
// Without Kineto the events are still collected: write them as Chrome trace
// "complete" events (microseconds), one thread lane per recording thread.
Status WriteChromeTrace(const prof::ProfilerResult& result, int rank, const std::string& path) {
  nlohmann::json events = nlohmann::json::array();
  for (const prof::KinetoEvent& e : result.events()) {
    events.push_back({{"name", e.name()},
                      {"ph", "X"},
                      {"cat", e.deviceType() == c10::DeviceType::CUDA ? "kernel" : "cpu_op"},
                      {"ts", e.startUs()},
                      {"dur", e.durationUs()},
                      {"pid", rank},
                      {"tid", e.startThreadId()}});
  }
  const nlohmann::json trace = {{"traceEvents", events}, {"displayTimeUnit", "ms"}};
  return WriteFileAtomically(path, trace.dump());
}
#endif

}  // namespace

StepProfiler::StepProfiler(int64_t first, int64_t last, std::string dir, int rank, bool cuda,
                           EventSink* events)
    : first_(first), last_(last), dir_(std::move(dir)), rank_(rank), cuda_(cuda),
      events_(events) {}

StepProfiler::~StepProfiler() {
  if (active_) {
    try {
      prof::disableProfiler();
    } catch (...) {
    }
  }
}

Status StepProfiler::BeginStep(int64_t step) {
  if (first_ < 1 || step != first_ || active_) return OkStatus();
  try {
    prof::prepareProfiler(Config(), Activities(cuda_));
    prof::enableProfiler(Config(), Activities(cuda_),
                         {at::RecordScope::FUNCTION, at::RecordScope::USER_SCOPE,
                          at::RecordScope::BACKWARD_FUNCTION});
  } catch (const c10::Error& e) {
    return InternalError("cannot start the profiler: " + std::string(e.what_without_backtrace()));
  }
  active_ = true;
  started_ = step;
  return OkStatus();
}

Status StepProfiler::EndStep(int64_t step) {
  if (active_) last_traced_ = step;
  if (!active_ || step < last_) return OkStatus();
  return StopAndWrite(step);
}

Status StepProfiler::Finish() {
  if (!active_) return OkStatus();
  return StopAndWrite(last_traced_);
}

Status StepProfiler::StopAndWrite(int64_t last_step) {
  active_ = false;
  std::unique_ptr<prof::ProfilerResult> result;
  try {
    result = prof::disableProfiler();
  } catch (const c10::Error& e) {
    return InternalError("cannot stop the profiler: " + std::string(e.what_without_backtrace()));
  }
  FTUNE_RETURN_IF_ERROR(MakeDirectories(dir_));
  std::ostringstream name;
  name << dir_ << "/rank-" << rank_ << "-steps-" << started_ << "-"
       << std::max(last_step, started_) << ".trace.json";
  const std::string path = name.str();
#if TORCH_VERSION_MAJOR < 2
  FTUNE_RETURN_IF_ERROR(WriteChromeTrace(*result, rank_, path));
#else
  try {
    result->save(path);
  } catch (const c10::Error& e) {
    return InternalError("cannot write the trace " + path + ": " +
                         std::string(e.what_without_backtrace()));
  }
#endif
  if (events_ != nullptr) {
    events_->Info("profile of rank " + std::to_string(rank_) + " written to " + path);
  }
  return OkStatus();
}

struct PhaseTimer::Impl {
  bool cuda = false;
  std::vector<StepPhase> phases;  // of each mark after the start
  std::vector<std::chrono::steady_clock::time_point> times;  // CPU: start + marks
#if defined(FTUNE_TRAIN_CUDA)
  // CUDA: start + marks are events[0, used). The events are kept from step
  // to step and recorded again, so a step creates none once the pool has
  // as many as a step marks.
  std::vector<std::unique_ptr<at::cuda::CUDAEvent>> events;
  size_t used = 0;
#endif
  void Record() {
#if defined(FTUNE_TRAIN_CUDA)
    if (cuda) {
      if (used == events.size()) {
        events.push_back(std::make_unique<at::cuda::CUDAEvent>(cudaEventDefault));
      }
      events[used++]->record();
      return;
    }
#endif
    times.push_back(std::chrono::steady_clock::now());
  }
};

PhaseTimer::PhaseTimer(bool cuda) : impl_(std::make_unique<Impl>()) {
#if defined(FTUNE_TRAIN_CUDA)
  impl_->cuda = cuda;
#else
  (void)cuda;  // a CPU-only LibTorch: every rank is timed by the host clock
#endif
}

PhaseTimer::~PhaseTimer() = default;

void PhaseTimer::Start() {
  impl_->phases.clear();
  impl_->times.clear();
#if defined(FTUNE_TRAIN_CUDA)
  impl_->used = 0;
#endif
  impl_->Record();
}

void PhaseTimer::Mark(StepPhase phase) {
  impl_->phases.push_back(phase);
  impl_->Record();
}

std::array<double, kNumStepPhases> PhaseTimer::Seconds() {
  std::array<double, kNumStepPhases> out{};
  for (size_t i = 0; i < impl_->phases.size(); ++i) {
    double seconds = 0;
#if defined(FTUNE_TRAIN_CUDA)
    if (impl_->cuda) {
      if (i == 0) impl_->events[impl_->used - 1]->synchronize();  // the step's end
      seconds = impl_->events[i]->elapsed_time(*impl_->events[i + 1]) / 1000.0;
    }
#endif
    if (!impl_->cuda) {
      seconds = std::chrono::duration<double>(impl_->times[i + 1] - impl_->times[i]).count();
    }
    out[static_cast<int>(impl_->phases[i])] += seconds;
  }
  return out;
}

}  // namespace ftune::trainer
