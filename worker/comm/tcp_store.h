// A small TCP key-value store for the rendezvous of one communicator.
//
// Gloo connects its full mesh through a store: every rank puts its listening
// address under its rank and reads the others'. With no shared filesystem,
// rank 0 hosts this store on an ephemeral port and publishes its "host:port"
// through the Rendezvous; the local launcher hosts one the same way for
// `--nproc N`. Keys are written once and read many times; a read waits (up
// to its timeout) for the key to appear, which is the only synchronisation
// the mesh setup needs.
//
// Wire format (each side, per message): u32 length (little endian), then the
// body. Request body: u8 op, then fields; a string is u32 length + bytes.
//   kSet  key value          -> u8 result
//   kGet  key i64 timeout_ms -> u8 result, value   (waits for the key)
//   kWait u32 n, n keys, i64 timeout_ms -> u8 result
// result: 0 ok, 1 timed out, 2 malformed request.
//
// Failure behaviour: the server answers a waiting request when its timeout
// passes; the client also stops waiting a little after that, so a dead
// server makes its calls fail with kUnavailable or kDeadlineExceeded, never
// hang.
//
// Thread-safety: TcpStoreServer serves many connections from its own threads;
// its public methods are called from one thread. TcpStoreClient is
// thread-safe (one request at a time under a mutex).
#ifndef FTUNE_WORKER_COMM_TCP_STORE_H_
#define FTUNE_WORKER_COMM_TCP_STORE_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "ftune/status.h"

namespace ftune::comm {

class TcpStoreServer {
 public:
  // Binds `host` (an address or name of this machine) on `port` (0: an
  // ephemeral one) and listens. Serves nothing until Start(), so that a
  // launcher can fork its ranks before this process has any thread.
  static Status Listen(const std::string& host, int port,
                       std::unique_ptr<TcpStoreServer>* out);
  ~TcpStoreServer();  // Stop()s.
  TcpStoreServer(const TcpStoreServer&) = delete;
  TcpStoreServer& operator=(const TcpStoreServer&) = delete;

  // Starts accepting and serving connections.
  void Start();
  // Closes every connection and joins the threads. Requests waiting for a
  // key are answered with a timeout first. Idempotent.
  void Stop();

  // "host:port" that clients connect to.
  const std::string& address() const { return address_; }
  // The listening socket, for a forked child to close its inherited copy.
  int listen_fd() const { return listen_fd_; }

 private:
  TcpStoreServer(int listen_fd, std::string address);
  void AcceptLoop();
  void Serve(int fd);
  // Handles one request body; fills the reply body. False on a malformed
  // request (the connection is then closed).
  bool Handle(const std::string& request, std::string* reply);

  int listen_fd_;
  const std::string address_;
  std::atomic<bool> stopping_{false};
  std::thread accept_thread_;

  std::mutex mu_;  // guards everything below
  std::condition_variable changed_;
  std::map<std::string, std::string> data_;
  std::vector<int> conn_fds_;
  std::vector<std::thread> conn_threads_;
};

class TcpStoreClient {
 public:
  // Connects to "host:port", retrying refused connections until `timeout`
  // (the server may still be starting).
  static Status Connect(const std::string& address,
                        std::chrono::milliseconds timeout,
                        std::unique_ptr<TcpStoreClient>* out);
  ~TcpStoreClient();
  TcpStoreClient(const TcpStoreClient&) = delete;
  TcpStoreClient& operator=(const TcpStoreClient&) = delete;

  Status Set(const std::string& key, std::string_view value);
  // Waits up to `timeout` for `key`, then returns its value.
  Status Get(const std::string& key, std::chrono::milliseconds timeout,
             std::string* value);
  // Waits up to `timeout` until every key exists.
  Status Wait(const std::vector<std::string>& keys,
              std::chrono::milliseconds timeout);

  const std::string& address() const { return address_; }

 private:
  TcpStoreClient(int fd, std::string address) : fd_(fd), address_(address) {}
  // Sends one request and reads its reply body; `wait` is how long the
  // server may hold the request.
  Status RoundTrip(const std::string& request, std::chrono::milliseconds wait,
                   std::string* reply);

  std::mutex mu_;
  int fd_;
  const std::string address_;
};

}  // namespace ftune::comm

#endif  // FTUNE_WORKER_COMM_TCP_STORE_H_
