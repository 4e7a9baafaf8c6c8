// Communicator: the collectives FSDP needs, behind one interface with a Gloo
// backend (CPU processes, so every distributed behaviour runs in CI) and an
// NCCL backend (GPUs).
//
// Design notes
// - Buffers are raw pointers + element counts + a DataType: the trainer keeps
//   LibTorch out of this library, and the NCCL backend takes device pointers
//   where the Gloo one takes host pointers.
// - Every collective names a stream. NCCL enqueues on it (a cudaStream_t
//   passed as void*) and returns before the data moves; Synchronize(stream)
//   waits for it. Gloo ignores the stream: its collectives are synchronous.
// - Every collective has a timeout (the backend's options). A peer that died
//   or hung makes the survivors' calls fail, never block: Gloo through its
//   context timeout and closed connections, NCCL through a watchdog that
//   aborts the communicator. The error names the backend, the collective, its
//   sequence number, this rank and, where the transport knows it, the peer:
//     "gloo AllReduce #7 (1000 x fp32, sum) on rank 1 of 3 (host h) failed
//      after 2 ms: lost the connection to a peer (it died, or failed first);
//      peer rank 2; gloo: ..."
// - After one failure a communicator is broken for good: every later call
//   returns kAborted with the first error's text. The caller exits (the agent
//   restarts the gang) or builds a new communicator.
// - All ranks must call the same collectives in the same order with the same
//   counts, dtypes, ops and roots, as with NCCL and MPI.
//
// Shapes (count = elements; esize = DataTypeSize(dtype)):
//   AllGather      send[send_count]           -> recv[send_count * size()]
//                  rank r's send lands at recv + r * send_count; in place
//                  when send == recv + rank() * send_count.
//   ReduceScatter  send[recv_count * size()]  -> recv[recv_count]
//                  rank r gets the reduction of every rank's send chunk r;
//                  in place when recv == send + rank() * recv_count.
//   AllReduce      send[count]                -> recv[count]; send may be recv.
//   Reduce         send[count]                -> recv[count] on `root` only
//                  (other ranks' recv is not touched and may be nullptr);
//                  one call per owner makes an uneven reduce-scatter.
//   Broadcast      buf[count]: root's contents end up in every rank's buf.
//   Barrier        returns once every rank has entered it.
// Uneven shards: callers pad (PaddedShardCount) so every rank's chunk has the
// same count, exactly as FSDP's flat parameters do.
//
// Reductions: kSum, kAvg (sum / size()), kMax. 16-bit floats: the Gloo backend
// accumulates in fp32 and rounds once (nearest-even); NCCL uses its own
// kernels. Integers: sums wrap in the type's width (two's complement), and
// kAvg truncates toward zero, as NCCL does.
//
// Thread-safety: a Communicator is used by one thread at a time (the rank's
// training loop); its collectives are ordered by that thread. rank(), size(),
// backend() and timeout() may be read from any thread. Destroying a
// communicator never blocks longer than its timeout.
#ifndef FTUNE_WORKER_COMM_COMMUNICATOR_H_
#define FTUNE_WORKER_COMM_COMMUNICATOR_H_

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "ftune/status.h"

namespace ftune::comm {

enum class DataType : uint8_t {
  kFloat32,
  kBFloat16,
  kFloat16,
  kUInt8,
  kInt32,
  kInt64,
};

inline constexpr DataType kAllDataTypes[] = {
    DataType::kFloat32, DataType::kBFloat16, DataType::kFloat16,
    DataType::kUInt8,   DataType::kInt32,    DataType::kInt64};

size_t DataTypeSize(DataType dtype);
// "fp32", "bf16", "fp16", "uint8", "int32", "int64".
std::string_view DataTypeName(DataType dtype);
// Inverse of DataTypeName; false for an unknown name.
bool ParseDataType(std::string_view name, DataType* dtype);
bool IsFloatingPoint(DataType dtype);

enum class ReduceOp : uint8_t { kSum, kAvg, kMax };

inline constexpr ReduceOp kAllReduceOps[] = {ReduceOp::kSum, ReduceOp::kAvg,
                                             ReduceOp::kMax};

// "sum", "avg", "max".
std::string_view ReduceOpName(ReduceOp op);

// A device stream: a cudaStream_t for NCCL (nullptr: the legacy default
// stream); ignored by Gloo. void* so that this header needs no CUDA.
using StreamHandle = void*;

// Elements per rank when `total` elements are split evenly over `world`
// ranks, the last ranks padded: ceil(total / world).
inline size_t PaddedShardCount(size_t total, int world) {
  const size_t w = static_cast<size_t>(world);
  return (total + w - 1) / w;
}

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  // "gloo" or "nccl".
  virtual std::string_view backend() const = 0;
  // The per-collective timeout this communicator was built with.
  virtual std::chrono::milliseconds timeout() const = 0;

  virtual Status AllGather(const void* send, void* recv, size_t send_count,
                           DataType dtype, StreamHandle stream) = 0;
  virtual Status ReduceScatter(const void* send, void* recv, size_t recv_count,
                               DataType dtype, ReduceOp op,
                               StreamHandle stream) = 0;
  virtual Status AllReduce(const void* send, void* recv, size_t count,
                           DataType dtype, ReduceOp op,
                           StreamHandle stream) = 0;
  virtual Status Reduce(const void* send, void* recv, size_t count, DataType dtype,
                        ReduceOp op, int root, StreamHandle stream) = 0;
  virtual Status Broadcast(void* buf, size_t count, DataType dtype, int root,
                           StreamHandle stream) = 0;
  // Host-side barrier: returns once every rank has called it and, for NCCL,
  // once the work enqueued on `stream` before it has finished.
  virtual Status Barrier(StreamHandle stream) = 0;
  // Waits until the collectives enqueued on `stream` have finished; returns
  // their error if one failed or timed out. Gloo: returns the sticky error,
  // if any (its collectives have already finished when they return).
  virtual Status Synchronize(StreamHandle stream) = 0;
};

}  // namespace ftune::comm

#endif  // FTUNE_WORKER_COMM_COMMUNICATOR_H_
