#include "worker/comm/local_rendezvous.h"

#include <cstdlib>

namespace ftune::comm {
namespace {

bool ParseInt(const char* s, int* out) {
  if (s == nullptr || *s == '\0') return false;
  char* end = nullptr;
  const long v = std::strtol(s, &end, 10);
  if (*end != '\0' || v < 0 || v > (1 << 20)) return false;
  *out = static_cast<int>(v);
  return true;
}

}  // namespace

Status LocalRendezvous::Connect(const std::string& store_address, int rank,
                                int world_size,
                                std::chrono::milliseconds timeout,
                                std::unique_ptr<LocalRendezvous>* out) {
  if (world_size < 1 || rank < 0 || rank >= world_size) {
    return Status(StatusCode::kInvalidArgument,
                  "local rendezvous: rank " + std::to_string(rank) +
                      " is not in a world of " + std::to_string(world_size));
  }
  std::unique_ptr<TcpStoreClient> client;
  FTUNE_RETURN_IF_ERROR(
      TcpStoreClient::Connect(store_address, timeout, &client));
  out->reset(new LocalRendezvous(std::move(client), rank, world_size));
  return OkStatus();
}

Status LocalRendezvous::FromEnv(std::chrono::milliseconds timeout,
                                std::unique_ptr<LocalRendezvous>* out) {
  const char* store = std::getenv(kEnvRendezvousStore);
  int rank = -1;
  int world = 0;
  if (store == nullptr || *store == '\0' ||
      !ParseInt(std::getenv(kEnvRank), &rank) ||
      !ParseInt(std::getenv(kEnvWorldSize), &world)) {
    return Status(StatusCode::kFailedPrecondition,
                  std::string("local rendezvous needs ") + kEnvRendezvousStore +
                      ", " + kEnvRank + " and " + kEnvWorldSize +
                      " in the environment (set by the --nproc launcher)");
  }
  return Connect(store, rank, world, timeout, out);
}

Status LocalRendezvous::Exchange(std::string_view data,
                                 std::chrono::milliseconds timeout,
                                 std::string* out) {
  const std::string key = "rendezvous/" + std::to_string(generation_++);
  if (rank_ == 0) FTUNE_RETURN_IF_ERROR(client_->Set(key, data));
  Status s = client_->Get(key, timeout, out);
  if (!s.ok()) {
    return Status(s.code(), "local rendezvous, rank " + std::to_string(rank_) +
                                ": waiting for rank 0's data: " + s.message());
  }
  return OkStatus();
}

}  // namespace ftune::comm
