// The host agent's connection to the coordinator (AgentService.Connect) and
// its lifecycle; docs/control-plane.md "Agent stream" is the contract.
//
// One connection at a time, each a fresh gRPC stream:
//   1. send RegisterAgent (agent_id from the spool, host, slots, ranks still
//      alive, last agent_seq in the spool);
//   2. a reader thread handles Registered (heartbeat interval; stale ranks
//      are stopped), Ack (spool trimmed), Assignment, StopJob and
//      RendezvousPublish (handed to the rank supervisor);
//   3. this thread writes: after the first Ack (or, if none comes within
//      first_ack_timeout, from the spool's persisted ack) every spooled event
//      above it in RankEventBatches, then live ones as they are spooled;
//      RendezvousPublish from local ranks; Heartbeat every interval.
// When the stream breaks, the agent reconnects with exponential backoff
// (initial_backoff doubling up to max_backoff, +-20% jitter). Ranks keep
// running meanwhile; their events wait in the spool. Rendezvous data of live
// attempts is re-sent after each registration, since it is not spooled.
//
// Shutdown: ranks are terminated (SIGTERM, SIGKILL after the grace period;
// they could not outlive the agent anyway, their channel ends with it), their
// exit events are flushed to the coordinator when it is reachable (bounded
// wait), then Run returns.
//
// Thread-safety: Run is called once, from one thread; Shutdown from any
// thread (a signal-handling thread) at any time.
#ifndef FTUNE_WORKER_AGENT_AGENT_H_
#define FTUNE_WORKER_AGENT_AGENT_H_

#include <grpcpp/grpcpp.h>

#include <deque>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "ftune/v1/agent_service.grpc.pb.h"
#include "worker/agent/process_launcher.h"
#include "worker/agent/rank_supervisor.h"
#include "worker/agent/slots.h"
#include "worker/agent/spool.h"

namespace ftune::agent {

class Agent {
 public:
  struct Options {
    std::string coordinator = "127.0.0.1:7450";
    // Bearer token for "authorization: Bearer <token>"; empty sends none.
    std::string token;
    // PEM of the CA that signed the coordinator's certificate; empty: no TLS.
    std::string tls_ca_pem;
    std::string host;
    std::string version;
    // Heartbeat period; 0: what Registered says (5 s if it says 0 too).
    int heartbeat_ms = 0;
    absl::Duration initial_backoff = absl::Milliseconds(100);
    absl::Duration max_backoff = absl::Seconds(5);
    absl::Duration first_ack_timeout = absl::Seconds(2);
    // A coordinator that accepts the stream but never answers RegisterAgent
    // is treated as unreachable after this long.
    absl::Duration register_timeout = absl::Seconds(30);
    size_t max_batch_events = 256;
    size_t max_batch_bytes = 1 << 20;
    // Grace period for stopping ranks at shutdown.
    absl::Duration shutdown_grace = absl::Seconds(30);
    // How long shutdown waits for the coordinator to acknowledge the last
    // events once the ranks are gone.
    absl::Duration flush_timeout = absl::Seconds(5);
  };

  // spool and launcher must outlive the agent.
  Agent(Options options, std::vector<HostSlot> slots, Spool* spool, ProcessLauncher* launcher,
        RankSupervisor::Options supervisor_options);
  ~Agent();
  Agent(const Agent&) = delete;
  Agent& operator=(const Agent&) = delete;

  // Serves until Shutdown() and returns once the ranks are stopped.
  void Run();
  void Shutdown();

 private:
  struct Outcome {
    bool registered = false;  // the coordinator answered Registered
    std::string failure;      // why the stream ended; empty at shutdown
    bool rejected = false;    // UNAUTHENTICATED: a configuration error
  };
  // One stream, from connect to its end.
  Outcome RunConnection();
  void ReadLoop(grpc::ClientReaderWriter<v1::AgentToCoordinator, v1::CoordinatorToAgent>* stream);
  bool SendSpooled(
      grpc::ClientReaderWriter<v1::AgentToCoordinator, v1::CoordinatorToAgent>* stream);
  std::shared_ptr<grpc::Channel> MakeChannel() const;
  void EnqueueRendezvous(const v1::RendezvousPublish& publish);
  void StopRanksThread();
  // Ranks stopped and either nothing is unacked or the flush time is up.
  bool DoneLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const Options options_;
  const std::vector<HostSlot> slots_;
  Spool* const spool_;
  std::unique_ptr<RankSupervisor> supervisor_;

  mutable absl::Mutex mu_;
  bool shutdown_requested_ ABSL_GUARDED_BY(mu_) = false;
  bool ranks_stopped_ ABSL_GUARDED_BY(mu_) = false;
  absl::Time flush_deadline_ ABSL_GUARDED_BY(mu_) = absl::InfiniteFuture();
  grpc::ClientContext* context_ ABSL_GUARDED_BY(mu_) = nullptr;

  // State of the current connection.
  bool connected_ ABSL_GUARDED_BY(mu_) = false;  // Registered received
  bool synced_ ABSL_GUARDED_BY(mu_) = false;     // first Ack received (or waited for)
  bool broken_ ABSL_GUARDED_BY(mu_) = false;
  bool reader_done_ ABSL_GUARDED_BY(mu_) = false;
  bool spool_dirty_ ABSL_GUARDED_BY(mu_) = false;
  int64_t sent_up_to_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Duration heartbeat_interval_ ABSL_GUARDED_BY(mu_) = absl::Seconds(5);
  absl::Time next_heartbeat_ ABSL_GUARDED_BY(mu_) = absl::InfiniteFuture();
  absl::Time ack_deadline_ ABSL_GUARDED_BY(mu_) = absl::InfiniteFuture();
  std::deque<v1::AgentToCoordinator> outbox_ ABSL_GUARDED_BY(mu_);

  std::thread stopper_;
};

}  // namespace ftune::agent

#endif  // FTUNE_WORKER_AGENT_AGENT_H_
