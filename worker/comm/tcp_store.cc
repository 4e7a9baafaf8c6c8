#include "worker/comm/tcp_store.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "worker/comm/net_util.h"

namespace ftune::comm {
namespace {

using Clock = std::chrono::steady_clock;

enum Op : uint8_t { kSet = 1, kGet = 2, kWait = 3 };
enum Result : uint8_t { kOk = 0, kTimedOut = 1, kMalformed = 2 };

// Largest message either side accepts; rendezvous values are a few hundred
// bytes, so anything near this is a corrupt or foreign stream.
constexpr uint32_t kMaxMessageBytes = 16u << 20;
// How much longer than the server may hold a request the client waits for
// its reply before calling the server dead.
constexpr auto kReplySlack = std::chrono::seconds(10);
// Far enough away to mean "no deadline" for a server connection, which
// Stop() wakes by shutting the socket down.
const auto kNever = std::chrono::hours(24 * 365);

void PutU32(std::string* s, uint32_t v) {
  char b[4];
  for (int i = 0; i < 4; ++i) b[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  s->append(b, 4);
}

void PutI64(std::string* s, int64_t v) {
  const uint64_t u = static_cast<uint64_t>(v);
  char b[8];
  for (int i = 0; i < 8; ++i) b[i] = static_cast<char>((u >> (8 * i)) & 0xff);
  s->append(b, 8);
}

void PutString(std::string* s, std::string_view v) {
  PutU32(s, static_cast<uint32_t>(v.size()));
  s->append(v.data(), v.size());
}

// Reads fields off a message body; any read past the end marks it bad.
class Reader {
 public:
  explicit Reader(std::string_view s) : s_(s) {}
  bool ok() const { return ok_; }
  bool done() const { return pos_ == s_.size(); }
  uint8_t U8() {
    if (!Need(1)) return 0;
    return static_cast<uint8_t>(s_[pos_++]);
  }
  uint32_t U32() {
    if (!Need(4)) return 0;
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      v |= static_cast<uint32_t>(static_cast<uint8_t>(s_[pos_ + i])) << (8 * i);
    }
    pos_ += 4;
    return v;
  }
  int64_t I64() {
    if (!Need(8)) return 0;
    uint64_t v = 0;
    for (int i = 0; i < 8; ++i) {
      v |= static_cast<uint64_t>(static_cast<uint8_t>(s_[pos_ + i])) << (8 * i);
    }
    pos_ += 8;
    return static_cast<int64_t>(v);
  }
  std::string String() {
    const uint32_t n = U32();
    if (!Need(n)) return {};
    std::string v(s_.substr(pos_, n));
    pos_ += n;
    return v;
  }

 private:
  bool Need(size_t n) {
    if (!ok_ || s_.size() - pos_ < n) {
      ok_ = false;
      return false;
    }
    return true;
  }
  std::string_view s_;
  size_t pos_ = 0;
  bool ok_ = true;
};

Status SendMessage(int fd, const std::string& body,
                   Clock::time_point deadline) {
  std::string framed;
  framed.reserve(body.size() + 4);
  PutU32(&framed, static_cast<uint32_t>(body.size()));
  framed += body;
  return WriteAll(fd, framed.data(), framed.size(), deadline);
}

Status ReceiveMessage(int fd, std::string* body, Clock::time_point deadline) {
  unsigned char len_bytes[4];
  FTUNE_RETURN_IF_ERROR(ReadAll(fd, len_bytes, 4, deadline));
  const uint32_t len = len_bytes[0] | (len_bytes[1] << 8) |
                       (len_bytes[2] << 16) |
                       (static_cast<uint32_t>(len_bytes[3]) << 24);
  if (len > kMaxMessageBytes) {
    return Status(StatusCode::kInternal,
                  "store message of " + std::to_string(len) +
                      " bytes: not a ftune store stream");
  }
  body->resize(len);
  return ReadAll(fd, body->data(), len, deadline);
}

void SetNoDelay(int fd) {
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

// Connects one socket to `ai` before `deadline` (non-blocking connect, so a
// silent remote host cannot hold us past it).
Status ConnectOne(const addrinfo* ai, Clock::time_point deadline, int* out) {
  const int fd =
      ::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK,
               ai->ai_protocol);
  if (fd < 0) {
    return Status(StatusCode::kInternal,
                  std::string("socket: ") + strerror(errno));
  }
  if (::connect(fd, ai->ai_addr, ai->ai_addrlen) != 0) {
    if (errno != EINPROGRESS) {
      const int err = errno;
      ::close(fd);
      return Status(StatusCode::kUnavailable,
                    std::string("connect: ") + strerror(err));
    }
    for (;;) {
      pollfd p{fd, POLLOUT, 0};
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          deadline - Clock::now());
      const int r =
          ::poll(&p, 1, static_cast<int>(std::max<int64_t>(0, left.count())));
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) {
        ::close(fd);
        return Status(StatusCode::kDeadlineExceeded, "connect timed out");
      }
      break;
    }
    int err = 0;
    socklen_t len = sizeof(err);
    ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err != 0) {
      ::close(fd);
      return Status(StatusCode::kUnavailable,
                    std::string("connect: ") + strerror(err));
    }
  }
  SetNoDelay(fd);
  *out = fd;
  return OkStatus();
}

}  // namespace

// ---------------------------------------------------------------- server

Status TcpStoreServer::Listen(const std::string& host, int port,
                              std::unique_ptr<TcpStoreServer>* out) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* res = nullptr;
  const std::string port_str = std::to_string(port);
  const int gai = ::getaddrinfo(host.empty() ? nullptr : host.c_str(),
                                port_str.c_str(), &hints, &res);
  if (gai != 0) {
    return Status(StatusCode::kInvalidArgument,
                  "store: cannot resolve '" + host + "': " + gai_strerror(gai));
  }
  std::string last_error = "no address";
  for (addrinfo* ai = res; ai != nullptr; ai = ai->ai_next) {
    const int fd = ::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC,
                            ai->ai_protocol);
    if (fd < 0) {
      last_error = std::string("socket: ") + strerror(errno);
      continue;
    }
    int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (::bind(fd, ai->ai_addr, ai->ai_addrlen) != 0 ||
        ::listen(fd, 256) != 0) {
      last_error = std::string("bind/listen: ") + strerror(errno);
      ::close(fd);
      continue;
    }
    sockaddr_storage ss{};
    socklen_t len = sizeof(ss);
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len);
    const int bound_port =
        ss.ss_family == AF_INET6
            ? ntohs(reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port)
            : ntohs(reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
    ::freeaddrinfo(res);
    out->reset(new TcpStoreServer(fd, JoinHostPort(host, bound_port)));
    return OkStatus();
  }
  ::freeaddrinfo(res);
  return Status(StatusCode::kInternal,
                "store: cannot listen on '" + host + "': " + last_error);
}

TcpStoreServer::TcpStoreServer(int listen_fd, std::string address)
    : listen_fd_(listen_fd), address_(std::move(address)) {}

TcpStoreServer::~TcpStoreServer() { Stop(); }

void TcpStoreServer::Start() {
  accept_thread_ = std::thread([this] { AcceptLoop(); });
}

void TcpStoreServer::Stop() {
  if (stopping_.exchange(true)) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    changed_.notify_all();
  }
  if (accept_thread_.joinable()) accept_thread_.join();
  std::vector<std::thread> threads;
  std::vector<int> fds;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (int fd : conn_fds_) ::shutdown(fd, SHUT_RDWR);
    threads.swap(conn_threads_);
    fds.swap(conn_fds_);
  }
  for (auto& t : threads) t.join();
  for (int fd : fds) ::close(fd);
  if (listen_fd_ >= 0) ::close(listen_fd_);
  listen_fd_ = -1;
}

void TcpStoreServer::AcceptLoop() {
  while (!stopping_.load()) {
    // A short poll rather than a blocking accept: Stop() needs no trick to
    // wake this thread, and 100 ms is nothing next to a rendezvous.
    pollfd p{listen_fd_, POLLIN, 0};
    const int r = ::poll(&p, 1, 100);
    if (r <= 0) continue;
    const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    SetNoDelay(fd);
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_.load()) {
      ::close(fd);
      break;
    }
    conn_fds_.push_back(fd);
    conn_threads_.emplace_back([this, fd] { Serve(fd); });
  }
}

void TcpStoreServer::Serve(int fd) {
  std::string request;
  std::string reply;
  while (!stopping_.load()) {
    if (!ReceiveMessage(fd, &request, Clock::now() + kNever).ok()) return;
    reply.clear();
    const bool ok = Handle(request, &reply);
    if (!SendMessage(fd, reply, Clock::now() + kReplySlack).ok() || !ok) {
      // The connection is closed by Stop(); a malformed request leaves it
      // unread from here on, which the client sees as a dead store.
      ::shutdown(fd, SHUT_RDWR);
      return;
    }
  }
}

bool TcpStoreServer::Handle(const std::string& request, std::string* reply) {
  Reader in(request);
  const uint8_t op = in.U8();
  if (op == kSet) {
    std::string key = in.String();
    std::string value = in.String();
    if (!in.ok() || !in.done()) {
      reply->push_back(static_cast<char>(kMalformed));
      return false;
    }
    std::lock_guard<std::mutex> lock(mu_);
    data_[std::move(key)] = std::move(value);
    changed_.notify_all();
    reply->push_back(static_cast<char>(kOk));
    return true;
  }
  if (op == kGet || op == kWait) {
    std::vector<std::string> keys;
    if (op == kGet) {
      keys.push_back(in.String());
    } else {
      const uint32_t n = in.U32();
      for (uint32_t i = 0; i < n && in.ok(); ++i) keys.push_back(in.String());
    }
    const int64_t timeout_ms = in.I64();
    if (!in.ok() || !in.done() || timeout_ms < 0) {
      reply->push_back(static_cast<char>(kMalformed));
      return false;
    }
    const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms);
    std::unique_lock<std::mutex> lock(mu_);
    const bool present = changed_.wait_until(lock, deadline, [&] {
      if (stopping_.load()) return true;
      for (const auto& k : keys) {
        if (data_.find(k) == data_.end()) return false;
      }
      return true;
    });
    bool all = present && !stopping_.load();
    reply->push_back(static_cast<char>(all ? kOk : kTimedOut));
    if (op == kGet) PutString(reply, all ? data_[keys[0]] : std::string());
    return true;
  }
  reply->push_back(static_cast<char>(kMalformed));
  return false;
}

// ---------------------------------------------------------------- client

Status TcpStoreClient::Connect(const std::string& address,
                               std::chrono::milliseconds timeout,
                               std::unique_ptr<TcpStoreClient>* out) {
  std::string host;
  int port = 0;
  FTUNE_RETURN_IF_ERROR(SplitHostPort(address, &host, &port));
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  const int gai =
      ::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res);
  if (gai != 0) {
    return Status(StatusCode::kInvalidArgument,
                  "store " + address + ": cannot resolve '" + host +
                      "': " + gai_strerror(gai));
  }
  const auto deadline = Clock::now() + timeout;
  Status last(StatusCode::kUnavailable, "no address");
  for (;;) {
    for (addrinfo* ai = res; ai != nullptr; ai = ai->ai_next) {
      int fd = -1;
      last = ConnectOne(ai, deadline, &fd);
      if (last.ok()) {
        ::freeaddrinfo(res);
        out->reset(new TcpStoreClient(fd, address));
        return OkStatus();
      }
    }
    // Refused: the server is not listening yet; try again until the deadline.
    if (Clock::now() + std::chrono::milliseconds(20) >= deadline) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ::freeaddrinfo(res);
  return Status(StatusCode::kDeadlineExceeded,
                "cannot connect to the rendezvous store at " + address +
                    " within " + std::to_string(timeout.count()) +
                    " ms: " + last.message());
}

TcpStoreClient::~TcpStoreClient() {
  if (fd_ >= 0) ::close(fd_);
}

Status TcpStoreClient::RoundTrip(const std::string& request,
                                 std::chrono::milliseconds wait,
                                 std::string* reply) {
  const auto deadline = Clock::now() + wait + kReplySlack;
  Status s = SendMessage(fd_, request, deadline);
  if (s.ok()) s = ReceiveMessage(fd_, reply, deadline);
  if (!s.ok()) {
    return Status(s.code(),
                  "rendezvous store " + address_ + ": " + s.message());
  }
  if (reply->empty()) {
    return Status(StatusCode::kInternal,
                  "rendezvous store " + address_ + ": empty reply");
  }
  return OkStatus();
}

Status TcpStoreClient::Set(const std::string& key, std::string_view value) {
  std::string req(1, static_cast<char>(kSet));
  PutString(&req, key);
  PutString(&req, value);
  std::lock_guard<std::mutex> lock(mu_);
  std::string reply;
  FTUNE_RETURN_IF_ERROR(
      RoundTrip(req, std::chrono::milliseconds(0), &reply));
  if (reply[0] != kOk) {
    return Status(StatusCode::kInternal, "rendezvous store " + address_ +
                                             " refused set '" + key + "'");
  }
  return OkStatus();
}

Status TcpStoreClient::Get(const std::string& key,
                           std::chrono::milliseconds timeout,
                           std::string* value) {
  std::string req(1, static_cast<char>(kGet));
  PutString(&req, key);
  PutI64(&req, timeout.count());
  std::lock_guard<std::mutex> lock(mu_);
  std::string reply;
  FTUNE_RETURN_IF_ERROR(RoundTrip(req, timeout, &reply));
  if (reply[0] == kTimedOut) {
    return Status(StatusCode::kDeadlineExceeded,
                  "rendezvous store " + address_ + ": key '" + key +
                      "' not set within " + std::to_string(timeout.count()) +
                      " ms");
  }
  Reader in(std::string_view(reply).substr(1));
  *value = in.String();
  if (reply[0] != kOk || !in.ok()) {
    return Status(StatusCode::kInternal,
                  "rendezvous store " + address_ + ": bad reply to get");
  }
  return OkStatus();
}

Status TcpStoreClient::Wait(const std::vector<std::string>& keys,
                            std::chrono::milliseconds timeout) {
  std::string req(1, static_cast<char>(kWait));
  PutU32(&req, static_cast<uint32_t>(keys.size()));
  for (const auto& k : keys) PutString(&req, k);
  PutI64(&req, timeout.count());
  std::lock_guard<std::mutex> lock(mu_);
  std::string reply;
  FTUNE_RETURN_IF_ERROR(RoundTrip(req, timeout, &reply));
  if (reply[0] == kTimedOut) {
    std::string names;
    for (const auto& k : keys) names += (names.empty() ? "'" : ", '") + k + "'";
    return Status(StatusCode::kDeadlineExceeded,
                  "rendezvous store " + address_ + ": keys " + names +
                      " not all set within " + std::to_string(timeout.count()) +
                      " ms");
  }
  if (reply[0] != kOk) {
    return Status(StatusCode::kInternal,
                  "rendezvous store " + address_ + ": bad reply to wait");
  }
  return OkStatus();
}

}  // namespace ftune::comm
