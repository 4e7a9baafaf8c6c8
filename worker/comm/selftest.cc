#include "worker/comm/selftest.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>

#include "worker/comm/half.h"
#if FTUNE_COMM_HAVE_GLOO
#include "worker/comm/gloo_communicator.h"
#endif
#if FTUNE_COMM_HAVE_NCCL
#include <cuda_runtime.h>

#include "worker/comm/nccl_communicator.h"
#endif

namespace ftune::comm {

const char* CollectiveName(Collective c) {
  switch (c) {
    case Collective::kAllGather:
      return "all_gather";
    case Collective::kReduceScatter:
      return "reduce_scatter";
    case Collective::kAllReduce:
      return "all_reduce";
    case Collective::kBroadcast:
      return "broadcast";
    case Collective::kReduce:
      return "reduce";
  }
  return "?";
}

namespace {

using Clock = std::chrono::steady_clock;

// ------------------------------------------------------------ memory

// Where the collectives' buffers live: host memory for Gloo, device memory
// (and a stream) for NCCL. Copies are ordered on stream().
class Memory {
 public:
  virtual ~Memory() = default;
  virtual Status Alloc(size_t bytes, void** p) = 0;
  virtual void Free(void* p) = 0;
  virtual Status ToDevice(void* dst, const void* host, size_t bytes) = 0;
  virtual Status ToHost(void* host, const void* src, size_t bytes) = 0;
  virtual StreamHandle stream() = 0;
};

class HostMemory : public Memory {
 public:
  Status Alloc(size_t bytes, void** p) override {
    *p = std::malloc(std::max<size_t>(bytes, 1));
    if (*p == nullptr) {
      return Status(StatusCode::kInternal,
                    "cannot allocate " + std::to_string(bytes) + " bytes");
    }
    return OkStatus();
  }
  void Free(void* p) override { std::free(p); }
  Status ToDevice(void* dst, const void* host, size_t bytes) override {
    std::memcpy(dst, host, bytes);
    return OkStatus();
  }
  Status ToHost(void* host, const void* src, size_t bytes) override {
    std::memcpy(host, src, bytes);
    return OkStatus();
  }
  StreamHandle stream() override { return nullptr; }
};

#if FTUNE_COMM_HAVE_NCCL
class CudaMemory : public Memory {
 public:
  CudaMemory() { cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking); }
  ~CudaMemory() override { cudaStreamDestroy(stream_); }
  Status Alloc(size_t bytes, void** p) override {
    return Check(cudaMalloc(p, std::max<size_t>(bytes, 1)), "cudaMalloc");
  }
  void Free(void* p) override { cudaFree(p); }
  // Async on our stream, then a sync: a plain cudaMemcpy from pageable
  // memory may return before its DMA lands, and is not ordered with a
  // non-blocking stream.
  Status ToDevice(void* dst, const void* host, size_t bytes) override {
    FTUNE_RETURN_IF_ERROR(Check(
        cudaMemcpyAsync(dst, host, bytes, cudaMemcpyHostToDevice, stream_),
        "cudaMemcpyAsync"));
    return Check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
  }
  Status ToHost(void* host, const void* src, size_t bytes) override {
    FTUNE_RETURN_IF_ERROR(Check(
        cudaMemcpyAsync(host, src, bytes, cudaMemcpyDeviceToHost, stream_),
        "cudaMemcpyAsync"));
    return Check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
  }
  StreamHandle stream() override { return stream_; }

 private:
  static Status Check(cudaError_t e, const char* what) {
    if (e == cudaSuccess) return OkStatus();
    return Status(StatusCode::kInternal,
                  std::string(what) + ": " + cudaGetErrorString(e));
  }
  cudaStream_t stream_ = nullptr;
};
#endif

// A device buffer freed by its owner's Memory.
class Buffer {
 public:
  Buffer(Memory* mem, size_t bytes) : mem_(mem) {
    status_ = mem_->Alloc(bytes, &ptr_);
  }
  ~Buffer() {
    if (status_.ok()) mem_->Free(ptr_);
  }
  const Status& status() const { return status_; }
  void* get() const { return ptr_; }

 private:
  Memory* mem_;
  void* ptr_ = nullptr;
  Status status_;
};

// ------------------------------------------------------------ values

// Small integers: exact in every dtype, and so are their sums and maxima
// over up to 15 ranks.
int64_t BaseValue(uint64_t rank_or_seed, uint64_t g, bool unsigned_type) {
  const int64_t v =
      static_cast<int64_t>((g * 2654435761u + rank_or_seed * 40503u) % 17u);
  return unsigned_type ? v : v - 8;
}

template <DataType D>
struct Codec;

template <>
struct Codec<DataType::kFloat32> {
  using T = float;
  static T Encode(double v) { return static_cast<float>(v); }
  static double Decode(T v) { return v; }
  static constexpr double kUnitRoundoff = 1.0 / (1 << 24);
};
template <>
struct Codec<DataType::kBFloat16> {
  using T = uint16_t;
  static T Encode(double v) { return FloatToBf16(static_cast<float>(v)); }
  static double Decode(T v) { return Bf16ToFloat(v); }
  static constexpr double kUnitRoundoff = 1.0 / (1 << 8);
};
template <>
struct Codec<DataType::kFloat16> {
  using T = uint16_t;
  static T Encode(double v) { return FloatToHalf(static_cast<float>(v)); }
  static double Decode(T v) { return HalfToFloat(v); }
  static constexpr double kUnitRoundoff = 1.0 / (1 << 11);
};
template <>
struct Codec<DataType::kUInt8> {
  using T = uint8_t;
  static T Encode(double v) { return static_cast<T>(static_cast<int64_t>(v)); }
  static double Decode(T v) { return v; }
  static constexpr double kUnitRoundoff = 0;
};
template <>
struct Codec<DataType::kInt32> {
  using T = int32_t;
  static T Encode(double v) { return static_cast<T>(static_cast<int64_t>(v)); }
  static double Decode(T v) { return v; }
  static constexpr double kUnitRoundoff = 0;
};
template <>
struct Codec<DataType::kInt64> {
  using T = int64_t;
  static T Encode(double v) { return static_cast<T>(v); }
  static double Decode(T v) { return static_cast<double>(v); }
  static constexpr double kUnitRoundoff = 0;
};

// Rank r's value of logical element g (reductions' inputs).
template <DataType D>
typename Codec<D>::T RankValue(int r, size_t g) {
  using T = typename Codec<D>::T;
  int64_t v = BaseValue(static_cast<uint64_t>(r), g, D == DataType::kUInt8);
  if constexpr (D == DataType::kInt64) {
    // Exercise the upper half of the word too.
    v += static_cast<int64_t>(r + 1) << 33;
    return static_cast<T>(v);
  }
  return Codec<D>::Encode(static_cast<double>(v));
}

// The same value on every rank (gather and broadcast payloads).
template <DataType D>
typename Codec<D>::T SharedValue(uint64_t seed, size_t g) {
  int64_t v = BaseValue(seed, g, D == DataType::kUInt8);
  if constexpr (D == DataType::kInt64) {
    return static_cast<int64_t>(g) * 1000003 - (int64_t{1} << 40) + v;
  }
  return Codec<D>::Encode(static_cast<double>(v));
}

// Expected reduction of element g over `n` ranks; *tolerance is the
// allowed absolute error (0: exact).
template <DataType D>
typename Codec<D>::T Expected(ReduceOp op, int n, size_t g, double* tolerance) {
  using T = typename Codec<D>::T;
  *tolerance = 0;
  if constexpr (std::is_integral_v<T> && D != DataType::kBFloat16 &&
                D != DataType::kFloat16) {
    using U = std::make_unsigned_t<T>;
    U sum = 0;
    T max = std::numeric_limits<T>::lowest();
    for (int r = 0; r < n; ++r) {
      const T v = RankValue<D>(r, g);
      sum = static_cast<U>(sum + static_cast<U>(v));
      max = std::max(max, v);
    }
    if (op == ReduceOp::kMax) return max;
    const T s = static_cast<T>(sum);
    if (op == ReduceOp::kSum) return s;
    return static_cast<T>(s / static_cast<T>(n));
  } else {
    double sum = 0;
    double max = -std::numeric_limits<double>::infinity();
    for (int r = 0; r < n; ++r) {
      const double v = Codec<D>::Decode(RankValue<D>(r, g));
      sum += v;
      max = std::max(max, v);
    }
    if (op == ReduceOp::kMax) return Codec<D>::Encode(max);
    if (op == ReduceOp::kSum) return Codec<D>::Encode(sum);
    // NCCL scales each input by 1/n in the dtype before summing; each of
    // those roundings and every partial sum may be off by one unit.
    *tolerance = Codec<D>::kUnitRoundoff * (n + 2) * 8.0;
    return Codec<D>::Encode(sum / n);
  }
}

template <typename T>
bool Matches(T got, T want, double tolerance, double got_d, double want_d) {
  if (tolerance == 0) {
    if constexpr (std::is_floating_point_v<T>) return got == want;
    return got == want || got_d == want_d;
  }
  return std::fabs(got_d - want_d) <= tolerance;
}

// ------------------------------------------------------------ runner

struct Point {
  Collective collective;
  DataType dtype;
  size_t total;  // logical elements
};

class Runner {
 public:
  Runner(Communicator& comm, Memory& mem, const SelftestOptions& options,
         FILE* report, SelftestResult* result)
      : comm_(comm),
        mem_(mem),
        options_(options),
        report_(report),
        result_(result),
        n_(comm.size()),
        rank_(comm.rank()) {}

  Status Run() {
    // Per dtype, logical sizes from the largest odd count that fits
    // max_bytes down to 1 element, each about 1/4 of the previous.
    std::vector<std::vector<size_t>> totals(options_.dtypes.size());
    size_t max_bytes = 16;
    for (size_t i = 0; i < options_.dtypes.size(); ++i) {
      const size_t esize = DataTypeSize(options_.dtypes[i]);
      size_t t = std::max<size_t>(options_.max_bytes / esize, 2) - 1;
      for (; t > 1; t = (t + 1) / 4 - 1) totals[i].insert(totals[i].begin(), t);
      totals[i].insert(totals[i].begin(), 1);
      max_bytes = std::max(max_bytes,
                           PaddedShardCount(totals[i].back(), n_) * n_ * esize);
    }
    Buffer send(&mem_, max_bytes), recv(&mem_, max_bytes), stats(&mem_, 16);
    FTUNE_RETURN_IF_ERROR(send.status());
    FTUNE_RETURN_IF_ERROR(recv.status());
    FTUNE_RETURN_IF_ERROR(stats.status());
    send_ = send.get();
    recv_ = recv.get();
    stats_ = stats.get();
    host_in_.resize(max_bytes);
    host_out_.resize(max_bytes);

    if (rank_ == 0 && report_ != nullptr) {
      std::fprintf(
          report_,
          "# ftune comm_selftest: backend %s, %d ranks, timeout %lld ms\n"
          "# bytes: all_gather output, reduce_scatter input, buffer "
          "otherwise; busbw as nccl-tests\n"
          "# check: sum (timed) and, for reductions, avg and max, on "
          "every rank\n",
          std::string(comm_.backend()).c_str(), n_,
          static_cast<long long>(comm_.timeout().count()));
      std::fprintf(report_,
                   "%-15s %-6s %-4s %12s %12s %6s %12s %10s %10s  %s\n",
                   "collective", "dtype", "op", "count", "bytes", "iters",
                   "time_us", "algbw_GB/s", "busbw_GB/s", "check");
    }
    int total_bad = 0;
    for (Collective c : options_.collectives) {
      for (size_t i = 0; i < options_.dtypes.size(); ++i) {
        const DataType d = options_.dtypes[i];
        for (size_t t : totals[i]) {
          int bad = 0;
          FTUNE_RETURN_IF_ERROR(RunPoint({c, d, t}, &bad));
          total_bad += bad;
        }
      }
    }
    if (rank_ == 0 && report_ != nullptr) {
      std::fprintf(report_, "# %d cases checked per rank; %s\n", result_->cases,
                   total_bad == 0 ? "all results correct on every rank"
                                  : "SOME RESULTS WRONG (see stderr)");
      std::fflush(report_);
    }
    if (total_bad != 0) {
      return Status(StatusCode::kInternal,
                    std::to_string(total_bad) +
                        " case(s) gave wrong results on some rank");
    }
    return OkStatus();
  }

 private:
  Status RunPoint(const Point& p, int* bad_any_rank) {
    const bool reduces = p.collective == Collective::kReduceScatter ||
                         p.collective == Collective::kAllReduce ||
                         p.collective == Collective::kReduce;
    int mismatches = 0;
    // The timed op first (sum or none), then the other reductions, checked.
    FTUNE_RETURN_IF_ERROR(CheckOnce(p, ReduceOp::kSum, &mismatches));
    int64_t ns = 0;
    int iters = 0;
    if (!options_.check_only) {
      FTUNE_RETURN_IF_ERROR(Time(p, &iters, &ns));
    }
    if (reduces) {
      FTUNE_RETURN_IF_ERROR(CheckOnce(p, ReduceOp::kAvg, &mismatches));
      FTUNE_RETURN_IF_ERROR(CheckOnce(p, ReduceOp::kMax, &mismatches));
    }
    // Slowest rank's time and any rank's mismatches, through the
    // communicator under test.
    int64_t stats[2] = {ns, mismatches};
    FTUNE_RETURN_IF_ERROR(mem_.ToDevice(stats_, stats, sizeof(stats)));
    FTUNE_RETURN_IF_ERROR(comm_.AllReduce(
        stats_, stats_, 2, DataType::kInt64, ReduceOp::kMax, mem_.stream()));
    FTUNE_RETURN_IF_ERROR(comm_.Synchronize(mem_.stream()));
    FTUNE_RETURN_IF_ERROR(mem_.ToHost(stats, stats_, sizeof(stats)));
    *bad_any_rank = stats[1] > 0 ? 1 : 0;
    if (rank_ == 0 && report_ != nullptr)
      Print(p, reduces, iters, stats[0], stats[1]);
    return OkStatus();
  }

  void Print(const Point& p, bool reduces, int iters, int64_t ns, int64_t bad) {
    const size_t esize = DataTypeSize(p.dtype);
    const size_t padded = PaddedShardCount(p.total, n_) * n_;
    size_t bytes = p.total * esize;
    double factor = 1;
    switch (p.collective) {
      case Collective::kAllGather:
      case Collective::kReduceScatter:
        bytes = padded * esize;
        factor = static_cast<double>(n_ - 1) / n_;
        break;
      case Collective::kAllReduce:
        factor = 2.0 * (n_ - 1) / n_;
        break;
      case Collective::kBroadcast:
      case Collective::kReduce:
        break;
    }
    const char* check = bad ? "FAIL" : "ok";
    if (options_.check_only || iters == 0) {
      std::fprintf(
          report_, "%-15s %-6s %-4s %12zu %12zu %6s %12s %10s %10s  %s\n",
          CollectiveName(p.collective),
          std::string(DataTypeName(p.dtype)).c_str(), reduces ? "sum" : "-",
          p.total, bytes, "-", "-", "-", "-", check);
    } else {
      const double sec = static_cast<double>(ns) * 1e-9 / iters;
      const double algbw = static_cast<double>(bytes) / sec * 1e-9;
      std::fprintf(
          report_, "%-15s %-6s %-4s %12zu %12zu %6d %12.2f %10.3f %10.3f  %s\n",
          CollectiveName(p.collective),
          std::string(DataTypeName(p.dtype)).c_str(), reduces ? "sum" : "-",
          p.total, bytes, iters, sec * 1e6, algbw, algbw * factor, check);
    }
    std::fflush(report_);
  }

  // Issues the point's collective once on the device buffers.
  Status Issue(const Point& p, ReduceOp op) {
    const size_t shard = PaddedShardCount(p.total, n_);
    switch (p.collective) {
      case Collective::kAllGather:
        return comm_.AllGather(send_, recv_, shard, p.dtype, mem_.stream());
      case Collective::kReduceScatter:
        return comm_.ReduceScatter(send_, recv_, shard, p.dtype, op,
                                   mem_.stream());
      case Collective::kAllReduce:
        return comm_.AllReduce(send_, recv_, p.total, p.dtype, op,
                               mem_.stream());
      case Collective::kBroadcast:
        return comm_.Broadcast(recv_, p.total, p.dtype, n_ - 1, mem_.stream());
      case Collective::kReduce:
        return comm_.Reduce(send_, recv_, p.total, p.dtype, op, n_ - 1, mem_.stream());
    }
    return OkStatus();
  }

  Status Time(const Point& p, int* iters, int64_t* ns) {
    const size_t bytes = std::max<size_t>(
        1, PaddedShardCount(p.total, n_) * n_ * DataTypeSize(p.dtype));
    int it = options_.iters;
    if (it <= 0) {
      const double target =
          comm_.backend() == "nccl" ? double(1u << 30) : double(128u << 20);
      it = static_cast<int>(
          std::clamp(target / static_cast<double>(bytes), 2.0, 200.0));
    }
    for (int i = 0; i < options_.warmup; ++i) {
      FTUNE_RETURN_IF_ERROR(Issue(p, ReduceOp::kSum));
    }
    FTUNE_RETURN_IF_ERROR(comm_.Barrier(mem_.stream()));
    const auto t0 = Clock::now();
    for (int i = 0; i < it; ++i) {
      FTUNE_RETURN_IF_ERROR(Issue(p, ReduceOp::kSum));
    }
    FTUNE_RETURN_IF_ERROR(comm_.Synchronize(mem_.stream()));
    *ns =
        std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0)
            .count();
    *iters = it;
    return OkStatus();
  }

  Status CheckOnce(const Point& p, ReduceOp op, int* mismatches) {
    switch (p.dtype) {
      case DataType::kFloat32:
        return CheckTyped<DataType::kFloat32>(p, op, mismatches);
      case DataType::kBFloat16:
        return CheckTyped<DataType::kBFloat16>(p, op, mismatches);
      case DataType::kFloat16:
        return CheckTyped<DataType::kFloat16>(p, op, mismatches);
      case DataType::kUInt8:
        return CheckTyped<DataType::kUInt8>(p, op, mismatches);
      case DataType::kInt32:
        return CheckTyped<DataType::kInt32>(p, op, mismatches);
      case DataType::kInt64:
        return CheckTyped<DataType::kInt64>(p, op, mismatches);
    }
    return OkStatus();
  }

  template <DataType D>
  Status CheckTyped(const Point& p, ReduceOp op, int* mismatches) {
    using T = typename Codec<D>::T;
    const size_t shard = PaddedShardCount(p.total, n_);
    const size_t padded = shard * n_;
    T* in = reinterpret_cast<T*>(host_in_.data());
    T* out = reinterpret_cast<T*>(host_out_.data());
    size_t in_count = 0, out_count = 0;
    switch (p.collective) {
      case Collective::kAllGather:
        in_count = shard;
        out_count = padded;
        for (size_t j = 0; j < shard; ++j) {
          const size_t g = rank_ * shard + j;
          in[j] = g < p.total ? SharedValue<D>(1, g) : T{};
        }
        break;
      case Collective::kReduceScatter:
        in_count = padded;
        out_count = shard;
        for (size_t g = 0; g < padded; ++g) {
          in[g] = g < p.total ? RankValue<D>(rank_, g) : T{};
        }
        break;
      case Collective::kAllReduce:
        in_count = out_count = p.total;
        for (size_t g = 0; g < p.total; ++g) in[g] = RankValue<D>(rank_, g);
        break;
      case Collective::kReduce:
        // Only the root (the last rank) receives; the others check nothing.
        in_count = p.total;
        out_count = rank_ == n_ - 1 ? p.total : 0;
        for (size_t g = 0; g < p.total; ++g) in[g] = RankValue<D>(rank_, g);
        break;
      case Collective::kBroadcast:
        in_count = out_count = p.total;
        // The root sends SharedValue; the others start from junk.
        for (size_t g = 0; g < p.total; ++g) {
          in[g] = rank_ == n_ - 1 ? SharedValue<D>(2, g) : static_cast<T>(0x5a);
        }
        break;
    }
    void* in_dev = p.collective == Collective::kBroadcast ? recv_ : send_;
    FTUNE_RETURN_IF_ERROR(mem_.ToDevice(in_dev, in, in_count * sizeof(T)));
    if (p.collective != Collective::kBroadcast) {
      // Junk in the output, so a collective that writes nothing fails.
      std::memset(out, 0x5a, out_count * sizeof(T));
      FTUNE_RETURN_IF_ERROR(
          mem_.ToDevice(recv_, out, out_count * sizeof(T)));
    }
    FTUNE_RETURN_IF_ERROR(Issue(p, op));
    FTUNE_RETURN_IF_ERROR(comm_.Synchronize(mem_.stream()));
    FTUNE_RETURN_IF_ERROR(mem_.ToHost(out, recv_, out_count * sizeof(T)));
    ++result_->cases;

    for (size_t j = 0; j < out_count; ++j) {
      T want{};
      double tol = 0;
      switch (p.collective) {
        case Collective::kAllGather:
          want = j < p.total ? SharedValue<D>(1, j) : T{};
          break;
        case Collective::kReduceScatter: {
          const size_t g = rank_ * shard + j;
          want = g < p.total ? Expected<D>(op, n_, g, &tol) : T{};
          break;
        }
        case Collective::kAllReduce:
        case Collective::kReduce:
          want = Expected<D>(op, n_, j, &tol);
          break;
        case Collective::kBroadcast:
          want = SharedValue<D>(2, j);
          break;
      }
      const double got_d = Codec<D>::Decode(out[j]);
      const double want_d = Codec<D>::Decode(want);
      if (Matches(out[j], want, tol, got_d, want_d)) continue;
      ++*mismatches;
      ++result_->mismatches;
      if (result_->errors.size() < 8) {
        char buf[256];
        std::snprintf(buf, sizeof(buf),
                      "rank %d: %s %s %s count %zu: element %zu is %.9g, "
                      "expected %.9g (tolerance %.3g)",
                      rank_, CollectiveName(p.collective),
                      std::string(DataTypeName(p.dtype)).c_str(),
                      std::string(ReduceOpName(op)).c_str(), p.total, j, got_d,
                      want_d, tol);
        result_->errors.push_back(buf);
        std::fprintf(stderr, "MISMATCH %s\n", buf);
      }
    }
    return OkStatus();
  }

  Communicator& comm_;
  Memory& mem_;
  const SelftestOptions& options_;
  FILE* report_;
  SelftestResult* result_;
  const int n_;
  const int rank_;
  void* send_ = nullptr;
  void* recv_ = nullptr;
  void* stats_ = nullptr;
  std::vector<uint8_t> host_in_;
  std::vector<uint8_t> host_out_;
};

}  // namespace

Status RunSelftestOnCommunicator(Communicator& comm,
                                 const SelftestOptions& options, FILE* report,
                                 SelftestResult* result) {
  SelftestResult local;
  if (result == nullptr) result = &local;
  std::unique_ptr<Memory> mem;
  if (comm.backend() == "nccl") {
#if FTUNE_COMM_HAVE_NCCL
    mem = std::make_unique<CudaMemory>();
#else
    return Status(StatusCode::kFailedPrecondition, "built without NCCL");
#endif
  } else {
    mem = std::make_unique<HostMemory>();
  }
  if (options.dtypes.empty() || options.collectives.empty()) {
    return Status(StatusCode::kInvalidArgument, "nothing to test");
  }
  Runner runner(comm, *mem, options, report, result);
  return runner.Run();
}

Status RunSelftestRank(Rendezvous& rendezvous, const SelftestOptions& options,
                       FILE* report, SelftestResult* result) {
  std::unique_ptr<Communicator> comm;
  if (options.backend == "gloo") {
#if FTUNE_COMM_HAVE_GLOO
    GlooOptions go;
    go.host = options.host;
    go.timeout = options.timeout;
    FTUNE_RETURN_IF_ERROR(CreateGlooCommunicator(rendezvous, go, &comm));
#else
    return Status(StatusCode::kFailedPrecondition,
                  "this build has no Gloo backend (libgloo-dev missing)");
#endif
  } else if (options.backend == "nccl") {
#if FTUNE_COMM_HAVE_NCCL
    NcclOptions no;
    no.timeout = options.timeout;
    no.device = options.device;
    if (no.device < 0) {
      std::string why;
      const int count = CudaDeviceCount(&why);
      if (count == 0) {
        return Status(StatusCode::kFailedPrecondition,
                      "rank " + std::to_string(rendezvous.rank()) +
                          ": no CUDA device: " + why);
      }
      no.device = rendezvous.rank() % count;
    }
    FTUNE_RETURN_IF_ERROR(CreateNcclCommunicator(rendezvous, no, &comm));
#else
    return Status(StatusCode::kFailedPrecondition,
                  "this build has no NCCL backend (FTUNE_CUDA=OFF)");
#endif
  } else {
    return Status(StatusCode::kInvalidArgument,
                  "unknown backend '" + options.backend + "' (gloo or nccl)");
  }
  return RunSelftestOnCommunicator(*comm, options, report, result);
}

}  // namespace ftune::comm
