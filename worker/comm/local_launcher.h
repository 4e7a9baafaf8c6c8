// LocalRankGroup: starts N ranks of one job on this machine as forked
// processes, for `--nproc N` standalone runs, comm_selftest and the
// multi-process tests.
//
// The launcher hosts the TcpStore that LocalRendezvous uses. It binds the
// store and forks every rank before it starts any thread (forking a process
// with threads leaves their locks in the child), then serves the store.
// Each child gets FTUNE_RENDEZVOUS_STORE, FTUNE_RANK, FTUNE_WORLD_SIZE and,
// unless already set, NCCL_NVLS_ENABLE=0 in its environment, runs the rank
// function and _exit()s with its return value.
//
// Thread-safety: one thread uses a group. Start() must be called while the
// calling process has no other threads (see above).
#ifndef FTUNE_WORKER_COMM_LOCAL_LAUNCHER_H_
#define FTUNE_WORKER_COMM_LOCAL_LAUNCHER_H_

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "ftune/status.h"
#include "worker/comm/tcp_store.h"

namespace ftune::comm {

struct LocalLaunchOptions {
  int nproc = 1;
  // Address the store listens on; the ranks connect to it.
  std::string host = "127.0.0.1";
  // Collect each rank's stdout and stderr into RankExit::output instead of
  // letting them through.
  bool capture_output = false;
};

struct RankExit {
  int rank = -1;
  pid_t pid = -1;
  bool exited = false;              // reaped
  int wait_status = 0;              // waitpid's status, valid when exited
  bool killed_by_launcher = false;  // SIGKILLed by Wait (deadline or grace)
  std::chrono::steady_clock::time_point exited_at;
  std::string output;  // with capture_output

  bool ok() const;
  // "rank 1 (pid 4242) exited with 3", "... killed by signal 9", ...
  std::string Describe() const;
};

// Runs in the child process; the return value is its exit code.
using RankMain = std::function<int(int rank, const std::string& store_address)>;

class LocalRankGroup {
 public:
  static Status Start(const LocalLaunchOptions& options,
                      const RankMain& rank_main,
                      std::unique_ptr<LocalRankGroup>* out);
  // SIGKILLs and reaps the ranks still running.
  ~LocalRankGroup();
  LocalRankGroup(const LocalRankGroup&) = delete;
  LocalRankGroup& operator=(const LocalRankGroup&) = delete;

  int nproc() const { return static_cast<int>(ranks_.size()); }
  pid_t pid(int rank) const { return ranks_[rank].pid; }
  const std::string& store_address() const { return server_->address(); }

  // Waits until every rank has exited. Ranks still running after `timeout`
  // are SIGKILLed. With grace_after_failure >= 0, once a rank fails the
  // others get that long to finish before they are SIGKILLed: a collective
  // job cannot go on without one of its ranks.
  std::vector<RankExit> Wait(std::chrono::milliseconds timeout,
                             std::chrono::milliseconds grace_after_failure =
                                 std::chrono::milliseconds(-1));

 private:
  LocalRankGroup() = default;
  void Reap(bool block);
  void Drain();

  std::unique_ptr<TcpStoreServer> server_;
  std::vector<RankExit> ranks_;
  std::vector<int> output_fds_;  // per rank; -1 when not captured or closed
};

}  // namespace ftune::comm

#endif  // FTUNE_WORKER_COMM_LOCAL_LAUNCHER_H_
