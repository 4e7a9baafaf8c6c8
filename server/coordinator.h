// The coordinator's three managers, built and wired in one place (as Ray's
// GcsServer wires its managers):
//
//   AgentManager  registry of host agents: register, slots, links,
//                 heartbeats and liveness
//   EventManager  rank events from agents: dedup and acks, persistence,
//                 fan-out to watchers, event metrics
//   JobManager    jobs: create, state machine, cancel, restarts, scheduling;
//                 the job side of the two above (AgentListener,
//                 RankEventHandler)
//
// main.cc, tests and benchmarks build one of these; the gRPC services get the
// managers they call. Locking is documented on each manager; the order is
// EventManager -> JobManager -> AgentManager -> Store / EventBus.
#ifndef FTUNE_SERVER_COORDINATOR_H_
#define FTUNE_SERVER_COORDINATOR_H_

#include <cstdint>
#include <functional>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "agent_manager.h"
#include "event_bus.h"
#include "event_manager.h"
#include "ftune/clock.h"
#include "job_manager.h"
#include "metrics_sink.h"
#include "store.h"

namespace ftune::server {

struct ManagerOptions {
  int64_t agent_timeout_ms = 15000;
  int32_t heartbeat_interval_ms = 2000;
  int32_t grace_seconds = 30;
  // See JobManager::Options::plan_device_bytes.
  std::function<absl::StatusOr<int64_t>(const v1::JobSpec&)> plan_device_bytes;
  // See JobManager::Options.
  int64_t plan_timeout_ms = 5000;
  PathPolicy paths;
  int64_t max_queued_jobs = 0;
  int64_t event_retention_ms = 0;
};

class Coordinator {
 public:
  // store, clock and bus must outlive this; metrics may be null.
  Coordinator(Store* store, Clock* clock, EventBus* bus, MetricsSink* metrics,
              const ManagerOptions& options);
  Coordinator(const Coordinator&) = delete;
  Coordinator& operator=(const Coordinator&) = delete;

  // Loads agents from the store and refreshes gauges. Call once before serving.
  absl::Status Recover();
  // Liveness first (so nothing is placed on a dead agent), then cancel
  // deadlines and scheduling, then expiring old events. Called
  // periodically.
  void Tick();

  AgentManager& agents() { return agents_; }
  EventManager& events() { return events_; }
  JobManager& jobs() { return jobs_; }

 private:
  AgentManager agents_;
  EventManager events_;
  JobManager jobs_;
};

}  // namespace ftune::server

#endif  // FTUNE_SERVER_COORDINATOR_H_
