// FSDP units, sharded loading and sharded LoRA; see fsdp.h for the design.
#include "worker/trainer/fsdp.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <fcntl.h>
#include <unistd.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <deque>
#include <future>
#include <map>
#include <utility>

#if FTUNE_FSDP_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/random_init_cuda.h"
#endif

#include "ftune/file_util.h"
#include "worker/trainer/fsdp_streams.h"
#include "worker/modelio/init_model.h"
#include "worker/modelio/llama_config.h"
#include "worker/modelio/safetensors.h"
#include "worker/trainer/weights.h"

namespace ftune::trainer {
namespace {

using comm::DataType;
using internal::CollectiveClock;
using internal::CurrentStream;
#if FTUNE_FSDP_CUDA
using internal::CommLane;
using internal::ComputeAfterLane;
using internal::LaneAfterCompute;
using internal::LaneFor;
using internal::LaneMarkTail;
#endif

constexpr int64_t kAlign = 64;  // bytes; every segment starts at a multiple
constexpr int64_t kNested = kernels::kNf4NestedBlocksize;
// Units with at most this many segments are gathered segment by segment
// (no staging); larger ones with one collective and a copy-out (fsdp.h).
constexpr int64_t kMaxDirectSegments = 2;
#if FTUNE_FSDP_CUDA
constexpr bool kCudaStreams = true;
#else
constexpr bool kCudaStreams = false;
#endif

int64_t AlignUp(int64_t x, int64_t a) { return (x + a - 1) / a * a; }
int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

at::TensorOptions U8(c10::Device d) { return at::TensorOptions().dtype(at::kByte).device(d); }

// "on rank 1 of 4": every collective error names it.
std::string Where(int rank, int world) {
  return "rank " + std::to_string(rank) + " of " + std::to_string(world);
}

Status Prefixed(const Status& s, const std::string& what) {
  return Status(s.code(), what + ": " + s.message());
}

// The device whose memory the communicator reads: host for Gloo, the
// model's device for NCCL (and for no communicator at all).
c10::Device CommDevice(comm::Communicator* comm, c10::Device model_device) {
  if (comm != nullptr && comm->backend() == "gloo") return c10::Device(c10::DeviceType::CPU);
  return model_device;
}

// Resets the kernel's peak-RSS mark (VmHWM) to the current RSS, so the next
// reading is the peak since now. Best effort: without it, VmHWM is the peak
// since the process started, which only overstates.
// Returns the heap's free pages to the kernel (see fsdp.h, "Loading").
void TrimHeap() {
#if defined(__GLIBC__)
  malloc_trim(0);
#endif
}

void ResetPeakRss() {
  const int fd = ::open("/proc/self/clear_refs", O_WRONLY | O_CLOEXEC);
  if (fd < 0) return;
  (void)!::write(fd, "5", 1);
  ::close(fd);
}

// An AllGather of `bytes` per rank; with one rank a copy (or nothing).
Status AllGatherBytes(comm::Communicator* comm, const at::Tensor& send, at::Tensor& recv,
                      int64_t bytes, int64_t send_offset, int64_t recv_offset,
                      comm::StreamHandle stream = nullptr) {
  const uint8_t* src = send.data_ptr<uint8_t>() + send_offset;
  uint8_t* dst = recv.data_ptr<uint8_t>() + recv_offset;
  if (comm == nullptr || comm->size() == 1) {
    if (src != dst) recv.narrow(0, recv_offset, bytes).copy_(send.narrow(0, send_offset, bytes));
    return OkStatus();
  }
  return comm->AllGather(src, dst, static_cast<size_t>(bytes), DataType::kUInt8, stream);
}

// Fails unless every rank passes the same values (a fingerprint of what
// the following collectives assume), naming the first rank that differs.
Status CheckSameOnEveryRank(comm::Communicator* comm, c10::Device model_device,
                            const std::vector<int64_t>& mine, const std::string& what) {
  if (comm == nullptr || comm->size() == 1) return OkStatus();
  const int world = comm->size();
  // Sizes first: the fingerprints themselves must be gathered with equal counts.
  const c10::Device dev = CommDevice(comm, model_device);
  const auto i64 = at::TensorOptions().dtype(at::kLong);
  auto gather = [&](const at::Tensor& v, int64_t n) -> Result<at::Tensor> {
    at::Tensor send = v.to(dev);
    at::Tensor all = at::empty({n * world}, i64.device(dev));
    const Status s = comm->AllGather(send.data_ptr(), all.data_ptr(), static_cast<size_t>(n),
                                     DataType::kInt64, nullptr);
    if (!s.ok()) return Prefixed(s, what + ": comparing ranks on " + Where(comm->rank(), world));
    return all.cpu();
  };
  const int64_t n = static_cast<int64_t>(mine.size());
  FTUNE_ASSIGN_OR_RETURN(at::Tensor sizes, gather(at::full({1}, n, i64), 1));
  for (int r = 0; r < world; ++r) {
    if (sizes.data_ptr<int64_t>()[r] != n) {
      return FailedPreconditionError(what + " differs between rank " + std::to_string(r) +
                                     " and rank " + std::to_string(comm->rank()) +
                                     ": every rank must load the same model with the same options");
    }
  }
  FTUNE_ASSIGN_OR_RETURN(at::Tensor all, gather(at::tensor(mine, i64), n));
  for (int r = 0; r < world; ++r) {
    for (int64_t i = 0; i < n; ++i) {
      if (all.data_ptr<int64_t>()[r * n + i] != mine[i]) {
        return FailedPreconditionError(
            what + " differs between rank " + std::to_string(r) + " and rank " +
            std::to_string(comm->rank()) + " (value " + std::to_string(i) + ": " +
            std::to_string(all.data_ptr<int64_t>()[r * n + i]) + " vs " + std::to_string(mine[i]) +
            "): every rank must load the same model with the same options");
      }
    }
  }
  return OkStatus();
}

// Elements [e0, e1) of an init-model tensor (bf16, on options.device),
// generated where they will live: by a CUDA kernel on a GPU, by the CPU
// writer's own code on the CPU. Both give init-model's bytes.
Result<at::Tensor> RandomInitPart(const WeightSpec& spec, const ModelOptions& options,
                                  int64_t e0, int64_t e1) {
  const auto bf16 = at::TensorOptions().dtype(at::kBFloat16).device(options.device);
  at::Tensor part = at::empty({e1 - e0}, bf16);
  if (e1 <= e0) return part;
  auto* out = reinterpret_cast<uint16_t*>(part.data_ptr());
  if (options.device.is_cuda()) {
#if FTUNE_FSDP_CUDA
    if (spec.is_norm) return part.fill_(1.0);
    c10::cuda::CUDAGuard guard(options.device);
    const kernels::Status s = kernels::FillNormalBf16Cuda(
        InitTensorKey(options.random_seed, spec.name), spec.stddev, static_cast<uint64_t>(e0),
        static_cast<uint64_t>(e1 - e0), out,
        c10::cuda::getCurrentCUDAStream(options.device.index()).stream());
    if (!s.ok()) return InternalError("random weights for '" + spec.name + "': " + s.message());
    return part;
#else
    return FailedPreconditionError("random weights on " + options.device.str() +
                              ": this ftune-rank was built without CUDA kernels");
#endif
  }
  FillInitWeight(spec, options.random_seed, static_cast<uint64_t>(e0), static_cast<uint64_t>(e1),
                 out, /*num_threads=*/0);
  return part;
}

// A dense base layer whose weight the engine sets and drops (the FSDP form
// of DenseLinear: same checks, same at::linear).
class ShardedDenseLinear final : public BaseLinear {
 public:
  ShardedDenseLinear(int64_t out, int64_t in) : out_(out), in_(in) {}
  int64_t in_features() const override { return in_; }
  int64_t out_features() const override { return out_; }
  at::Tensor Forward(const at::Tensor& x) const override {
    TORCH_CHECK(weight_.defined(), "dense base layer (", out_, ", ", in_,
                "): weight not resident (an FSDP unit used without being gathered)");
    TORCH_CHECK(x.size(-1) == in_, "DenseLinear: input ", x.sizes(),
                " does not match weight (out, in) = ", weight_.sizes());
    TORCH_CHECK(x.scalar_type() == weight_.scalar_type(), "DenseLinear: input dtype ",
                x.scalar_type(), " differs from the weight's ", weight_.scalar_type());
    return at::linear(x, weight_);  // (..., out)
  }
  at::Tensor DenseWeight(c10::ScalarType dtype) const override {
    TORCH_CHECK(weight_.defined(), "dense base layer (", out_, ", ", in_,
                "): weight not resident (an FSDP unit used without being gathered)");
    return weight_.to(dtype);
  }
  at::Tensor* mutable_weight() { return &weight_; }

 private:
  int64_t out_, in_;
  at::Tensor weight_;  // (out, in), a view into the gathered unit
};

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

class FsdpUnitsImpl final : public FsdpUnits {
 public:
  FsdpUnitsImpl(LlamaModel* model, comm::Communicator* comm, FsdpOptions options, bool tied)
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
                         comm->size() > 1 && comm->backend() == "nccl") {}

  std::vector<Unit>& units() { return units_; }
  int world() const { return world_; }
  int rank() const { return rank_; }

  // Lays out the unit's segments once its tensors are listed.
  void Layout(Unit& u) {
    int64_t so = 0, go = 0;
    auto add = [&](int64_t piece) {
      Segment s;
      s.piece_bytes = piece;
      s.shard_offset = so;
      s.gathered_offset = go;
      so = AlignUp(so + piece, kAlign);
      go = AlignUp(go + piece * world_, kAlign);
      u.segments.push_back(s);
      return static_cast<int>(u.segments.size()) - 1;
    };
    const int64_t esize = c10::elementSize(model_->options().dtype);
    for (UnitTensor& t : u.tensors) {
      if (t.nf4) {
        t.seg_packed = add(t.geo.PackedPieceBytes());
        t.seg_absmax = add(t.geo.AbsmaxPieceBytes());
        if (t.geo.nested) t.seg_absmax2 = add(t.geo.Absmax2PieceBytes());
      } else {
        t.seg_dense = add(CeilDiv(t.numel, world_) * esize);
      }
    }
    u.shard_bytes = so;
    u.gathered_bytes = go;
  }

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
  std::vector<Unit> units_;
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

// ------------------------------------------------------------ NF4 pieces

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

Result<Nf4ShardPieces> QuantizeNf4Part(const at::Tensor& part, const Nf4ShardGeometry& g,
                                       int rank, comm::Communicator* comm,
                                       const std::string& name) {
  const int world = comm == nullptr ? 1 : comm->size();
  if (world != g.world) {
    return InvalidArgumentError("QuantizeNf4Part('" + name + "'): geometry for " +
                                std::to_string(g.world) + " ranks but the communicator has " +
                                std::to_string(world));
  }
  const int64_t count = g.ElementEnd(rank) - g.ElementBegin(rank);
  if (part.dim() != 1 || part.numel() != count) {
    return InvalidArgumentError("QuantizeNf4Part('" + name + "'): " + Where(rank, world) +
                                " owns " + std::to_string(count) + " elements, got a tensor of " +
                                std::to_string(part.numel()) + " (dim " +
                                std::to_string(part.dim()) + ")");
  }
  const c10::Device dev = part.device();
  Nf4ShardPieces p;
  p.packed = at::zeros({g.PackedPieceBytes()}, U8(dev));
  at::Tensor absmax = at::zeros({g.blocks_per_rank}, at::TensorOptions().dtype(at::kFloat).device(dev));
  if (count > 0) {
    Nf4Options plain;
    plain.blocksize = g.blocksize;
    plain.double_quant = false;
    // The part's blocks are whole blocks of the tensor (only the tensor's
    // last block may be partial, and it is the last of the last non-empty
    // part), so quantizing them alone gives the tensor's bytes.
    Nf4Weight w = QuantizeNf4Weight(part.reshape({1, count}), plain);
    p.packed.narrow(0, 0, w.packed.numel()).copy_(w.packed);
    absmax.narrow(0, 0, w.absmax.numel()).copy_(w.absmax);
  }
  if (!g.nested) {
    p.absmax = absmax.view(at::kByte);
    return p;
  }
  // The nested offset is a mean over the whole tensor in torch's reduction
  // order: gather every rank's absmax and double-quantize the whole vector
  // here, as every other rank does, then keep this rank's slice.
  at::Tensor whole;
  if (world == 1) {
    whole = absmax.narrow(0, 0, g.num_blocks);
  } else {
    const c10::Device cdev = CommDevice(comm, dev);
    at::Tensor send = absmax.to(cdev);
    at::Tensor all = at::empty({g.blocks_per_rank * world}, send.options());
    const Status s = comm->AllGather(send.data_ptr(), all.data_ptr(),
                                     static_cast<size_t>(g.blocks_per_rank), DataType::kFloat32,
                                     nullptr);
    if (!s.ok()) {
      return Prefixed(s, "gathering the block absmax of '" + name + "' on " + Where(rank, world));
    }
    whole = all.narrow(0, 0, g.num_blocks).to(dev);
  }
  Nf4NestedStats st = DoubleQuantizeNf4Absmax(whole);
  p.absmax = at::zeros({g.AbsmaxPieceBytes()}, U8(dev));
  at::Tensor absmax2 = at::zeros({g.blocks_per_rank / kNested}, absmax.options());
  const int64_t b0 = g.BlockBegin(rank), b1 = g.BlockEnd(rank);
  if (b1 > b0) {
    p.absmax.narrow(0, 0, b1 - b0).copy_(st.qabsmax.narrow(0, b0, b1 - b0));
    const int64_t n0 = b0 / kNested, n1 = CeilDiv(b1, kNested);
    absmax2.narrow(0, 0, n1 - n0).copy_(st.absmax2.narrow(0, n0, n1 - n0));
  }
  p.absmax2 = absmax2.view(at::kByte);
  p.offset = st.offset;
  return p;
}

Result<Nf4Weight> GatherNf4Pieces(const Nf4ShardPieces& mine, const Nf4ShardGeometry& g,
                                  int64_t out_features, int64_t in_features,
                                  comm::Communicator* comm) {
  if (out_features * in_features != g.numel) {
    return InvalidArgumentError("GatherNf4Pieces: (" + std::to_string(out_features) + ", " +
                                std::to_string(in_features) + ") is not " +
                                std::to_string(g.numel) + " elements");
  }
  const c10::Device dev = mine.packed.device();
  const c10::Device cdev = CommDevice(comm, dev);
  auto gather = [&](const at::Tensor& piece, int64_t bytes) -> Result<at::Tensor> {
    at::Tensor send = piece.to(cdev).contiguous();
    at::Tensor all = at::empty({bytes * g.world}, U8(cdev));
    FTUNE_RETURN_IF_ERROR(AllGatherBytes(comm, send, all, bytes, 0, 0));
    return all.to(dev);
  };
  Nf4Weight w;
  w.out_features = out_features;
  w.in_features = in_features;
  w.blocksize = g.blocksize;
  FTUNE_ASSIGN_OR_RETURN(at::Tensor packed, gather(mine.packed, g.PackedPieceBytes()));
  w.packed = packed.narrow(0, 0, kernels::Nf4PackedBytes(g.numel)).clone();
  FTUNE_ASSIGN_OR_RETURN(at::Tensor absmax, gather(mine.absmax, g.AbsmaxPieceBytes()));
  if (g.nested) {
    w.absmax = absmax.narrow(0, 0, g.num_blocks).clone();
    FTUNE_ASSIGN_OR_RETURN(at::Tensor a2, gather(mine.absmax2, g.Absmax2PieceBytes()));
    w.nested_absmax =
        a2.view(at::kFloat).narrow(0, 0, kernels::Nf4NumNestedBlocks(g.num_blocks)).clone();
    w.offset = mine.offset.clone();
  } else {
    w.absmax = absmax.view(at::kFloat).narrow(0, 0, g.num_blocks).clone();
  }
  w.Validate();
  return w;
}

FsdpUnits* FsdpUnitsOf(const LlamaModel& model) {
  return dynamic_cast<FsdpUnits*>(model.unit_hooks());
}

// ------------------------------------------------------------ loading

Result<std::unique_ptr<LlamaModel>> LoadShardedModel(const std::string& model_dir,
                                                    const ModelOptions& options,
                                                    const FsdpOptions& fsdp,
                                                    comm::Communicator* comm, LoadStats* stats) {
  const auto t0 = std::chrono::steady_clock::now();
  ResetPeakRss();
  LoadStats local;
  local.start_rss_bytes = CurrentRssBytes();
  const int world = comm == nullptr ? 1 : comm->size();
  const int rank = comm == nullptr ? 0 : comm->rank();
  if (comm != nullptr && comm->backend() == "nccl" && !options.device.is_cuda()) {
    return InvalidArgumentError("LoadShardedModel: an NCCL communicator needs a CUDA model device, "
                                "got " + options.device.str());
  }
  FTUNE_ASSIGN_OR_RETURN(LlamaConfig config, LoadLlamaConfig(model_dir));
  // The weights come from the safetensors files, or are generated (random).
  std::unique_ptr<SafetensorsModel> st;
  std::map<std::string, WeightSpec> random_specs;
  std::string source;
  if (options.random_weights) {
    for (WeightSpec& w : LlamaWeightSpecs(config)) random_specs[w.name] = std::move(w);
    source = model_dir + "/config.json (random weights, seed " +
             std::to_string(options.random_seed) + ")";
  } else {
    FTUNE_ASSIGN_OR_RETURN(st, SafetensorsModel::OpenDirectory(model_dir));
    source = st->source();
  }

  // The model with no frozen bytes; the projections' layers are remembered
  // by name so their units can point at them.
  std::map<std::string, BaseLinear*> bases;
  auto make_base = [&](const std::string& name, int64_t out,
                       int64_t in) -> Result<std::unique_ptr<BaseLinear>> {
    std::unique_ptr<BaseLinear> b;
    if (options.quantize_base) {
      b = Nf4Linear::Unmaterialized(out, in, options.nf4);
    } else {
      b = std::make_unique<ShardedDenseLinear>(out, in);
    }
    bases[name] = b.get();
    return b;
  };
  FTUNE_ASSIGN_OR_RETURN(std::unique_ptr<LlamaModel> model,
                                 LlamaModel::BuildUnmaterialized(config, options, source,
                                                                 make_base));
  auto units = std::make_shared<FsdpUnitsImpl>(model.get(), comm, fsdp,
                                               config.tie_word_embeddings);
  const c10::Device cdev = CommDevice(comm, options.device);
  // Where shards live: pinned host memory when offloading from a GPU, else
  // where the communicator reads.
  const bool pin = fsdp.offload_params && options.device.is_cuda();
  const c10::Device shard_device = fsdp.offload_params ? c10::Device(c10::DeviceType::CPU) : cdev;

  // This rank's elements [e0, e1) of a tensor, in the compute dtype on the
  // device; checks the file's shape against the config.
  auto read_part = [&](const UnitTensor& t, int64_t e0, int64_t e1) -> Result<at::Tensor> {
    if (options.random_weights) {
      auto it = random_specs.find(t.name);
      if (it == random_specs.end()) {
        return InternalError("random weights: no init spec for '" + t.name + "'");
      }
      FTUNE_ASSIGN_OR_RETURN(at::Tensor part,
                                     RandomInitPart(it->second, options, e0, e1));
      return part.to(options.dtype);
    }
    FTUNE_ASSIGN_OR_RETURN(SafetensorsModel::TensorRef ref, st->Find(t.name));
    std::vector<int64_t> file_shape(ref.info->shape.begin(), ref.info->shape.end());
    if (file_shape != t.shape) {
      return InvalidArgumentError(ref.file->path() + ": tensor '" + t.name + "' has shape " +
                                  ShapeToString(ref.info->shape) +
                                  " but the config implies " +
                                  ShapeToString(std::vector<uint64_t>(t.shape.begin(), t.shape.end())));
    }
    FTUNE_ASSIGN_OR_RETURN(c10::ScalarType file_dtype, TorchDtypeOf(ref.info->dtype));
    at::Tensor raw = at::empty({e1 - e0}, at::TensorOptions().dtype(file_dtype));
    if (e1 > e0) {
      FTUNE_RETURN_IF_ERROR(ref.file->ReadElements(t.name, e0, e1, raw.data_ptr()));
      local.read_bytes += raw.numel() * static_cast<int64_t>(raw.element_size());
    }
    return raw.to(at::TensorOptions().dtype(options.dtype).device(options.device));
  };

  auto dense = [&](const std::string& name, std::vector<int64_t> shape,
                   std::vector<at::Tensor*> targets) {
    UnitTensor t;
    t.name = name;
    t.shape = std::move(shape);
    t.numel = 1;
    for (int64_t d : t.shape) t.numel *= d;
    t.targets = std::move(targets);
    return t;
  };
  const int64_t h = config.hidden_size;
  std::vector<Unit>& list = units->units();
  list.resize(model->num_units());
  {
    Unit& u = list[LlamaModel::kEmbeddingUnit];
    u.name = "embedding";
    std::vector<at::Tensor*> targets = {&model->mutable_embed_tokens()};
    if (config.tie_word_embeddings) targets.push_back(&model->mutable_lm_head());
    u.tensors.push_back(dense("model.embed_tokens.weight", {config.vocab_size, h}, targets));
  }
  for (int64_t i = 0; i < config.num_hidden_layers; ++i) {
    Unit& u = list[LlamaModel::LayerUnit(i)];
    u.name = "layer " + std::to_string(i);
    DecoderLayer& l = model->mutable_layers()[i];
    const std::string p = "model.layers." + std::to_string(i) + ".";
    u.tensors.push_back(dense(p + "input_layernorm.weight", {h}, {&l.input_layernorm}));
    u.tensors.push_back(
        dense(p + "post_attention_layernorm.weight", {h}, {&l.post_attention_layernorm}));
    for (const char* name : {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                             "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                             "mlp.down_proj"}) {
      const std::string wname = p + name + ".weight";
      BaseLinear* b = bases.at(wname);
      std::vector<int64_t> shape = {b->out_features(), b->in_features()};
      if (options.quantize_base) {
        UnitTensor t;
        t.name = wname;
        t.shape = shape;
        t.numel = shape[0] * shape[1];
        t.nf4 = true;
        t.geo = Nf4ShardGeometry::Make(t.numel, options.nf4, world);
        t.linear = static_cast<Nf4Linear*>(b);
        u.tensors.push_back(std::move(t));
      } else {
        u.tensors.push_back(dense(wname, shape, {static_cast<ShardedDenseLinear*>(b)->mutable_weight()}));
      }
    }
  }
  {
    Unit& u = list[model->head_unit()];
    u.name = "head";
    u.tensors.push_back(dense("model.norm.weight", {h}, {&model->mutable_final_norm()}));
    if (!config.tie_word_embeddings) {
      u.tensors.push_back(
          dense("lm_head.weight", {config.vocab_size, h}, {&model->mutable_lm_head()}));
    }
  }

  const int64_t esize = c10::elementSize(options.dtype);
  for (Unit& u : list) units->Layout(u);
  {
    // Every rank must lay out the same units: a rank given another model or
    // other options would otherwise run mismatched collectives.
    std::vector<int64_t> mine = {static_cast<int64_t>(list.size()),
                                 static_cast<int64_t>(options.dtype), options.quantize_base,
                                 options.nf4.blocksize, options.nf4.double_quant};
    for (const Unit& u : list) mine.push_back(u.shard_bytes);
    FTUNE_RETURN_IF_ERROR(CheckSameOnEveryRank(
        comm, options.device, mine, "LoadShardedModel(" + source + "): the model layout"));
  }
  for (Unit& u : list) {
    u.shard = at::zeros({u.shard_bytes}, U8(shard_device).pinned_memory(pin));
    for (UnitTensor& t : u.tensors) {
      local.largest_tensor_bytes = std::max(local.largest_tensor_bytes, t.numel * esize);
      const std::string what = "loading '" + t.name + "' (" + source + ") on " + Where(rank, world);
      if (t.nf4) {
        const int64_t e0 = t.geo.ElementBegin(rank), e1 = t.geo.ElementEnd(rank);
        FTUNE_ASSIGN_OR_RETURN(at::Tensor part, read_part(t, e0, e1));
        Result<Nf4ShardPieces> pieces = QuantizeNf4Part(part, t.geo, rank, comm, t.name);
        if (!pieces.ok()) return Prefixed(pieces.status(), what);
        part = at::Tensor();
        auto put = [&](int seg, const at::Tensor& bytes) {
          const Segment& s = u.segments[seg];
          u.shard.narrow(0, s.shard_offset, s.piece_bytes).copy_(bytes);
        };
        put(t.seg_packed, pieces->packed);
        put(t.seg_absmax, pieces->absmax);
        if (t.geo.nested) {
          put(t.seg_absmax2, pieces->absmax2);
          t.offset = pieces->offset.to(options.device);
        }
      } else {
        const int64_t piece = CeilDiv(t.numel, world);
        const int64_t e0 = std::min(t.numel, rank * piece);
        const int64_t e1 = std::min(t.numel, (rank + 1) * piece);
        FTUNE_ASSIGN_OR_RETURN(at::Tensor part, read_part(t, e0, e1));
        const Segment& s = u.segments[t.seg_dense];
        if (e1 > e0) {
          u.shard.narrow(0, s.shard_offset, (e1 - e0) * esize).copy_(part.view(at::kByte));
        }
      }
      TrimHeap();
    }
    local.shard_bytes += u.shard_bytes;
  }
  local.unit_count = static_cast<int64_t>(list.size());
  model->set_unit_hooks(units);
  local.peak_rss_bytes = PeakRssBytes();
  local.end_rss_bytes = CurrentRssBytes();
  local.seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (stats != nullptr) *stats = local;
  return model;
}

// ------------------------------------------------------------ ShardedLora

Result<std::unique_ptr<ShardedLora>> ShardedLora::Create(LlamaModel* model,
                                                        comm::Communicator* comm) {
  if (model == nullptr || !model->has_lora()) {
    return FailedPreconditionError("ShardedLora: the model has no LoRA adapters attached "
                                   "(AttachLora or LoadAdapter first)");
  }
  std::unique_ptr<ShardedLora> s(new ShardedLora());
  s->model_ = model;
  s->comm_ = comm;
  s->world_ = comm == nullptr ? 1 : comm->size();
  s->rank_ = comm == nullptr ? 0 : comm->rank();
  s->comm_device_ = CommDevice(comm, model->options().device);
  s->clock_ = std::make_shared<internal::CollectiveClock>();
  for (const NamedTensor& p : model->LoraParameters()) {
    Entry e;
    e.name = p.name;
    e.offset = s->total_numel_;
    e.numel = p.tensor.numel();
    e.shape = p.tensor.sizes().vec();
    s->total_numel_ += e.numel;
    s->layout_.push_back(std::move(e));
    s->params_.push_back(p.tensor);
  }
  s->shard_numel_ = CeilDiv(s->total_numel_, s->world_);
  FTUNE_RETURN_IF_ERROR(CheckSameOnEveryRank(
      comm, model->options().device, {s->total_numel_, static_cast<int64_t>(s->layout_.size())},
      "ShardedLora: the LoRA layout (elements, tensors)"));
  FTUNE_ASSIGN_OR_RETURN(at::Tensor flat, s->FullFlat(/*grads=*/false));
  if (s->world_ > 1) {
    const Status st = comm->Broadcast(flat.data_ptr(), static_cast<size_t>(flat.numel()),
                                      DataType::kFloat32, 0, nullptr);
    if (!st.ok()) return Prefixed(st, "ShardedLora: broadcasting the adapters from rank 0");
    // Every rank now holds rank 0's adapters.
    at::Tensor dev = flat.to(model->options().device);
    c10::NoGradGuard no_grad;
    for (size_t i = 0; i < s->params_.size(); ++i) {
      const Entry& e = s->layout_[i];
      s->params_[i].view(-1).copy_(dev.narrow(0, e.offset, e.numel));
    }
  }
  s->shard_ = flat.narrow(0, s->shard_begin(), s->shard_numel_)
                  .to(model->options().device)
                  .clone()
                  .detach();
  s->shard_.set_requires_grad(true);
  if (s->world_ > 1) {
    // Spans: consecutive entries of the same decoder layer (PEFT names
    // "...layers.<i>...."); every rank builds the same ones.
    auto layer_of = [](const std::string& name) -> std::string {
      const size_t at = name.find(".layers.");
      if (at == std::string::npos) return name;
      const size_t end = name.find('.', at + 8);
      return name.substr(at + 8, end == std::string::npos ? std::string::npos : end - at - 8);
    };
    std::string current;
    for (size_t i = 0; i < s->layout_.size(); ++i) {
      const std::string layer = layer_of(s->layout_[i].name);
      if (s->spans_.empty() || layer != current) {
        Span sp;
        sp.begin = s->layout_[i].offset;
        sp.first = i;
        s->spans_.push_back(std::move(sp));
        current = layer;
      }
      Span& sp = s->spans_.back();
      sp.end = s->layout_[i].offset + s->layout_[i].numel;
      ++sp.count;
      s->span_of_.push_back(s->spans_.size() - 1);
    }
    for (Span& sp : s->spans_) {
      sp.seen.assign(sp.count, false);
      sp.remaining = sp.count;
    }
    s->acc_ = at::zeros({s->shard_numel_}, at::TensorOptions().dtype(at::kFloat).device(s->comm_device_));
    s->units_ = FsdpUnitsOf(*model);
    ShardedLora* self = s.get();
    for (size_t i = 0; i < s->params_.size(); ++i) {
      s->hooks_.push_back(
          s->params_[i].register_hook([self, i](const at::Tensor& grad) { self->OnGrad(i, grad); }));
    }
    s->per_span_ = true;
  }
  return s;
}

ShardedLora::~ShardedLora() {
  for (size_t i = 0; i < hooks_.size(); ++i) params_[i].remove_hook(hooks_[i]);
}

void ShardedLora::OnGrad(size_t entry, const at::Tensor& grad) {
  if (!grad.defined()) return;
  c10::NoGradGuard no_grad;
  Span& sp = spans_[span_of_[entry]];
  if (!sp.staged.defined()) {
    sp.staged = at::zeros({sp.end - sp.begin},
                          at::TensorOptions().dtype(at::kFloat).device(comm_device_));
  }
  const Entry& e = layout_[entry];
  sp.staged.narrow(0, e.offset - sp.begin, e.numel)
      .add_(grad.detach().reshape(-1).to(comm_device_, at::kFloat));
  if (!sp.seen[entry - sp.first]) {
    sp.seen[entry - sp.first] = true;
    --sp.remaining;
  }
  if (sp.remaining == 0) {
    const Status st = ReduceSpan(span_of_[entry]);
    TORCH_CHECK(st.ok(), st.ToString());
  }
}

// Reduces one span onto its owners and adds this rank's part to acc_; the
// span starts over. Every rank reduces the same spans in the same order
// (same graph, same hooks).
Status ShardedLora::ReduceSpan(size_t index) {
  Span& sp = spans_[index];
  at::Tensor staged = std::move(sp.staged);
  sp.staged = at::Tensor();
  sp.seen.assign(sp.count, false);
  sp.remaining = sp.count;
  if (!staged.defined()) return OkStatus();
  auto reduce = [&](comm::StreamHandle stream) -> Status {
    for (int r = 0; r < world_; ++r) {
      const int64_t lo = std::max(sp.begin, r * shard_numel_);
      const int64_t hi = std::min(sp.end, (r + 1) * shard_numel_);
      if (lo >= hi) continue;
      at::Tensor mine = r == rank_ ? at::empty({hi - lo}, staged.options()) : at::Tensor();
      const Status st = comm_->Reduce(staged.data_ptr<float>() + (lo - sp.begin),
                                      r == rank_ ? mine.data_ptr() : nullptr,
                                      static_cast<size_t>(hi - lo), DataType::kFloat32,
                                      comm::ReduceOp::kSum, r, stream);
      if (!st.ok()) {
        return Prefixed(st, "ShardedLora: reducing the gradients of '" +
                                layout_[sp.first].name + "'... onto rank " + std::to_string(r) +
                                " on " + Where(rank_, world_));
      }
      if (r == rank_) acc_.narrow(0, lo - r * shard_numel_, hi - lo).add_(mine);
    }
    return OkStatus();
  };
  if (kCudaStreams && comm_device_.is_cuda()) {
#if FTUNE_FSDP_CUDA
    CommLane& lane = LaneFor(comm_, comm_device_);
    LaneAfterCompute(lane, c10::cuda::getCurrentCUDAStream(comm_device_.index()).stream());
    staged.record_stream(c10::Stream(lane.stream));  // written on compute, read on the lane
    Status st;
    {
      c10::cuda::CUDAStreamGuard guard(lane.stream);
      const int64_t mark = clock_->Begin(lane.stream.stream(), /*background=*/true);
      st = reduce(lane.stream.stream());
      clock_->End(mark, lane.stream.stream());
      marks_.push_back(mark);
    }
    LaneMarkTail(lane);
    return st;
#endif
  }
  // Gloo: here, on this thread, once a prefetch thread's gather is done.
  if (units_ != nullptr) units_->WaitForPrefetch();
  const auto t0 = std::chrono::steady_clock::now();
  const Status st = reduce(nullptr);
  const double host = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  clock_->Add(host, host);
  return st;
}

// The full flat vector (padded) of the adapters or of their gradients
// (zeros where a gradient is undefined), on the communicator's device.
Result<at::Tensor> ShardedLora::FullFlat(bool grads) const {
  c10::NoGradGuard no_grad;
  at::Tensor flat = at::zeros({shard_numel_ * world_},
                              at::TensorOptions().dtype(at::kFloat).device(comm_device_));
  for (size_t i = 0; i < params_.size(); ++i) {
    const Entry& e = layout_[i];
    const at::Tensor src = grads ? params_[i].grad() : params_[i];
    if (!src.defined()) continue;
    flat.narrow(0, e.offset, e.numel).copy_(src.detach().reshape(-1));
  }
  return flat;
}

Status ShardedLora::ReduceGradients() {
  at::Tensor mine;
  if (per_span_) {
    // Spans with tensors that got no gradient are still open: reduce them
    // now, in span order (the same on every rank).
    for (size_t i = 0; i < spans_.size(); ++i) {
      FTUNE_RETURN_IF_ERROR(ReduceSpan(i));
    }
#if FTUNE_FSDP_CUDA
    if (comm_device_.is_cuda()) {
      const cudaStream_t compute = c10::cuda::getCurrentCUDAStream(comm_device_.index()).stream();
      for (int64_t mark : marks_) clock_->Need(mark, compute);
      marks_.clear();
      ComputeAfterLane(LaneFor(comm_, comm_device_), compute);
    }
#endif
    mine = acc_.to(shard_.device());
    acc_ = at::zeros_like(acc_);
  } else {
    // One rank: the shard is the whole flat gradient.
    FTUNE_ASSIGN_OR_RETURN(at::Tensor flat, FullFlat(/*grads=*/true));
    mine = flat.narrow(0, 0, shard_numel_).to(shard_.device());
  }
  c10::NoGradGuard no_grad;
  if (shard_.grad().defined()) {
    shard_.mutable_grad().add_(mine);
  } else {
    shard_.mutable_grad() = mine;
  }
  for (at::Tensor& p : params_) p.mutable_grad().reset();
  return OkStatus();
}

double ShardedLora::reduce_scatter_seconds() { return clock_->busy(); }
double ShardedLora::reduce_scatter_exposed_seconds() { return clock_->exposed(); }

Result<double> ShardedLora::GradNorm() {
  c10::NoGradGuard no_grad;
  double local = 0;
  if (shard_.grad().defined()) {
    local = shard_.grad().to(at::kDouble).pow(2).sum().item<double>();
  }
  if (world_ == 1) return std::sqrt(local);
  // Gathered as bytes and summed in rank order, so every rank computes the
  // same double (an fp32 all-reduce would round, and differently per rank
  // order). The buffers live where the communicator reads (device for NCCL).
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  at::Tensor send = at::full({1}, local, f64).to(comm_device_);
  at::Tensor all = at::empty({world_}, f64.device(comm_device_));
  const Status st = comm_->AllGather(send.data_ptr(), all.data_ptr(), sizeof(double),
                                     DataType::kUInt8, nullptr);
  if (!st.ok()) return Prefixed(st, "ShardedLora::GradNorm on " + Where(rank_, world_));
  all = all.cpu();
  double sum = 0;
  for (int r = 0; r < world_; ++r) sum += all.data_ptr<double>()[r];
  return std::sqrt(sum);
}

Result<double> ShardedLora::ClipGradNorm(double max_norm) {
  if (!(max_norm > 0)) {
    return InvalidArgumentError("max_grad_norm (" + std::to_string(max_norm) + ") must be > 0");
  }
  FTUNE_ASSIGN_OR_RETURN(double total, GradNorm());
  if (shard_.grad().defined()) {
    c10::NoGradGuard no_grad;
    // torch's clip_grad_norm_: an fp32 coefficient, clamped, applied
    // unconditionally.
    at::Tensor t = at::scalar_tensor(total, at::TensorOptions().dtype(at::kFloat));
    at::Tensor coef = at::clamp_max(at::reciprocal(t + 1e-6) * max_norm, 1.0);
    shard_.mutable_grad().mul_(coef.to(shard_.device()));
  }
  return total;
}

Status ShardedLora::GatherParams() {
  c10::NoGradGuard no_grad;
  at::Tensor send = shard_.detach().to(comm_device_).contiguous();
  at::Tensor full;
  if (world_ == 1) {
    full = send;
  } else {
    full = at::empty({shard_numel_ * world_}, send.options());
    const Status st = comm_->AllGather(send.data_ptr(), full.data_ptr(),
                                       static_cast<size_t>(shard_numel_), DataType::kFloat32,
                                       nullptr);
    if (!st.ok()) return Prefixed(st, "ShardedLora::GatherParams on " + Where(rank_, world_));
  }
  full = full.to(model_->options().device);
  for (size_t i = 0; i < params_.size(); ++i) {
    const Entry& e = layout_[i];
    params_[i].view(-1).copy_(full.narrow(0, e.offset, e.numel));
  }
  return OkStatus();
}

}  // namespace ftune::trainer
