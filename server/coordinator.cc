#include "coordinator.h"

namespace ftune::server {

Coordinator::Coordinator(Store* store, Clock* clock, EventBus* bus, MetricsSink* metrics,
                         const ManagerOptions& o)
    : agents_(store, clock, AgentManager::Options{o.agent_timeout_ms, o.heartbeat_interval_ms}),
      events_(store, bus, metrics, &agents_),
      jobs_(store, clock, metrics, &agents_, &events_,
            JobManager::Options{o.grace_seconds, o.agent_timeout_ms, o.plan_device_bytes,
                                o.plan_timeout_ms, o.paths, o.max_queued_jobs,
                                o.event_retention_ms}) {
  agents_.SetListener(&jobs_);
  events_.SetHandler(&jobs_);
}

absl::Status Coordinator::Recover() {
  if (auto st = agents_.Recover(); !st.ok()) return st;
  jobs_.RefreshGauges();
  return absl::OkStatus();
}

void Coordinator::Tick() {
  agents_.CheckLiveness();
  jobs_.Tick();
  jobs_.ExpireEvents();
}

}  // namespace ftune::server
