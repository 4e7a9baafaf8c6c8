#include "worker/comm/net_util.h"

#include <arpa/inet.h>
#include <errno.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>

namespace ftune::comm {
namespace {

int MillisUntil(std::chrono::steady_clock::time_point deadline) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
      deadline - std::chrono::steady_clock::now());
  if (left.count() <= 0) return 0;
  if (left.count() > 1000 * 1000) return 1000 * 1000;
  return static_cast<int>(left.count());
}

// Waits for `events` on fd; false when the deadline passed first.
Status PollFor(int fd, short events,
               std::chrono::steady_clock::time_point deadline,
               const char* what) {
  for (;;) {
    pollfd p{fd, events, 0};
    const int ms = MillisUntil(deadline);
    const int r = ::poll(&p, 1, ms);
    if (r > 0) return OkStatus();
    if (r == 0) {
      return Status(StatusCode::kDeadlineExceeded,
                    std::string("timed out waiting to ") + what);
    }
    if (errno != EINTR) {
      return Status(StatusCode::kInternal,
                    std::string("poll: ") + strerror(errno));
    }
  }
}

}  // namespace

Status ResolveCommHost(const std::string& host, const std::string& iface,
                       std::string* out) {
  if (!iface.empty()) {
    ifaddrs* list = nullptr;
    if (::getifaddrs(&list) != 0) {
      return Status(StatusCode::kInternal,
                    std::string("getifaddrs: ") + strerror(errno));
    }
    std::string found;
    for (ifaddrs* a = list; a != nullptr; a = a->ifa_next) {
      if (a->ifa_addr == nullptr || a->ifa_addr->sa_family != AF_INET) continue;
      if (iface != a->ifa_name) continue;
      char buf[INET_ADDRSTRLEN];
      const auto* sin = reinterpret_cast<const sockaddr_in*>(a->ifa_addr);
      if (::inet_ntop(AF_INET, &sin->sin_addr, buf, sizeof(buf)) != nullptr) {
        found = buf;
        break;
      }
    }
    ::freeifaddrs(list);
    if (found.empty()) {
      return Status(StatusCode::kInvalidArgument,
                    "network interface '" + iface + "' has no IPv4 address");
    }
    *out = found;
    return OkStatus();
  }
  if (!host.empty()) {
    *out = host;
    return OkStatus();
  }
  if (const char* env = std::getenv("FTUNE_COMM_HOST"); env && *env) {
    *out = env;
    return OkStatus();
  }
  *out = LocalHostName();
  return OkStatus();
}

std::string LocalHostName() {
  char buf[256] = {};
  if (::gethostname(buf, sizeof(buf) - 1) != 0) return "localhost";
  return buf;
}

std::string JoinHostPort(const std::string& host, int port) {
  if (host.find(':') != std::string::npos) {
    return "[" + host + "]:" + std::to_string(port);
  }
  return host + ":" + std::to_string(port);
}

Status SplitHostPort(const std::string& address, std::string* host, int* port) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == address.size()) {
    return Status(StatusCode::kInvalidArgument,
                  "address '" + address + "' is not host:port");
  }
  std::string h = address.substr(0, colon);
  if (h.size() >= 2 && h.front() == '[' && h.back() == ']') {
    h = h.substr(1, h.size() - 2);
  }
  char* end = nullptr;
  const long p = std::strtol(address.c_str() + colon + 1, &end, 10);
  if (*end != '\0' || p <= 0 || p > 65535) {
    return Status(StatusCode::kInvalidArgument,
                  "address '" + address + "' has no valid port");
  }
  *host = h;
  *port = static_cast<int>(p);
  return OkStatus();
}

Status WriteAll(int fd, const void* buf, size_t n,
                std::chrono::steady_clock::time_point deadline) {
  const char* p = static_cast<const char*>(buf);
  while (n > 0) {
    const ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w > 0) {
      p += w;
      n -= static_cast<size_t>(w);
      continue;
    }
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      FTUNE_RETURN_IF_ERROR(PollFor(fd, POLLOUT, deadline, "send"));
      continue;
    }
    return Status(
        StatusCode::kUnavailable,
        std::string("connection lost while sending: ") + strerror(errno));
  }
  return OkStatus();
}

Status ReadAll(int fd, void* buf, size_t n,
               std::chrono::steady_clock::time_point deadline) {
  char* p = static_cast<char*>(buf);
  while (n > 0) {
    const ssize_t r = ::recv(fd, p, n, MSG_DONTWAIT);
    if (r > 0) {
      p += r;
      n -= static_cast<size_t>(r);
      continue;
    }
    if (r == 0) {
      return Status(StatusCode::kUnavailable, "connection closed by the peer");
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      FTUNE_RETURN_IF_ERROR(PollFor(fd, POLLIN, deadline, "receive"));
      continue;
    }
    return Status(
        StatusCode::kUnavailable,
        std::string("connection lost while receiving: ") + strerror(errno));
  }
  return OkStatus();
}

void IgnoreSigpipe() {
  struct sigaction old {};
  if (::sigaction(SIGPIPE, nullptr, &old) == 0 && old.sa_handler == SIG_DFL) {
    ::signal(SIGPIPE, SIG_IGN);
  }
}

}  // namespace ftune::comm
