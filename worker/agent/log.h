// Agent log: one line per record on stderr, prefixed with a UTC timestamp and
// a severity letter, so that journald/systemd and test harnesses capture the
// agent's story without a logging dependency (the abseil shipped with
// Debian 12 predates absl/log).
//
// Thread-safe: each record is written with a single write(2) call, so lines
// from concurrent threads never interleave.
#ifndef FTUNE_WORKER_AGENT_LOG_H_
#define FTUNE_WORKER_AGENT_LOG_H_

#include "absl/strings/string_view.h"

namespace ftune::agent {

enum class LogLevel { kInfo, kWarning, kError };

void Log(LogLevel level, absl::string_view message);

inline void LogInfo(absl::string_view message) { Log(LogLevel::kInfo, message); }
inline void LogWarning(absl::string_view message) { Log(LogLevel::kWarning, message); }
inline void LogError(absl::string_view message) { Log(LogLevel::kError, message); }

}  // namespace ftune::agent

#endif  // FTUNE_WORKER_AGENT_LOG_H_
