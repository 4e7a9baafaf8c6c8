// FSDP units: gather -> compute -> free, prefetch, re-gather in backward;
// see fsdp_units.h for the design.
#include "worker/trainer/fsdp_units.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <deque>
#include <future>
#include <utility>

#if FTUNE_FSDP_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "worker/trainer/fsdp_common.h"
#include "worker/trainer/fsdp_streams.h"
#include "worker/trainer/profiler.h"

namespace ftune::trainer {
namespace internal {
namespace {

constexpr int64_t kAlign = 64;  // bytes; every segment starts at a multiple
// Units with at most this many segments are gathered segment by segment
// (no staging); larger ones with one collective and a copy-out (fsdp_units.h).
constexpr int64_t kMaxDirectSegments = 2;

class FsdpUnitsImpl final : public FsdpUnits {
 public:
  FsdpUnitsImpl(LlamaModel* model, comm::Communicator* comm, FsdpOptions options, bool tied,
                std::vector<Unit> units)
      : model_(model),
        comm_(comm),
        options_(options),
        world_(comm == nullptr ? 1 : comm->size()),
        rank_(comm == nullptr ? 0 : comm->rank()),
        device_(model->options().device),
        comm_device_(CommDevice(comm, model->options().device)),
        tied_(tied),
        // Gloo collectives block the calling thread, so a thread overlaps
        // them with compute; NCCL enqueues them on a second CUDA stream.
        thread_prefetch_(options.prefetch && comm != nullptr && comm->size() > 1 &&
                         comm->backend() == "gloo"),
        stream_prefetch_(kCudaStreams && options.prefetch && comm != nullptr &&
                         comm->size() > 1 && comm->backend() == "nccl"),
        units_(std::move(units)) {}

  // --- FsdpUnits
  Status GatherUnit(int64_t unit) override {
    if (unit < 0 || unit >= num_units()) {
      return OutOfRangeError("FSDP unit " + std::to_string(unit) + " of " +
                             std::to_string(num_units()));
    }
    if (tied_ && unit == model_->head_unit()) {
      FTUNE_RETURN_IF_ERROR(GatherOne(LlamaModel::kEmbeddingUnit));
    }
    return GatherOne(unit);
  }

  void ReleaseUnit(int64_t unit) override {
    if (unit < 0 || unit >= num_units()) return;
    ReleaseOne(unit);
    if (tied_ && unit == model_->head_unit()) ReleaseOne(LlamaModel::kEmbeddingUnit);
  }

  bool resident(int64_t unit) const override { return units_.at(unit).resident; }
  int64_t num_units() const override { return static_cast<int64_t>(units_.size()); }
  int64_t shard_bytes(int64_t unit) const override { return units_.at(unit).shard_bytes; }
  int64_t gathered_bytes(int64_t unit) const override { return units_.at(unit).gathered_bytes; }
  int64_t gathers() const override { return gathers_; }
  int64_t gathered_bytes_total() const override { return gathered_bytes_total_; }
  double gather_seconds() const override { return gather_seconds_; }
  int64_t prefetch_hits() const override { return prefetch_hits_; }
  void WaitForPrefetch() override { JoinPrefetch(); }
  double gather_busy_seconds() override { return clock_.busy(); }
  double gather_exposed_seconds() override { return clock_.exposed(); }
  const FsdpOptions& options() const override { return options_; }

  // --- UnitHooks
  void Gather(int64_t unit, UnitPhase phase) override {
    FTUNE_RANGE("ftune::fsdp_gather");
    const Status s = GatherUnit(unit);
    TORCH_CHECK(s.ok(), "FSDP gather of unit ", unit, " (",
                unit >= 0 && unit < num_units() ? units_[unit].name : std::string("?"), ", ",
                phase == UnitPhase::kBackward ? "backward" : "forward", "): ", s.ToString());
  }

  void Release(int64_t unit, UnitPhase phase) override {
    // SHARD_GRAD_OP keeps a unit from its forward to its backward.
    if (phase == UnitPhase::kForward && !options_.reshard_after_forward) return;
    ReleaseUnit(unit);
  }

  // With FsdpOptions::prefetch on Gloo: gathers `unit` on a background
  // thread while the caller computes; its Gather then only waits for it.
  void Prefetch(int64_t unit, UnitPhase phase) override {
    if (unit < 0 || unit >= num_units() || units_[unit].resident) return;
#if FTUNE_FSDP_CUDA
    if (stream_prefetch_) {
      StreamPrefetch(unit);
      return;
    }
#endif
    if (!thread_prefetch_) return;
    if (pending_unit_ == unit || (prefetched_ != nullptr && prefetched_unit_ == unit)) return;
    JoinPrefetch();
    prefetched_.reset();  // an unclaimed prefetch (never expected) is dropped
    prefetched_unit_ = -1;
    pending_unit_ = unit;
    const Unit* u = &units_[unit];
    pending_ = std::async(std::launch::async, [this, u] { return Fetch(*u, nullptr); });
  }

  ~FsdpUnitsImpl() override {
    // A prefetch still in flight (after an exception) must not outlive us.
    JoinPrefetch();
#if FTUNE_FSDP_CUDA
    DropInFlight();
    for (cudaEvent_t e : released_) cudaEventDestroy(e);
#endif
  }

 private:
  // A unit's gathered buffer and what fetching it cost; built without
  // touching the model, so a prefetch thread can build it.
  struct Fetched {
    at::Tensor gathered;
    int64_t bytes_received = 0;
    double seconds = 0;
  };

  // Gathers u on `stream` (tensor work on c10's current stream, which the
  // NCCL prefetch sets to the same stream).
  Result<Fetched> Fetch(const Unit& u, comm::StreamHandle stream) const {
    Fetched f;
    // Offloaded shards are copied in first (pinned host memory on CUDA, so
    // the copy is asynchronous on the current stream).
    at::Tensor src = u.shard.device() == comm_device_ ? u.shard
                                                     : u.shard.to(comm_device_, /*non_blocking=*/true);
    if (world_ == 1) {
      f.gathered = src;  // the gathered layout is the shard's
    } else {
      const auto t0 = std::chrono::steady_clock::now();
      f.gathered = at::empty({u.gathered_bytes}, U8(comm_device_));
      if (static_cast<int64_t>(u.segments.size()) <= kMaxDirectSegments) {
        // Few segments (the embedding, the head: huge dense tensors): one
        // collective each, straight into place, no staging.
        for (size_t i = 0; i < u.segments.size(); ++i) {
          const Segment& s = u.segments[i];
          const Status st = AllGatherBytes(comm_, src, f.gathered, s.piece_bytes, s.shard_offset,
                                           s.gathered_offset, stream);
          if (!st.ok()) {
            return Prefixed(st, "FSDP unit '" + u.name + "' segment " + std::to_string(i) +
                                    " all-gather on " + Where(rank_, world_));
          }
        }
      } else {
        // Many segments (a decoder layer has 23): one collective for the
        // whole unit into a rank-major staging buffer, then one strided copy
        // per segment to its contiguous place.
        at::Tensor staging = at::empty({u.shard_bytes * world_}, U8(comm_device_));
        const Status st = AllGatherBytes(comm_, src, staging, u.shard_bytes, 0, 0, stream);
        if (!st.ok()) {
          return Prefixed(st, "FSDP unit '" + u.name + "' all-gather on " + Where(rank_, world_));
        }
        for (const Segment& s : u.segments) {
          f.gathered.narrow(0, s.gathered_offset, s.piece_bytes * world_)
              .view({world_, s.piece_bytes})
              .copy_(staging.as_strided({world_, s.piece_bytes}, {u.shard_bytes, 1},
                                        s.shard_offset));
        }
      }
      f.bytes_received = (u.gathered_bytes / world_) * (world_ - 1);
      f.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    if (f.gathered.device() != device_) f.gathered = f.gathered.to(device_);
    return f;
  }

#if FTUNE_FSDP_CUDA
  // NCCL prefetch: gathers `unit` on the communicator's lane, which first
  // waits for everything enqueued on the compute stream so far (so the
  // collectives keep one order, and memory the compute stream freed is not
  // written early). The buffers are allocated on the lane's stream; the
  // claim records the compute stream on the gathered buffer so the caching
  // allocator does not hand it back to the lane while it is read.
  void StreamPrefetch(int64_t unit) {
    if (inflight_.unit == unit) return;
    DropInFlight();  // an unclaimed prefetch (never expected)
    // Rate limit (torch FSDP's limit_all_gathers): the host runs ahead of
    // the GPU, and each prefetch would take a new buffer while the released
    // ones still wait for the compute stream. Wait until the GPU has passed
    // all but the latest release, so at most about three gathered units
    // (current, prefetched, one being freed) exist.
    while (released_.size() > 1) {
      cudaEventSynchronize(released_.front());
      cudaEventDestroy(released_.front());
      released_.pop_front();
    }
    const c10::cuda::CUDAStream compute = c10::cuda::getCurrentCUDAStream(device_.index());
    CommLane& lane = LaneFor(comm_, device_);
    const cudaStream_t comm = lane.stream.stream();
    LaneAfterCompute(lane, compute.stream());
    inflight_.unit = unit;
    {
      c10::cuda::CUDAStreamGuard guard(lane.stream);
      inflight_.mark = clock_.Begin(comm, /*background=*/true);
      inflight_.result = Fetch(units_[unit], comm);
      clock_.End(inflight_.mark, comm);
    }
    cudaEventCreateWithFlags(&inflight_.done, cudaEventDisableTiming);
    cudaEventRecord(inflight_.done, comm);
    LaneMarkTail(lane);
  }

  // The compute stream waits for the prefetch; returns its buffers.
  Result<Fetched> ClaimInFlight() {
    const c10::cuda::CUDAStream compute = c10::cuda::getCurrentCUDAStream(device_.index());
    clock_.Need(inflight_.mark, compute.stream());
    cudaStreamWaitEvent(compute.stream(), inflight_.done, 0);
    cudaEventDestroy(inflight_.done);
    Result<Fetched> f = std::move(inflight_.result);
    inflight_ = InFlight();
    if (f.ok() && f->gathered.defined()) f->gathered.record_stream(c10::Stream(compute));
    return f;
  }

  void DropInFlight() {
    if (inflight_.unit < 0) return;
    (void)ClaimInFlight();
  }
#endif

  // Waits for the prefetch in flight, if any; its result stays parked in
  // prefetched_ for the Gather that wants it (or is dropped by the next
  // prefetch). Every collective of this engine first calls it, so the
  // communicator is used by one thread at a time.
  void JoinPrefetch() {
    if (!pending_.valid()) return;
    try {
      prefetched_ = std::make_unique<Result<Fetched>>(pending_.get());
    } catch (const std::exception& e) {
      prefetched_ = std::make_unique<Result<Fetched>>(
          InternalError("FSDP prefetch of unit " + std::to_string(pending_unit_) + ": " + e.what()));
    }
    prefetched_unit_ = pending_unit_;
    pending_unit_ = -1;
  }

  Status GatherOne(int64_t unit) {
    Unit& u = units_[unit];
    if (u.resident) return OkStatus();
    const auto t0 = std::chrono::steady_clock::now();
    JoinPrefetch();
    Result<Fetched> f = InternalError("unreachable");
    bool device_timed = false;
#if FTUNE_FSDP_CUDA
    if (stream_prefetch_ && inflight_.unit == unit) {
      f = ClaimInFlight();
      ++prefetch_hits_;
      device_timed = true;
      u.comm_stream_buffer = true;
    } else if (comm_ != nullptr && comm_->backend() == "nccl" && world_ > 1) {
      // On the compute stream, after whatever the lane still runs (a
      // prefetch, the tied head's embedding, LoRA reductions): one
      // communicator's collectives stay in one order on the device.
      const cudaStream_t compute = c10::cuda::getCurrentCUDAStream(device_.index()).stream();
      ComputeAfterLane(LaneFor(comm_, device_), compute);
      const int64_t mark = clock_.Begin(compute, /*background=*/false);
      f = Fetch(u, compute);
      clock_.End(mark, compute);
      device_timed = true;
    } else
#endif
    if (prefetched_ != nullptr && prefetched_unit_ == unit) {
      f = std::move(*prefetched_);
      prefetched_.reset();
      prefetched_unit_ = -1;
      ++prefetch_hits_;
    } else {
      // Another unit's prefetch stays parked (the tied head gathers the
      // embedding first, then claims its own prefetch).
      f = Fetch(u, CurrentStream(device_));
    }
    if (!f.ok()) return f.status();
    if (world_ > 1) {
      ++gathers_;
      gathered_bytes_total_ += f->bytes_received;
      gather_seconds_ += f->seconds;
      if (!device_timed) {
        // Host-timed (Gloo): busy is the gather's own time, exposed the
        // time this thread waited for it here.
        clock_.Add(f->seconds,
                   std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      }
    }
    u.gathered = f->gathered;
    Materialize(u);
    u.resident = true;
    return OkStatus();
  }

  void ReleaseOne(int64_t unit) {
    Unit& u = units_[unit];
    if (!u.resident) return;
    for (UnitTensor& t : u.tensors) {
      if (t.nf4) {
        t.linear->ReleaseWeight();
      } else {
        for (at::Tensor* target : t.targets) *target = at::Tensor();
      }
    }
    u.gathered = at::Tensor();
    u.resident = false;
#if FTUNE_FSDP_CUDA
    if (u.comm_stream_buffer) {
      // The buffer returns to the prefetch stream's pool once the compute
      // stream has passed this point (record_stream); StreamPrefetch waits
      // on these marks so the host cannot run ahead and gather more units.
      cudaEvent_t freed = nullptr;
      if (cudaEventCreateWithFlags(&freed, cudaEventDisableTiming) == cudaSuccess) {
        cudaEventRecord(freed, c10::cuda::getCurrentCUDAStream(device_.index()).stream());
        released_.push_back(freed);
      }
    }
#endif
    u.comm_stream_buffer = false;
  }

  at::Tensor View(const Unit& u, int seg, int64_t bytes, c10::ScalarType dtype) const {
    at::Tensor b = u.gathered.narrow(0, u.segments[seg].gathered_offset, bytes);
    return dtype == at::kByte ? b : b.view(dtype);
  }

  void Materialize(Unit& u) {
    const c10::ScalarType dtype = model_->options().dtype;
    for (UnitTensor& t : u.tensors) {
      if (t.nf4) {
        Nf4Weight w;
        w.out_features = t.shape[0];
        w.in_features = t.shape[1];
        w.blocksize = t.geo.blocksize;
        w.packed = View(u, t.seg_packed, kernels::Nf4PackedBytes(t.numel), at::kByte);
        const int64_t nb = t.geo.num_blocks;
        if (t.geo.nested) {
          w.absmax = View(u, t.seg_absmax, nb, at::kByte);
          w.nested_absmax =
              View(u, t.seg_absmax2, kernels::Nf4NumNestedBlocks(nb) * 4, at::kFloat);
          w.offset = t.offset;
        } else {
          w.absmax = View(u, t.seg_absmax, nb * 4, at::kFloat);
        }
        t.linear->SetWeight(std::move(w));
      } else {
        at::Tensor v = View(u, t.seg_dense, t.numel * c10::elementSize(dtype), dtype).view(t.shape);
        for (at::Tensor* target : t.targets) *target = v;
      }
    }
  }

  LlamaModel* model_;
  comm::Communicator* comm_;
  FsdpOptions options_;
  int world_;
  int rank_;
  c10::Device device_;
  c10::Device comm_device_;
  bool tied_;
  const bool thread_prefetch_;
  const bool stream_prefetch_;
  std::vector<Unit> units_;
  CollectiveClock clock_;
#if FTUNE_FSDP_CUDA
  // The NCCL prefetch: at most one unit gathered on the lane and not
  // yet claimed by its Gather (which makes the compute stream wait on done).
  struct InFlight {
    int64_t unit = -1;
    Result<Fetched> result = InternalError("no prefetch");
    cudaEvent_t done = nullptr;
    int64_t mark = -1;
  };
  InFlight inflight_;
  // Compute-stream marks where prefetched buffers were released, oldest first.
  std::deque<cudaEvent_t> released_;
#endif
  // At most one prefetch in flight (pending_) and one finished but not yet
  // claimed by its Gather (prefetched_).
  std::future<Result<Fetched>> pending_;
  int64_t pending_unit_ = -1;
  std::unique_ptr<Result<Fetched>> prefetched_;
  int64_t prefetched_unit_ = -1;
  int64_t gathers_ = 0;
  int64_t prefetch_hits_ = 0;
  int64_t gathered_bytes_total_ = 0;
  double gather_seconds_ = 0;
};

}  // namespace

void LayoutUnit(Unit& u, int world, c10::ScalarType dtype) {
  int64_t so = 0, go = 0;
  auto add = [&](int64_t piece) {
    Segment s;
    s.piece_bytes = piece;
    s.shard_offset = so;
    s.gathered_offset = go;
    so = AlignUp(so + piece, kAlign);
    go = AlignUp(go + piece * world, kAlign);
    u.segments.push_back(s);
    return static_cast<int>(u.segments.size()) - 1;
  };
  const int64_t esize = c10::elementSize(dtype);
  for (UnitTensor& t : u.tensors) {
    if (t.nf4) {
      t.seg_packed = add(t.geo.PackedPieceBytes());
      t.seg_absmax = add(t.geo.AbsmaxPieceBytes());
      if (t.geo.nested) t.seg_absmax2 = add(t.geo.Absmax2PieceBytes());
    } else {
      t.seg_dense = add(CeilDiv(t.numel, world) * esize);
    }
  }
  u.shard_bytes = so;
  u.gathered_bytes = go;
}

std::shared_ptr<FsdpUnits> MakeFsdpUnits(LlamaModel* model, comm::Communicator* comm,
                                         const FsdpOptions& options, bool tied,
                                         std::vector<Unit> units) {
  return std::make_shared<FsdpUnitsImpl>(model, comm, options, tied, std::move(units));
}

}  // namespace internal

// ------------------------------------------------------------ NF4 geometry

namespace {
using internal::AlignUp;
using internal::CeilDiv;
constexpr int64_t kNested = kernels::kNf4NestedBlocksize;
}  // namespace

Nf4ShardGeometry Nf4ShardGeometry::Make(int64_t numel, const Nf4Options& options, int world) {
  Nf4ShardGeometry g;
  g.numel = numel;
  g.blocksize = options.blocksize;
  g.nested = options.double_quant;
  g.world = world;
  g.num_blocks = kernels::Nf4NumBlocks(numel, options.blocksize);
  const int64_t align = g.nested ? kNested : 1;
  g.blocks_per_rank = std::max<int64_t>(1, AlignUp(CeilDiv(g.num_blocks, world), align));
  return g;
}

int64_t Nf4ShardGeometry::BlockBegin(int rank) const {
  return std::min(num_blocks, rank * blocks_per_rank);
}
int64_t Nf4ShardGeometry::BlockEnd(int rank) const {
  return std::min(num_blocks, (rank + 1) * blocks_per_rank);
}
int64_t Nf4ShardGeometry::ElementBegin(int rank) const {
  return std::min(numel, BlockBegin(rank) * blocksize);
}
int64_t Nf4ShardGeometry::ElementEnd(int rank) const {
  return std::min(numel, BlockEnd(rank) * blocksize);
}

FsdpUnits* FsdpUnitsOf(const LlamaModel& model) {
  return dynamic_cast<FsdpUnits*>(model.unit_hooks());
}

}  // namespace ftune::trainer
