// Streams and clocks of the FSDP collectives (internal to ftune_fsdp; see
// fsdp_units.h, "Timing" and the NCCL prefetch):
//   CurrentStream   where tensor work of a device is enqueued;
//   CommLane        the one CUDA stream a communicator's background
//                   collectives use (FSDP prefetch, LoRA reductions), with the
//                   waits that keep every collective of the communicator in
//                   the host's order on the device, as NCCL requires;
//   CollectiveClock device time of collectives (CUDA events) or host time
//                   (Gloo), and the part of it compute waited for.
// The CUDA parts exist when ftune_fsdp is built with FTUNE_FSDP_CUDA.
#ifndef FTUNE_WORKER_TRAINER_FSDP_STREAMS_H_
#define FTUNE_WORKER_TRAINER_FSDP_STREAMS_H_

#include <c10/core/Device.h>

#include <cstdint>
#include <map>

#include "worker/comm/communicator.h"

#if FTUNE_FSDP_CUDA
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace ftune::trainer::internal {

#if FTUNE_FSDP_CUDA
inline constexpr bool kCudaStreams = true;
#else
inline constexpr bool kCudaStreams = false;
#endif

// c10's current CUDA stream for a GPU device, none (nullptr) otherwise.
// (A CUDA handle may be nullptr too: the legacy default stream.)
comm::StreamHandle CurrentStream(c10::Device device);

#if FTUNE_FSDP_CUDA
// Collectives on the compute stream first wait for the lane's tail
// (ComputeAfterLane); the lane first waits for the compute stream
// (LaneAfterCompute) and marks its tail after each collective (LaneMarkTail).
struct CommLane {
  explicit CommLane(c10::cuda::CUDAStream s) : stream(s) {}
  c10::cuda::CUDAStream stream;
  cudaEvent_t tail = nullptr;
};
// One lane per communicator and device, created on first use (a
// high-priority stream from c10's pool); lives for the process.
CommLane& LaneFor(const comm::Communicator* comm, c10::Device device);
void LaneAfterCompute(CommLane& lane, cudaStream_t compute);
void LaneMarkTail(CommLane& lane);
void ComputeAfterLane(CommLane& lane, cudaStream_t compute);
#endif

// Busy = the collectives' own time; exposed = the part compute waited for:
// all of a collective timed without Need, and of one with Need (a prefetch,
// a background reduction) only what was left when the compute stream
// reached the Need point. Thread-safety: one thread at a time.
class CollectiveClock {
 public:
  CollectiveClock() = default;
  CollectiveClock(const CollectiveClock&) = delete;
  CollectiveClock& operator=(const CollectiveClock&) = delete;
  ~CollectiveClock();

  // Host-timed collectives (Gloo). Exposed is clamped to busy: waiting
  // includes the host's own overhead.
  void Add(double busy, double exposed);

#if FTUNE_FSDP_CUDA
  // Marks the start of a collective enqueued next on `stream`; returns its
  // id. A background one (`background`) is counted once Need says when its
  // result was needed.
  int64_t Begin(cudaStream_t stream, bool background);
  void End(int64_t id, cudaStream_t stream);
  // The compute stream needs the collective's result from here on.
  void Need(int64_t id, cudaStream_t stream);
#endif

  // Seconds so far; waits for the timed collectives that have ended
  // (background ones are counted once needed).
  double busy();
  double exposed();

 private:
  void Harvest();
#if FTUNE_FSDP_CUDA
  struct Mark {
    bool background = false;
    cudaEvent_t start = nullptr, end = nullptr, need = nullptr;
  };
  std::map<int64_t, Mark> marks_;
  int64_t next_id_ = 0;
#endif
  double busy_ = 0;
  double exposed_ = 0;
};

}  // namespace ftune::trainer::internal

#endif  // FTUNE_WORKER_TRAINER_FSDP_STREAMS_H_
