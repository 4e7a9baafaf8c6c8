// Gloo backend: collectives between CPU processes over TCP (Debian's
// libgloo), so that every distributed code path runs in CI without a GPU.
//
// Setup: rank 0 hosts a TcpStore on an ephemeral port and publishes its
// address through the Rendezvous; every rank connects Gloo's full mesh of
// TCP pairs through that store, the ranks pass a barrier, and the store is
// closed (it is needed only to exchange the pairs' addresses).
//
// Collectives map onto Gloo's algorithms: allgather (ring), allreduce (ring),
// broadcast (binomial tree), barrier. Gloo of this vintage has no reduce-
// scatter over unbound buffers, so ReduceScatter is an allreduce of the whole
// input followed by taking this rank's chunk: twice the traffic of a ring
// reduce-scatter, which only matters for CPU benchmarks. bf16/fp16 are
// widened to fp32 before the reduction and rounded once at the end.
//
// Timeouts: Gloo's context timeout bounds every wait of every collective and
// of the mesh setup. A dead peer usually fails the survivors sooner: its TCP
// connections close, and Gloo fails the operations pending on them. The
// error names the peer's rank when Gloo's message carries its address.
//
// Side effect: creating a communicator sets SIGPIPE to SIG_IGN if it had
// its default action (see IgnoreSigpipe in net_util.h).
//
// Thread-safety: as Communicator (one thread at a time).
#ifndef FTUNE_WORKER_COMM_GLOO_COMMUNICATOR_H_
#define FTUNE_WORKER_COMM_GLOO_COMMUNICATOR_H_

#include <chrono>
#include <memory>
#include <string>

#include "worker/comm/communicator.h"
#include "worker/comm/rendezvous.h"
#include "ftune/status.h"

namespace ftune::comm {

struct GlooOptions {
  // Address to bind and advertise; see ResolveCommHost (net_util.h) for the
  // defaults. "127.0.0.1" for ranks of one machine.
  std::string host;
  // Network interface to use instead of `host` (e.g. "eth0").
  std::string iface;
  // Bound on every collective.
  std::chrono::milliseconds timeout = std::chrono::minutes(5);
  // Bound on each step of the setup (rendezvous, store connection, mesh
  // connection); 0: `timeout`. Ranks start at different times, so a job
  // wants a short collective timeout but a patient setup.
  std::chrono::milliseconds setup_timeout{0};
};

// Builds this rank's communicator; every rank of `rendezvous` calls it.
Status CreateGlooCommunicator(Rendezvous& rendezvous,
                              const GlooOptions& options,
                              std::unique_ptr<Communicator>* out);

}  // namespace ftune::comm

#endif  // FTUNE_WORKER_COMM_GLOO_COMMUNICATOR_H_
