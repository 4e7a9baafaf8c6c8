// Small helpers shared by the FSDP files (internal to ftune_fsdp): sizes and
// alignment, where the communicator reads, error texts that name the rank,
// and the two collectives every part uses (a byte all-gather that is a copy
// with one rank, and the check that every rank agrees on a layout before
// any data moves).
//
// Thread-safety: free functions; the collectives follow the communicator's
// rule (one thread at a time).
#ifndef FTUNE_WORKER_TRAINER_FSDP_COMMON_H_
#define FTUNE_WORKER_TRAINER_FSDP_COMMON_H_

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/TensorOptions.h>

#include <cstdint>
#include <string>
#include <vector>

#include "worker/comm/communicator.h"
#include "ftune/status.h"

namespace ftune::trainer::internal {

inline int64_t AlignUp(int64_t x, int64_t a) { return (x + a - 1) / a * a; }
inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline at::TensorOptions U8(c10::Device d) {
  return at::TensorOptions().dtype(at::kByte).device(d);
}

// "rank 1 of 4": every collective error names it.
std::string Where(int rank, int world);

Status Prefixed(const Status& s, const std::string& what);

// The device whose memory the communicator reads: host for Gloo, the
// model's device for NCCL (and for no communicator at all).
c10::Device CommDevice(comm::Communicator* comm, c10::Device model_device);

// An AllGather of `bytes` per rank; with one rank a copy (or nothing).
Status AllGatherBytes(comm::Communicator* comm, const at::Tensor& send, at::Tensor& recv,
                      int64_t bytes, int64_t send_offset, int64_t recv_offset,
                      comm::StreamHandle stream = nullptr);

// Fails unless every rank passes the same values (a fingerprint of what
// the following collectives assume), naming the first rank that differs.
Status CheckSameOnEveryRank(comm::Communicator* comm, c10::Device model_device,
                            const std::vector<int64_t>& mine, const std::string& what);

}  // namespace ftune::trainer::internal

#endif  // FTUNE_WORKER_TRAINER_FSDP_COMMON_H_
