// The job state machine, as one transition table.
//
//   QUEUED -> SCHEDULED -> RUNNING -> SUCCEEDED
//     |          |           |  \--> FAILED
//     |          |           \-----> RESTARTING -> QUEUED (next attempt)
//     |          \-----------------> RESTARTING | FAILED | RUNNING
//     \--> CANCELLED     SCHEDULED | RUNNING | RESTARTING -> CANCELLING -> CANCELLED
//
// SUCCEEDED, FAILED and CANCELLED are terminal. Thread-safe (pure functions).
#ifndef FTUNE_SERVER_JOB_STATE_H_
#define FTUNE_SERVER_JOB_STATE_H_

#include <string>

#include "absl/status/status.h"
#include "ftune/v1/job_service.pb.h"

namespace ftune::server {

bool IsTerminal(v1::JobState state);
// Live: holds or may soon hold slots (SCHEDULED, RUNNING, RESTARTING, CANCELLING).
bool HoldsSlots(v1::JobState state);
// OK if the table allows from -> to, else FAILED_PRECONDITION naming both.
absl::Status CheckTransition(v1::JobState from, v1::JobState to);
std::string StateName(v1::JobState state);

}  // namespace ftune::server

#endif  // FTUNE_SERVER_JOB_STATE_H_
