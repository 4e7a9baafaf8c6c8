// Streams and clocks of the FSDP collectives; see fsdp_streams.h.
#include "worker/trainer/fsdp_streams.h"

#include <algorithm>
#include <memory>
#include <mutex>
#include <utility>

namespace ftune::trainer::internal {

comm::StreamHandle CurrentStream(c10::Device device) {
#if FTUNE_FSDP_CUDA
  if (device.is_cuda()) return c10::cuda::getCurrentCUDAStream(device.index()).stream();
#endif
  (void)device;
  return nullptr;
}

#if FTUNE_FSDP_CUDA
CommLane& LaneFor(const comm::Communicator* comm, c10::Device device) {
  static std::mutex mu;
  static auto* lanes = new std::map<std::pair<const void*, int>, std::unique_ptr<CommLane>>();
  std::lock_guard<std::mutex> lock(mu);
  auto& lane = (*lanes)[{comm, device.index()}];
  if (lane == nullptr) {
    lane = std::make_unique<CommLane>(
        c10::cuda::getStreamFromPool(/*isHighPriority=*/true, device.index()));
    cudaEventCreateWithFlags(&lane->tail, cudaEventDisableTiming);
  }
  return *lane;
}

void LaneAfterCompute(CommLane& lane, cudaStream_t compute) {
  cudaEvent_t ready = nullptr;
  cudaEventCreateWithFlags(&ready, cudaEventDisableTiming);
  cudaEventRecord(ready, compute);
  cudaStreamWaitEvent(lane.stream.stream(), ready, 0);
  cudaEventDestroy(ready);  // released once the wait is done
}

void LaneMarkTail(CommLane& lane) { cudaEventRecord(lane.tail, lane.stream.stream()); }

void ComputeAfterLane(CommLane& lane, cudaStream_t compute) {
  cudaStreamWaitEvent(compute, lane.tail, 0);
}

namespace {

cudaEvent_t Record(cudaStream_t stream) {
  cudaEvent_t e = nullptr;
  if (cudaEventCreate(&e) != cudaSuccess) return nullptr;
  if (cudaEventRecord(e, stream) != cudaSuccess) {
    cudaEventDestroy(e);
    return nullptr;
  }
  return e;
}

}  // namespace

int64_t CollectiveClock::Begin(cudaStream_t stream, bool background) {
  const int64_t id = next_id_++;
  Mark& m = marks_[id];
  m.background = background;
  m.start = Record(stream);
  return id;
}

void CollectiveClock::End(int64_t id, cudaStream_t stream) { marks_[id].end = Record(stream); }

void CollectiveClock::Need(int64_t id, cudaStream_t stream) { marks_[id].need = Record(stream); }
#endif

CollectiveClock::~CollectiveClock() {
#if FTUNE_FSDP_CUDA
  for (auto& [id, m] : marks_) {
    for (cudaEvent_t e : {m.start, m.end, m.need}) {
      if (e != nullptr) cudaEventDestroy(e);
    }
  }
#endif
}

void CollectiveClock::Add(double busy, double exposed) {
  busy_ += busy;
  exposed_ += std::min(exposed, busy);
}

double CollectiveClock::busy() {
  Harvest();
  return busy_;
}

double CollectiveClock::exposed() {
  Harvest();
  return exposed_;
}

void CollectiveClock::Harvest() {
#if FTUNE_FSDP_CUDA
  for (auto it = marks_.begin(); it != marks_.end();) {
    Mark& m = it->second;
    // A background collective not yet needed stays; so does an open mark.
    if (m.start == nullptr || m.end == nullptr || (m.background && m.need == nullptr)) {
      ++it;
      continue;
    }
    float ms = 0, waited = 0;
    if (cudaEventSynchronize(m.end) == cudaSuccess &&
        cudaEventElapsedTime(&ms, m.start, m.end) == cudaSuccess) {
      double exposed = ms;
      if (m.need != nullptr && cudaEventSynchronize(m.need) == cudaSuccess &&
          cudaEventElapsedTime(&waited, m.need, m.end) == cudaSuccess) {
        exposed = std::clamp<double>(waited, 0.0, ms);
      }
      Add(ms / 1e3, exposed / 1e3);
    }
    for (cudaEvent_t e : {m.start, m.end, m.need}) {
      if (e != nullptr) cudaEventDestroy(e);
    }
    it = marks_.erase(it);
  }
#endif
}

}  // namespace ftune::trainer::internal
