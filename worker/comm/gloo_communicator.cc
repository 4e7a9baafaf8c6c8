#include "worker/comm/gloo_communicator.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <gloo/allgather.h>
#include <gloo/allreduce.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/common/error.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/tcp/address.h>
#include <gloo/transport/tcp/device.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <type_traits>
#include <vector>

#include "worker/comm/half.h"
#include "worker/comm/net_util.h"
#include "worker/comm/tcp_store.h"

namespace ftune::comm {
namespace {

using Clock = std::chrono::steady_clock;

// Gloo's Store interface over our TcpStoreClient. Gloo reports store errors
// as exceptions, so this throws; CreateGlooCommunicator catches them.
class GlooStoreAdapter : public gloo::rendezvous::Store {
 public:
  GlooStoreAdapter(TcpStoreClient* client, std::chrono::milliseconds timeout)
      : client_(client), timeout_(timeout) {}

  void set(const std::string& key, const std::vector<char>& data) override {
    Check(client_->Set(key, std::string_view(data.data(), data.size())));
  }
  std::vector<char> get(const std::string& key) override {
    std::string value;
    Check(client_->Get(key, timeout_, &value));
    return std::vector<char>(value.begin(), value.end());
  }
  void wait(const std::vector<std::string>& keys) override {
    Check(client_->Wait(keys, timeout_));
  }
  void wait(const std::vector<std::string>& keys,
            const std::chrono::milliseconds& timeout) override {
    Check(client_->Wait(keys, timeout));
  }

 private:
  static void Check(const Status& s) {
    if (!s.ok()) throw gloo::IoException(s.ToString());
  }
  TcpStoreClient* client_;
  std::chrono::milliseconds timeout_;
};

// Wrapping add: signed overflow is undefined in C++, two's complement
// wrapping is what NCCL's integer sums do.
template <typename T>
T WrapAdd(T a, T b) {
  if constexpr (std::is_integral_v<T>) {
    using U = std::make_unsigned_t<T>;
    return static_cast<T>(static_cast<U>(a) + static_cast<U>(b));
  } else {
    return a + b;
  }
}

template <typename T>
void SumFn(void* c, const void* a, const void* b, size_t n) {
  T* out = static_cast<T*>(c);
  const T* x = static_cast<const T*>(a);
  const T* y = static_cast<const T*>(b);
  for (size_t i = 0; i < n; ++i) out[i] = WrapAdd(x[i], y[i]);
}

template <typename T>
void MaxFn(void* c, const void* a, const void* b, size_t n) {
  T* out = static_cast<T*>(c);
  const T* x = static_cast<const T*>(a);
  const T* y = static_cast<const T*>(b);
  for (size_t i = 0; i < n; ++i) out[i] = std::max(x[i], y[i]);
}

template <typename T>
void DivideInPlace(T* p, size_t n, int world) {
  for (size_t i = 0; i < n; ++i)
    p[i] = static_cast<T>(p[i] / static_cast<T>(world));
}

bool IsHalf(DataType d) {
  return d == DataType::kBFloat16 || d == DataType::kFloat16;
}

void WidenHalf(DataType d, const void* src, float* dst, size_t n) {
  const uint16_t* s = static_cast<const uint16_t*>(src);
  if (d == DataType::kBFloat16) {
    for (size_t i = 0; i < n; ++i) dst[i] = Bf16ToFloat(s[i]);
  } else {
    for (size_t i = 0; i < n; ++i) dst[i] = HalfToFloat(s[i]);
  }
}

// dst = round(src / divisor); divisor 1 for sum and max.
void NarrowHalf(DataType d, const float* src, void* dst, size_t n,
                float divisor) {
  uint16_t* out = static_cast<uint16_t*>(dst);
  if (d == DataType::kBFloat16) {
    for (size_t i = 0; i < n; ++i) out[i] = FloatToBf16(src[i] / divisor);
  } else {
    for (size_t i = 0; i < n; ++i) out[i] = FloatToHalf(src[i] / divisor);
  }
}

// Gloo's tcp::Address::str() gives "[ip]:port" (plus "$seq" for a pair);
// its messages about a closed or failed connection quote that string.
std::string AddressKey(const std::vector<char>& bytes) {
  std::string s = gloo::transport::tcp::Address(bytes).str();
  const size_t dollar = s.find('$');
  if (dollar != std::string::npos) s.resize(dollar);
  return s;
}

// A socket address as Gloo's messages print it. Gloo's own formatting is
// used (its port is printed in network byte order), so keys match quotes.
std::string SockaddrKey(const sockaddr_storage& ss, socklen_t len) {
  if (ss.ss_family != AF_INET && ss.ss_family != AF_INET6) return "";
  std::string s =
      gloo::transport::tcp::Address(reinterpret_cast<const sockaddr*>(&ss), len)
          .str();
  const size_t dollar = s.find('$');
  if (dollar != std::string::npos) s.resize(dollar);
  return s;
}

// Local addresses of this process's TCP connections to any of `listeners`
// (the peers' Gloo listening sockets), one per line. A peer that accepted
// such a connection knows it only by this address, and Gloo's error on
// that side quotes it; publishing them lets the peer name us.
std::string OutgoingConnections(const std::map<std::string, int>& listeners) {
  std::string out;
  DIR* dir = ::opendir("/proc/self/fd");
  if (dir == nullptr) return out;
  while (dirent* e = ::readdir(dir)) {
    const int fd = std::atoi(e->d_name);
    if (fd <= 2 || fd == ::dirfd(dir)) continue;
    sockaddr_storage local{}, peer{};
    socklen_t llen = sizeof(local), plen = sizeof(peer);
    if (::getsockname(fd, reinterpret_cast<sockaddr*>(&local), &llen) != 0 ||
        ::getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &plen) != 0) {
      continue;
    }
    if (listeners.count(SockaddrKey(peer, plen)) == 0) continue;
    out += SockaddrKey(local, llen) + "\n";
  }
  ::closedir(dir);
  return out;
}

class GlooCommunicator : public Communicator {
 public:
  GlooCommunicator(int rank, int size, std::string host,
                   std::chrono::milliseconds timeout,
                   std::shared_ptr<gloo::transport::Device> device,
                   std::shared_ptr<gloo::rendezvous::Context> context,
                   std::map<std::string, int> peer_by_address)
      : rank_(rank),
        size_(size),
        host_(std::move(host)),
        timeout_(timeout),
        device_(std::move(device)),
        context_(std::move(context)),
        peer_by_address_(std::move(peer_by_address)) {}

  ~GlooCommunicator() override {
    // The context's pairs reference the device; release them first.
    context_.reset();
    device_.reset();
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string_view backend() const override { return "gloo"; }
  std::chrono::milliseconds timeout() const override { return timeout_; }

  Status AllGather(const void* send, void* recv, size_t send_count,
                   DataType dtype, StreamHandle) override {
    Op op = Begin("AllGather", send_count, dtype, nullptr);
    if (!op.status.ok()) return op.status;
    if (send_count > 0 && (send == nullptr || recv == nullptr)) {
      return Invalid(op, "null buffer");
    }
    if (send_count == 0) return OkStatus();
    const size_t bytes = send_count * DataTypeSize(dtype);
    uint8_t* out = static_cast<uint8_t*>(recv);
    return Run(op, [&] {
      gloo::AllgatherOptions opts(context_);
      // In place when the input already sits at this rank's offset: Gloo
      // then skips the copy (memcpy onto itself is undefined).
      if (send != out + rank_ * bytes) {
        opts.setInput(const_cast<uint8_t*>(static_cast<const uint8_t*>(send)),
                      bytes);
      }
      opts.setOutput(out, bytes * size_);
      opts.setTimeout(timeout_);
      gloo::allgather(opts);
    });
  }

  Status ReduceScatter(const void* send, void* recv, size_t recv_count,
                       DataType dtype, ReduceOp rop, StreamHandle) override {
    Op op = Begin("ReduceScatter", recv_count, dtype, &rop);
    if (!op.status.ok()) return op.status;
    if (recv_count > 0 && (send == nullptr || recv == nullptr)) {
      return Invalid(op, "null buffer");
    }
    if (recv_count == 0) return OkStatus();
    const size_t total = recv_count * size_;
    const size_t offset = recv_count * rank_;
    return Run(op, [&] {
      if (IsHalf(dtype)) {
        float* acc = Scratch<float>(total);
        WidenHalf(dtype, send, acc, total);
        GlooAllreduce<float>(acc, total, rop);
        NarrowHalf(dtype, acc + offset, recv, recv_count,
                   rop == ReduceOp::kAvg ? static_cast<float>(size_) : 1.0f);
        return;
      }
      const size_t esize = DataTypeSize(dtype);
      uint8_t* acc = Scratch<uint8_t>(total * esize);
      std::memcpy(acc, send, total * esize);
      ReduceNative(dtype, acc, total, rop, /*divide_from=*/offset,
                   /*divide_count=*/recv_count);
      std::memcpy(recv, acc + offset * esize, recv_count * esize);
    });
  }

  Status AllReduce(const void* send, void* recv, size_t count, DataType dtype,
                   ReduceOp rop, StreamHandle) override {
    Op op = Begin("AllReduce", count, dtype, &rop);
    if (!op.status.ok()) return op.status;
    if (count > 0 && (send == nullptr || recv == nullptr)) {
      return Invalid(op, "null buffer");
    }
    if (count == 0) return OkStatus();
    return Run(op, [&] { AllReduceInto(send, recv, count, dtype, rop); });
  }

  // An all-reduce whose result only the root keeps (Gloo's own reduce has
  // no 16-bit path; ReduceScatter works the same way). Same traffic order
  // on every rank, so failures and timeouts behave like AllReduce's.
  Status Reduce(const void* send, void* recv, size_t count, DataType dtype,
                ReduceOp rop, int root, StreamHandle) override {
    Op op = Begin("Reduce", count, dtype, &rop);
    if (!op.status.ok()) return op.status;
    if (root < 0 || root >= size_) {
      return Invalid(op, "root " + std::to_string(root) + " is not a rank of " +
                             std::to_string(size_));
    }
    if (count > 0 && (send == nullptr || (rank_ == root && recv == nullptr))) {
      return Invalid(op, "null buffer");
    }
    if (count == 0) return OkStatus();
    return Run(op, [&] {
      AllReduceInto(send, rank_ == root ? recv : nullptr, count, dtype, rop);
    });
  }

  Status Broadcast(void* buf, size_t count, DataType dtype, int root,
                   StreamHandle) override {
    Op op = Begin("Broadcast", count, dtype, nullptr);
    if (!op.status.ok()) return op.status;
    if (root < 0 || root >= size_) {
      return Invalid(op, "root " + std::to_string(root) + " is not a rank of " +
                             std::to_string(size_));
    }
    if (count > 0 && buf == nullptr) return Invalid(op, "null buffer");
    if (count == 0) return OkStatus();
    return Run(op, [&] {
      gloo::BroadcastOptions opts(context_);
      opts.setOutput(static_cast<uint8_t*>(buf), count * DataTypeSize(dtype));
      opts.setRoot(root);
      opts.setTimeout(timeout_);
      gloo::broadcast(opts);
    });
  }

  Status Barrier(StreamHandle) override {
    Op op = Begin("Barrier", 0, DataType::kUInt8, nullptr);
    if (!op.status.ok()) return op.status;
    return Run(op, [&] {
      gloo::BarrierOptions opts(context_);
      opts.setTimeout(timeout_);
      gloo::barrier(opts);
    });
  }

  Status Synchronize(StreamHandle) override {
    if (!failed_.ok()) return Broken();
    return OkStatus();
  }

 private:
  struct Op {
    Status status;
    std::string what;  // "gloo AllReduce #7 (1000 x fp32, sum) on rank 1 of 3"
  };

  Op Begin(const char* name, size_t count, DataType dtype,
           const ReduceOp* rop) {
    Op op;
    ++seq_;
    if (!failed_.ok()) {
      op.status = Broken();
      return op;
    }
    op.what = std::string("gloo ") + name + " #" + std::to_string(seq_);
    if (std::string_view(name) != "Barrier") {
      op.what += " (" + std::to_string(count) + " x " +
                 std::string(DataTypeName(dtype));
      if (rop != nullptr) op.what += ", " + std::string(ReduceOpName(*rop));
      op.what += ")";
    }
    op.what += " on rank " + std::to_string(rank_) + " of " +
               std::to_string(size_) + " (host " + host_ + ")";
    return op;
  }

  Status Invalid(const Op& op, const std::string& why) {
    // A bad argument is the caller's bug on this rank only; the peers are
    // now inside the collective and will time out, so the communicator is
    // as broken as after a transport error.
    failed_ = Status(StatusCode::kInvalidArgument, op.what + ": " + why);
    return failed_;
  }

  Status Broken() const {
    return Status(
        StatusCode::kAborted,
        "gloo communicator of rank " + std::to_string(rank_) +
            " is unusable after an earlier failure: " + failed_.message());
  }

  // Runs one Gloo call and turns its exceptions into this rank's sticky
  // error, naming the peer when Gloo's message quotes its address.
  template <typename Fn>
  Status Run(const Op& op, Fn&& fn) {
    const auto start = Clock::now();
    std::string error;
    try {
      fn();
      return OkStatus();
    } catch (const std::exception& e) {
      error = e.what();
    }
    const auto elapsed = std::chrono::duration_cast<std::chrono::milliseconds>(
        Clock::now() - start);
    StatusCode code = StatusCode::kInternal;
    std::string cause;
    if (error.find("Timed out") != std::string::npos ||
        error.find("timeout") != std::string::npos) {
      code = StatusCode::kDeadlineExceeded;
      cause = "no progress within the " + std::to_string(timeout_.count()) +
              " ms timeout (a peer rank died, hung or is in another "
              "collective)";
    } else if (error.find("closed") != std::string::npos ||
               error.find("reset") != std::string::npos ||
               error.find("Read error") != std::string::npos ||
               error.find("Write error") != std::string::npos ||
               error.find("Broken pipe") != std::string::npos) {
      code = StatusCode::kUnavailable;
      cause = "lost the connection to a peer (it died, or failed first)";
    } else {
      cause = "gloo error";
    }
    std::string peer;
    for (const auto& [address, r] : peer_by_address_) {
      if (error.find(address) != std::string::npos) {
        peer = "peer rank " + std::to_string(r);
        break;
      }
    }
    if (peer.empty() && size_ == 2) {
      peer = "peer rank " + std::to_string(1 - rank_) + " (the only peer)";
    }
    std::string msg = op.what + " failed after " +
                      std::to_string(elapsed.count()) + " ms: " + cause;
    msg += peer.empty() ? "; peer: unknown" : "; " + peer;
    msg += "; gloo: " + error;
    failed_ = Status(code, msg);
    return failed_;
  }

  // AllReduce's and Reduce's body: `send` reduced across ranks into `recv`
  // (nullptr: into scratch, for a Reduce's non-root). 16-bit floats are
  // summed in fp32 and rounded once.
  void AllReduceInto(const void* send, void* recv, size_t count, DataType dtype, ReduceOp rop) {
    if (IsHalf(dtype)) {
      float* acc = Scratch<float>(count);
      WidenHalf(dtype, send, acc, count);
      GlooAllreduce<float>(acc, count, rop);
      if (recv != nullptr) {
        NarrowHalf(dtype, acc, recv, count,
                   rop == ReduceOp::kAvg ? static_cast<float>(size_) : 1.0f);
      }
      return;
    }
    const size_t bytes = count * DataTypeSize(dtype);
    void* out = recv != nullptr ? recv : Scratch<uint8_t>(bytes);
    if (send != out) std::memcpy(out, send, bytes);
    ReduceNative(dtype, out, count, rop, 0, count);
  }

  template <typename T>
  T* Scratch(size_t n) {
    const size_t bytes = n * sizeof(T);
    if (scratch_.size() < bytes) scratch_.resize(bytes);
    return reinterpret_cast<T*>(scratch_.data());
  }

  template <typename T>
  void GlooAllreduce(T* buf, size_t count, ReduceOp rop) {
    gloo::AllreduceOptions opts(context_);
    opts.setOutput(buf, count);
    opts.setReduceFunction(rop == ReduceOp::kMax ? &MaxFn<T> : &SumFn<T>);
    opts.setTimeout(timeout_);
    gloo::allreduce(opts);
  }

  // Reduces `buf` (count elements of a non-16-bit dtype) in place across
  // ranks; for kAvg divides [divide_from, divide_from + divide_count).
  void ReduceNative(DataType dtype, void* buf, size_t count, ReduceOp rop,
                    size_t divide_from, size_t divide_count) {
    switch (dtype) {
      case DataType::kFloat32:
        return ReduceTyped(static_cast<float*>(buf), count, rop, divide_from,
                           divide_count);
      case DataType::kUInt8:
        return ReduceTyped(static_cast<uint8_t*>(buf), count, rop, divide_from,
                           divide_count);
      case DataType::kInt32:
        return ReduceTyped(static_cast<int32_t*>(buf), count, rop, divide_from,
                           divide_count);
      case DataType::kInt64:
        return ReduceTyped(static_cast<int64_t*>(buf), count, rop, divide_from,
                           divide_count);
      case DataType::kBFloat16:
      case DataType::kFloat16:
        break;  // widened by the callers
    }
  }

  template <typename T>
  void ReduceTyped(T* buf, size_t count, ReduceOp rop, size_t divide_from,
                   size_t divide_count) {
    GlooAllreduce<T>(buf, count, rop);
    if (rop == ReduceOp::kAvg)
      DivideInPlace(buf + divide_from, divide_count, size_);
  }

  const int rank_;
  const int size_;
  const std::string host_;
  const std::chrono::milliseconds timeout_;
  std::shared_ptr<gloo::transport::Device> device_;
  std::shared_ptr<gloo::rendezvous::Context> context_;
  // Addresses Gloo's errors quote (the peers' pair listeners and outgoing
  // connections, in Gloo's own formatting) -> the peer's rank.
  const std::map<std::string, int> peer_by_address_;
  uint64_t seq_ = 0;
  Status failed_;
  std::vector<uint8_t> scratch_;
};

}  // namespace

Status CreateGlooCommunicator(Rendezvous& rendezvous,
                              const GlooOptions& options,
                              std::unique_ptr<Communicator>* out) {
  IgnoreSigpipe();
  const int rank = rendezvous.rank();
  const int size = rendezvous.world_size();
  const std::string where = "gloo setup on rank " + std::to_string(rank) +
                            " of " + std::to_string(size);
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
  std::string host;
  FTUNE_RETURN_IF_ERROR(
      ResolveCommHost(options.host, options.iface, &host));

  // Rank 0 hosts the store for the duration of the setup only.
  std::unique_ptr<TcpStoreServer> server;
  std::string published;
  if (rank == 0) {
    FTUNE_RETURN_IF_ERROR(TcpStoreServer::Listen(host, 0, &server));
    server->Start();
    published = server->address();
  }
  std::string store_address;
  Status s = rendezvous.Exchange(published, setup, &store_address);
  if (!s.ok()) return Status(s.code(), where + ": rendezvous: " + s.message());
  std::unique_ptr<TcpStoreClient> client;
  s = TcpStoreClient::Connect(store_address, setup, &client);
  if (!s.ok()) return Status(s.code(), where + ": " + s.message());

  GlooStoreAdapter store(client.get(), setup);
  std::shared_ptr<gloo::transport::Device> device;
  std::shared_ptr<gloo::rendezvous::Context> context;
  std::map<std::string, int> peer_by_address;
  try {
    gloo::transport::tcp::attr attr;
    attr.hostname = host;
    device = gloo::transport::tcp::CreateDevice(attr);
    context = std::make_shared<gloo::rendezvous::Context>(rank, size);
    context->setTimeout(setup);
    context->connectFullMesh(store, device);
    // From here on the context's default is the collective timeout (every
    // collective also passes it explicitly).
    context->setTimeout(options.timeout);
    // Map the addresses Gloo's errors quote back to ranks, so that an error
    // can say which peer failed. connectFullMesh stored, under each rank's
    // number, the listening addresses of that rank's pairs (one per peer,
    // equal length). The side that accepted a connection knows its peer
    // only by the peer's outgoing address, which each rank publishes.
    std::map<std::string, int> listeners;
    for (int r = 0; r < size && size > 1; ++r) {
      std::vector<char> all = store.get(std::to_string(r));
      const size_t one = all.size() / static_cast<size_t>(size - 1);
      for (size_t off = 0; one > 0 && off + one <= all.size(); off += one) {
        listeners[AddressKey(
            std::vector<char>(all.begin() + off, all.begin() + off + one))] = r;
      }
    }
    for (const auto& [address, r] : listeners) {
      if (r != rank) peer_by_address[address] = r;
    }
    // Past this barrier every rank has left connectFullMesh, so the
    // connections listed below exist however Gloo completes them.
    gloo::BarrierOptions connected(context);
    connected.setTimeout(setup);
    gloo::barrier(connected);
    const std::string outgoing = OutgoingConnections(listeners);
    store.set("ftune/outgoing/" + std::to_string(rank),
              std::vector<char>(outgoing.begin(), outgoing.end()));
    for (int r = 0; r < size; ++r) {
      if (r == rank) continue;
      std::vector<char> list = store.get("ftune/outgoing/" + std::to_string(r));
      std::string line;
      for (char c : list) {
        if (c != '\n') {
          line.push_back(c);
          continue;
        }
        if (!line.empty()) peer_by_address[line] = r;
        line.clear();
      }
    }
    // Nobody needs the store past this barrier: rank 0 may close it.
    gloo::BarrierOptions barrier(context);
    barrier.setTimeout(setup);
    gloo::barrier(barrier);
  } catch (const std::exception& e) {
    return Status(
        std::string(e.what()).find("imed out") != std::string::npos ||
                std::string(e.what()).find("DEADLINE") != std::string::npos
            ? StatusCode::kDeadlineExceeded
            : StatusCode::kUnavailable,
        where + " (host " + host +
            "): connecting the mesh failed: " + e.what());
  }
  client.reset();
  server.reset();
  *out = std::make_unique<GlooCommunicator>(
      rank, size, host, options.timeout, std::move(device), std::move(context),
      std::move(peer_by_address));
  return OkStatus();
}

}  // namespace ftune::comm
