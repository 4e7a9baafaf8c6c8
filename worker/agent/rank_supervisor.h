// The rank supervisor: starts one rank process per assigned slot, relays its
// channel into the spool, delivers commands to it, and notices when it exits,
// hangs or must be stopped (docs/control-plane.md, "Rank processes").
//
// Per rank:
//   * a channel (socketpair): the rank's end is inherited as --channel-fd;
//   * a reader thread: every RankMessage becomes a spooled RankEvent, except
//     rendezvous_publish, which goes up at once through the RendezvousSink
//     (rendezvous data is only meaningful while the attempt runs, so it is not
//     spooled; see LocalPublications for resending it after a reconnect);
//   * a waiter thread: reaps the process, lets the reader drain what the rank
//     wrote before it died, then spools RankExit. RankExit is therefore always
//     the last event of a rank.
// A timer thread (or the test, through CheckTimers) kills ranks silent for
// longer than silence_timeout (RankExit.hung) and escalates stops:
// StopRank on the channel, SIGTERM after the grace period, SIGKILL after
// another one.
//
// Stops the agent decides on its own (shutdown, stale ranks) skip StopRank
// and start at SIGTERM: a rank that exits 0 after a StopRank reads as a clean
// finish, and the coordinator, which asked for nothing, would count the
// attempt as done. Terminated, the rank exits non-zero and the coordinator
// restarts the gang from its last checkpoint.
//
// Whatever cannot be done (bad slot, unwritable work dir, binary that does not
// execute) becomes a RankEvent.launch_failed naming the cause; the supervisor
// never throws or aborts. A spec whose paths the agent refuses is bad input:
// each of its ranks is reported as exiting 2 with the reason, so the job
// fails without restarts, as if the rank had refused it itself.
//
// What a rank gets (docs/security.md, "What a job may touch"):
//   * its spec with the paths checked against allowed_roots and resolved
//     (symlinks followed), so the rank opens exactly what was checked;
//   * <output_dir>/<job_id> as its output directory (<work_dir>/jobs/<job_id>/
//     output without one): two jobs naming one output_dir never share
//     checkpoints;
//   * an allowlisted environment, and every argument as --flag=value, so a
//     value starting with '-' is never read as a flag.
//
// An assignment is idempotent: a rank (job, attempt, rank) that runs or ran in
// this process is not started again when the coordinator re-sends it after a
// reconnect.
//
// A rank assigned to a slot still held by a rank that is stopping (a stale
// rank the coordinator gave up on, terminated on registration) waits for
// that slot instead of failing: it starts once the old rank has exited,
// which SIGKILL bounds. A StopJob for its attempt meanwhile reports it as
// launch_failed, so the coordinator still hears of every rank it placed.
//
// Thread-safety: all public methods may be called from any thread. Assign
// calls are serialized internally.
#ifndef FTUNE_WORKER_AGENT_RANK_SUPERVISOR_H_
#define FTUNE_WORKER_AGENT_RANK_SUPERVISOR_H_

#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "absl/status/statusor.h"
#include "ftune/clock.h"
#include "ftune/path_policy.h"
#include "ftune/v1/agent_service.pb.h"
#include "worker/agent/process_launcher.h"
#include "worker/agent/slots.h"
#include "worker/agent/spool.h"

namespace ftune::agent {

class RankSupervisor {
 public:
  struct Options {
    // Absolute; job files go to <work_dir>/jobs/<job_id>/.
    std::string work_dir;
    std::string rank_binary;
    // Absolute directories a job's model, data and output_dir must lie under
    // (ftune/path_policy.h); work_dir is always one. Empty: any path.
    std::vector<std::string> allowed_roots;
    // Names of variables of the agent's environment ranks get besides the
    // built-in allowlist (rank_supervisor.cc, kRankEnv).
    std::vector<std::string> extra_env;
    absl::Duration silence_timeout = absl::Seconds(600);
    // Used when a StopJob says 0, for stale ranks and at shutdown.
    absl::Duration default_grace = absl::Seconds(30);
    // Period of the timer thread; zero: no thread, the caller runs CheckTimers.
    absl::Duration poll_interval = absl::Milliseconds(100);
    size_t stderr_tail_lines = 20;
    // Null: the real clock.
    Clock* clock = nullptr;
  };
  using RendezvousSink = std::function<void(const v1::RendezvousPublish&)>;

  // spool and launcher must outlive the supervisor. sink is called from a
  // rank's reader thread.
  RankSupervisor(Options options, std::vector<HostSlot> slots, Spool* spool,
                 ProcessLauncher* launcher, RendezvousSink sink);
  // Kills (SIGKILL) ranks still running and waits for them; call Shutdown
  // first for an orderly stop.
  ~RankSupervisor();
  RankSupervisor(const RankSupervisor&) = delete;
  RankSupervisor& operator=(const RankSupervisor&) = delete;

  // Starts every rank of the assignment that this process has not started yet.
  void Assign(const v1::Assignment& assignment);

  // StopRank(save_checkpoint) to each rank of (job_id, attempt), SIGTERM
  // after the grace period, SIGKILL after another; grace_seconds <= 0 means
  // default_grace.
  void Stop(const v1::StopJob& stop);

  // Ranks the coordinator no longer wants (Registered.stale): SIGTERM at
  // once, SIGKILL after default_grace.
  void StopStale(const std::vector<v1::RunningRank>& stale);

  // Hands rendezvous data to each rank of its (job, attempt), once per rank;
  // ranks started later for that attempt get it right after they start.
  void DeliverRendezvous(const v1::RendezvousPublish& publish);

  // Ranks started and not yet reported exited: those running, and those
  // whose exit is held in memory because the spool is full.
  std::vector<v1::RunningRank> Running() const;
  size_t num_running() const;

  // Rendezvous data local ranks published for attempts that still have live
  // ranks here; the agent re-sends them after a reconnect, since the
  // coordinator may have missed them.
  std::vector<v1::RendezvousPublish> LocalPublications() const;

  // Runs the silence and stop timers once, joins finished rank threads and
  // starts ranks whose slot a stopped rank freed.
  void CheckTimers();

  // Terminates every rank (SIGTERM at once, SIGKILL after grace) and waits
  // until all have exited, at most grace + 5 s; assignments after this are
  // reported as launch_failed. Returns true when no rank is left.
  bool Shutdown(absl::Duration grace);

  // Blocks until no rank runs or the timeout passes; true when none runs.
  bool WaitIdle(absl::Duration timeout);

 private:
  using Key = std::tuple<std::string, int, int>;   // job_id, attempt, rank
  using AttemptKey = std::pair<std::string, int>;  // job_id, attempt
  struct Rank;

  // A rank waiting for its slot to be freed by a stopping rank.
  struct WaitingLaunch {
    v1::Assignment assignment;  // its ranks: just this one
    std::string spec_path, attempt_dir, output_dir;
  };

  void LaunchRank(const v1::Assignment& a, const v1::RankAssignment& ra,
                  const std::string& spec_path, const std::string& attempt_dir,
                  const std::string& output_dir);
  // Starts the waiting launches whose slot is free (or fails them once the
  // supervisor is closed). Takes assign_mu_.
  void StartWaitingLaunches();
  void ReadLoop(const std::shared_ptr<Rank>& rank);
  void WaitLoop(const std::shared_ptr<Rank>& rank);
  void ReportLaunchFailed(const std::string& job_id, int attempt, int rank,
                          const std::string& message);
  // A rank that is not started because its spec is bad: RankExit code 2.
  void ReportBadInput(const std::string& job_id, int attempt, int rank,
                      const std::string& message);
  // The spec's paths checked and resolved in place; the output directory of
  // the job. INVALID_ARGUMENT / NOT_FOUND naming the key otherwise.
  absl::StatusOr<std::string> CheckPaths(const std::string& job_id, const std::string& job_dir,
                                         v1::JobSpec* spec) const;
  // Appends to the spool. An event the spool refuses for want of disk
  // (RESOURCE_EXHAUSTED: ENOSPC, EFBIG) is held in memory, and so is every
  // later one until the held ones are in, so the order holds.
  void SpoolEvent(v1::RankEvent* event);
  // Appends the held events, oldest first, until one is refused again.
  void SpoolHeldLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(held_mu_);
  void SendToRank(const std::shared_ptr<Rank>& rank, const v1::AgentMessage& msg);
  // For ranks already marked stopping with term_at due: logs and signals.
  void TerminateNow(const std::vector<std::shared_ptr<Rank>>& ranks, const std::string& why);
  void TimerLoop();
  std::vector<std::string> BuildEnv(const HostSlot& slot) const;

  const Options options_;
  const std::vector<HostSlot> slots_;
  Spool* const spool_;
  ProcessLauncher* const launcher_;
  const RendezvousSink sink_;
  Clock* const clock_;
  PathPolicy paths_;

  absl::Mutex assign_mu_;  // serializes Assign
  mutable absl::Mutex mu_;
  std::map<Key, std::shared_ptr<Rank>> live_ ABSL_GUARDED_BY(mu_);
  // Ranks whose waiter has finished; their threads still need joining.
  std::vector<std::shared_ptr<Rank>> finished_ ABSL_GUARDED_BY(mu_);
  // Every rank this process started or failed to start.
  std::set<Key> started_ ABSL_GUARDED_BY(mu_);
  std::vector<WaitingLaunch> waiting_ ABSL_GUARDED_BY(mu_);
  std::map<AttemptKey, std::string> rendezvous_in_ ABSL_GUARDED_BY(mu_);
  std::map<AttemptKey, std::string> rendezvous_out_ ABSL_GUARDED_BY(mu_);
  bool stop_timer_ ABSL_GUARDED_BY(mu_) = false;

  // Events the spool could not take (disk full), oldest first: retried on
  // every timer tick and before each new event. Exits, launch failures,
  // checkpoints, errors and rendezvous are always kept; metrics and log
  // lines beyond kMaxHeldEvents are dropped (and counted in the log), so a
  // chatty rank on a full disk cannot grow the agent without bound.
  mutable absl::Mutex held_mu_ ABSL_ACQUIRED_AFTER(mu_);
  std::deque<v1::RankEvent> held_ ABSL_GUARDED_BY(held_mu_);
  int64_t num_held_dropped_ ABSL_GUARDED_BY(held_mu_) = 0;
  // Set by Shutdown: later assignments are refused (launch_failed).
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  std::thread timer_;
};

}  // namespace ftune::agent

#endif  // FTUNE_WORKER_AGENT_RANK_SUPERVISOR_H_
