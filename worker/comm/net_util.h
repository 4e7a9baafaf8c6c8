// Small socket helpers shared by the TCP store and the Gloo backend.
//
// Thread-safety: free functions without shared state.
#ifndef FTUNE_WORKER_COMM_NET_UTIL_H_
#define FTUNE_WORKER_COMM_NET_UTIL_H_

#include <chrono>
#include <string>

#include "ftune/status.h"

namespace ftune::comm {

// The address this rank binds and advertises to its peers, chosen in this
// order: `iface` (its first IPv4 address), `host`, $FTUNE_COMM_HOST, then
// this machine's host name. Ranks on several hosts need an address the other
// hosts reach: set FTUNE_COMM_HOST (or the options) where the host name
// resolves to a loopback address, as Debian's /etc/hosts makes it do.
Status ResolveCommHost(const std::string& host, const std::string& iface,
                       std::string* out);

// gethostname(), for error messages ("rank 1 (host gpu-a)").
std::string LocalHostName();

// "host:port" <-> parts. IPv6 literals are bracketed: "[::1]:4000".
std::string JoinHostPort(const std::string& host, int port);
Status SplitHostPort(const std::string& address, std::string* host, int* port);

// Writes/reads exactly n bytes before `deadline`. Fails with kUnavailable on
// a closed connection and kDeadlineExceeded when the deadline passes.
// Writes never raise SIGPIPE.
Status WriteAll(int fd, const void* buf, size_t n,
                std::chrono::steady_clock::time_point deadline);
Status ReadAll(int fd, void* buf, size_t n,
               std::chrono::steady_clock::time_point deadline);

// Makes a write to a closed socket an EPIPE error instead of a process-
// killing SIGPIPE, if SIGPIPE still has its default action. Gloo writes with
// writev(), which cannot ask for MSG_NOSIGNAL, so a rank whose peer died
// would otherwise die of the signal instead of reporting the failure.
void IgnoreSigpipe();

}  // namespace ftune::comm

#endif  // FTUNE_WORKER_COMM_NET_UTIL_H_
