// Rendering of coordinator resources for people and for scripts.
//
// Human output: aligned tables, one line per job event, times in ISO 8601
// UTC (events, describe) or relative to now (lists), sizes through
// FormatByteSize so the CLI prints memory the way job specs are written.
// Machine output: protobuf JSON with the proto field names (the same keys as
// the job YAML), one object per line, so `ftune watch --output json` can be
// read line by line.
//
// Functions that print relative times take `now_ms` instead of reading the
// clock, so tests pin the output. All functions are pure and thread-safe;
// RunSummary is a plain value type (not thread-safe).
#ifndef FTUNE_CLI_FORMAT_H_
#define FTUNE_CLI_FORMAT_H_

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include <google/protobuf/message.h>

#include "ftune/v1/job_service.pb.h"

namespace ftune::cli {

// --- job states -------------------------------------------------------------

// "RUNNING"; "UNKNOWN(42)" for values this build does not know.
std::string JobStateName(v1::JobState state);
// Case-insensitive state name ("running", "Failed"); false for anything else,
// including JOB_STATE_UNSPECIFIED, which no job is ever in.
bool ParseJobState(std::string_view text, v1::JobState* state);
// SUCCEEDED, FAILED and CANCELLED: nothing moves the job afterwards.
bool IsFinalState(v1::JobState state);

// --- scalars ------------------------------------------------------------------

// 1714564803123 -> "2024-05-01T12:00:03Z" (UTC, whole seconds); "-" for 0,
// which the coordinator uses for "never".
std::string FormatIsoTime(int64_t unix_ms);
// "just now", "42s ago", "5m ago", "3h ago", "2d ago", "in 5m"; "-" for 0.
std::string FormatRelativeTime(int64_t unix_ms, int64_t now_ms);
// "2024-05-01T12:00:03Z (5m ago)"; "-" for 0.
std::string FormatTimestamp(int64_t unix_ms, int64_t now_ms);
// Fixed decimals: FormatFixed(1.23456, 4) -> "1.2346"; "nan"/"inf" kept.
std::string FormatFixed(double value, int decimals);
// Learning rates span decades: 0.0002 -> "2.000e-04".
std::string FormatScientific(double value);

// --- resources ----------------------------------------------------------------

// One line per event (a rank error adds its stderr tail as indented lines),
// ending in '\n'. Layout: "<time> <who> <what> <details>", e.g.
//   2024-05-01T12:00:03Z rank 0  step 10  loss 1.2346  lr 2.000e-04  grad_norm 0.512  tokens/s 1234.5
//   2024-05-01T12:00:04Z job     state RUNNING -> SUCCEEDED: all ranks exited 0
std::string FormatEvent(const v1::JobEvent& event);

std::string FormatJobsTable(const std::vector<v1::Job>& jobs, int64_t now_ms);
// `ftune describe`: fields, placement and the spec as YAML.
std::string FormatJobDetails(const v1::Job& job, int64_t now_ms);
std::string FormatCheckpointsTable(const std::vector<v1::Checkpoint>& checkpoints,
                                   int64_t now_ms);
std::string FormatAgentsTable(const std::vector<v1::Agent>& agents, int64_t now_ms);

// "job j-1 FAILED: rank 1 exited with status 1" (no reason: no colon part).
std::string FormatOutcome(const v1::Job& job);

// Protobuf JSON on one line, proto field names, no trailing newline.
std::string ToJsonLine(const google::protobuf::Message& message);

// Collects what the final summary line of `watch` / `submit --follow` needs
// from the events it saw; the job record fills in what the coordinator keeps.
// Only the newest attempt's throughput counts, since a restarted gang
// measures from scratch; the peak memory is the peak over every attempt.
class RunSummary {
 public:
  void Add(const v1::JobEvent& event);

  // "summary: steps 100, final loss 0.8123, tokens/s 2469.0, peak memory 14.5GiB,
  // adapter /out/adapter"; '-' for what is unknown (e.g. a watch that started
  // after the events that carried it).
  std::string Format(const v1::Job& job) const;

 private:
  int32_t attempt_ = -1;
  int64_t max_step_ = 0;
  bool have_loss_ = false;
  double last_loss_ = 0;
  // rank -> its most recent tokens/s in the current attempt.
  std::map<int32_t, double> tokens_per_second_;
  int64_t peak_bytes_ = 0;
  std::string adapter_path_;
};

}  // namespace ftune::cli

#endif  // FTUNE_CLI_FORMAT_H_
