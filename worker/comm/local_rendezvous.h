// LocalRendezvous: the rendezvous of `--nproc N` standalone runs, where one
// launcher process starts every rank on this machine and there is no agent.
//
// The launcher hosts a TcpStore and hands its address to each rank (the
// environment for exec'd ranks, an argument for forked ones). Exchange k:
// rank 0 sets "rendezvous/<k>", every rank waits for that key.
//
// Thread-safety: as Rendezvous (one thread at a time).
#ifndef FTUNE_WORKER_COMM_LOCAL_RENDEZVOUS_H_
#define FTUNE_WORKER_COMM_LOCAL_RENDEZVOUS_H_

#include <chrono>
#include <memory>
#include <string>
#include <string_view>

#include "worker/comm/rendezvous.h"
#include "ftune/status.h"
#include "worker/comm/tcp_store.h"

namespace ftune::comm {

// Environment a launcher sets for each rank it starts.
inline constexpr char kEnvRendezvousStore[] =
    "FTUNE_RENDEZVOUS_STORE";  // host:port
inline constexpr char kEnvRank[] = "FTUNE_RANK";
inline constexpr char kEnvWorldSize[] = "FTUNE_WORLD_SIZE";

class LocalRendezvous : public Rendezvous {
 public:
  // Connects to the launcher's store at `store_address`.
  static Status Connect(const std::string& store_address, int rank,
                        int world_size, std::chrono::milliseconds timeout,
                        std::unique_ptr<LocalRendezvous>* out);
  // Connect() with the kEnv* variables above.
  static Status FromEnv(std::chrono::milliseconds timeout,
                        std::unique_ptr<LocalRendezvous>* out);

  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }
  Status Exchange(std::string_view data, std::chrono::milliseconds timeout,
                  std::string* out) override;

 private:
  LocalRendezvous(std::unique_ptr<TcpStoreClient> client, int rank,
                  int world_size)
      : client_(std::move(client)), rank_(rank), world_size_(world_size) {}

  std::unique_ptr<TcpStoreClient> client_;
  const int rank_;
  const int world_size_;
  int generation_ = 0;
};

}  // namespace ftune::comm

#endif  // FTUNE_WORKER_COMM_LOCAL_RENDEZVOUS_H_
