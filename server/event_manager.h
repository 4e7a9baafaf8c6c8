// EventManager: the coordinator's event path, free of gRPC.
//
//   agent --RankEventBatch--> IngestEvents: drop resends (agent_seq <= the
//     agent's ack), turn each fresh RankEvent into the JobEvent watchers see,
//     hand them to the job side (RankEventHandler, JobManager), which applies
//     them to their jobs and stores jobs, events and the advanced ack in ONE
//     transaction -> the new ack goes back to the agent.
//   every JobEvent (from ingest or from a job's own state change) is stored
//     with Append inside the transaction that changes its job, and after the
//     commit Publish fans it out to the EventBus (WatchJob streams) and to the
//     metrics.
//
// So an ack never covers an event that is not stored, a resent event is never
// stored twice, and nothing is published that did not commit. Events of a job
// this store never had, of an attempt other than the job's current one, or of
// a rank not placed on the sending agent are acked and dropped (counted in
// ftune_events_dropped_total). Job event seqs (gap-free per
// job) are assigned by the job side, since they live in the job row.
//
// State it owns: none in memory beyond ingest_mu_; the events table of the
// Store. The ack itself is part of the agent's record (AgentManager).
//
// Locking: ingest_mu_ serializes IngestEvents, so reading an agent's ack,
// storing the batch and advancing the ack are one step even when an agent's
// old and new streams overlap. It comes first in the coordinator's lock
// order: ingest_mu_ -> JobManager's job lock -> AgentManager's registry lock
// -> Store and EventBus. Append, Publish and ReadEvents take no lock of this
// class (Append runs inside its caller's transaction).
//
// Thread-safe: every public method may be called from any thread.
#ifndef FTUNE_SERVER_EVENT_MANAGER_H_
#define FTUNE_SERVER_EVENT_MANAGER_H_

#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "agent_manager.h"
#include "event_bus.h"
#include "ftune/v1/agent_service.pb.h"
#include "ftune/v1/job_service.pb.h"
#include "metrics_sink.h"
#include "store.h"

namespace ftune::server {

// One fresh rank event on its way into the store.
struct IngestedEvent {
  const v1::RankEvent* rank_event;
  // The agent it came from.
  std::string agent_id;
  // What watchers will see (its text is also the reason a failure gives);
  // job_id and seq are set by the job side.
  v1::JobEvent job_event;
};

// The job side of ingest (JobManager implements it).
class RankEventHandler {
 public:
  virtual ~RankEventHandler() = default;
  // Applies `events` (fresh, in agent_seq order) to their jobs and, in one
  // store transaction, writes the jobs, appends the JobEvents and runs
  // `also_in_transaction` (the ack); publishes and sends after the commit.
  // Returns how many events were stored; the others (of a job this store
  // never had, of an attempt that is not the job's current one, of a rank
  // not placed on the sending agent) are dropped and counted.
  virtual absl::StatusOr<int> ApplyRankEvents(
      std::vector<IngestedEvent> events,
      const std::function<absl::Status()>& also_in_transaction) = 0;
};

// The JobEvent watchers see for a rank event from `host`: payload copied,
// lifecycle events (hello, exit, launch failure) put in words.
v1::JobEvent JobEventFor(const v1::RankEvent& event, const std::string& host);

class EventManager {
 public:
  // metrics may be null.
  EventManager(Store* store, EventBus* bus, MetricsSink* metrics, AgentManager* agents);
  // Required, before serving.
  void SetHandler(RankEventHandler* handler) { handler_ = handler; }

  // --- AgentService
  // Stores a batch in one transaction; returns the agent's new ack seq.
  absl::StatusOr<int64_t> IngestEvents(const std::string& agent_id,
                                       const v1::RankEventBatch& batch);

  // --- JobService (WatchJob)
  // Stored events of a job after after_seq, at most limit. Reads need no
  // manager lock: events are immutable once committed.
  absl::StatusOr<std::vector<v1::JobEvent>> ReadEvents(const std::string& job_id,
                                                       int64_t after_seq, int limit);
  EventBus* bus() { return bus_; }

  // --- for the job side
  // Stores events; call inside the store transaction that changes their job.
  absl::Status Append(const std::vector<v1::JobEvent>& events);
  // After that transaction commits: to watchers, then to the metrics.
  // Callers publish in commit order, so each job's events go out in seq
  // order (JobManager publishes under its job lock).
  void Publish(const std::vector<v1::JobEvent>& events);

 private:
  Store* const store_;
  EventBus* const bus_;
  MetricsSink* const metrics_;
  AgentManager* const agents_;
  RankEventHandler* handler_ = nullptr;
  std::mutex ingest_mu_;
};

}  // namespace ftune::server

#endif  // FTUNE_SERVER_EVENT_MANAGER_H_
