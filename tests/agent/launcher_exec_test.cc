// The real fork/exec launcher under the rank supervisor: what a rank process
// actually gets (argv, environment, channel fd, stderr file, process group),
// exec failures, signals, hang detection and stop escalation with real
// processes. Ranks are ftune-test-rank or small shell scripts.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "temp_dir.h"
#include "tests/agent/test_util.h"
#include "worker/agent/process_launcher.h"
#include "worker/agent/rank_supervisor.h"

namespace ftune::agent {
namespace {

using testing::AllEvents;
using testutil::TempDir;
using testing::WaitFor;

class AgentLauncherExecTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Spool::Options so;
    so.dir = dir_.path() + "/spool";
    auto spool = Spool::Open(so);
    ASSERT_TRUE(spool.ok()) << spool.status();
    spool_ = std::move(*spool);
    options_.work_dir = dir_.path() + "/work";
    options_.rank_binary = FTUNE_TEST_RANK_BINARY;
    options_.poll_interval = absl::Milliseconds(20);
    options_.default_grace = absl::Seconds(1);
  }

  // The sink plays the coordinator: it relays rank 0's rendezvous straight
  // back down, as the coordinator does for every agent of the job.
  void Start() {
    supervisor_ =
        std::make_unique<RankSupervisor>(options_, CpuSlots(2), spool_.get(), launcher_.get(),
                                         [this](const v1::RendezvousPublish& p) {
                                           {
                                             std::lock_guard<std::mutex> lock(mu_);
                                             published_.push_back(p);
                                           }
                                           supervisor_->DeliverRendezvous(p);
                                         });
  }

  std::string Script(const std::string& name, const std::string& body) {
    const std::string path = dir_.path() + "/" + name;
    testing::WriteText(path, "#!/bin/sh\n" + body);
    ::chmod(path.c_str(), 0755);
    return path;
  }

  static v1::Assignment Job(int world_size, const std::map<std::string, std::string>& labels,
                            const std::string& job = "job-1") {
    v1::Assignment a;
    a.set_job_id(job);
    a.set_world_size(world_size);
    for (const auto& [k, v] : labels) (*a.mutable_spec()->mutable_labels())[k] = v;
    for (int r = 0; r < world_size; ++r) {
      v1::RankAssignment* ra = a.add_ranks();
      ra->set_rank(r);
      ra->set_slot(r);
    }
    return a;
  }

  // The RankExit events, once there are n of them.
  std::vector<v1::RankEvent> WaitExits(
      size_t n, std::chrono::milliseconds timeout = std::chrono::seconds(20)) {
    std::vector<v1::RankEvent> exits;
    EXPECT_TRUE(WaitFor(
        [&] {
          exits.clear();
          for (const v1::RankEvent& e : AllEvents(*spool_)) {
            if (e.has_exit() || e.has_launch_failed()) exits.push_back(e);
          }
          return exits.size() >= n;
        },
        timeout))
        << "events so far:\n"
        << Dump();
    return exits;
  }

  std::string Dump() {
    std::string out;
    for (const v1::RankEvent& e : AllEvents(*spool_)) out += e.ShortDebugString() + "\n";
    return out;
  }

  TempDir dir_{"agent_launcher_exec_test"};
  std::unique_ptr<Spool> spool_;
  std::unique_ptr<ProcessLauncher> launcher_ = NewForkExecLauncher();
  RankSupervisor::Options options_;
  std::unique_ptr<RankSupervisor> supervisor_;
  std::mutex mu_;
  std::vector<v1::RendezvousPublish> published_;
};

TEST_F(AgentLauncherExecTest, TwoRealRanksRunToCompletion) {
  Start();
  v1::Assignment a = Job(2, {{"test.steps", "6"}, {"test.step_ms", "2"}});
  a.mutable_spec()->mutable_training()->set_save_steps(3);
  supervisor_->Assign(a);
  auto exits = WaitExits(2);
  for (const v1::RankEvent& e : exits) {
    ASSERT_TRUE(e.has_exit()) << e.DebugString();
    EXPECT_EQ(e.exit().exit_code(), 0) << Dump();
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    ASSERT_EQ(published_.size(), 1u);
    EXPECT_EQ(published_[0].data(), "rdzv:job-1:0");
  }
  // Per rank: hello, steps 1..6 in order, done, exit; checkpoints from rank 0.
  for (int rank = 0; rank < 2; ++rank) {
    std::vector<std::string> kinds;
    std::vector<int64_t> steps;
    for (const v1::RankEvent& e : AllEvents(*spool_)) {
      if (e.rank() != rank) continue;
      if (e.has_exit()) kinds.push_back("exit");
      if (!e.has_message()) continue;
      if (e.message().has_hello()) kinds.push_back("hello");
      if (e.message().has_step()) steps.push_back(e.message().step().step());
      if (e.message().has_checkpoint())
        kinds.push_back(absl::StrCat("ckpt", e.message().checkpoint().step()));
      if (e.message().has_done()) kinds.push_back("done");
    }
    EXPECT_EQ(steps, (std::vector<int64_t>{1, 2, 3, 4, 5, 6}));
    if (rank == 0) {
      EXPECT_EQ(kinds, (std::vector<std::string>{"hello", "ckpt3", "ckpt6", "done", "exit"}));
    } else {
      EXPECT_EQ(kinds, (std::vector<std::string>{"hello", "done", "exit"}));
    }
  }
  const std::string out = options_.work_dir + "/jobs/job-1/output";
  EXPECT_TRUE(std::filesystem::exists(out + "/checkpoint-6/manifest.json"));
  EXPECT_TRUE(std::filesystem::exists(out + "/adapter/adapter_model.txt"));
  EXPECT_NE(testing::ReadText(options_.work_dir + "/jobs/job-1/attempt-0/rank-1.log")
                .find("done at step 6"),
            std::string::npos);
}

TEST_F(AgentLauncherExecTest, RankSeesContractArgvEnvironmentAndChannel) {
  options_.rank_binary = Script("show.sh",
                                "echo \"args: $*\" >&2\n"
                                "echo \"nvls=$NCCL_NVLS_ENABLE\" >&2\n"
                                "fd=${2#--channel-fd=}\n"
                                "[ -S /proc/$$/fd/$fd ] && echo \"fd $fd is a socket\" >&2\n"
                                "echo \"stdout goes to the log too\"\n"
                                "echo \"pgid=$(ps -o pgid= $$ | tr -d ' ') pid=$$\" >&2\n"
                                "exit 7\n");
  Start();
  supervisor_->Assign(Job(1, {}));
  auto exits = WaitExits(1);
  const v1::RankExit& exit = exits[0].exit();
  EXPECT_EQ(exit.exit_code(), 7);
  const std::string tail = absl::StrJoin(exit.stderr_tail(), "\n");
  const std::string work = options_.work_dir;
  EXPECT_NE(tail.find(absl::StrCat("args: run --channel-fd=")), std::string::npos) << tail;
  EXPECT_NE(tail.find(absl::StrCat(" --spec=", work,
                                   "/jobs/job-1/attempt-0/spec.yaml --job-id=job-1 --attempt=0 "
                                   "--rank=0 --world-size=1 --device=cpu --output-dir=",
                                   work, "/jobs/job-1/output")),
            std::string::npos)
      << tail;
  EXPECT_NE(tail.find("nvls=0"), std::string::npos) << tail;
  EXPECT_NE(tail.find("is a socket"), std::string::npos) << tail;
  EXPECT_NE(tail.find("stdout goes to the log too"), std::string::npos) << tail;
  // Its own process group.
  std::string pgid, pid;
  for (const std::string& line : exit.stderr_tail()) {
    if (line.rfind("pgid=", 0) == 0) {
      pgid = line.substr(5, line.find(' ') - 5);
      pid = line.substr(line.find("pid=") + 4);
    }
  }
  if (!pgid.empty()) {  // ps may be missing; the rest holds regardless
    EXPECT_EQ(pgid, pid);
  }
}

TEST_F(AgentLauncherExecTest, MissingOrNonExecutableBinaryIsLaunchFailed) {
  options_.rank_binary = dir_.path() + "/no/such/ftune-rank";
  Start();
  supervisor_->Assign(Job(1, {}));
  auto exits = WaitExits(1);
  ASSERT_TRUE(exits[0].has_launch_failed()) << exits[0].DebugString();
  const std::string msg = exits[0].launch_failed().message();
  EXPECT_NE(msg.find("cannot execute " + options_.rank_binary + ": No such file or directory"),
            std::string::npos)
      << msg;
  EXPECT_NE(msg.find("--rank-binary"), std::string::npos) << msg;

  supervisor_.reset();
  options_.rank_binary = dir_.path() + "/not-executable";
  testing::WriteText(options_.rank_binary, "#!/bin/sh\nexit 0\n");
  Start();
  supervisor_->Assign(Job(1, {}, "job-2"));
  exits = WaitExits(2);
  ASSERT_TRUE(exits[1].has_launch_failed());
  EXPECT_NE(exits[1].launch_failed().message().find("Permission denied"), std::string::npos)
      << exits[1].launch_failed().message();
  EXPECT_TRUE(supervisor_->Running().empty());
}

TEST_F(AgentLauncherExecTest, SignalledRankReportsMinusTheSignal) {
  options_.rank_binary = Script("die.sh", "echo 'about to die' >&2\nkill -USR1 $$\nsleep 5\n");
  Start();
  supervisor_->Assign(Job(1, {}));
  auto exits = WaitExits(1);
  EXPECT_EQ(exits[0].exit().exit_code(), -SIGUSR1);
  ASSERT_GE(exits[0].exit().stderr_tail_size(), 1);
  EXPECT_EQ(exits[0].exit().stderr_tail(0), "about to die");
}

TEST_F(AgentLauncherExecTest, LeftoverProcessesOfARankAreKilledWithIt) {
  const std::string pid_file = dir_.path() + "/helper.pid";
  options_.rank_binary = Script("helper.sh", "sleep 300 &\necho $! > " + pid_file + "\nexit 1\n");
  Start();
  supervisor_->Assign(Job(1, {}));
  auto exits = WaitExits(1);
  EXPECT_EQ(exits[0].exit().exit_code(), 1);
  const pid_t helper = std::stoi(testing::ReadText(pid_file));
  // Dead means gone, or a zombie waiting for init to reap it.
  auto dead = [&] {
    const std::string stat = testing::ReadText(absl::StrCat("/proc/", helper, "/stat"));
    const size_t paren = stat.rfind(')');
    return stat.empty() ||
           (paren != std::string::npos && stat.size() > paren + 2 && stat[paren + 2] == 'Z');
  };
  EXPECT_TRUE(WaitFor(dead)) << "helper " << helper << " outlived its rank";
}

TEST_F(AgentLauncherExecTest, HungRealRankIsKilledAfterTheSilenceTimeout) {
  options_.silence_timeout = absl::Milliseconds(500);
  Start();
  supervisor_->Assign(Job(2, {{"test.steps", "1000"},
                              {"test.step_ms", "2"},
                              {"test.hang_at_step", "3"},
                              {"test.crash_rank", "0"}}));
  // Rank 0 hangs; rank 1 then waits for it in the step barrier, silent too,
  // just like a peer stuck in a collective.
  auto exits = WaitExits(2);
  for (const v1::RankEvent& e : exits) {
    EXPECT_TRUE(e.exit().hung()) << e.DebugString();
    EXPECT_EQ(e.exit().exit_code(), -SIGKILL);
  }
  const std::string tail0 = absl::StrJoin(
      exits[0].rank() == 0 ? exits[0].exit().stderr_tail() : exits[1].exit().stderr_tail(), "\n");
  EXPECT_NE(tail0.find("simulated hang at step 3"), std::string::npos) << tail0;
}

TEST_F(AgentLauncherExecTest, StopWithCheckpointEndsRealRanksCleanly) {
  Start();
  supervisor_->Assign(Job(2, {{"test.steps", "100000"}, {"test.step_ms", "5"}}));
  ASSERT_TRUE(WaitFor([&] {
    for (const v1::RankEvent& e : AllEvents(*spool_)) {
      if (e.has_message() && e.message().has_step() && e.message().step().step() >= 3) return true;
    }
    return false;
  }));
  v1::StopJob stop;
  stop.set_job_id("job-1");
  stop.set_save_checkpoint(true);
  stop.set_grace_seconds(30);
  supervisor_->Stop(stop);
  auto exits = WaitExits(2);
  for (const v1::RankEvent& e : exits) EXPECT_EQ(e.exit().exit_code(), 0) << e.DebugString();
  int64_t checkpoint = -1;
  for (const v1::RankEvent& e : AllEvents(*spool_)) {
    if (e.has_message() && e.message().has_checkpoint()) {
      checkpoint = e.message().checkpoint().step();
      EXPECT_TRUE(e.message().checkpoint().complete());
    }
  }
  ASSERT_GT(checkpoint, 0) << Dump();
  const std::string dir =
      absl::StrCat(options_.work_dir, "/jobs/job-1/output/checkpoint-", checkpoint);
  EXPECT_TRUE(std::filesystem::exists(dir + "/rank-0.state"));
  EXPECT_TRUE(std::filesystem::exists(dir + "/rank-1.state"));
  EXPECT_TRUE(std::filesystem::exists(dir + "/manifest.json"));
}

TEST_F(AgentLauncherExecTest, RankIgnoringStopIsTerminatedThenKilled) {
  options_.rank_binary = Script("stubborn.sh",
                                "trap 'echo got TERM >&2' TERM\necho ready >&2\n"
                                "while :; do sleep 0.05; done\n");
  Start();
  supervisor_->Assign(Job(1, {}));
  ASSERT_TRUE(WaitFor([&] {
    return testing::ReadText(options_.work_dir + "/jobs/job-1/attempt-0/rank-0.log")
               .find("ready") != std::string::npos;
  }));
  v1::StopJob stop;
  stop.set_job_id("job-1");
  stop.set_grace_seconds(1);
  const auto t0 = std::chrono::steady_clock::now();
  supervisor_->Stop(stop);
  auto exits = WaitExits(1);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_EQ(exits[0].exit().exit_code(), -SIGKILL);
  EXPECT_GE(seconds, 1.9);
  EXPECT_LT(seconds, 10.0);
  EXPECT_NE(absl::StrJoin(exits[0].exit().stderr_tail(), "\n").find("got TERM"), std::string::npos);
}

}  // namespace
}  // namespace ftune::agent
