// Faults and sizes a shared cluster sees, on loopback: real coordinator,
// agents and the scripted ftune-test-rank (labels script its faults).
//   * an agent paused past the heartbeat timeout with its TCP connection
//     alive (SIGSTOP, then SIGCONT) comes back; its old ranks die and move
//     nothing;
//   * a rank exiting 2 (bad spec or input) fails the job without a restart;
//   * following the watch of an ended job from its last event ends at once;
//   * a 5 MiB log line and a 20 MiB error from a rank arrive truncated and
//     the job goes on;
//   * a full disk under the running coordinator, then under the running
//     agent, made full two ways (DiskFull, once per FullBy): the process's
//     RLIMIT_FSIZE lowered from outside with prlimit (EFBIG), and its
//     directory on a small tmpfs the test fills with a file of its own
//     (ENOSPC, SQLITE_FULL: a real full disk; skipped where mounting is not
//     permitted). CreateJob is refused RESOURCE_EXHAUSTED and counted, the
//     agent holds its rank's events, and once there is room the job ends
//     SUCCEEDED with every event stored, in order; a coordinator restarted
//     on the filled filesystem opens its database and serves reads;
//   * an agent whose own spool filled its disk while the coordinator was
//     away empties it once the coordinator is back, with nobody making
//     room: recording an ack on a full filesystem takes the spool's reserve.
//   * --store-sync=normal (no fdatasync per commit) keeps every job it
//     acknowledged across a kill -9 of the coordinator, and says at start
//     what it gives up; a mode other than full or normal is refused.
#include <dirent.h>
#include <signal.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "cluster.h"
#include "small_fs.h"

namespace ftune::testing {
namespace {

using std::chrono::seconds;

std::string Describe(const v1::Job& job) {
  return v1::JobState_Name(job.state()) + " (" + job.state_reason() + ")";
}

TEST(Faults, AgentPausedPastItsTimeoutComesBackAndItsStaleRanksMoveNothing) {
  Cluster c;
  c.StartCoordinator();
  const int agent = c.StartAgent("host-a", 1);
  ASSERT_TRUE(c.WaitAgents(1));
  v1::JobSpec spec = c.Spec(1, 150, 5);
  spec.set_max_restarts(2);
  const v1::Job job = c.Submit(spec);
  ASSERT_TRUE(c.WaitFor_Step(job.id(), 12));

  // Paused past the 3 s timeout: the rank goes on stepping and saving
  // checkpoints into the job's output dir, unseen.
  c.agent(agent).Signal(SIGSTOP);
  ASSERT_TRUE(WaitFor([&] { return c.GetJob(job.id()).attempt() == 1; }, seconds(15)))
      << Describe(c.GetJob(job.id()));
  const std::string resume = c.GetJob(job.id()).resume_checkpoint();
  ASSERT_FALSE(resume.empty());
  std::this_thread::sleep_for(std::chrono::seconds(1));
  c.agent(agent).Signal(SIGCONT);

  // The agent registers again (its old stream was ended), is told its rank
  // is stale, kills it, and attempt 1 runs to the end from `resume`.
  ASSERT_TRUE(c.WaitState(job.id(), v1::SUCCEEDED, seconds(60))) << Describe(c.GetJob(job.id()));
  const v1::Job done = c.GetJob(job.id());
  EXPECT_EQ(done.restarts(), 1);
  EXPECT_EQ(done.attempt(), 1);
  const std::string log = ReadFile(c.agent(agent).log_path());
  EXPECT_NE(log.find("stopping 1 stale ranks"), std::string::npos) << log;

  // Nothing of attempt 0 after the restart: its spooled checkpoints, steps
  // and exit were dropped.
  int64_t requeued_at = 0;
  for (const auto& e : c.Events(job.id())) {
    if (e.has_state_change() && e.state_change().from() == v1::RESTARTING &&
        e.state_change().to() == v1::QUEUED) {
      requeued_at = e.seq();
      EXPECT_NE(e.state_change().reason().find(resume), std::string::npos)
          << e.state_change().reason();
    }
    if (requeued_at > 0 && e.seq() > requeued_at && e.rank() >= 0)
      EXPECT_EQ(e.attempt(), 1) << "event " << e.seq() << " of attempt " << e.attempt();
  }
  EXPECT_GT(requeued_at, 0);
}

TEST(Faults, RankExitingWithCode2FailsTheJobWithoutRestarting) {
  Cluster c;
  c.StartCoordinator();
  c.StartAgent("host-a", 2);
  ASSERT_TRUE(c.WaitAgents(1));
  v1::JobSpec spec = c.Spec(2, 50, 0);
  spec.set_max_restarts(3);
  (*spec.mutable_labels())["test.crash_at_step"] = "3";
  (*spec.mutable_labels())["test.crash_rank"] = "1";
  (*spec.mutable_labels())["test.crash_attempt"] = "*";
  (*spec.mutable_labels())["test.crash_exit_code"] = "2";
  const v1::Job job = c.Submit(spec);
  ASSERT_TRUE(c.WaitState(job.id(), v1::FAILED, seconds(30))) << Describe(c.GetJob(job.id()));
  const v1::Job failed = c.GetJob(job.id());
  EXPECT_EQ(failed.restarts(), 0);
  EXPECT_EQ(failed.reason_code(), "bad_input");
  EXPECT_NE(failed.state_reason().find("exited with code 2"), std::string::npos)
      << failed.state_reason();
}

TEST(Faults, FollowingAnEndedJobFromItsLastEventEndsAtOnce) {
  Cluster c;
  c.StartCoordinator();
  c.StartAgent("host-a", 1);
  ASSERT_TRUE(c.WaitAgents(1));
  const v1::Job job = c.Submit(c.Spec(1, 3, 0));
  ASSERT_TRUE(c.WaitState(job.id(), v1::SUCCEEDED, seconds(30)));
  const int64_t last = c.GetJob(job.id()).last_event_seq();
  ASSERT_GT(last, 0);
  auto stub = c.Client();
  for (int64_t after : {last - 1, last, last + 100}) {
    grpc::ClientContext ctx;
    c.AddAuth(&ctx);
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    v1::WatchJobRequest req;
    req.set_job_id(job.id());
    req.set_after_seq(after);
    req.set_follow(true);
    auto reader = stub->WatchJob(&ctx, req);
    int n = 0;
    v1::WatchJobResponse r;
    while (reader->Read(&r)) n += r.events_size();
    const grpc::Status st = reader->Finish();
    EXPECT_TRUE(st.ok()) << "after_seq " << after << ": " << st.error_message();
    EXPECT_EQ(n, after < last ? 1 : 0) << "after_seq " << after;
  }
}

// Before the agent cut strings, such an event made a batch over the
// coordinator's gRPC limit, refused and resent forever: the job's stream
// was jammed. Many big log lines also test the watch's byte cap: read with
// gRPC's default 4 MiB receive limit, no batch may exceed it.
TEST(Faults, HugeLogLineAndErrorFromARankArriveTruncatedAndTheJobGoesOn) {
  Cluster c;
  c.StartCoordinator();
  c.StartAgent("host-a", 1);
  ASSERT_TRUE(c.WaitAgents(1));
  v1::JobSpec spec = c.Spec(1, 6, 0);
  (*spec.mutable_labels())["test.big_log_bytes"] = std::to_string(5 << 20);
  (*spec.mutable_labels())["test.big_log_count"] = "100";
  (*spec.mutable_labels())["test.big_error_bytes"] = std::to_string(20 << 20);
  const v1::Job job = c.Submit(spec);
  ASSERT_TRUE(c.WaitState(job.id(), v1::SUCCEEDED, seconds(60))) << Describe(c.GetJob(job.id()));
  const auto events = c.Events(job.id());
  ASSERT_EQ(static_cast<int64_t>(events.size()), c.GetJob(job.id()).last_event_seq());
  int big_logs = 0, big_errors = 0, steps = 0;
  for (const auto& e : events) {
    steps += e.has_step();
    if (e.has_log() && e.log().text().find("truncated by ftune-agent: 5242880 bytes") !=
                           std::string::npos) {
      EXPECT_LT(e.log().text().size(), 65 << 10);
      ++big_logs;
    }
    if (e.has_error() && e.error().message().find("truncated by ftune-agent: 20971520 bytes") !=
                             std::string::npos) {
      EXPECT_LT(e.error().message().size(), 65 << 10);
      ++big_errors;
    }
  }
  EXPECT_EQ(big_logs, 100);
  EXPECT_EQ(big_errors, 1);
  EXPECT_EQ(steps, 6);
}

// Without a sync per commit, an acknowledged job is still in the OS's hands
// when the coordinator dies: only an OS crash or power loss could lose it.
TEST(Faults, StoreSyncNormalKeepsAcknowledgedJobsAcrossACoordinatorKill9) {
  Cluster c;
  c.StartCoordinator({"--store-sync=normal"});
  const std::string log = ReadFile(c.coordinator().log_path());
  EXPECT_NE(log.find("--store-sync=normal: commits are not flushed to disk one by one; the last "
                     "jobs and events acknowledged before a power loss or OS crash can be lost"),
            std::string::npos)
      << log;
  c.StartAgent("host-a", 1);
  ASSERT_TRUE(c.WaitAgents(1));
  std::vector<std::string> ids;
  for (int i = 0; i < 20; ++i) ids.push_back(c.Submit(c.Spec(1, 200, 0)).id());
  c.KillCoordinator(SIGKILL);

  c.StartCoordinator({"--store-sync=normal"});
  for (const auto& id : ids) {
    ASSERT_FALSE(id.empty());
    EXPECT_EQ(c.GetJob(id).id(), id) << "acknowledged job " << id << " is gone";
  }
}

TEST(Faults, AStoreSyncModeOtherThanFullOrNormalIsRefused) {
  Cluster c;
  Process p({FTUNE_COORDINATOR_BIN, "--state-dir=" + c.dir() + "/state", "--store-sync=sometimes"},
            c.dir() + "/sometimes.log");
  const int code = p.Wait(seconds(20));
  const std::string log = ReadFile(c.dir() + "/sometimes.log");
  ASSERT_NE(code, INT_MIN) << "still running: " << log;
  EXPECT_NE(code, 0) << log;
  EXPECT_NE(log.find("--store-sync: sometimes not in {full,normal}"), std::string::npos) << log;
  EXPECT_FALSE(std::filesystem::exists(c.dir() + "/state/ftune.db"));
}

// The disk under process `pid` is "full" while this lives: its soft
// RLIMIT_FSIZE is lowered to `bytes`, so a write that would take a file past
// that fails (EFBIG, or SIGXFSZ's default action kills the process: the
// daemons must ignore it). Processes it forks meanwhile inherit the limit.
class FullDiskOf {
 public:
  FullDiskOf(pid_t pid, rlim_t bytes) : pid_(pid) {
    struct rlimit full {};
    EXPECT_EQ(::prlimit(pid_, RLIMIT_FSIZE, nullptr, &old_), 0) << std::strerror(errno);
    full = old_;
    full.rlim_cur = bytes;
    EXPECT_EQ(::prlimit(pid_, RLIMIT_FSIZE, &full, nullptr), 0) << std::strerror(errno);
  }
  ~FullDiskOf() { Free(); }
  void Free() {
    if (freed_) return;
    freed_ = true;
    // A process already gone (the cluster was torn down first) keeps nothing.
    if (::prlimit(pid_, RLIMIT_FSIZE, &old_, nullptr) != 0 && errno != ESRCH)
      ADD_FAILURE() << "prlimit " << pid_ << ": " << std::strerror(errno);
  }
  FullDiskOf(const FullDiskOf&) = delete;
  FullDiskOf& operator=(const FullDiskOf&) = delete;

 private:
  pid_t pid_;
  struct rlimit old_ {};
  bool freed_ = false;
};

// The children of `pid` (every thread's), from /proc.
std::vector<pid_t> ChildrenOf(pid_t pid) {
  std::vector<pid_t> out;
  const std::string tasks = "/proc/" + std::to_string(pid) + "/task";
  DIR* d = ::opendir(tasks.c_str());
  if (d == nullptr) return out;
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.') continue;
    std::ifstream in(tasks + "/" + e->d_name + "/children");
    pid_t child;
    while (in >> child) out.push_back(child);
  }
  ::closedir(d);
  return out;
}

int64_t StoreErrors(int metrics_port) {
  const std::string m = Scrape(metrics_port);
  const std::string key = "\nftune_store_errors_total ";
  const size_t at = m.find(key);
  if (at == std::string::npos) return -1;
  return static_cast<int64_t>(std::stod(m.substr(at + key.size())));
}

std::set<std::string> JobIds(Cluster& c) {
  std::set<std::string> ids;
  auto stub = c.Client();
  v1::ListJobsRequest req;
  req.set_page_size(100);
  for (;;) {
    grpc::ClientContext ctx;
    c.AddAuth(&ctx);
    v1::ListJobsResponse resp;
    const grpc::Status st = stub->ListJobs(&ctx, req, &resp);
    EXPECT_TRUE(st.ok()) << st.error_message();
    for (const auto& j : resp.jobs()) ids.insert(j.id());
    if (!st.ok() || resp.next_page_token().empty()) return ids;
    req.set_page_token(resp.next_page_token());
  }
}

// Every stored event of a finished one-rank job of `steps` steps: seqs 1..n
// without a gap, each step once and in order, the last a change to
// SUCCEEDED.
void ExpectEveryEventInOrder(Cluster& c, const std::string& id, int steps) {
  const std::vector<v1::JobEvent> events = c.Events(id);
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(static_cast<int64_t>(events.size()), c.GetJob(id).last_event_seq());
  int64_t last_step = 0;
  for (size_t i = 0; i < events.size(); ++i) {
    const v1::JobEvent& e = events[i];
    EXPECT_EQ(e.seq(), static_cast<int64_t>(i) + 1) << "a gap before event " << e.seq();
    if (e.has_step()) {
      EXPECT_EQ(e.step().step(), last_step + 1) << "event " << e.seq();
      last_step = e.step().step();
    }
  }
  EXPECT_EQ(last_step, steps);
  ASSERT_TRUE(events.back().has_state_change()) << events.back().DebugString();
  EXPECT_EQ(events.back().state_change().to(), v1::SUCCEEDED);
}

// How a test makes the disk under a running process full.
enum class FullBy {
  // The process's RLIMIT_FSIZE lowered from outside (prlimit): a write that
  // takes one of its files past the limit fails with EFBIG. Needs nothing
  // but the right to prlimit the process.
  kFileSizeLimit,
  // Its directory on a small tmpfs that the test fills with a file of its
  // own: a write that needs a new block fails with ENOSPC (SQLite:
  // SQLITE_FULL), as on a real full disk. Skipped where mounting is refused.
  kFilledFilesystem,
};

std::string FullByName(const ::testing::TestParamInfo<FullBy>& info) {
  return info.param == FullBy::kFileSizeLimit ? "FileSizeLimit" : "FilledFilesystem";
}

// The disk full tests, once per FullBy. Dir() names where the process under
// test keeps its files (its --state-dir or --work-dir); Fill() and
// MakeRoom() flip that disk between full and not while it runs.
class DiskFull : public ::testing::TestWithParam<FullBy> {
 protected:
  // Room for the coordinator's database, its write-ahead log before its
  // first checkpoint (about 4 MiB), or an agent's spool and job dirs.
  static constexpr uint64_t kFilesystemBytes = 16 << 20;

  void SetUp() override {
    if (GetParam() != FullBy::kFilledFilesystem) return;
    fs_ = std::make_unique<testutil::SmallFs>(kFilesystemBytes, "ftune-it-small-fs");
    if (!fs_->skip_reason().empty()) GTEST_SKIP() << fs_->skip_reason();
    ASSERT_TRUE(fs_->mounted());
  }

  // `name` on the disk the test fills: on the small filesystem, or in the
  // cluster's own dir.
  std::string Dir(const Cluster& c, const std::string& name) const {
    return (fs_ != nullptr ? fs_->path() : c.dir()) + "/" + name;
  }

  // Full for process `pid`: no file of it may grow past `max_file_bytes`
  // (kFileSizeLimit), or no block is left (kFilledFilesystem).
  void Fill(pid_t pid, rlim_t max_file_bytes) {
    if (fs_ == nullptr) {
      limit_.emplace(pid, max_file_bytes);
      return;
    }
    fs_->Fill();
    // Space the process frees itself is its own again: a write of it in
    // flight while the filler grew (the agent's spool records an ack, from
    // its reserve if it must, and truncates its log) may free blocks just
    // after. Fill those too, until nothing more was freed.
    for (int quiet = 0; quiet < 3;) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      quiet = fs_->Fill() == 0 ? quiet + 1 : 0;
    }
  }

  // Room for about `bytes` more for process `pid`: no file of it may grow
  // past `bytes` (kFileSizeLimit), or all but `bytes` of the filesystem is
  // taken (kFilledFilesystem).
  void LeaveRoom(pid_t pid, rlim_t bytes) {
    if (fs_ == nullptr) {
      limit_.emplace(pid, bytes);
    } else {
      fs_->Fill(bytes);
    }
  }

  void MakeRoom() {
    if (fs_ == nullptr) {
      limit_->Free();
    } else {
      fs_->MakeRoom();
    }
  }

 private:
  // Unmounted after the test body's cluster is gone, so never busy.
  std::unique_ptr<testutil::SmallFs> fs_;
  std::optional<FullDiskOf> limit_;
};

INSTANTIATE_TEST_SUITE_P(Faults, DiskFull,
                         ::testing::Values(FullBy::kFileSizeLimit, FullBy::kFilledFilesystem),
                         FullByName);

// The coordinator's disk fills while a job runs: CreateJob is refused
// RESOURCE_EXHAUSTED naming the full disk and the error is counted; the
// job's events the store refuses stay in the agent's spool (never acked),
// so once there is room again they all arrive and the job ends SUCCEEDED.
// The database is whole afterwards: a coordinator killed and started again
// on it (quick_check, write-ahead log recovery) lists every job.
TEST_P(DiskFull, OnTheCoordinatorRefusesNewJobsAndLosesNoEventOnceThereIsRoom) {
  Cluster c;
  const std::string state_dir = Dir(c, "state");
  const std::vector<std::string> flags = {"--state-dir=" + state_dir};
  c.StartCoordinator(flags);
  const int agent = c.StartAgent("host-a", 1);
  ASSERT_TRUE(c.WaitAgents(1));
  const v1::Job before = c.Submit(c.Spec(1, 3, 0));
  ASSERT_TRUE(c.WaitState(before.id(), v1::SUCCEEDED, seconds(60)))
      << Describe(c.GetJob(before.id()));
  // Long enough (8 s) that the rank is still running when the disk fills,
  // even on a loaded machine.
  constexpr int kSteps = 200;
  const v1::JobSpec spec = c.Spec(1, kSteps, 0);
  const v1::Job job = c.Submit(spec);
  ASSERT_TRUE(c.WaitFor_Step(job.id(), 5, seconds(60))) << Describe(c.GetJob(job.id()));
  const int64_t errors_before = StoreErrors(c.metrics_port());
  ASSERT_GE(errors_before, 0);

  // A file size limit at the smaller of the database's two files as they
  // are now: neither may grow. The WAL is written over from its start once
  // a checkpoint has copied all of it into ftune.db (every second or so), so
  // it is ftune.db that cannot grow to take a new page that keeps the disk
  // full, as on a filesystem with no free block.
  const std::string db = state_dir + "/ftune.db";
  Fill(c.coordinator().pid(), std::min(std::filesystem::file_size(db),
                                       std::filesystem::file_size(db + "-wal")));
  std::set<std::string> stored = {before.id(), job.id()};
  grpc::Status refused;
  auto stub = c.Client();
  ASSERT_TRUE(WaitFor(
      [&] {
        grpc::ClientContext ctx;
        c.AddAuth(&ctx);
        v1::CreateJobRequest req;
        *req.mutable_spec() = c.Spec(1, 3, 0);
        v1::Job created;
        refused = stub->CreateJob(&ctx, req, &created);
        if (refused.ok()) stored.insert(created.id());
        return !refused.ok();
      },
      seconds(60)))
      << "no CreateJob refused on a full disk";
  EXPECT_TRUE(refused.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED ||
              refused.error_code() == grpc::StatusCode::UNAVAILABLE)
      << refused.error_code() << ": " << refused.error_message();
  EXPECT_NE(refused.error_message().find("disk is full"), std::string::npos)
      << refused.error_message();
  EXPECT_GT(StoreErrors(c.metrics_port()), errors_before);

  // The rank runs to its end meanwhile; its last steps and its exit cannot
  // be stored, so the job stays RUNNING (and the coordinator alive).
  ASSERT_TRUE(WaitFor([&] { return ChildrenOf(c.agent(agent).pid()).empty(); }, seconds(90)))
      << "the rank did not end";
  ASSERT_TRUE(c.coordinator().Running()) << ReadFile(c.coordinator().log_path());
  const v1::Job stuck = c.GetJob(job.id());
  EXPECT_EQ(stuck.state(), v1::RUNNING) << Describe(stuck);
  EXPECT_LT(stuck.last_step(), kSteps);

  // A filled filesystem is full for a new process too (a file size limit
  // is the old process's): a coordinator started again on it opens the
  // database, recovering its write-ahead log with no block to spare, and
  // serves reads. Its agent, away for seconds, retries at its backoff's
  // cap (5 s): a timeout longer than that keeps the agent and its rank.
  if (GetParam() == FullBy::kFilledFilesystem) {
    c.KillCoordinator(SIGKILL);
    c.StartCoordinator({"--state-dir=" + state_dir, "--agent-timeout=15"});
    const v1::Job read = c.GetJob(job.id());
    EXPECT_EQ(read.state(), v1::RUNNING) << Describe(read);
    EXPECT_EQ(read.last_step(), stuck.last_step());
  }

  MakeRoom();
  ASSERT_TRUE(c.WaitState(job.id(), v1::SUCCEEDED, seconds(90))) << Describe(c.GetJob(job.id()));
  EXPECT_TRUE(c.coordinator().Running());
  ExpectEveryEventInOrder(c, job.id(), kSteps);
  // And the coordinator takes new jobs again.
  const v1::Job after = c.Submit(c.Spec(1, 3, 0));
  ASSERT_FALSE(after.id().empty());
  stored.insert(after.id());

  c.KillCoordinator(SIGKILL);
  c.StartCoordinator(flags);
  const std::set<std::string> listed = JobIds(c);
  for (const auto& id : stored) EXPECT_TRUE(listed.count(id)) << id << " is gone";
  ExpectEveryEventInOrder(c, job.id(), kSteps);
}

// The agent's disk fills while its rank runs: the spool refuses the rank's
// events, the agent holds them in memory (and lives on), the job stays
// RUNNING while the rank ends; once there is room the held events are
// spooled and sent in order and the job ends SUCCEEDED.
TEST_P(DiskFull, OnTheAgentHoldsTheRanksEventsAndDeliversThemInOrderOnceThereIsRoom) {
  Cluster c;
  c.StartCoordinator();
  const int agent = c.StartAgent("host-a", 1, {"--work-dir=" + Dir(c, "agent-host-a")});
  ASSERT_TRUE(c.WaitAgents(1));
  constexpr int kSteps = 150;  // 6 s: still running when the disk fills
  const v1::JobSpec spec = c.Spec(1, kSteps, 0);
  const v1::Job job = c.Submit(spec);
  ASSERT_TRUE(c.WaitFor_Step(job.id(), 5, seconds(60))) << Describe(c.GetJob(job.id()));
  const pid_t agent_pid = c.agent(agent).pid();
  ASSERT_EQ(ChildrenOf(agent_pid).size(), 1u);

  // A file size limit of 16 bytes: no spool record fits (its job id alone
  // is longer), the spool's `acked` file (a number) still does. The
  // agent's own log, longer already, takes nothing meanwhile.
  Fill(agent_pid, 16);
  ASSERT_TRUE(WaitFor([&] { return ChildrenOf(agent_pid).empty(); }, seconds(90)))
      << "the rank did not end";
  ASSERT_TRUE(c.agent(agent).Running()) << ReadFile(c.agent(agent).log_path());
  const v1::Job held = c.GetJob(job.id());
  EXPECT_EQ(held.state(), v1::RUNNING) << Describe(held);
  EXPECT_LT(held.last_step(), kSteps);

  MakeRoom();
  ASSERT_TRUE(c.WaitState(job.id(), v1::SUCCEEDED, seconds(60))) << Describe(c.GetJob(job.id()));
  EXPECT_TRUE(c.agent(agent).Running());
  const std::string log = ReadFile(c.agent(agent).log_path());
  EXPECT_NE(log.find("held in memory are spooled"), std::string::npos) << log;
  ExpectEveryEventInOrder(c, job.id(), kSteps);
  const v1::Job done = c.GetJob(job.id());
  EXPECT_EQ(done.restarts(), 0);
}

// The same, with the agent's stream cut while the rank's exit is held (the
// coordinator restarts): the agent registers again with that rank among its
// running ones, so the coordinator does not take it for lost (a restart)
// and waits for its exit.
TEST_P(DiskFull, OnTheAgentAcrossACoordinatorRestartLosesNoRank) {
  Cluster c;
  c.StartCoordinator();
  const int agent = c.StartAgent("host-a", 1, {"--work-dir=" + Dir(c, "agent-host-a")});
  ASSERT_TRUE(c.WaitAgents(1));
  constexpr int kSteps = 150;
  v1::JobSpec spec = c.Spec(1, kSteps, 0);
  spec.set_max_restarts(2);
  const v1::Job job = c.Submit(spec);
  ASSERT_TRUE(c.WaitFor_Step(job.id(), 5, seconds(60))) << Describe(c.GetJob(job.id()));
  const pid_t agent_pid = c.agent(agent).pid();

  Fill(agent_pid, 16);
  ASSERT_TRUE(WaitFor([&] { return ChildrenOf(agent_pid).empty(); }, seconds(90)))
      << "the rank did not end";
  c.KillCoordinator(SIGKILL);
  c.StartCoordinator();
  // The agent registered again, its rank's exit still held: a restarted
  // coordinator counts the agents it knew as alive until they time out, so
  // wait for a heartbeat, which comes only on a registered stream.
  const int64_t started_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                                 std::chrono::system_clock::now().time_since_epoch())
                                 .count();
  ASSERT_TRUE(WaitFor(
      [&] {
        auto stub = c.Client();
        grpc::ClientContext ctx;
        c.AddAuth(&ctx);
        v1::ListAgentsResponse r;
        return stub->ListAgents(&ctx, {}, &r).ok() && r.agents_size() == 1 &&
               r.agents(0).last_seen_unix_ms() > started_ms;
      },
      seconds(30)));
  const v1::Job held = c.GetJob(job.id());
  EXPECT_EQ(held.state(), v1::RUNNING) << Describe(held);

  MakeRoom();
  ASSERT_TRUE(WaitFor(
      [&] {
        const v1::JobState s = c.GetJob(job.id()).state();
        return s == v1::SUCCEEDED || s == v1::FAILED || s == v1::CANCELLED;
      },
      seconds(90)))
      << Describe(c.GetJob(job.id()));
  const v1::Job done = c.GetJob(job.id());
  EXPECT_EQ(done.state(), v1::SUCCEEDED) << Describe(done);
  EXPECT_EQ(done.restarts(), 0) << Describe(done);
  for (const auto& e : c.Events(job.id()))
    EXPECT_FALSE(e.has_state_change() && e.state_change().to() == v1::RESTARTING)
        << "event " << e.seq() << ": " << e.state_change().reason();
  ExpectEveryEventInOrder(c, job.id(), kSteps);
}


// The agent's spool fills its disk itself: the coordinator is down while a
// rank sends many log lines, so nothing is acknowledged and the spool grows
// until the disk refuses more; the rest is held in memory. Nobody makes
// room: once the coordinator is back and acknowledges what was spooled,
// the agent trims its log, spools what it held, and the job ends SUCCEEDED
// with every event. On a filled filesystem recording the ack needs a block
// the disk no longer has: the spool's reserve gives it one (spool.h).
TEST_P(DiskFull, OnTheAgentFilledByItsOwnSpoolEmptiesOnceTheCoordinatorIsBack) {
  Cluster c;
  c.StartCoordinator();
  const int agent = c.StartAgent("host-a", 1, {"--work-dir=" + Dir(c, "agent-host-a")});
  ASSERT_TRUE(c.WaitAgents(1));
  const pid_t agent_pid = c.agent(agent).pid();
  // 1 MiB left: 1500 log lines of 1000 bytes need more. Each smaller than
  // a block, the spool fills the last block before one is refused.
  LeaveRoom(agent_pid, 1 << 20);
  constexpr int kSteps = 35;
  constexpr int kBigLogs = 1500;
  v1::JobSpec spec = c.Spec(1, kSteps, 0);
  // The lines come after step 30, 3 s in: time to stop the coordinator
  // once the rank is past its rendezvous (which goes through it).
  (*spec.mutable_labels())["test.step_ms"] = "100";
  (*spec.mutable_labels())["test.big_log_bytes"] = "1000";
  (*spec.mutable_labels())["test.big_log_count"] = std::to_string(kBigLogs);
  (*spec.mutable_labels())["test.big_log_step"] = "30";
  const v1::Job job = c.Submit(spec);
  ASSERT_TRUE(c.WaitFor_Step(job.id(), 1, seconds(60))) << Describe(c.GetJob(job.id()));
  c.KillCoordinator(SIGKILL);
  ASSERT_TRUE(WaitFor(
      [&] {
        return ReadFile(c.agent(agent).log_path()).find("holding events in memory") !=
               std::string::npos;
      },
      seconds(30)))
      << "the spool never filled the disk: " << ReadFile(c.agent(agent).log_path());
  ASSERT_TRUE(WaitFor([&] { return ChildrenOf(agent_pid).empty(); }, seconds(60)))
      << "the rank did not end";

  // Away for seconds, the agent retries at its backoff's cap (5 s): a
  // timeout longer than that keeps it (and its rank) alive meanwhile.
  c.StartCoordinator({"--agent-timeout=15"});
  ASSERT_TRUE(c.WaitState(job.id(), v1::SUCCEEDED, seconds(60)))
      << Describe(c.GetJob(job.id())) << "\n"
      << ReadFile(c.agent(agent).log_path());
  EXPECT_TRUE(c.agent(agent).Running());
  ExpectEveryEventInOrder(c, job.id(), kSteps);
  int big_logs = 0;
  for (const auto& e : c.Events(job.id())) big_logs += e.has_log() && e.log().text().size() == 1000;
  EXPECT_EQ(big_logs, kBigLogs);
  EXPECT_EQ(c.GetJob(job.id()).restarts(), 0);
}

}  // namespace
}  // namespace ftune::testing
