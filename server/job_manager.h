// JobManager: all job and agent logic of the coordinator, free of gRPC.
//
// It is the only writer of job state. Each operation runs under one mutex:
// load from the Store, apply the state machine (job_state.h), write back and
// append events in ONE store transaction, then (after commit) publish the
// events to the EventBus, update metrics, and queue messages to agents.
// Nothing is published or sent for a change that did not commit.
//
// Agents are reached through AgentLink, whose Send must not block (the
// gRPC stream behind it drains a queue on its own thread). Time comes from
// a Clock so tests drive heartbeats and timeouts by hand.
//
// Thread-safe: every public method may be called from any thread.
#ifndef FTUNE_SERVER_JOB_MANAGER_H_
#define FTUNE_SERVER_JOB_MANAGER_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "event_bus.h"
#include "ftune/clock.h"
#include "ftune/v1/agent_service.pb.h"
#include "ftune/v1/job_service.pb.h"
#include "scheduler.h"
#include "store.h"

namespace ftune::server {

class AgentLink {
 public:
  virtual ~AgentLink() = default;
  // Queues a message for the agent; never blocks.
  virtual void Send(const v1::CoordinatorToAgent& msg) = 0;
};

// What the manager reports to Prometheus (server/metrics.h implements it).
class MetricsSink {
 public:
  virtual ~MetricsSink() = default;
  virtual void JobStates(const std::map<v1::JobState, int>& counts) = 0;
  virtual void Fleet(int agents_alive, int agents_dead, int slots_free, int slots_used) = 0;
  virtual void Step(const std::string& job_id, int rank, const v1::StepMetrics& m) = 0;
  virtual void Memory(const std::string& job_id, int rank, const v1::MemoryStats& m) = 0;
  virtual void CheckpointSaved(const std::string& job_id, int64_t time_ms) = 0;
  virtual void Restarted(const std::string& job_id) = 0;
  virtual void JobEnded(const std::string& job_id) = 0;
  virtual void EventsIngested(int n) = 0;
};

struct ManagerOptions {
  int64_t agent_timeout_ms = 15000;
  int32_t heartbeat_interval_ms = 2000;
  int32_t grace_seconds = 30;
  // Per-rank peak device bytes of a (defaulted, valid) spec: the memory plan
  // (main.cc wires worker/trainer's PlanMemory). An error (the model's
  // config is not readable here) means "no plan": the job is scheduled on
  // resources.min_gpu_memory alone. Unset: no plans.
  std::function<absl::StatusOr<int64_t>(const v1::JobSpec&)> plan_device_bytes;
};

struct ListJobsResult {
  std::vector<v1::Job> jobs;
  std::string next_page_token;
};

class JobManager {
 public:
  JobManager(Store* store, Clock* clock, EventBus* bus, MetricsSink* metrics,
             ManagerOptions options);

  // Loads agents from the store (all disconnected; each gets a full timeout
  // to reconnect) and refreshes gauges. Call once before serving.
  absl::Status Recover();

  // --- JobService
  absl::StatusOr<v1::Job> CreateJob(v1::JobSpec spec, const std::string& request_id);
  absl::StatusOr<v1::Job> GetJob(const std::string& job_id);
  absl::StatusOr<ListJobsResult> ListJobs(const v1::ListJobsRequest& request);
  absl::StatusOr<v1::Job> CancelJob(const std::string& job_id);
  absl::StatusOr<std::vector<v1::Checkpoint>> ListCheckpoints(const std::string& job_id);
  std::vector<v1::Agent> ListAgents();
  absl::StatusOr<std::vector<v1::JobEvent>> ReadEvents(const std::string& job_id,
                                                       int64_t after_seq, int limit);

  // --- AgentService
  absl::Status RegisterAgent(const v1::RegisterAgent& reg, std::shared_ptr<AgentLink> link);
  // Stores a batch in one transaction; returns the agent's new ack seq.
  absl::StatusOr<int64_t> IngestEvents(const std::string& agent_id,
                                       const v1::RankEventBatch& batch);
  void Heartbeat(const std::string& agent_id);
  void Rendezvous(const std::string& agent_id, const v1::RendezvousPublish& publish);
  // The agent's stream ended; only forgets `link` if it is still the current one.
  void AgentDisconnected(const std::string& agent_id, const AgentLink* link);

  // Liveness, cancel deadlines, scheduling. Called periodically.
  void Tick();

  EventBus* bus() { return bus_; }

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
  using Outbox = std::vector<std::pair<std::string, v1::CoordinatorToAgent>>;
  struct Pending {
    std::vector<v1::JobEvent> events;
    Outbox outbox;
    std::vector<std::string> ended_jobs;
    std::vector<std::string> restarted_jobs;
    void Merge(Pending&& other);
  };

  // All below: mu_ held.
  // Jobs whose ranks may hold slots (SCHEDULED, RUNNING, RESTARTING, CANCELLING).
  absl::StatusOr<std::vector<std::pair<int64_t, v1::Job>>> ListSlotHolders();
  void AddEvent(v1::Job* job, v1::JobEvent event, Pending* p);
  absl::Status Transition(v1::Job* job, v1::JobState to, const std::string& reason,
                          const std::string& reason_code, Pending* p);
  absl::Status HandleRankEvent(v1::Job* job, const AgentState& agent, const v1::RankEvent& ev,
                               Pending* p);
  absl::Status RankExited(v1::Job* job, int32_t rank, int32_t exit_code,
                          const std::string& failure, Pending* p);
  absl::Status FailAttempt(v1::Job* job, const std::string& why, const std::string& code,
                           Pending* p);
  absl::Status Requeue(v1::Job* job, Pending* p);
  void StopRanks(const v1::Job& job, bool save_checkpoint, const std::string& reason, Pending* p);
  bool AllExited(const v1::Job& job) const;
  void CheckLostRanks(AgentState* agent, Pending* p);
  void ScheduleLocked(Pending* p);
  void SweepLocked(Pending* p);
  std::vector<AgentView> FleetLocked(bool include_used);
  void Flush(Pending* p);  // publish, send, metrics: after commit
  void RefreshGaugesLocked();
  int64_t NowMs() { return absl::ToUnixMillis(clock_->Now()); }

  Store* store_;
  Clock* clock_;
  EventBus* bus_;
  MetricsSink* metrics_;
  ManagerOptions options_;
  std::mutex mu_;
  std::map<std::string, AgentState> agents_;
};

}  // namespace ftune::server

#endif  // FTUNE_SERVER_JOB_MANAGER_H_
