// FSDP units: the frozen model sharded across the ranks of a job, gathered
// unit by unit around its use (gather -> compute -> free), prefetched, and
// re-gathered in backward. LoadShardedModel (fsdp_load.h) builds the shards
// and installs the FsdpUnits on the model; ShardedLora (fsdp_lora.h) shards
// the trainable state.
//
// Units. One FSDP unit per decoder layer, plus one for the embedding and one
// for the final norm + lm_head (LlamaModel's unit numbering, model.h). A
// unit's frozen storage on a rank is ONE flat byte buffer, its shard: for
// every tensor of the unit, in order, this rank's piece of each of its
// segments, each piece at a 64-byte aligned offset:
//   NF4 projection: packed codes | absmax (uint8 codes when nested, else
//                   fp32) | absmax2 (fp32, nested only)
//   dense tensor (embedding, norms, lm_head, unquantized projections):
//                   its elements in the compute dtype
// Every tensor is split evenly over the ranks at quantization-block
// boundaries: rank r owns blocks [r * P, (r + 1) * P) of the row-major
// flattened weight, P = ceil(num_blocks / world) rounded up to a multiple of
// 256 blocks (64 * 256 elements) when nested, so that the nested statistics
// split at the same boundaries; the last ranks' pieces are padded (possibly
// entirely padding). Dense tensors split by elements, ceil(numel / world).
// So every rank's shard of a unit has the same size, and a rank quantizes
// exactly the elements it owns (Nf4ShardGeometry below).
//
// Where the shards live: on the communicator's device (the GPU for NCCL,
// the host for Gloo), or with FsdpOptions::offload_params in host memory
// (pinned when the model is on a GPU, so the copy in is asynchronous). The
// gathered units are always on the model's device. (The trainable state's
// placement: fsdp_lora.h.)
//
// The gathered buffer holds each segment's world pieces back to back, so
// each tensor's bytes are contiguous and the layers use views into it. A
// decoder layer (23 segments) is gathered with ONE AllGather of the rank's
// shard into a rank-major staging buffer, then one strided copy per segment
// (the staging is freed at once: the gather briefly needs twice the unit, as
// FSDP2's copy-out does), which saves 22 collective latencies per layer.
// The embedding and head units (one or two segments, but vocab x hidden
// dense) are gathered segment by segment straight into place, without
// staging. Releasing drops the gathered buffer. With one rank the gathered
// layout is the shard itself (no copy, no staging).
//
// Forward/backward: the model calls UnitHooks (model.h) around each unit;
// FsdpUnits implements them: Gather = the all-gather above (after copying
// an offloaded shard to the device), Release = drop the gathered
// buffer (reshard_after_forward decides for the forward phase). Collectives
// run on the compute stream (c10's current stream). Prefetch
// (FsdpOptions::prefetch) gathers the unit the model announces next while
// the current one computes (at most one prefetch in flight; two units plus
// a staging buffer resident):
//   Gloo: on a background thread, joined before any other collective of the
//     engine so the communicator still sees one thread at a time;
//   NCCL: on a second (high-priority) CUDA stream that first waits for the
//     compute stream, so the communicator's collectives keep one order on
//     the device; the unit's Gather makes the compute stream wait for it,
//     and records the compute stream on the buffer for the allocator.
//
// Timing. Every unit gather is timed: on CUDA by events on its stream
// (device time), on Gloo by the host. "Busy" is the gathers' own time;
// "exposed" the part compute waited for: all of a gather on the compute
// stream, and of a prefetched one only what was left when the compute
// stream reached its Gather (an event recorded there). Busy - exposed is
// the communication hidden behind compute. ShardedLora times its
// reduce-scatters the same way.
// Collective failures throw c10::Error carrying the collective's Status text.
// FSDP wants ModelOptions::activation_checkpointing: without it autograd
// keeps the gathered buffers it saved alive until backward (correct, but
// every unit stays in memory).
//
// Thread-safety: one thread at a time (the rank's training thread; the
// communicator's rule). The Communicator must outlive the model.
#ifndef FTUNE_WORKER_TRAINER_FSDP_UNITS_H_
#define FTUNE_WORKER_TRAINER_FSDP_UNITS_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "worker/comm/communicator.h"
#include "worker/trainer/model.h"
#include "worker/trainer/nf4_linear.h"
#include "ftune/status.h"
#include "worker/config/options.h"

namespace ftune::trainer {

// FsdpOptions (worker/config/options.h) is one struct for the whole of
// FSDP: LoadShardedModel hands it to the FsdpUnits it installs, and
// ShardedLora::Create reads it back from them (FsdpUnits::options), so the
// units and the LoRA state cannot disagree.

// Where a rank's part of one NF4 tensor lies (see the file comment).
struct Nf4ShardGeometry {
  int64_t numel = 0;
  int64_t blocksize = 64;
  bool nested = true;
  int world = 1;
  int64_t num_blocks = 0;
  int64_t blocks_per_rank = 0;  // P: padded, a multiple of 256 when nested

  static Nf4ShardGeometry Make(int64_t numel, const Nf4Options& options, int world);
  int64_t BlockBegin(int rank) const;  // clamped to num_blocks
  int64_t BlockEnd(int rank) const;
  int64_t ElementBegin(int rank) const;  // clamped to numel
  int64_t ElementEnd(int rank) const;
  // Bytes of each rank's piece (padded), per segment.
  int64_t PackedPieceBytes() const { return blocks_per_rank * blocksize / 2; }
  int64_t AbsmaxPieceBytes() const { return blocks_per_rank * (nested ? 1 : 4); }
  int64_t Absmax2PieceBytes() const { return nested ? blocks_per_rank / 256 * 4 : 0; }
};

// The UnitHooks of a sharded model (installed by LoadShardedModel). Tests
// and tools reach it through FsdpUnitsOf to gather a unit by hand.
class FsdpUnits : public UnitHooks {
 public:
  ~FsdpUnits() override = default;
  // Status forms of Gather/Release (the hooks throw instead).
  virtual Status GatherUnit(int64_t unit) = 0;
  virtual void ReleaseUnit(int64_t unit) = 0;
  virtual bool resident(int64_t unit) const = 0;
  virtual int64_t num_units() const = 0;
  virtual int64_t shard_bytes(int64_t unit) const = 0;     // this rank's shard of the unit
  virtual int64_t gathered_bytes(int64_t unit) const = 0;  // the unit once gathered
  virtual int64_t gathers() const = 0;  // units gathered with collectives so far
  // Bytes those gathers received from other ranks, and the host time spent
  // in them (for NCCL: enqueueing only; the device time needs events).
  virtual int64_t gathered_bytes_total() const = 0;
  virtual double gather_seconds() const = 0;
  // Gathers served by a prefetch (FsdpOptions::prefetch).
  virtual int64_t prefetch_hits() const = 0;
  // Seconds of the gathers so far and the part compute waited for (see
  // "Timing"); waits for the timed gathers to finish.
  virtual double gather_busy_seconds() = 0;
  // Waits for a Gloo prefetch thread's collective, so that another thread
  // (autograd's, in ShardedLora's gradient hooks) may use the communicator.
  virtual void WaitForPrefetch() = 0;
  virtual double gather_exposed_seconds() = 0;
  virtual const FsdpOptions& options() const = 0;
};

// nullptr when the model is not sharded (no FsdpUnits installed).
FsdpUnits* FsdpUnitsOf(const LlamaModel& model);

namespace internal {

// What LoadShardedModel describes and fills, and the units run on.

// One segment of a unit: a piece per rank, gathered back to back.
struct Segment {
  int64_t piece_bytes = 0;
  int64_t shard_offset = 0;     // in this rank's shard
  int64_t gathered_offset = 0;  // in the gathered buffer (world * piece_bytes there)
};

struct UnitTensor {
  std::string name;
  std::vector<int64_t> shape;
  int64_t numel = 0;
  bool nf4 = false;
  // NF4.
  Nf4ShardGeometry geo;
  Nf4Linear* linear = nullptr;
  at::Tensor offset;  // fp32 (1) on the model's device, nested only
  int seg_packed = -1, seg_absmax = -1, seg_absmax2 = -1;
  // Dense: where the gathered view goes (the embedding is also lm_head when tied).
  std::vector<at::Tensor*> targets;
  int seg_dense = -1;
};

struct Unit {
  std::string name;
  std::vector<UnitTensor> tensors;
  std::vector<Segment> segments;
  int64_t shard_bytes = 0;
  int64_t gathered_bytes = 0;
  at::Tensor shard;     // uint8 (shard_bytes)
  at::Tensor gathered;  // uint8 (gathered_bytes) while resident
  bool resident = false;
  bool comm_stream_buffer = false;  // gathered by the NCCL prefetch (on its stream)
};

// Lays out the unit's segments once its tensors are listed (`dtype`: the
// compute dtype of its dense tensors).
void LayoutUnit(Unit& u, int world, c10::ScalarType dtype);

// The hooks over `units` (laid out, shards filled), for
// LlamaModel::set_unit_hooks. `tied`: the head unit uses the embedding's.
std::shared_ptr<FsdpUnits> MakeFsdpUnits(LlamaModel* model, comm::Communicator* comm,
                                         const FsdpOptions& options, bool tied,
                                         std::vector<Unit> units);

}  // namespace internal
}  // namespace ftune::trainer

#endif  // FTUNE_WORKER_TRAINER_FSDP_UNITS_H_
