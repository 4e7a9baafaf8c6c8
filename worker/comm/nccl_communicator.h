// NCCL backend: collectives between GPUs, one rank per GPU.
//
// Setup: rank 0 draws an ncclUniqueId and publishes its bytes through the
// Rendezvous; every rank calls ncclCommInitRankConfig on its device with a
// non-blocking communicator, so that no NCCL call can block this process
// past our timeout.
//
// Collectives are enqueued on the caller's cudaStream_t and return at once;
// Synchronize(stream) waits for them. A watchdog thread follows each
// enqueued collective through two CUDA events (recorded before and after
// it): the timeout counts from the moment the collective starts on the GPU,
// so compute queued ahead of it on the stream is not charged to it. A
// collective still running `timeout` after it started, or an asynchronous
// error NCCL reports (ncclCommGetAsyncError), makes the watchdog abort the
// communicator (ncclCommAbort), which ends the hung kernels, so a stream a
// caller synchronises on drains; every later call, and Synchronize, return
// the error naming the collective, its sequence number, rank, host and
// device. NCCL does not say which peer failed; the message says so.
//
// Environment: NCCL_NVLS_ENABLE=0 is expected (NVLink multicast, NVLS, can
// take the GPUs of a shared host out of service). Unset, it is set to 0
// before NCCL starts; set to anything else, creation fails unless
// NcclOptions::allow_nvlink_multicast.
//
// Thread-safety: as Communicator (one thread at a time); the watchdog is
// internal. The calling thread's current CUDA device is set to
// NcclOptions::device by every call.
#ifndef FTUNE_WORKER_COMM_NCCL_COMMUNICATOR_H_
#define FTUNE_WORKER_COMM_NCCL_COMMUNICATOR_H_

#include <chrono>
#include <memory>
#include <string>

#include "worker/comm/communicator.h"
#include "worker/comm/rendezvous.h"
#include "ftune/status.h"

namespace ftune::comm {

struct NcclOptions {
  // CUDA device ordinal of this rank; -1: the calling thread's current one.
  int device = -1;
  // Bound on every collective, from its start on the GPU.
  std::chrono::milliseconds timeout = std::chrono::minutes(5);
  // Bound on the rendezvous and on ncclCommInitRankConfig; 0: `timeout`.
  std::chrono::milliseconds setup_timeout{0};
  // Let a NCCL_NVLS_ENABLE other than 0 through (see above).
  bool allow_nvlink_multicast = false;
};

// Builds this rank's communicator; every rank of `rendezvous` calls it.
Status CreateNcclCommunicator(Rendezvous& rendezvous,
                              const NcclOptions& options,
                              std::unique_ptr<Communicator>* out);

// Number of CUDA devices this process sees; 0 with the reason in *why when
// there is no driver or device. Initialises CUDA: a launcher that forks
// ranks afterwards must ask in a child process instead.
int CudaDeviceCount(std::string* why);

}  // namespace ftune::comm

#endif  // FTUNE_WORKER_COMM_NCCL_COMMUNICATOR_H_
