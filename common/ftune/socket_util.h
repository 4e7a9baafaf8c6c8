// Small POSIX socket helpers shared by the coordinator's TLS front
// (server/tls_terminator.cc) and the tests that talk to it over loopback.
//
// Thread-safety: stateless.
#ifndef FTUNE_COMMON_SOCKET_UTIL_H_
#define FTUNE_COMMON_SOCKET_UTIL_H_

#include <chrono>

namespace ftune {

// Reads and writes on fd give up after `timeout` (0: never).
void SetSocketTimeouts(int fd, std::chrono::milliseconds timeout);
// Each write goes out at once (TCP_NODELAY): with Nagle's algorithm a
// reply's second segment waits for the peer's delayed ACK (40 ms).
void SetNoDelay(int fd);
// A TCP connection to 127.0.0.1:port, close-on-exec, with SetNoDelay and
// SetSocketTimeouts(timeout); -1 when it cannot be made (refused).
int ConnectLoopback(int port, std::chrono::milliseconds timeout = std::chrono::milliseconds(0));

}  // namespace ftune

#endif  // FTUNE_COMMON_SOCKET_UTIL_H_
