// FSDP for QLoRA: the frozen model sharded across the ranks of a job, the
// LoRA adapters and their gradients sharded ZeRO-style (issue 4, "Sharding").
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
// exactly the elements it owns.
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
// Double quantization. bitsandbytes' nested offset is the mean of the WHOLE
// tensor's block absmax, summed in torch's CUDA reduction order
// (kernels/nf4.h), which no combination of per-rank partial sums
// reproduces bit for bit. So loading all-gathers each nested tensor's fp32
// absmax (numel / 16 bytes, one tensor at a time), and every rank runs the
// same double quantization on the same whole vector and keeps its slice:
// the gathered bytes are identical to QuantizeNf4Weight of the whole tensor
// (tests/fsdp/fsdp_test.cc, FsdpNf4BytesTest, checks it byte for byte).
//
// Loading (LoadShardedModel). Each rank reads only its element range of
// each tensor with pread (SafetensorsModel::ReadElements: nothing is mapped,
// so no file pages count in RSS; the page cache is the kernel's), converts
// it to the compute dtype and quantizes it, one tensor at a time. Peak host
// RSS is its shard plus about one tensor's share; LoadStats reports it.
// glibc keeps freed chunks below its (adaptive) mmap threshold in the heap,
// which would let the temporaries of successive tensors pile up in RSS, so
// the loader hands free heap pages back (malloc_trim) after each tensor.
// Before any data moves, the ranks compare their unit layouts (and
// ShardedLora its flat layout): a rank given another model or options fails
// with FAILED_PRECONDITION instead of running mismatched collectives.
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
// LoRA (ShardedLora). The adapters stay whole on every rank for the forward
// (they are small); the flat fp32 vector of them in LoraParameters() order,
// padded to world * shard_numel, is split evenly: rank r's shard is what the
// optimizer updates, and GatherParams all-gathers the shards back into the
// adapters. Gradients are summed over ranks (the train loop scales each
// micro-batch loss by 1/global_tokens) layer by layer during backward: a
// hook on each LoRA tensor adds its gradient into its decoder layer's span
// of the flat vector, and once a layer's tensors all have theirs, the span
// is reduced onto the ranks that own it (one Reduce per owner: a
// reduce-scatter with uneven chunks) and added to the rank's accumulated
// shard gradient. With NCCL that runs on the communicator's background
// stream while backward goes on through the layers below; with Gloo it runs
// in the hook. ReduceGradients reduces the spans still open (tensors that
// got no gradient contribute zeros) and hands the shard gradient over.
//
// Thread-safety: one thread at a time (the rank's training thread; the
// communicator's rule). The Communicator must outlive the model and the
// ShardedLora.
#ifndef FTUNE_WORKER_TRAINER_FSDP_H_
#define FTUNE_WORKER_TRAINER_FSDP_H_

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

namespace internal {
class CollectiveClock;  // fsdp.cc
}

struct LoadStats {
  int64_t peak_rss_bytes = 0;   // VmHWM at the end of loading (the mark is reset at its start)
  int64_t start_rss_bytes = 0;  // VmRSS when loading started
  int64_t end_rss_bytes = 0;    // VmRSS when it returned
  int64_t shard_bytes = 0;      // this rank's frozen shards, all units
  int64_t largest_tensor_bytes = 0;  // the largest tensor in the compute dtype (the bound's "one tensor")
  int64_t read_bytes = 0;       // bytes this rank read from the safetensors files
  int64_t unit_count = 0;
  double seconds = 0;
};

// load -> quantize -> shard for one rank. comm == nullptr or comm->size() ==
// 1: whole units on this rank, same math as LlamaModel::Load. Reads only
// this rank's byte ranges of the safetensors files. Every rank of `comm`
// must call it with the same arguments. A collective failure returns its
// Status (code kept, message prefixed with what was being loaded).
Result<std::unique_ptr<LlamaModel>> LoadShardedModel(const std::string& model_dir,
                                                    const ModelOptions& options,
                                                    const FsdpOptions& fsdp,
                                                    comm::Communicator* comm,
                                                    LoadStats* stats = nullptr);

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

// One rank's quantized part of an NF4 tensor, each piece padded to the
// geometry's piece size (uint8 tensors of exactly the *PieceBytes above).
struct Nf4ShardPieces {
  at::Tensor packed;   // uint8 (PackedPieceBytes)
  at::Tensor absmax;   // uint8 (AbsmaxPieceBytes): fp32 values when not nested
  at::Tensor absmax2;  // uint8 (Absmax2PieceBytes), fp32 values; undefined when not nested
  at::Tensor offset;   // fp32 (1), the whole tensor's nested offset; undefined when not nested
};

// Quantizes this rank's elements `part` (1-D, ElementEnd - ElementBegin of
// `rank`, compute dtype, on the device) of an NF4 tensor. Nested: all-gathers
// the fp32 block absmax of the tensor over `comm` (a collective: every rank
// calls it, in the same order) and double-quantizes the whole vector. `name`
// names the tensor in errors. comm may be nullptr when g.world == 1.
Result<Nf4ShardPieces> QuantizeNf4Part(const at::Tensor& part, const Nf4ShardGeometry& g,
                                       int rank, comm::Communicator* comm,
                                       const std::string& name);

// The whole Nf4Weight of shape (out, in) from every rank's pieces (an
// AllGather per segment), the inverse of QuantizeNf4Part. For tests and
// consolidation; the training path gathers whole units instead.
Result<Nf4Weight> GatherNf4Pieces(const Nf4ShardPieces& mine, const Nf4ShardGeometry& g,
                                  int64_t out_features, int64_t in_features,
                                  comm::Communicator* comm);

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

// LoRA parameters + their gradients, sharded (ZeRO-style flat fp32 vector in
// LoraParameters() order, padded to world * shard_numel; rank r owns
// [r * shard_numel, (r + 1) * shard_numel)).
class ShardedLora {
 public:
  // The model's adapters must be attached (FAILED_PRECONDITION otherwise);
  // rank 0's values are broadcast so every rank starts from the same ones.
  // comm == nullptr: one rank.
  static Result<std::unique_ptr<ShardedLora>> Create(LlamaModel* model, comm::Communicator* comm);

  at::Tensor shard() const { return shard_; }  // fp32 1-D leaf, what AdamW updates;
                                              // .grad() defined after ReduceGradients
  int64_t total_numel() const { return total_numel_; }
  int64_t shard_begin() const { return rank_ * shard_numel_; }
  int64_t shard_numel() const { return shard_numel_; }

  // The train loop scales each micro-batch loss by 1/global_tokens before
  // backward, so gradients are SUMMED over ranks. After the step's last
  // backward: reduces the spans still open (see the file comment; a tensor
  // without a gradient contributes zeros), waits for the reductions the
  // hooks started, and adds this rank's reduced gradients since the last
  // call into shard().grad() (like autograd accumulation); the full LoRA
  // grads are then released. One rank: the full gradients are the shard's.
  Status ReduceGradients();
  // Global L2 norm over all shards (every rank gets the same double: the
  // per-rank sums of squares are gathered and added in rank order); clips
  // shard().grad() by min(1, max_norm / (norm + 1e-6)) as torch does; returns
  // the norm before clipping (HF semantics, optim.h).
  Result<double> ClipGradNorm(double max_norm);
  Result<double> GradNorm();
  // After the optimizer step: shards -> every rank's LoRA tensors used in
  // forward.
  Status GatherParams();
  // Seconds the gradient reductions took (device time on CUDA, see
  // "Timing") and the part of it compute waited for in ReduceGradients.
  double reduce_scatter_seconds();
  double reduce_scatter_exposed_seconds();

  ~ShardedLora();
  ShardedLora(const ShardedLora&) = delete;
  ShardedLora& operator=(const ShardedLora&) = delete;

  struct Entry {
    std::string name;
    int64_t offset = 0;
    int64_t numel = 0;
    std::vector<int64_t> shape;
  };
  const std::vector<Entry>& layout() const { return layout_; }  // PEFT names, flat offsets

 private:
  ShardedLora() = default;
  Result<at::Tensor> FullFlat(bool grads) const;
  // A decoder layer's adapters: a span [begin, end) of the flat vector.
  struct Span {
    int64_t begin = 0, end = 0;
    size_t first = 0, count = 0;  // entries [first, first + count) of layout()
    std::vector<bool> seen;       // which entries have a gradient this round
    size_t remaining = 0;
    at::Tensor staged;            // fp32 [end - begin] on the comm device; undefined = none yet
  };
  void OnGrad(size_t entry, const at::Tensor& grad);  // a LoRA tensor's hook
  Status ReduceSpan(size_t span);

  std::vector<Span> spans_;
  std::vector<size_t> span_of_;   // layout index -> span
  std::vector<unsigned> hooks_;   // hook handles, params_ order
  bool per_span_ = false;         // more than one rank: reduce during backward
  at::Tensor acc_;                // fp32 [shard_numel] reduced gradients since ReduceGradients
  std::vector<int64_t> marks_;    // device-timed reductions not yet waited for
  FsdpUnits* units_ = nullptr;

  LlamaModel* model_ = nullptr;
  comm::Communicator* comm_ = nullptr;
  int world_ = 1;
  int rank_ = 0;
  int64_t total_numel_ = 0;
  int64_t shard_numel_ = 0;
  std::vector<Entry> layout_;
  std::vector<at::Tensor> params_;  // the model's LoRA tensors, layout() order
  at::Tensor shard_;
  c10::Device comm_device_ = c10::Device(c10::DeviceType::CPU);
  std::shared_ptr<internal::CollectiveClock> clock_;
};

}  // namespace ftune::trainer

#endif  // FTUNE_WORKER_TRAINER_FSDP_H_
