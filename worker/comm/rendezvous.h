// Rendezvous: how the ranks of one communicator find each other.
//
// Every backend needs the same single step: rank 0 makes a few bytes (the
// address of the Gloo key-value store it hosts, or NCCL's ncclUniqueId) and
// every rank needs them. The bytes are opaque here, so one rendezvous serves
// both backends. There is no shared filesystem: the bytes travel either
// through the control plane (ChannelRendezvous: rank 0's RankMessage
// .rendezvous_publish, relayed by agents and coordinator to every rank as
// AgentMessage.rendezvous) or through a store the local launcher hosts
// (LocalRendezvous, for `--nproc N`).
//
// Thread-safety: implementations are used by one thread at a time; rank()
// and world_size() may be read from any thread.
#ifndef FTUNE_WORKER_COMM_RENDEZVOUS_H_
#define FTUNE_WORKER_COMM_RENDEZVOUS_H_

#include <chrono>
#include <string>
#include <string_view>

#include "ftune/status.h"

namespace ftune::comm {

class Rendezvous {
 public:
  virtual ~Rendezvous() = default;

  virtual int rank() const = 0;
  virtual int world_size() const = 0;

  // Publishes `data` if this is rank 0 (other ranks' `data` is ignored) and
  // returns rank 0's data in *out on every rank, rank 0 included. Calls match
  // by order: the k-th Exchange of every rank returns rank 0's k-th data, so
  // every rank makes the same sequence of calls (one per communicator).
  // kDeadlineExceeded when rank 0's data has not arrived within `timeout`.
  virtual Status Exchange(std::string_view data,
                          std::chrono::milliseconds timeout,
                          std::string* out) = 0;
};

}  // namespace ftune::comm

#endif  // FTUNE_WORKER_COMM_RENDEZVOUS_H_
