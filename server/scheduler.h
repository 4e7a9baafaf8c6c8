// Gang scheduler: priority, then FIFO; all ranks of a job or none.
//
// Pure functions over a snapshot of the fleet, so the job manager can call
// them under its lock and tests can drive them with hand-made fleets.
// Ordering is strict: a job that cannot be placed blocks the jobs behind it
// (no backfill), so a large high-priority job is never starved by small ones;
// each blocked job gets a reason saying what it waits for. The first blocked
// job says which slots it misses; every job behind it gets the same words
// (kJobsAheadReason), as Slurm's "Priority" reason, so a queue of 100,000
// jobs need not be rewritten each time its head moves.
//
// The job manager walks its queue (job_index.h) with a GangPlacer and stops
// at the first job that does not fit; Schedule() is the same over a list.
#ifndef FTUNE_SERVER_SCHEDULER_H_
#define FTUNE_SERVER_SCHEDULER_H_

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "ftune/v1/job_service.pb.h"

namespace ftune::server {

struct AgentView {
  std::string agent_id;
  std::string host;
  bool alive = true;
  std::vector<v1::Slot> slots;
  std::set<int> used;  // slot indexes held by live jobs
};

struct PendingJob {
  std::string job_id;
  int32_t priority = 0;
  int64_t ordinal = 0;  // submission order
  v1::ResourceSpec resources;
};

inline constexpr char kJobsAheadCode[] = "jobs_ahead";
inline constexpr char kSlotsMissingCode[] = "slots_missing";
inline constexpr char kJobsAheadReason[] =
    "waiting behind the jobs ahead of it in the queue (higher priority, or the same priority "
    "and submitted earlier); the first of them waits for slots";

struct Decision {
  std::string job_id;
  bool placed = false;
  std::vector<v1::RankPlacement> placement;  // by rank, when placed
  std::string reason;                        // why not, otherwise
  std::string reason_code;                   // kJobsAheadCode | kSlotsMissingCode
};

// Places jobs one at a time on the free slots of live agents, all ranks of
// a job or none; the slots it gives out are used for the jobs after.
class GangPlacer {
 public:
  explicit GangPlacer(std::vector<AgentView> agents);
  // Placed, or not with a kSlotsMissingCode reason.
  Decision Place(const PendingJob& job);

 private:
  std::vector<AgentView> agents_;
  std::map<std::string, size_t> by_id_;  // index into agents_
};

// The decision for a job waiting behind a blocked one.
Decision JobsAhead(const std::string& job_id);

// Places pending jobs in priority-then-FIFO order onto the free slots of live
// agents. Returns one decision per pending job, in scheduling order.
std::vector<Decision> Schedule(std::vector<PendingJob> pending,
                               const std::vector<AgentView>& agents);

// The resources the scheduler places a job with: min_gpu_memory raised to
// the memory plan's per-rank prediction when that is larger.
v1::ResourceSpec PlannedResources(const v1::ResourceSpec& resources, int64_t planned_device_bytes);

// Whether the job could ever run on this fleet (all agents, alive or not,
// with every slot free). RESOURCE_EXHAUSTED with the numbers when not.
absl::Status CheckFits(const v1::ResourceSpec& resources, const std::vector<AgentView>& agents);

}  // namespace ftune::server

#endif  // FTUNE_SERVER_SCHEDULER_H_
