// A TCP connection to 127.0.0.1:port for tests that speak to a server by
// hand (raw HTTP, a TLS handshake, or none at all).
#ifndef FTUNE_TESTS_COMMON_LOOPBACK_H_
#define FTUNE_TESTS_COMMON_LOOPBACK_H_

#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>

namespace ftune::testutil {

// The connected socket, reads giving up after `read_timeout` (0: never);
// -1 when the connection is refused.
inline int ConnectLoopback(int port, std::chrono::seconds read_timeout = std::chrono::seconds(0)) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  if (read_timeout.count() > 0) {
    timeval tv{static_cast<time_t>(read_timeout.count()), 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  }
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

}  // namespace ftune::testutil

#endif  // FTUNE_TESTS_COMMON_LOOPBACK_H_
