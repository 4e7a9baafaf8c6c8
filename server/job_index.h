// JobIndex: the live jobs of the store, in memory, for the scheduler.
//
// The scheduler runs on every tick and after every change that frees or
// asks for slots, under the job lock that CreateJob also takes. Reading
// the whole queue back from SQLite each time costs seconds at 100,000
// queued jobs; this index answers what it asks from memory:
//
//   - the queued jobs in scheduling order: priority (higher first), then
//     submission order (the job's ordinal), with what placing them needs;
//   - the queued jobs whose stored reason is not yet "jobs_ahead" (new,
//     requeued, or the previous head of the queue), so that a tick writes
//     only the reasons that change instead of visiting the whole queue;
//   - queued jobs per owner (the per-user cap), jobs per state (gauges) and
//     the slots live jobs hold.
//
// Only non-terminal jobs are kept; ended jobs are counted per state. The
// Store owns the index and is its only writer: it loads it once at open and
// feeds it every job it stores, after the transaction commits, so the index
// is always the committed rows (store.h). Nothing here is durable.
//
// Thread-safety: none; the Store guards it with its own lock.
#ifndef FTUNE_SERVER_JOB_INDEX_H_
#define FTUNE_SERVER_JOB_INDEX_H_

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "ftune/v1/job_service.pb.h"
#include "scheduler.h"

namespace ftune::server {

// Scheduling order: higher priority first, then earlier submission. Ordinals
// are unique, so no two queued jobs compare equal.
struct QueueKey {
  int32_t priority = 0;
  int64_t ordinal = 0;
  bool operator<(const QueueKey& o) const {
    if (priority != o.priority) return priority > o.priority;
    return ordinal < o.ordinal;
  }
  bool operator==(const QueueKey& o) const {
    return priority == o.priority && ordinal == o.ordinal;
  }
};

// What the index keeps of one live job.
struct IndexedJob {
  std::string id;
  int64_t ordinal = 0;
  v1::JobState state = v1::QUEUED;
  int32_t priority = 0;
  std::string owner;
  // As the scheduler places the job: min_gpu_memory raised to the memory
  // plan (PlannedResources).
  v1::ResourceSpec resources;
  std::string state_reason;
  std::string reason_code;
  // (agent_id, slot) of each rank not yet exited, while the job holds slots
  // (HoldsSlots); empty otherwise.
  std::vector<std::pair<std::string, int>> held_slots;

  // The entry of a stored job.
  static IndexedJob Of(const v1::Job& job, int64_t ordinal);
  QueueKey key() const { return {priority, ordinal}; }
  bool operator==(const IndexedJob& o) const;
};

class JobIndex {
 public:
  // A job as it now stands in the store. `inserted`: a new row (an ended job
  // inserted as such is counted; an ended job updated again is not counted
  // twice).
  void Put(IndexedJob job, bool inserted);
  // Ended jobs already in the store at load time.
  void AddEnded(v1::JobState state, int64_t count);
  void Clear();

  // Null when the job is not live (ended or unknown).
  const IndexedJob* Find(const std::string& id) const;
  // Queued jobs in scheduling order, while fn returns true.
  void ForEachQueued(const std::function<bool(const IndexedJob&)>& fn) const;
  // Queued jobs whose reason_code is not kJobsAheadCode, in scheduling
  // order, while fn returns true.
  void ForEachQueuedNotBehind(const std::function<bool(const IndexedJob&)>& fn) const;
  size_t num_queued() const { return queue_.size(); }
  int64_t NumQueued(const std::string& owner) const;
  // Jobs per state (a v1::JobState); states with none are absent.
  std::map<int, int> CountByState() const;
  // Slots held by live jobs, per agent, ascending.
  std::map<std::string, std::vector<int>> UsedSlots() const;
  // Changes whenever UsedSlots() may have: a pass that saw this version
  // may reuse what it computed from them.
  uint64_t used_slots_version() const { return used_version_; }

  // The first difference from `other` in words; empty when they hold the
  // same jobs, order and counts. For checking the index against a fresh load.
  std::string Diff(const JobIndex& other) const;

 private:
  void Remove(const std::string& id);

  std::unordered_map<std::string, IndexedJob> live_;
  std::map<QueueKey, const IndexedJob*> queue_;
  std::map<QueueKey, const IndexedJob*> not_behind_;
  std::map<std::string, int64_t> queued_per_owner_;
  std::map<int, int64_t> per_state_;
  // agent_id -> slot -> how many live jobs say they hold it (1 unless
  // something is wrong).
  std::map<std::string, std::map<int, int>> used_;
  uint64_t used_version_ = 0;
};

}  // namespace ftune::server

#endif  // FTUNE_SERVER_JOB_INDEX_H_
