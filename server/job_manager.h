// JobManager: the jobs of the coordinator, free of gRPC.
//
// The only writer of job rows. It validates and stores jobs, moves them
// through the state machine, cancels them, restarts the gang of a failed
// attempt from its latest complete checkpoint, and asks the Scheduler where
// queued jobs go. The table of allowed transitions is job_state.h's; what
// drives each one is here:
//
//   QUEUED -> SCHEDULED -> RUNNING -> SUCCEEDED
//     |          |           |  \--> FAILED
//     |          |           \-----> RESTARTING -> QUEUED (next attempt)
//     |          \-----------------> RESTARTING | FAILED | RUNNING
//     \--> CANCELLED     SCHEDULED | RUNNING | RESTARTING -> CANCELLING -> CANCELLED
//
//   QUEUED -> SCHEDULED        the Scheduler placed every rank (after each
//                              create, cancel, end or requeue, and each Tick)
//   SCHEDULED -> RUNNING       every rank said hello
//   SCHEDULED|RUNNING
//     -> SUCCEEDED             every rank exited 0
//     -> RESTARTING            a rank failed or was lost and restarts remain:
//                              the rest of the gang is stopped
//     -> FAILED                the same with no restarts left, or a rank
//                              exited 2 (bad spec or input: not restarted)
//   RESTARTING -> QUEUED       the whole gang exited: attempt + 1, resuming
//                              from the latest complete checkpoint
//   QUEUED -> CANCELLED        CancelJob
//   live -> CANCELLING         CancelJob: ranks save a checkpoint and stop
//   CANCELLING -> CANCELLED    every rank exited, or the cancel deadline
//                              (2 x grace + agent timeout) passed
//
// Every change is one transaction: load from the Store, apply, write the job
// back and append its events (EventManager::Append); after the commit, the
// events are published (EventManager::Publish), messages go to agents
// (AgentManager::Send) and metrics are updated. Nothing is published or sent
// for a change that did not commit.
//
// A scheduling pass reads the queue and the slots in use from the store's
// in-memory index of live jobs (job_index.h), not from the rows, walks it
// up to the first job that does not fit, and stores all its placements and
// changed reasons in one transaction (ScheduleLocked).
//
// It is also the job side of the other two managers: AgentListener (agents
// registering, lost or dead) and RankEventHandler (what a rank event does to
// its job).
//
// Locking: mu_ (the job lock) is held across every read-modify-write of job
// rows, scheduling included. Lock order across the coordinator:
// EventManager's ingest lock -> mu_ -> AgentManager's registry lock -> Store
// and EventBus. Messages and publishing happen after commit, never inside a
// store transaction. UnwantedRanks and SlotHolderPlacements read committed
// rows without mu_ (the registry calls them under its own lock). CreateJob
// checks paths and runs the memory plan (file reads) before taking mu_.
//
// Thread-safe: every public method may be called from any thread.
#ifndef FTUNE_SERVER_JOB_MANAGER_H_
#define FTUNE_SERVER_JOB_MANAGER_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "agent_manager.h"
#include "event_manager.h"
#include "ftune/clock.h"
#include "ftune/path_policy.h"
#include "ftune/v1/agent_service.pb.h"
#include "ftune/v1/job_service.pb.h"
#include "metrics_sink.h"
#include "scheduler.h"
#include "store.h"

namespace ftune::server {

// Bytes of jobs in one ListJobs page (beyond its first job): with the rest
// of the response, under gRPC's default 4 MiB receive limit of clients.
inline constexpr size_t kMaxListJobsBytes = 2 << 20;

struct ListJobsResult {
  std::vector<v1::Job> jobs;
  std::string next_page_token;
};

class JobManager final : public AgentListener, public RankEventHandler {
 public:
  struct Options {
    int32_t grace_seconds = 30;
    // The agents' heartbeat timeout: part of the cancel deadline, and said
    // when ranks are lost with their agent.
    int64_t agent_timeout_ms = 15000;
    // Per-rank peak device bytes of a (defaulted, valid) spec: the memory plan
    // (main.cc wires worker/trainer's PlanMemory). An error (the model's
    // config is not readable here) means "no plan": the job is scheduled on
    // resources.min_gpu_memory alone. Unset: no plans.
    std::function<absl::StatusOr<int64_t>(const v1::JobSpec&)> plan_device_bytes;
    // How long CreateJob waits for the plan (it reads the model's
    // config.json, maybe on a network filesystem) before going on without.
    int64_t plan_timeout_ms = 5000;
    // Where a spec's paths may lead (ftune/path_policy.h), checked on
    // CreateJob against what this host sees. No roots: anywhere.
    PathPolicy paths;
    // Jobs one owner may have QUEUED at once (admins too); CreateJob beyond
    // it is RESOURCE_EXHAUSTED. Other owners are unaffected. 0: no cap.
    int64_t max_queued_jobs = 0;
    // Events of a job that ended longer ago than this are deleted, all but
    // its last (how it ended). 0: kept forever.
    int64_t event_retention_ms = 0;
  };

  // metrics may be null; agents and events must outlive this.
  JobManager(Store* store, Clock* clock, MetricsSink* metrics, AgentManager* agents,
             EventManager* events, Options options);

  // --- JobService
  // `owner` is stored with the job (empty: none). A request_id already used
  // by another owner's job is refused.
  absl::StatusOr<v1::Job> CreateJob(v1::JobSpec spec, const std::string& request_id,
                                    const std::string& owner = "");
  absl::StatusOr<v1::Job> GetJob(const std::string& job_id);
  absl::StatusOr<ListJobsResult> ListJobs(const v1::ListJobsRequest& request);
  absl::StatusOr<v1::Job> CancelJob(const std::string& job_id);
  absl::StatusOr<std::vector<v1::Checkpoint>> ListCheckpoints(const std::string& job_id);

  // Deletes the events of jobs that ended more than event_retention_ms ago
  // (not their last). Runs at most every tenth of the retention (1 s to
  // 1 h); called periodically. Takes no job lock: no job row changes.
  void ExpireEvents();

  // --- AgentService
  // Relays rank 0's rendezvous data to every agent of its job's current
  // attempt. Only from the agent rank 0 is placed on: from any other it is
  // dropped (and counted), and false is returned.
  bool Rendezvous(const std::string& agent_id, const v1::RendezvousPublish& publish);

  // Cancel deadlines, scheduling, gauges. Called periodically, after
  // AgentManager::CheckLiveness.
  void Tick();
  // Gauges; also the per-job counters of every live job (JobStarted), for a
  // coordinator that recovered jobs started before it.
  void RefreshGauges();

  // --- AgentListener
  std::vector<v1::RunningRank> UnwantedRanks(const std::string& agent_id,
                                             const std::vector<v1::RunningRank>& running) override;
  std::vector<v1::RankPlacement> SlotHolderPlacements() override;
  void CheckLostRanks(const std::string& agent_id,
                      const std::vector<v1::RunningRank>& running) override;
  void AgentsDead(const std::set<std::string>& agent_ids) override;
  void FleetChanged() override { RefreshGauges(); }

  // --- RankEventHandler
  absl::StatusOr<int> ApplyRankEvents(
      std::vector<IngestedEvent> events,
      const std::function<absl::Status()>& also_in_transaction) override;

 private:
  using Outbox = std::vector<std::pair<std::string, v1::CoordinatorToAgent>>;
  // What a committed change still has to do.
  struct Pending {
    std::vector<v1::JobEvent> events;
    Outbox outbox;
    std::vector<std::string> ended_jobs;
    std::vector<std::string> restarted_jobs;
    std::vector<std::pair<std::string, int64_t>> started_jobs;  // id, restarts
    void Merge(Pending&& other);
  };

  // The one check of a submitted spec: defaults applied, then validated
  // (proto/jobspec.h). INVALID_ARGUMENT listing every problem.
  static absl::Status ValidateAndResolveSpec(v1::JobSpec* spec);
  // The spec's paths against options_.paths; INVALID_ARGUMENT naming the key.
  absl::Status CheckPaths(const v1::JobSpec& spec) const;
  // options_.plan_device_bytes on its own thread, waited for at most
  // plan_timeout_ms; 0 (no plan) on error, timeout, or when too many plans
  // are still stuck. Called without mu_.
  int64_t PlanOutsideLock(const v1::JobSpec& spec);

  // Jobs whose ranks may hold slots (SCHEDULED, RUNNING, RESTARTING,
  // CANCELLING). A read of committed rows: needs no lock.
  absl::StatusOr<std::vector<std::pair<int64_t, v1::Job>>> ListSlotHolders();

  // All below: mu_ held.
  void AddEvent(v1::Job* job, v1::JobEvent event, Pending* p);
  absl::Status Transition(v1::Job* job, v1::JobState to, const std::string& reason,
                          const std::string& reason_code, Pending* p);
  // Null when `ev`, sent by agent_id, may act on `job`; else the reason
  // (ftune_events_dropped_total's label) it is dropped.
  static const char* WhyDropped(const v1::Job& job, const v1::RankEvent& ev,
                                const std::string& agent_id);
  absl::Status ApplyRankEvent(v1::Job* job, const v1::RankEvent& ev, v1::JobEvent je,
                              Pending* p);
  absl::Status RankExited(v1::Job* job, int32_t rank, int32_t exit_code,
                          const std::string& failure, Pending* p);
  absl::Status FailAttempt(v1::Job* job, const std::string& why, const std::string& code,
                           Pending* p);
  absl::Status Requeue(v1::Job* job, Pending* p);
  void StopRanks(const v1::Job& job, bool save_checkpoint, const std::string& reason, Pending* p);
  bool AllExited(const v1::Job& job) const;
  void ExpireCancelsLocked(Pending* p);
  void ScheduleLocked(Pending* p);
  // The live agents with a free slot, with the slots live jobs hold.
  std::vector<AgentView> FreeFleetLocked();
  // How many of the agent's slots are in `used` (ascending).
  static int NumUsed(const AgentView& agent, const std::vector<int>& used);
  void Flush(Pending* p);  // publish, send, metrics: after commit
  // Flush, then schedule when a job ended or was requeued (slots freed).
  void FlushAndReschedule(Pending* p);
  void RefreshGaugesLocked();
  int64_t NowMs() { return absl::ToUnixMillis(clock_->Now()); }

  Store* const store_;
  Clock* const clock_;
  MetricsSink* const metrics_;
  AgentManager* const agents_;
  EventManager* const events_;
  const Options options_;
  std::mutex mu_;
  // Plans still running (a stuck read keeps its thread): shared with them.
  std::shared_ptr<std::atomic<int>> plans_in_flight_ = std::make_shared<std::atomic<int>>(0);
  // FreeFleetLocked's last answer and what it was computed from.
  struct FreeFleet {
    std::shared_ptr<const std::vector<AgentView>> fleet;
    uint64_t used_version = 0;
    std::vector<AgentView> agents;
  };
  FreeFleet free_fleet_;  // guarded by mu_
  std::mutex expiry_mu_;
  int64_t next_expiry_ms_ = 0;                  // guarded by expiry_mu_
  std::set<std::string> events_expired_;        // guarded by expiry_mu_
};

}  // namespace ftune::server

#endif  // FTUNE_SERVER_JOB_MANAGER_H_
