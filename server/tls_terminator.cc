#include "tls_terminator.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include <cerrno>
#include <csignal>
#include <cstring>

#include "absl/status/status.h"
#include "ftune/socket_util.h"

namespace ftune::server {
namespace {

std::string Errno(int err) { return std::strerror(err); }

// "HOST:PORT", "[V6]:PORT" or "PORT" -> host ("" for every IPv4
// interface) and port.
bool SplitListen(const std::string& listen, std::string* host, std::string* port) {
  if (!listen.empty() && listen[0] == '[') {
    const size_t close = listen.find("]:");
    if (close == std::string::npos) return false;
    *host = listen.substr(1, close - 1);
    *port = listen.substr(close + 2);
  } else if (const size_t colon = listen.rfind(':'); colon != std::string::npos) {
    *host = listen.substr(0, colon);
    *port = listen.substr(colon + 1);
    if (host->find(':') != std::string::npos) return false;  // IPv6 without brackets
  } else {
    *host = "";
    *port = listen;
  }
  if (port->empty() || port->size() > 5 ||
      port->find_first_not_of("0123456789") != std::string::npos || std::stoi(*port) > 65535)
    return false;
  return true;
}

absl::StatusOr<int> ListenOn(const std::string& listen, int* bound_port) {
  std::string host, port;
  if (!SplitListen(listen, &host, &port))
    return absl::InvalidArgumentError("'" + listen +
                                      "' is not HOST:PORT, [IPV6]:PORT or PORT");
  addrinfo hints{};
  hints.ai_family = host.empty() ? AF_INET : AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* found = nullptr;
  if (const int rc = getaddrinfo(host.empty() ? nullptr : host.c_str(), port.c_str(), &hints,
                                 &found);
      rc != 0)
    return absl::InvalidArgumentError("cannot resolve '" + host + "': " + gai_strerror(rc));
  std::unique_ptr<addrinfo, void (*)(addrinfo*)> free_found(found, freeaddrinfo);
  // Non-blocking: a client gone between poll and accept must not stall the
  // accepting thread. Accepted sockets are blocking (accept4 without
  // SOCK_NONBLOCK), with timeouts.
  const int fd = socket(found->ai_family, found->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK,
                        found->ai_protocol);
  if (fd < 0) return absl::InternalError("socket: " + Errno(errno));
  const int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (found->ai_family == AF_INET6) setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
  if (bind(fd, found->ai_addr, found->ai_addrlen) != 0 || ::listen(fd, 64) != 0) {
    const int err = errno;
    close(fd);
    return absl::UnavailableError("cannot listen on " + listen + ": " + Errno(err));
  }
  sockaddr_storage addr{};
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  *bound_port = ntohs(addr.ss_family == AF_INET6
                          ? reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port
                          : reinterpret_cast<sockaddr_in*>(&addr)->sin_port);
  return fd;
}

bool SendAll(int fd, const char* data, size_t n) {
  while (n > 0) {
    const ssize_t w = send(fd, data, n, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    data += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

// Bytes both ways between the TLS client and the plain upstream until the
// upstream closes (it answered), a write fails, or nothing moves for
// `idle`. The upstream connection is made with the client's first bytes,
// so a client that only completes a handshake holds none of the upstream's
// threads. When the client stops sending, the upstream's write side is
// shut so it still answers what it got.
void Relay(SSL* ssl, int client, int upstream_port, std::chrono::milliseconds idle) {
  char buf[16384];
  int upstream = -1;
  bool client_open = true;
  for (;;) {
    bool client_ready = client_open && SSL_pending(ssl) > 0;
    if (!client_ready) {
      pollfd p[2] = {{upstream, POLLIN, 0}, {client_open ? client : -1, POLLIN, 0}};
      const int r = poll(p, 2, static_cast<int>(idle.count()));
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) break;
      if (p[0].revents & (POLLIN | POLLHUP | POLLERR)) {
        const ssize_t n = read(upstream, buf, sizeof(buf));
        if (n <= 0 || SSL_write(ssl, buf, static_cast<int>(n)) != n) break;
      }
      client_ready = client_open && (p[1].revents & (POLLIN | POLLHUP | POLLERR));
    }
    if (client_ready) {
      const int n = SSL_read(ssl, buf, sizeof(buf));
      if (n > 0) {
        if (upstream < 0 && (upstream = ftune::ConnectLoopback(upstream_port, idle)) < 0) break;
        if (!SendAll(upstream, buf, static_cast<size_t>(n))) break;
      } else if (upstream < 0) {
        break;  // gone before asking anything
      } else {
        client_open = false;
        shutdown(upstream, SHUT_WR);
      }
    }
  }
  if (upstream >= 0) close(upstream);
}

}  // namespace

absl::StatusOr<std::unique_ptr<TlsTerminator>> TlsTerminator::Start(
    const std::string& listen, int upstream_port, std::shared_ptr<const TlsIdentity> identity,
    Options options) {
  if (!identity) return absl::InvalidArgumentError("no TLS identity");
  int port = 0;
  absl::StatusOr<int> fd = ListenOn(listen, &port);
  if (!fd.ok()) return fd.status();
  const int wake = eventfd(0, EFD_CLOEXEC);
  if (wake < 0) {
    close(*fd);
    return absl::InternalError("eventfd: " + Errno(errno));
  }
  return std::unique_ptr<TlsTerminator>(
      new TlsTerminator(*fd, wake, port, upstream_port, std::move(identity), options));
}

TlsTerminator::TlsTerminator(int listen_fd, int wake_fd, int port, int upstream_port,
                             std::shared_ptr<const TlsIdentity> identity, Options options)
    : listen_fd_(listen_fd),
      wake_fd_(wake_fd),
      port_(port),
      upstream_port_(upstream_port),
      options_(options),
      identity_(std::move(identity)) {
  acceptor_ = std::thread([this] { AcceptLoop(); });
}

TlsTerminator::~TlsTerminator() {
  stopping_ = true;
  const uint64_t one = 1;
  (void)!write(wake_fd_, &one, sizeof(one));
  acceptor_.join();
  {
    std::lock_guard<std::mutex> lock(mu_);
    // Wakes each connection's thread out of its poll, read or handshake.
    for (Connection& c : connections_) shutdown(c.fd, SHUT_RDWR);
  }
  // Joined without mu_: a thread takes it to say it is done. No thread
  // adds connections any more, so the list is stable.
  for (Connection& c : connections_) {
    c.thread.join();
    close(c.fd);
  }
  close(listen_fd_);
  close(wake_fd_);
}

void TlsTerminator::SetIdentity(std::shared_ptr<const TlsIdentity> identity) {
  if (!identity) return;
  std::lock_guard<std::mutex> lock(mu_);
  identity_ = std::move(identity);
}

void TlsTerminator::ReapLocked() {
  for (auto it = connections_.begin(); it != connections_.end();) {
    if (!it->done) {
      ++it;
      continue;
    }
    it->thread.join();  // its last act was setting done
    close(it->fd);
    it = connections_.erase(it);
  }
}

void TlsTerminator::AcceptLoop() {
  while (!stopping_) {
    pollfd p[2] = {{listen_fd_, POLLIN, 0}, {wake_fd_, POLLIN, 0}};
    const int r = poll(p, 2, 1000);
    std::lock_guard<std::mutex> lock(mu_);
    ReapLocked();
    if (stopping_ || r <= 0 || !(p[0].revents & POLLIN)) continue;
    const int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      // Out of descriptors: let connections end instead of spinning.
      if (errno == EMFILE || errno == ENFILE)
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      continue;
    }
    if (static_cast<int>(connections_.size()) >= options_.max_connections) {
      close(fd);
      continue;
    }
    Connection& c = connections_.emplace_back();
    c.fd = fd;
    c.thread = std::thread([this, &c, identity = identity_] {
      Serve(c.fd, identity);
      std::lock_guard<std::mutex> done_lock(mu_);
      c.done = true;
    });
  }
}

void TlsTerminator::Serve(int client, const std::shared_ptr<const TlsIdentity>& identity) {
  sigset_t pipe;
  sigemptyset(&pipe);
  sigaddset(&pipe, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &pipe, nullptr);
  ftune::SetSocketTimeouts(client, options_.handshake_timeout);
  ftune::SetNoDelay(client);
  if (SSL* ssl = SSL_new(identity->ctx())) {
    if (SSL_set_fd(ssl, client) == 1 && SSL_accept(ssl) == 1) {
      ftune::SetSocketTimeouts(client, options_.idle_timeout);
      Relay(ssl, client, upstream_port_, options_.idle_timeout);
      SSL_shutdown(ssl);
    }
    SSL_free(ssl);
  }
  ERR_clear_error();  // this thread's queue: a failed handshake leaves errors there
  // The peer sees the end now; the descriptor itself is closed once this
  // thread is joined, so its number is not reused while the destructor may
  // still shut it down.
  shutdown(client, SHUT_RDWR);
}

}  // namespace ftune::server
