// AgentManager: the coordinator's registry of host agents, free of gRPC.
//
// State it owns, per agent: the stored record (host, slots, and the highest
// event seq stored from it, which EventManager advances), the link to its
// open stream if any, liveness (alive, last seen), and what it reported
// running when it last registered.
//
//   * Register: the agent's record is stored; the first messages on its new
//     link are `registered` (heartbeat interval, and the ranks it runs that no
//     job wants any more: it stops them) and the ack of what is stored.
//   * One live registration per id: while an agent's stream is open and it
//     was heard from within LiveWindowMs (three heartbeat intervals, at most
//     the timeout), a second registration of its id is refused
//     (ALREADY_EXISTS). Past that the old stream is taken for one its agent
//     left, and is ended in favour of the new one.
//   * Liveness: heartbeats and event batches count as signs of life. An agent
//     silent for agent_timeout_ms is dead: its link is dropped and
//     disconnected, and the job side fails the ranks placed on it. Ending the
//     stream is what brings a paused agent back: heartbeats on a stream that
//     stayed open would never revive it, while a fresh registration does, and
//     its Registered reply names the ranks of attempts the coordinator no
//     longer wants (the agent kills them).
//   * Lost ranks: a re-registering agent reports the ranks it still runs;
//     ranks placed on it that it does not report died with its previous
//     process. That check waits until every event the agent sent before
//     registering is stored (the ack reaches its last_agent_seq), so an exit
//     it spooled while the coordinator was away is not taken for a loss.
//
// What agents mean for jobs is decided by the job side, AgentListener
// (JobManager): this class never reads or writes a job.
//
// Locking: mu_ guards the registry. Lock order across the coordinator:
// EventManager's ingest lock -> JobManager's job lock -> mu_ -> Store and
// EventBus. mu_ is held for the registry itself, for AgentLink::Send (never
// blocks), and in RegisterAgent also across the agent's store row and
// AgentListener::UnwantedRanks (a lock-free read of committed jobs), so that
// nothing sent to the agent after that read goes to its old link. Listener
// calls that take the job lock are made with mu_ released.
//
// Thread-safe: every public method may be called from any thread.
#ifndef FTUNE_SERVER_AGENT_MANAGER_H_
#define FTUNE_SERVER_AGENT_MANAGER_H_

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "ftune/clock.h"
#include "ftune/v1/agent_service.pb.h"
#include "ftune/v1/job_service.pb.h"
#include "scheduler.h"
#include "store.h"

namespace ftune::server {

// The coordinator's end of one agent stream.
class AgentLink {
 public:
  virtual ~AgentLink() = default;
  // Queues a message for the agent; never blocks.
  virtual void Send(const v1::CoordinatorToAgent& msg) = 0;
  // Ends the stream (the agent sees it break and registers again); never
  // blocks. A no-op once the stream has ended.
  virtual void Disconnect() = 0;
};

// The job side of the registry (JobManager implements it).
class AgentListener {
 public:
  virtual ~AgentListener() = default;

  // Called with the registry lock held; must read committed job rows only
  // and take no lock.
  //   Of the ranks a registering agent reports running, in their order,
  //   those no live job wants on it any more.
  virtual std::vector<v1::RunningRank> UnwantedRanks(
      const std::string& agent_id, const std::vector<v1::RunningRank>& running) = 0;
  //   Placements (job_id set) of every job that holds slots.
  virtual std::vector<v1::RankPlacement> SlotHolderPlacements() = 0;

  // Called with no lock of this class held.
  //   The agent re-registered reporting `running`, and everything it sent
  //   before is stored: ranks placed on it that are not in `running` are
  //   lost.
  virtual void CheckLostRanks(const std::string& agent_id,
                              const std::vector<v1::RunningRank>& running) = 0;
  //   These agents missed their heartbeat timeout (their links are dropped).
  virtual void AgentsDead(const std::set<std::string>& agent_ids) = 0;
  //   An agent (re)registered: fleet gauges.
  virtual void FleetChanged() = 0;
};

class AgentManager {
 public:
  struct Options {
    int64_t agent_timeout_ms = 15000;
    int32_t heartbeat_interval_ms = 2000;
  };
  // What ingest needs to know of the agent a batch came from.
  struct EventSource {
    std::string host;
    int64_t acked_seq = 0;
  };

  AgentManager(Store* store, Clock* clock, Options options);
  // Required, before Recover.
  void SetListener(AgentListener* listener) { listener_ = listener; }

  // Loads agents from the store. They count as alive (without a link) until
  // they miss a full timeout, so running jobs survive a coordinator restart
  // while their agents reconnect. Call once before serving.
  absl::Status Recover();

  // --- AgentService
  absl::Status RegisterAgent(const v1::RegisterAgent& reg, std::shared_ptr<AgentLink> link);
  void Heartbeat(const std::string& agent_id);
  // The agent's stream ended; only forgets `link` if it is still the current one.
  void AgentDisconnected(const std::string& agent_id, const AgentLink* link);

  // --- JobService
  std::vector<v1::Agent> ListAgents();

  // Marks agents silent for longer than the timeout dead and disconnects
  // them. Called periodically.
  void CheckLiveness();

  // --- for the other managers
  // Every agent with its slots, alive or not (`used` left empty), in
  // agent_id order. Built again only after a registration or a death (not
  // per heartbeat): the scheduler reads it on every pass. Immutable.
  std::shared_ptr<const std::vector<AgentView>> Fleet();
  // Queues msg on the agent's link; dropped when it has none (dead, or
  // between streams: what matters is sent again when it registers).
  void Send(const std::string& agent_id, const v1::CoordinatorToAgent& msg);
  // A batch of events arrived: counts as a sign of life. FAILED_PRECONDITION
  // for an agent that never registered.
  absl::StatusOr<EventSource> EventsArrived(const std::string& agent_id);
  // Events up to acked_seq are stored (the store's row was updated with
  // them); runs the agent's pending lost-rank check once it is due.
  void EventsAcked(const std::string& agent_id, int64_t acked_seq);

  const Options& options() const { return options_; }

 private:
  struct AgentState {
    StoredAgent stored;
    std::shared_ptr<AgentLink> link;
    bool alive = false;
    int64_t last_seen_ms = 0;
    // After a (re)register: check for lost ranks once events up to here are in.
    int64_t lost_check_seq = -1;
    std::vector<v1::RunningRank> reported_running;
  };

  int64_t NowMs() { return absl::ToUnixMillis(clock_->Now()); }
  int64_t LiveWindowMs() const {
    return std::min<int64_t>(options_.agent_timeout_ms, 3 * int64_t{options_.heartbeat_interval_ms});
  }

  Store* const store_;
  Clock* const clock_;
  const Options options_;
  AgentListener* listener_ = nullptr;
  std::mutex mu_;
  std::map<std::string, AgentState> agents_;  // guarded by mu_
  // Fleet() as of the last change of agents_; null: to build again.
  std::shared_ptr<const std::vector<AgentView>> fleet_;  // guarded by mu_
};

}  // namespace ftune::server

#endif  // FTUNE_SERVER_AGENT_MANAGER_H_
