#include "worker/comm/nccl_communicator.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "worker/comm/net_util.h"

namespace ftune::comm {
namespace {

using Clock = std::chrono::steady_clock;

ncclDataType_t ToNccl(DataType d) {
  switch (d) {
    case DataType::kFloat32:
      return ncclFloat32;
    case DataType::kBFloat16:
      return ncclBfloat16;
    case DataType::kFloat16:
      return ncclFloat16;
    case DataType::kUInt8:
      return ncclUint8;
    case DataType::kInt32:
      return ncclInt32;
    case DataType::kInt64:
      return ncclInt64;
  }
  return ncclFloat32;
}

ncclRedOp_t ToNccl(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return ncclSum;
    case ReduceOp::kAvg:
      return ncclAvg;
    case ReduceOp::kMax:
      return ncclMax;
  }
  return ncclSum;
}

// The pause between polls of NCCL's or CUDA's state. Waits for a
// collective are mostly short, and a sleep's wake-up latency would show in
// every small message's time, so the first ~20000 polls only yield; a long
// wait (a slow peer, compute ahead on the stream) then polls every 100 us
// instead of burning a core.
void Backoff(int* spins) {
  if (++*spins < 20000) {
    std::this_thread::yield();
    return;
  }
  std::this_thread::sleep_for(std::chrono::microseconds(100));
}

// Waits while a non-blocking communicator reports ncclInProgress (after
// init, an enqueue or finalize). Returns the final state; ncclInProgress
// when `deadline` passed first.
ncclResult_t WaitWhileInProgress(ncclComm_t comm, Clock::time_point deadline) {
  int spins = 0;
  for (;;) {
    ncclResult_t state = ncclSuccess;
    const ncclResult_t r = ncclCommGetAsyncError(comm, &state);
    if (r != ncclSuccess) return r;
    if (state != ncclInProgress) return state;
    if (Clock::now() >= deadline) return ncclInProgress;
    Backoff(&spins);
  }
}

class NcclCommunicator : public Communicator {
 public:
  NcclCommunicator(int rank, int size, int device, std::string host,
                   std::chrono::milliseconds timeout, ncclComm_t comm,
                   int32_t* barrier_buf)
      : rank_(rank),
        size_(size),
        device_(device),
        host_(std::move(host)),
        timeout_(timeout),
        comm_(comm),
        barrier_buf_(barrier_buf) {
    watchdog_ = std::thread([this] { WatchdogLoop(); });
  }

  ~NcclCommunicator() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      cv_.notify_all();
    }
    watchdog_.join();
    cudaSetDevice(device_);
    std::lock_guard<std::mutex> lock(mu_);
    if (comm_ != nullptr) {
      // Finalize flushes outstanding work; a peer that is gone can keep it
      // from finishing, so it gets the timeout and then an abort.
      ncclResult_t r = ncclCommFinalize(comm_);
      if (r == ncclSuccess || r == ncclInProgress) {
        r = WaitWhileInProgress(comm_, Clock::now() + timeout_);
      }
      if (r == ncclSuccess) {
        ncclCommDestroy(comm_);
      } else {
        ncclCommAbort(comm_);
      }
      comm_ = nullptr;
    }
    for (auto& p : pending_) {
      cudaEventDestroy(p.start);
      cudaEventDestroy(p.end);
    }
    for (cudaEvent_t e : free_events_) cudaEventDestroy(e);
    cudaFree(barrier_buf_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string_view backend() const override { return "nccl"; }
  std::chrono::milliseconds timeout() const override { return timeout_; }

  Status AllGather(const void* send, void* recv, size_t send_count,
                   DataType dtype, StreamHandle stream) override {
    const std::string what = Describe("AllGather", send_count, dtype, nullptr);
    if (send_count > 0 && (send == nullptr || recv == nullptr)) {
      return Invalid(what, "null buffer");
    }
    return Enqueue(what, stream, [&](ncclComm_t c, cudaStream_t s) {
      return ncclAllGather(send, recv, send_count, ToNccl(dtype), c, s);
    });
  }

  Status ReduceScatter(const void* send, void* recv, size_t recv_count,
                       DataType dtype, ReduceOp op,
                       StreamHandle stream) override {
    const std::string what = Describe("ReduceScatter", recv_count, dtype, &op);
    if (recv_count > 0 && (send == nullptr || recv == nullptr)) {
      return Invalid(what, "null buffer");
    }
    return Enqueue(what, stream, [&](ncclComm_t c, cudaStream_t s) {
      return ncclReduceScatter(send, recv, recv_count, ToNccl(dtype),
                               ToNccl(op), c, s);
    });
  }

  Status AllReduce(const void* send, void* recv, size_t count, DataType dtype,
                   ReduceOp op, StreamHandle stream) override {
    const std::string what = Describe("AllReduce", count, dtype, &op);
    if (count > 0 && (send == nullptr || recv == nullptr)) {
      return Invalid(what, "null buffer");
    }
    return Enqueue(what, stream, [&](ncclComm_t c, cudaStream_t s) {
      return ncclAllReduce(send, recv, count, ToNccl(dtype), ToNccl(op), c, s);
    });
  }

  Status Reduce(const void* send, void* recv, size_t count, DataType dtype,
                ReduceOp op, int root, StreamHandle stream) override {
    const std::string what = Describe("Reduce", count, dtype, &op);
    if (root < 0 || root >= size_) {
      return Invalid(what, "root " + std::to_string(root) + " is not a rank of " +
                               std::to_string(size_));
    }
    if (count > 0 && (send == nullptr || (rank_ == root && recv == nullptr))) {
      return Invalid(what, "null buffer");
    }
    return Enqueue(what, stream, [&](ncclComm_t c, cudaStream_t s) {
      return ncclReduce(send, recv, count, ToNccl(dtype), ToNccl(op), root, c, s);
    });
  }

  Status Broadcast(void* buf, size_t count, DataType dtype, int root,
                   StreamHandle stream) override {
    const std::string what = Describe("Broadcast", count, dtype, nullptr);
    if (root < 0 || root >= size_) {
      return Invalid(what, "root " + std::to_string(root) +
                               " is not a rank of " + std::to_string(size_));
    }
    if (count > 0 && buf == nullptr) return Invalid(what, "null buffer");
    return Enqueue(what, stream, [&](ncclComm_t c, cudaStream_t s) {
      return ncclBroadcast(buf, buf, count, ToNccl(dtype), root, c, s);
    });
  }

  Status Barrier(StreamHandle stream) override {
    const std::string what = Describe("Barrier", 0, DataType::kInt32, nullptr);
    // NCCL has no barrier: a one-element allreduce that every rank must join
    // for any to finish, then a wait for it on the host.
    FTUNE_RETURN_IF_ERROR(
        Enqueue(what, stream, [&](ncclComm_t c, cudaStream_t s) {
          return ncclAllReduce(barrier_buf_, barrier_buf_, 1, ncclInt32,
                               ncclSum, c, s);
        }));
    return Synchronize(stream);
  }

  Status Synchronize(StreamHandle stream) override {
    const cudaStream_t s = static_cast<cudaStream_t>(stream);
    cudaSetDevice(device_);
    int spins = 0;
    Clock::time_point failed_at{};
    for (;;) {
      const cudaError_t e = cudaStreamQuery(s);
      std::lock_guard<std::mutex> lock(mu_);
      // The failure itself, not "broken by an earlier failure": this may be
      // the first call to hear of it.
      if (e == cudaSuccess) return failed_;
      if (e != cudaErrorNotReady) {
        // A sticky CUDA error: the context is unusable from here on.
        return FailLocked(StatusCode::kInternal,
                          Where("Synchronize") +
                              ": cudaStreamQuery: " + cudaGetErrorString(e));
      }
      if (!failed_.ok()) {
        // The watchdog has aborted the communicator, which ends NCCL's
        // kernels; give the stream a timeout's worth of time to drain, then
        // report anyway rather than wait on a stream that may never drain.
        if (failed_at == Clock::time_point{}) failed_at = Clock::now();
        if (Clock::now() - failed_at > timeout_) return failed_;
      }
      Backoff(&spins);
    }
  }

 private:
  struct Pending {
    std::string what;
    cudaEvent_t start;
    cudaEvent_t end;
    bool started = false;
    Clock::time_point started_at;
  };

  std::string Where(const char* name) const {
    return std::string("nccl ") + name + " on rank " + std::to_string(rank_) +
           " of " + std::to_string(size_) + " (host " + host_ +
           ", cuda:" + std::to_string(device_) + ")";
  }

  std::string Describe(const char* name, size_t count, DataType dtype,
                       const ReduceOp* op) {
    std::string s = std::string("nccl ") + name + " #" + std::to_string(++seq_);
    if (std::string_view(name) != "Barrier") {
      s += " (" + std::to_string(count) + " x " +
           std::string(DataTypeName(dtype));
      if (op != nullptr) s += ", " + std::string(ReduceOpName(*op));
      s += ")";
    }
    return s + " on rank " + std::to_string(rank_) + " of " +
           std::to_string(size_) + " (host " + host_ +
           ", cuda:" + std::to_string(device_) + ")";
  }

  Status Invalid(const std::string& what, const std::string& why) {
    // The peers are inside the collective already and will time out; this
    // rank's communicator is as unusable as theirs.
    std::lock_guard<std::mutex> lock(mu_);
    if (!failed_.ok()) return Broken();
    return FailLocked(StatusCode::kInvalidArgument, what + ": " + why);
  }

  Status Broken() const {
    return Status(
        StatusCode::kAborted,
        "nccl communicator of rank " + std::to_string(rank_) +
            " is unusable after an earlier failure: " + failed_.message());
  }

  // Records the first failure and aborts the communicator. mu_ held.
  Status FailLocked(StatusCode code, const std::string& message) {
    if (failed_.ok()) failed_ = Status(code, message);
    if (comm_ != nullptr) {
      ncclCommAbort(comm_);
      comm_ = nullptr;
    }
    return failed_;
  }

  Status TakeEvents(cudaEvent_t* start, cudaEvent_t* end) {
    for (cudaEvent_t* e : {start, end}) {
      if (!free_events_.empty()) {
        *e = free_events_.back();
        free_events_.pop_back();
        continue;
      }
      const cudaError_t err =
          cudaEventCreateWithFlags(e, cudaEventDisableTiming);
      if (err != cudaSuccess) {
        return Status(
            StatusCode::kInternal,
            Where("event") + ": cudaEventCreate: " + cudaGetErrorString(err));
      }
    }
    return OkStatus();
  }

  template <typename Fn>
  Status Enqueue(const std::string& what, StreamHandle stream, Fn&& call) {
    const cudaStream_t s = static_cast<cudaStream_t>(stream);
    std::lock_guard<std::mutex> lock(mu_);
    if (!failed_.ok()) return Broken();
    cudaError_t ce = cudaSetDevice(device_);
    Pending p;
    p.what = what;
    Status st =
        ce == cudaSuccess
            ? TakeEvents(&p.start, &p.end)
            : Status(StatusCode::kInternal,
                     what + ": cudaSetDevice: " + cudaGetErrorString(ce));
    if (!st.ok()) return FailLocked(st.code(), st.message());
    // On failure the events go back to the pool; nothing waits on them.
    auto fail = [&](StatusCode code, const std::string& message) {
      free_events_.push_back(p.start);
      free_events_.push_back(p.end);
      return FailLocked(code, message);
    };
    ce = cudaEventRecord(p.start, s);
    if (ce != cudaSuccess) {
      return fail(StatusCode::kInternal,
                  what + ": cudaEventRecord: " + cudaGetErrorString(ce));
    }
    ncclResult_t r = call(comm_, s);
    if (r == ncclInProgress) {
      r = WaitWhileInProgress(comm_, Clock::now() + timeout_);
      if (r == ncclInProgress) {
        return fail(StatusCode::kDeadlineExceeded,
                    what + ": not enqueued within " +
                        std::to_string(timeout_.count()) + " ms");
      }
    }
    if (r != ncclSuccess) {
      return fail(
          r == ncclInvalidArgument || r == ncclInvalidUsage
              ? StatusCode::kInvalidArgument
              : StatusCode::kInternal,
          what + ": " + ncclGetErrorString(r) + ": " + ncclGetLastError(comm_));
    }
    ce = cudaEventRecord(p.end, s);
    if (ce != cudaSuccess) {
      return fail(StatusCode::kInternal,
                  what + ": cudaEventRecord: " + cudaGetErrorString(ce));
    }
    pending_.push_back(std::move(p));
    cv_.notify_all();
    return OkStatus();
  }

  void WatchdogLoop() {
    cudaSetDevice(device_);
    std::unique_lock<std::mutex> lock(mu_);
    while (!stop_) {
      if (pending_.empty() || !failed_.ok()) {
        // Idle: asynchronous errors (a proxy's socket to a dead peer) still
        // need noticing, just not often.
        cv_.wait_for(lock, std::chrono::milliseconds(100));
      } else {
        lock.unlock();
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
        lock.lock();
      }
      if (stop_ || !failed_.ok() || comm_ == nullptr) continue;
      CheckLocked();
    }
  }

  void CheckLocked() {
    ncclResult_t async = ncclSuccess;
    const ncclResult_t r = ncclCommGetAsyncError(comm_, &async);
    if (r != ncclSuccess || (async != ncclSuccess && async != ncclInProgress)) {
      const ncclResult_t bad = r != ncclSuccess ? r : async;
      const std::string what =
          pending_.empty() ? Where("communicator") : pending_.front().what;
      FailLocked(bad == ncclRemoteError ? StatusCode::kUnavailable
                                        : StatusCode::kInternal,
                 what + " failed: NCCL reported " + ncclGetErrorString(bad) +
                     " (" + ncclGetLastError(nullptr) +
                     "); peer: unknown (NCCL does not say)");
      return;
    }
    // Retire finished collectives, oldest first (one stream's work finishes
    // in order; across streams a younger one may finish first, which only
    // delays its retirement).
    while (!pending_.empty()) {
      const cudaError_t e = cudaEventQuery(pending_.front().end);
      if (e == cudaErrorNotReady) break;
      if (e != cudaSuccess) {
        FailLocked(StatusCode::kInternal,
                   pending_.front().what + ": " + cudaGetErrorString(e));
        return;
      }
      free_events_.push_back(pending_.front().start);
      free_events_.push_back(pending_.front().end);
      pending_.pop_front();
    }
    const auto now = Clock::now();
    for (auto& p : pending_) {
      if (!p.started) {
        if (cudaEventQuery(p.start) != cudaSuccess) continue;
        p.started = true;
        p.started_at = now;
      }
      const auto ran = std::chrono::duration_cast<std::chrono::milliseconds>(
          now - p.started_at);
      if (ran > timeout_) {
        FailLocked(StatusCode::kDeadlineExceeded,
                   p.what + " failed: not finished " +
                       std::to_string(ran.count()) +
                       " ms after it started on the GPU (timeout " +
                       std::to_string(timeout_.count()) +
                       " ms): a peer rank died, hung or is in another "
                       "collective; peer: unknown (NCCL does not say); "
                       "communicator aborted");
        return;
      }
    }
  }

  const int rank_;
  const int size_;
  const int device_;
  const std::string host_;
  const std::chrono::milliseconds timeout_;
  uint64_t seq_ = 0;  // caller's thread only

  std::mutex mu_;  // guards everything below; held around every NCCL call
  std::condition_variable cv_;
  ncclComm_t comm_;  // null once aborted
  Status failed_;
  std::deque<Pending> pending_;
  std::vector<cudaEvent_t> free_events_;
  bool stop_ = false;
  int32_t* barrier_buf_;  // one device int for Barrier
  std::thread watchdog_;
};

Status CheckNvls(const NcclOptions& options) {
  const char* v = std::getenv("NCCL_NVLS_ENABLE");
  if (v == nullptr) {
    // Set before NCCL reads its environment (at its first initialisation).
    ::setenv("NCCL_NVLS_ENABLE", "0", 0);
    return OkStatus();
  }
  if (std::string(v) == "0" || options.allow_nvlink_multicast)
    return OkStatus();
  return Status(StatusCode::kFailedPrecondition,
                std::string("NCCL_NVLS_ENABLE=") + v +
                    ": NVLink multicast must stay off on shared GPU hosts "
                    "(NVLS can take their GPUs out of service); set "
                    "NCCL_NVLS_ENABLE=0 or "
                    "NcclOptions::allow_nvlink_multicast");
}

}  // namespace

int CudaDeviceCount(std::string* why) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    if (why != nullptr) *why = cudaGetErrorString(e);
    return 0;
  }
  if (n == 0 && why != nullptr) *why = "no CUDA device";
  return n;
}

Status CreateNcclCommunicator(Rendezvous& rendezvous,
                              const NcclOptions& options,
                              std::unique_ptr<Communicator>* out) {
  const int rank = rendezvous.rank();
  const int size = rendezvous.world_size();
  const std::string host = LocalHostName();
  int device = options.device;
  std::string where = "nccl setup on rank " + std::to_string(rank) + " of " +
                      std::to_string(size) + " (host " + host + ")";
  if (size < 1 || rank < 0 || rank >= size) {
    return Status(StatusCode::kInvalidArgument,
                  where + ": rank/world size out of range");
  }
  if (options.timeout.count() <= 0) {
    return Status(StatusCode::kInvalidArgument,
                  where + ": timeout must be > 0");
  }
  const std::chrono::milliseconds setup = options.setup_timeout.count() > 0
                                              ? options.setup_timeout
                                              : options.timeout;
  Status s = CheckNvls(options);
  if (!s.ok()) return Status(s.code(), where + ": " + s.message());
  cudaError_t ce = device >= 0 ? cudaSetDevice(device) : cudaGetDevice(&device);
  if (ce != cudaSuccess) {
    return Status(StatusCode::kInternal, where + ": selecting CUDA device " +
                                             std::to_string(device) + ": " +
                                             cudaGetErrorString(ce));
  }
  where += " cuda:" + std::to_string(device);

  ncclUniqueId id;
  std::memset(&id, 0, sizeof(id));
  std::string published;
  if (rank == 0) {
    const ncclResult_t r = ncclGetUniqueId(&id);
    if (r != ncclSuccess) {
      return Status(StatusCode::kInternal,
                    where + ": ncclGetUniqueId: " + ncclGetErrorString(r));
    }
    published.assign(reinterpret_cast<const char*>(&id), sizeof(id));
  }
  std::string got;
  s = rendezvous.Exchange(published, setup, &got);
  if (!s.ok()) return Status(s.code(), where + ": rendezvous: " + s.message());
  if (got.size() != sizeof(id)) {
    return Status(StatusCode::kInvalidArgument,
                  where + ": rendezvous gave " + std::to_string(got.size()) +
                      " bytes, not an ncclUniqueId (" +
                      std::to_string(sizeof(id)) + ")");
  }
  std::memcpy(&id, got.data(), sizeof(id));

  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t comm = nullptr;
  ncclResult_t r = ncclCommInitRankConfig(&comm, size, id, rank, &config);
  if (r == ncclInProgress || (r == ncclSuccess && comm != nullptr)) {
    r = WaitWhileInProgress(comm, Clock::now() + setup);
  }
  if (r != ncclSuccess) {
    const std::string last = comm != nullptr ? ncclGetLastError(comm) : "";
    if (comm != nullptr) ncclCommAbort(comm);
    if (r == ncclInProgress) {
      return Status(StatusCode::kDeadlineExceeded,
                    where + ": ncclCommInitRankConfig did not finish within " +
                        std::to_string(setup.count()) +
                        " ms (a rank missing?)");
    }
    return Status(StatusCode::kInternal,
                  where + ": ncclCommInitRankConfig: " + ncclGetErrorString(r) +
                      ": " + last);
  }
  int32_t* barrier_buf = nullptr;
  ce = cudaMalloc(&barrier_buf, sizeof(int32_t));
  if (ce == cudaSuccess) ce = cudaMemset(barrier_buf, 0, sizeof(int32_t));
  if (ce != cudaSuccess) {
    ncclCommAbort(comm);
    return Status(StatusCode::kInternal,
                  where + ": cudaMalloc: " + cudaGetErrorString(ce));
  }
  *out = std::make_unique<NcclCommunicator>(rank, size, device, host,
                                            options.timeout, comm, barrier_buf);
  return OkStatus();
}

}  // namespace ftune::comm
