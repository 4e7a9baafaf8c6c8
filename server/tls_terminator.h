// TLS in front of a plain-HTTP server on this host: the coordinator's
// /metrics over HTTPS (--metrics-tls-cert, --metrics-tls-key).
//
// Why not the exposer's own HTTPS: prometheus-cpp serves through civetweb,
// whose TLS loads OpenSSL at run time by name (libssl.so) and looks up
// functions OpenSSL 3 no longer exports. Debian 12's civetweb 1.15 starts
// anyway and jumps to a null SSL_get_peer_certificate on the first HTTPS
// connection, killing the process; newer civetweb refuses to start. So the
// exposer listens on 127.0.0.1 at a port of its own and this terminator,
// built on the OpenSSL ftune links, listens on --metrics-listen: it
// completes each client's handshake with the current identity, connects to
// the exposer with the client's first bytes (so a client that only
// handshakes holds none of the exposer's threads), and relays bytes both
// ways until either side closes. HTTP, basic auth and its 401 stay the
// exposer's, byte for byte. Nothing but TLS is answered on the public
// address: a plaintext request fails the handshake and is closed.
//
// Limits, so a client cannot hold the coordinator's threads: at most
// `max_connections` open (more are closed at accept), a handshake must
// finish within `handshake_timeout`, and a connection with no byte either
// way for `idle_timeout` is closed.
//
// Threads: one accepting, one per open connection; each blocks SIGPIPE for
// itself, so a peer gone mid-write is an error, not a signal.
//
// Thread-safe. SetIdentity changes the identity later handshakes use; open
// connections keep theirs. The destructor stops accepting, ends the open
// connections and joins every thread.
#ifndef FTUNE_SERVER_TLS_TERMINATOR_H_
#define FTUNE_SERVER_TLS_TERMINATOR_H_

#include <atomic>
#include <chrono>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "tls_identity.h"

namespace ftune::server {

class TlsTerminator {
 public:
  struct Options {
    int max_connections = 32;
    std::chrono::milliseconds handshake_timeout{10000};
    std::chrono::milliseconds idle_timeout{60000};
  };

  // Listens on `listen` ("HOST:PORT", "[V6]:PORT", or a bare "PORT" for
  // every IPv4 interface; port 0 picks one) and relays to
  // 127.0.0.1:`upstream_port`.
  static absl::StatusOr<std::unique_ptr<TlsTerminator>> Start(
      const std::string& listen, int upstream_port, std::shared_ptr<const TlsIdentity> identity,
      Options options);
  static absl::StatusOr<std::unique_ptr<TlsTerminator>> Start(
      const std::string& listen, int upstream_port, std::shared_ptr<const TlsIdentity> identity) {
    return Start(listen, upstream_port, std::move(identity), Options());
  }
  ~TlsTerminator();
  TlsTerminator(const TlsTerminator&) = delete;
  TlsTerminator& operator=(const TlsTerminator&) = delete;

  // The port it listens on.
  int port() const { return port_; }
  void SetIdentity(std::shared_ptr<const TlsIdentity> identity);

 private:
  struct Connection {
    int fd = -1;  // the client's; closed once the thread is joined
    std::thread thread;
    bool done = false;  // guarded by mu_
  };

  TlsTerminator(int listen_fd, int wake_fd, int port, int upstream_port,
                std::shared_ptr<const TlsIdentity> identity, Options options);
  void AcceptLoop();
  // One connection, from the handshake to the end of the relay.
  void Serve(int client_fd, const std::shared_ptr<const TlsIdentity>& identity);
  // Joins and forgets the connections whose thread has ended. Holds mu_.
  void ReapLocked();

  const int listen_fd_;
  const int wake_fd_;  // eventfd: the destructor wakes the accepting thread
  const int port_;
  const int upstream_port_;
  const Options options_;
  std::atomic<bool> stopping_{false};
  std::mutex mu_;
  std::shared_ptr<const TlsIdentity> identity_;  // guarded by mu_
  std::list<Connection> connections_;            // guarded by mu_
  std::thread acceptor_;
};

}  // namespace ftune::server

#endif  // FTUNE_SERVER_TLS_TERMINATOR_H_
