// What the coordinator's managers report to Prometheus. server/metrics.h
// implements it; tests pass null (every manager checks).
//
// EventManager reports what events say (steps, memory, checkpoints, how many
// were ingested); JobManager which events it dropped and what jobs do
// (state counts, fleet, starts, restarts, ends).
//
// Thread-safety: implementations must allow calls from any thread.
#ifndef FTUNE_SERVER_METRICS_SINK_H_
#define FTUNE_SERVER_METRICS_SINK_H_

#include <cstdint>
#include <map>
#include <string>

#include "ftune/v1/job_service.pb.h"

namespace ftune::server {

// Why a rank event was not stored: the `reason` label of
// ftune_events_dropped_total. The exporter creates a series at 0 for each,
// so a dashboard has data before anything is dropped.
//   stale_attempt          a rank of an attempt that is not the job's current one
//   not_placed             a rank the sending agent does not hold
//   unknown_job            a job the store does not have
//   rendezvous_not_placed  rendezvous data from an agent other than rank 0's
inline constexpr char kDropStaleAttempt[] = "stale_attempt";
inline constexpr char kDropNotPlaced[] = "not_placed";
inline constexpr char kDropUnknownJob[] = "unknown_job";
inline constexpr char kDropRendezvousNotPlaced[] = "rendezvous_not_placed";
inline constexpr const char* kEventDropReasons[] = {kDropStaleAttempt, kDropNotPlaced,
                                                    kDropUnknownJob, kDropRendezvousNotPlaced};

class MetricsSink {
 public:
  virtual ~MetricsSink() = default;
  virtual void JobStates(const std::map<v1::JobState, int>& counts) = 0;
  virtual void Fleet(int agents_alive, int agents_dead, int slots_free, int slots_used) = 0;
  virtual void Step(const std::string& job_id, int rank, const v1::StepMetrics& m) = 0;
  virtual void Memory(const std::string& job_id, int rank, const v1::MemoryStats& m) = 0;
  virtual void CheckpointSaved(const std::string& job_id, int64_t time_ms) = 0;
  // A job's attempt started (RUNNING), or a recovering coordinator found it
  // holding slots: its per-job counters exist from now on, checkpoints at 0
  // and restarts at `restarts` (the job's stored count), so every dashboard
  // panel has data from the first scrape instead of from the first restart.
  virtual void JobStarted(const std::string& job_id, int64_t restarts) = 0;
  virtual void Restarted(const std::string& job_id) = 0;
  virtual void JobEnded(const std::string& job_id) = 0;
  virtual void EventsIngested(int n) = 0;
  // Rank events not stored: `reason` is one of kEventDropReasons.
  virtual void EventsDropped(const std::string& reason, int n) = 0;
};

}  // namespace ftune::server

#endif  // FTUNE_SERVER_METRICS_SINK_H_
