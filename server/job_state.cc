#include "job_state.h"

#include <set>
#include <utility>

namespace ftune::server {
namespace {

using v1::JobState;

const std::set<std::pair<JobState, JobState>>& Table() {
  static const auto* table = new std::set<std::pair<JobState, JobState>>{
      {v1::QUEUED, v1::SCHEDULED},      {v1::QUEUED, v1::CANCELLED},
      {v1::QUEUED, v1::FAILED},         {v1::SCHEDULED, v1::RUNNING},
      {v1::SCHEDULED, v1::RESTARTING},  {v1::SCHEDULED, v1::FAILED},
      {v1::SCHEDULED, v1::CANCELLING},  {v1::SCHEDULED, v1::SUCCEEDED},
      {v1::RUNNING, v1::SUCCEEDED},     {v1::RUNNING, v1::FAILED},
      {v1::RUNNING, v1::RESTARTING},    {v1::RUNNING, v1::CANCELLING},
      {v1::RESTARTING, v1::QUEUED},     {v1::RESTARTING, v1::FAILED},
      {v1::RESTARTING, v1::CANCELLING}, {v1::CANCELLING, v1::CANCELLED},
  };
  return *table;
}

}  // namespace

bool IsTerminal(JobState s) {
  return s == v1::SUCCEEDED || s == v1::FAILED || s == v1::CANCELLED;
}

bool HoldsSlots(JobState s) {
  return s == v1::SCHEDULED || s == v1::RUNNING || s == v1::RESTARTING || s == v1::CANCELLING;
}

absl::Status CheckTransition(JobState from, JobState to) {
  if (Table().count({from, to})) return absl::OkStatus();
  return absl::FailedPreconditionError("job cannot go from " + StateName(from) + " to " +
                                       StateName(to));
}

std::string StateName(JobState s) { return v1::JobState_Name(s); }

}  // namespace ftune::server
