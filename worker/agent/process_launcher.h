// Starting and watching rank processes, behind an interface so that tests of
// the rank supervisor can inject launch failures, exits and signals by hand
// instead of sleeping or killing real processes; ForkExecLauncher is the
// real one.
//
// ForkExecLauncher puts each rank in its own process group, so a Ctrl-C on the
// agent's terminal reaches only the agent (which then stops its ranks in
// order) and signals reach a rank's helper processes too. When the rank
// itself exits, whatever is left of its group is killed before the rank is
// reaped: helpers never outlive their rank or hold its channel open.
//
// Thread-safety: Launch may be called from any thread. A RankProcess may be
// signalled from any thread while one thread blocks in Wait(); signalling
// after Wait() returned does nothing (the pid may belong to someone else).
#ifndef FTUNE_WORKER_AGENT_PROCESS_LAUNCHER_H_
#define FTUNE_WORKER_AGENT_PROCESS_LAUNCHER_H_

#include <sys/types.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace ftune::agent {

struct LaunchRequest {
  // Path of the executable (no PATH lookup).
  std::string binary;
  // Complete argv, argv[0] included.
  std::vector<std::string> argv;
  // Complete environment, "KEY=VALUE" entries.
  std::vector<std::string> env;
  // The child's stderr and stdout are appended to this file.
  std::string stderr_path;
  // A descriptor (>= 3) the child inherits under the same number: the rank's
  // end of its channel. Every other descriptor of the agent is close-on-exec.
  int inherit_fd = -1;
};

class RankProcess {
 public:
  virtual ~RankProcess() = default;
  virtual pid_t pid() const = 0;
  // Sends sig to the process (and its process group).
  virtual void Signal(int sig) = 0;
  // Blocks until the process has ended and returns its exit code, or -signal
  // when a signal ended it. Called once.
  virtual int Wait() = 0;
};

class ProcessLauncher {
 public:
  virtual ~ProcessLauncher() = default;
  // Starts the process. An error means it never ran (cannot open the log,
  // cannot execute the binary); its message names the path and the reason.
  virtual absl::StatusOr<std::unique_ptr<RankProcess>> Launch(const LaunchRequest& request) = 0;
};

// fork + execve. Exec failures are reported by Launch (through a close-on-exec
// pipe), not as an exit code 127.
std::unique_ptr<ProcessLauncher> NewForkExecLauncher();

}  // namespace ftune::agent

#endif  // FTUNE_WORKER_AGENT_PROCESS_LAUNCHER_H_
