// RankSupervisor with a fake process launcher and a fake clock: the test
// plays each rank on its channel and decides when it "exits", so launch
// failures, hangs and stop escalation are driven by hand, without sleeping.
#include "worker/agent/rank_supervisor.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <condition_variable>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>

#include "channel.h"
#include "jobspec.h"
#include "full_disk.h"
#include "temp_dir.h"
#include "tests/agent/test_util.h"

namespace ftune::agent {
namespace {

using testing::AllEvents;
using testutil::TempDir;
using testing::WaitFor;

// What the test sees of one fake rank process.
struct FakeRank {
  LaunchRequest request;
  std::unique_ptr<Channel> channel;  // the rank's end

  std::mutex mu;
  std::condition_variable cv;
  std::vector<int> signals;
  bool exited = false;
  int exit_code = 0;
  // A rank that traps SIGTERM ignores it; SIGKILL always ends it.
  bool dies_on_sigterm = false;

  void Exit(int code) {
    std::lock_guard<std::mutex> lock(mu);
    if (exited) return;
    exited = true;
    exit_code = code;
    // Like a real exit: the rank's end of the channel closes.
    ::shutdown(channel->fd(), SHUT_RDWR);
    cv.notify_all();
  }
  std::vector<int> Signals() {
    std::lock_guard<std::mutex> lock(mu);
    return signals;
  }
  void Send(const v1::RankMessage& m) { ASSERT_TRUE(channel->Write(m)); }
  // Next AgentMessage within timeout_ms; false if none.
  bool Receive(v1::AgentMessage* m, int timeout_ms = 5000) {
    struct pollfd p {
      channel->fd(), POLLIN, 0
    };
    return ::poll(&p, 1, timeout_ms) > 0 && channel->Read(m);
  }
};

class FakeProcess : public RankProcess {
 public:
  FakeProcess(std::shared_ptr<FakeRank> rank, pid_t pid) : rank_(std::move(rank)), pid_(pid) {}
  pid_t pid() const override { return pid_; }
  void Signal(int sig) override {
    {
      std::lock_guard<std::mutex> lock(rank_->mu);
      if (rank_->exited) return;
      rank_->signals.push_back(sig);
    }
    if (sig == SIGKILL || (sig == SIGTERM && rank_->dies_on_sigterm)) rank_->Exit(-sig);
  }
  int Wait() override {
    std::unique_lock<std::mutex> lock(rank_->mu);
    rank_->cv.wait(lock, [&] { return rank_->exited; });
    return rank_->exit_code;
  }

 private:
  std::shared_ptr<FakeRank> rank_;
  pid_t pid_;
};

class FakeLauncher : public ProcessLauncher {
 public:
  absl::StatusOr<std::unique_ptr<RankProcess>> Launch(const LaunchRequest& request) override {
    std::lock_guard<std::mutex> lock(mu_);
    requests_.push_back(request);
    if (!fail_with_.ok()) return fail_with_;
    auto rank = std::make_shared<FakeRank>();
    rank->request = request;
    // The supervisor closes its copy of the child's end after Launch, as a
    // real launch does once the child has inherited it.
    rank->channel = std::make_unique<Channel>(::fcntl(request.inherit_fd, F_DUPFD_CLOEXEC, 3));
    ranks_.push_back(rank);
    return std::unique_ptr<RankProcess>(
        new FakeProcess(rank, 1000 + static_cast<pid_t>(ranks_.size())));
  }
  void FailWith(absl::Status s) {
    std::lock_guard<std::mutex> lock(mu_);
    fail_with_ = std::move(s);
  }
  size_t num_launches() {
    std::lock_guard<std::mutex> lock(mu_);
    return requests_.size();
  }
  std::shared_ptr<FakeRank> rank(size_t i) {
    std::lock_guard<std::mutex> lock(mu_);
    return i < ranks_.size() ? ranks_[i] : nullptr;
  }

 private:
  std::mutex mu_;
  absl::Status fail_with_;
  std::vector<LaunchRequest> requests_;
  std::vector<std::shared_ptr<FakeRank>> ranks_;
};

class AgentRankSupervisorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Spool::Options so;
    so.dir = dir_.path() + "/spool";
    auto spool = Spool::Open(so);
    ASSERT_TRUE(spool.ok()) << spool.status();
    spool_ = std::move(*spool);
    options_.work_dir = dir_.path() + "/work";
    options_.rank_binary = "/opt/ftune/bin/ftune-rank";
    options_.silence_timeout = absl::Seconds(600);
    options_.default_grace = absl::Seconds(30);
    options_.poll_interval = absl::ZeroDuration();  // the test runs CheckTimers
    options_.clock = &clock_;
  }

  void Start(std::vector<HostSlot> slots = CpuSlots(2)) {
    supervisor_ =
        std::make_unique<RankSupervisor>(options_, std::move(slots), spool_.get(), &launcher_,
                                         [this](const v1::RendezvousPublish& p) {
                                           std::lock_guard<std::mutex> lock(mu_);
                                           published_.push_back(p);
                                         });
  }

  static v1::Assignment MakeAssignment(int world_size, std::vector<std::pair<int, int>> rank_slots,
                                       const std::string& job = "job-1", int attempt = 0) {
    v1::Assignment a;
    a.set_job_id(job);
    a.set_attempt(attempt);
    a.set_world_size(world_size);
    a.mutable_spec()->set_name("test-job");
    a.mutable_spec()->mutable_training()->set_max_steps(7);
    (*a.mutable_spec()->mutable_labels())["test.steps"] = "7";
    for (auto [rank, slot] : rank_slots) {
      v1::RankAssignment* ra = a.add_ranks();
      ra->set_rank(rank);
      ra->set_slot(slot);
    }
    return a;
  }

  std::vector<v1::RankEvent> Events() { return AllEvents(*spool_); }

  // Waits until the spool holds n events.
  std::vector<v1::RankEvent> WaitEvents(size_t n) {
    EXPECT_TRUE(WaitFor([&] { return spool_->num_unacked() >= n; }))
        << "have " << spool_->num_unacked();
    return Events();
  }

  static v1::RankMessage Step(int64_t step) {
    v1::RankMessage m;
    m.mutable_step()->set_step(step);
    return m;
  }

  TempDir dir_{"agent_supervisor_test"};
  FakeClock clock_;
  FakeLauncher launcher_;
  std::unique_ptr<Spool> spool_;
  RankSupervisor::Options options_;
  std::unique_ptr<RankSupervisor> supervisor_;
  std::mutex mu_;
  std::vector<v1::RendezvousPublish> published_;
};

TEST_F(AgentRankSupervisorTest, LaunchRequestFollowsTheContract) {
  Start();
  v1::Assignment a = MakeAssignment(4, {{2, 0}, {3, 1}});
  a.set_resume_checkpoint("/ckpt/checkpoint-50");
  supervisor_->Assign(a);
  ASSERT_EQ(launcher_.num_launches(), 2u);
  const LaunchRequest& r = launcher_.rank(1)->request;
  const std::string attempt_dir = options_.work_dir + "/jobs/job-1/attempt-0";
  // --flag=value throughout: a value is never taken for a flag.
  const std::vector<std::string> expected = {
      "/opt/ftune/bin/ftune-rank",
      "run",
      "--channel-fd=" + std::to_string(r.inherit_fd),
      "--spec=" + attempt_dir + "/spec.yaml",
      "--job-id=job-1",
      "--attempt=0",
      "--rank=3",
      "--world-size=4",
      "--device=cpu",
      "--output-dir=" + options_.work_dir + "/jobs/job-1/output",
      "--resume-from=/ckpt/checkpoint-50"};
  EXPECT_EQ(r.argv, expected);
  EXPECT_EQ(r.binary, "/opt/ftune/bin/ftune-rank");
  EXPECT_GE(r.inherit_fd, 3);
  EXPECT_EQ(r.stderr_path, attempt_dir + "/rank-3.log");
  EXPECT_NE(std::find(r.env.begin(), r.env.end(), "NCCL_NVLS_ENABLE=0"), r.env.end());
  for (const std::string& e : r.env)
    EXPECT_NE(e.rfind("CUDA_VISIBLE_DEVICES=", 0), 0u) << "CPU slot got " << e;

  // The spec file is the job's YAML and reads back to the same spec.
  v1::JobSpec spec;
  std::vector<std::string> errors;
  ASSERT_TRUE(LoadJobSpecFile(attempt_dir + "/spec.yaml", &spec, &errors));
  EXPECT_EQ(spec.SerializeAsString(), a.spec().SerializeAsString());
  EXPECT_TRUE(std::filesystem::is_directory(options_.work_dir + "/jobs/job-1/output"));

  auto running = supervisor_->Running();
  ASSERT_EQ(running.size(), 2u);
  EXPECT_EQ(running[0].rank(), 2);
  EXPECT_EQ(running[1].slot(), 1);
  launcher_.rank(0)->Exit(0);
  launcher_.rank(1)->Exit(0);
  EXPECT_TRUE(supervisor_->WaitIdle(absl::Seconds(10)));
}

// The value of --name=value in argv, or "".
std::string FlagValue(const std::vector<std::string>& argv, const std::string& name) {
  for (const std::string& a : argv)
    if (a.rfind(name + "=", 0) == 0) return a.substr(name.size() + 1);
  return "";
}

TEST_F(AgentRankSupervisorTest, GpuSlotsGetTheirGpuAndEachJobItsOwnOutputDir) {
  HostSlot gpu;
  gpu.slot.set_index(0);
  gpu.slot.set_device_uuid("GPU-1234");
  gpu.gpu_index = 3;
  Start({gpu});
  v1::Assignment a = MakeAssignment(1, {{0, 0}});
  a.mutable_spec()->set_output_dir(dir_.path() + "/custom-out");
  supervisor_->Assign(a);
  ASSERT_EQ(launcher_.num_launches(), 1u);
  const LaunchRequest& r = launcher_.rank(0)->request;
  EXPECT_NE(std::find(r.env.begin(), r.env.end(), "CUDA_VISIBLE_DEVICES=3"), r.env.end());
  EXPECT_NE(std::find(r.env.begin(), r.env.end(), "CUDA_DEVICE_ORDER=PCI_BUS_ID"), r.env.end());
  EXPECT_EQ(FlagValue(r.argv, "--device"), "cuda:0");
  // <output_dir>/<job_id>: a second job naming the same output_dir gets its own.
  EXPECT_EQ(FlagValue(r.argv, "--output-dir"), dir_.path() + "/custom-out/job-1");
  EXPECT_TRUE(std::filesystem::is_directory(dir_.path() + "/custom-out/job-1"));
  EXPECT_EQ(FlagValue(r.argv, "--resume-from"), "");
  launcher_.rank(0)->Exit(0);
  ASSERT_TRUE(supervisor_->WaitIdle(absl::Seconds(10)));
  v1::Assignment b = MakeAssignment(1, {{0, 0}}, "job-2");
  b.mutable_spec()->set_output_dir(dir_.path() + "/custom-out");
  supervisor_->Assign(b);
  ASSERT_EQ(launcher_.num_launches(), 2u);
  EXPECT_EQ(FlagValue(launcher_.rank(1)->request.argv, "--output-dir"),
            dir_.path() + "/custom-out/job-2");
  launcher_.rank(1)->Exit(0);
}

TEST_F(AgentRankSupervisorTest, ValuesStartingWithADashStayValues) {
  Start();
  v1::Assignment a = MakeAssignment(1, {{0, 0}}, "--help");
  a.set_resume_checkpoint("/ckpt/-rf");
  supervisor_->Assign(a);
  ASSERT_EQ(launcher_.num_launches(), 1u);
  const std::vector<std::string>& argv = launcher_.rank(0)->request.argv;
  EXPECT_NE(std::find(argv.begin(), argv.end(), "--job-id=--help"), argv.end());
  EXPECT_NE(std::find(argv.begin(), argv.end(), "--resume-from=/ckpt/-rf"), argv.end());
  EXPECT_EQ(std::find(argv.begin(), argv.end(), "--help"), argv.end());
  launcher_.rank(0)->Exit(0);
}

TEST_F(AgentRankSupervisorTest, RanksGetAnAllowlistedEnvironment) {
  ::setenv("FTUNE_TEST_AGENT_SECRET", "hunter2", 1);
  ::setenv("NCCL_DEBUG", "INFO", 1);
  ::setenv("FTUNE_DATA_CACHE", "/cache", 1);
  ::setenv("FTUNE_TEST_EXTRA", "yes", 1);
  ::setenv("LD_AUDIT", "/tmp/evil.so", 1);
  options_.extra_env = {"FTUNE_TEST_EXTRA"};
  Start();
  supervisor_->Assign(MakeAssignment(1, {{0, 0}}));
  ASSERT_EQ(launcher_.num_launches(), 1u);
  const std::vector<std::string>& env = launcher_.rank(0)->request.env;
  const auto has = [&](const std::string& entry) {
    return std::find(env.begin(), env.end(), entry) != env.end();
  };
  EXPECT_TRUE(has("NCCL_DEBUG=INFO"));
  EXPECT_TRUE(has("FTUNE_DATA_CACHE=/cache"));
  EXPECT_TRUE(has("FTUNE_TEST_EXTRA=yes"));  // --rank-env
  EXPECT_TRUE(has(std::string("PATH=") + std::getenv("PATH")));
  for (const std::string& e : env) {
    EXPECT_NE(e.rfind("FTUNE_TEST_AGENT_SECRET=", 0), 0u) << e;
    EXPECT_NE(e.rfind("LD_AUDIT=", 0), 0u) << e;
  }
  ::unsetenv("FTUNE_TEST_AGENT_SECRET");
  ::unsetenv("LD_AUDIT");
  launcher_.rank(0)->Exit(0);
}

TEST_F(AgentRankSupervisorTest, PathsOutsideTheAllowedRootsAreBadInputAndNothingStarts) {
  const std::string data = dir_.path() + "/data";
  const std::string outside = dir_.path() + "/outside";
  std::filesystem::create_directories(data + "/model");
  std::filesystem::create_directories(outside);
  std::ofstream(data + "/train.jsonl") << "{}\n";
  std::ofstream(outside + "/secret.jsonl") << "{}\n";
  std::filesystem::create_symlink(outside + "/secret.jsonl", data + "/escape.jsonl");
  std::filesystem::create_symlink(data + "/train.jsonl", data + "/inside.jsonl");
  options_.allowed_roots = {data};
  Start();

  const auto spec_of = [&](const std::string& job, const std::string& file,
                           const std::string& output_dir) {
    v1::Assignment a = MakeAssignment(2, {{0, 0}, {1, 1}}, job);
    a.mutable_spec()->mutable_model()->set_model_name_or_path(data + "/model");
    a.mutable_spec()->mutable_dataset()->add_data_files(file);
    a.mutable_spec()->set_output_dir(output_dir);
    return a;
  };
  // A symlink out of the root, '..', /dev/zero, an output_dir outside.
  supervisor_->Assign(spec_of("job-1", data + "/escape.jsonl", data + "/out"));
  supervisor_->Assign(spec_of("job-2", data + "/../outside/secret.jsonl", data + "/out"));
  supervisor_->Assign(spec_of("job-3", "/dev/zero", data + "/out"));
  supervisor_->Assign(spec_of("job-4", data + "/train.jsonl", outside));
  auto events = WaitEvents(8);
  ASSERT_EQ(events.size(), 8u);
  EXPECT_EQ(launcher_.num_launches(), 0u);
  const std::vector<std::string> why = {"which resolves to " + outside + "/secret.jsonl",
                                        "must not contain '..'", "(/dev/zero) is outside",
                                        "output_dir (" + outside + ") is outside"};
  for (size_t i = 0; i < events.size(); ++i) {
    ASSERT_TRUE(events[i].has_exit()) << events[i].DebugString();
    EXPECT_EQ(events[i].exit().exit_code(), 2);  // bad input: no restarts
    ASSERT_EQ(events[i].exit().stderr_tail_size(), 1);
    EXPECT_NE(events[i].exit().stderr_tail(0).find(why[i / 2]), std::string::npos)
        << events[i].exit().stderr_tail(0);
  }

  // Inside: the rank gets the paths resolved, and its own output directory.
  supervisor_->Assign(spec_of("job-5", data + "/inside.jsonl", data + "/out"));
  ASSERT_EQ(launcher_.num_launches(), 2u);
  v1::JobSpec written;
  std::vector<std::string> errors;
  ASSERT_TRUE(LoadJobSpecFile(options_.work_dir + "/jobs/job-5/attempt-0/spec.yaml", &written,
                              &errors));
  EXPECT_EQ(written.dataset().data_files(0), data + "/train.jsonl");
  EXPECT_EQ(FlagValue(launcher_.rank(0)->request.argv, "--output-dir"), data + "/out/job-5");
  launcher_.rank(0)->Exit(0);
  launcher_.rank(1)->Exit(0);
}

TEST_F(AgentRankSupervisorTest, MessagesAreSpooledInOrderAndTheExitComesLast) {
  Start();
  supervisor_->Assign(MakeAssignment(1, {{0, 1}}));
  auto rank = launcher_.rank(0);
  v1::RankMessage hello;
  hello.mutable_hello()->set_rank(0);
  rank->Send(hello);
  rank->Send(Step(1));
  rank->Send(Step(2));
  rank->Exit(0);
  auto events = WaitEvents(4);
  ASSERT_EQ(events.size(), 4u);
  EXPECT_TRUE(events[0].message().has_hello());
  EXPECT_EQ(events[1].message().step().step(), 1);
  EXPECT_EQ(events[2].message().step().step(), 2);
  ASSERT_TRUE(events[3].has_exit());
  EXPECT_EQ(events[3].exit().exit_code(), 0);
  EXPECT_FALSE(events[3].exit().hung());
  EXPECT_EQ(events[3].exit().stderr_tail_size(), 0);  // only failures carry the tail
  for (size_t i = 0; i < events.size(); ++i) {
    EXPECT_EQ(events[i].agent_seq(), static_cast<int64_t>(i + 1));
    EXPECT_EQ(events[i].job_id(), "job-1");
    EXPECT_EQ(events[i].attempt(), 0);
    EXPECT_EQ(events[i].rank(), 0);
    EXPECT_EQ(events[i].time_unix_ms(), absl::ToUnixMillis(clock_.Now()));
  }
  EXPECT_TRUE(supervisor_->WaitIdle(absl::Seconds(10)));
  EXPECT_TRUE(supervisor_->Running().empty());
}

using testutil::FullDisk;

TEST_F(AgentRankSupervisorTest, EventsAFullDiskRefusesAreHeldInOrderAndSpooledOnceThereIsRoom) {
  Start();
  supervisor_->Assign(MakeAssignment(1, {{0, 1}}));
  auto rank = launcher_.rank(0);
  rank->Send(Step(1));
  WaitEvents(1);
  {
    FullDisk full(std::filesystem::file_size(spool_->log_path()));
    rank->Send(Step(2));
    rank->Exit(3);
    EXPECT_TRUE(supervisor_->WaitIdle(absl::Seconds(10)));  // the exit was handled
    supervisor_->CheckTimers();                              // and still has no room
    EXPECT_EQ(spool_->num_unacked(), 1u);
  }
  supervisor_->CheckTimers();  // room again
  auto events = Events();
  ASSERT_EQ(events.size(), 3u);
  EXPECT_EQ(events[1].message().step().step(), 2);
  ASSERT_TRUE(events[2].has_exit());
  EXPECT_EQ(events[2].exit().exit_code(), 3);
  EXPECT_EQ(events[1].agent_seq(), 2);
  EXPECT_EQ(events[2].agent_seq(), 3);
}

// The agent registers again with Running(): a rank whose exit the full
// spool holds is still running as far as the coordinator may know, or it
// would count it lost and restart the job.
TEST_F(AgentRankSupervisorTest, ARankWhoseExitIsHeldStillCountsAsRunning) {
  Start();
  supervisor_->Assign(MakeAssignment(1, {{0, 1}}));
  auto rank = launcher_.rank(0);
  rank->Send(Step(1));
  WaitEvents(1);
  {
    FullDisk full(std::filesystem::file_size(spool_->log_path()));
    rank->Exit(0);
    EXPECT_TRUE(supervisor_->WaitIdle(absl::Seconds(10)));  // the exit was handled
    supervisor_->CheckTimers();                              // and still has no room
    EXPECT_EQ(supervisor_->num_running(), 0u);
    const std::vector<v1::RunningRank> running = supervisor_->Running();
    ASSERT_EQ(running.size(), 1u);
    EXPECT_EQ(running[0].job_id(), "job-1");
    EXPECT_EQ(running[0].attempt(), 0);
    EXPECT_EQ(running[0].rank(), 0);
  }
  supervisor_->CheckTimers();  // room again: the exit is spooled
  auto events = Events();
  ASSERT_EQ(events.size(), 2u);
  EXPECT_TRUE(events[1].has_exit());
  EXPECT_TRUE(supervisor_->Running().empty());
}

TEST_F(AgentRankSupervisorTest, FailedRankCarriesTheLastTwentyStderrLines) {
  Start();
  supervisor_->Assign(MakeAssignment(1, {{0, 0}}));
  auto rank = launcher_.rank(0);
  {
    std::ofstream log(rank->request.stderr_path, std::ios::app);
    for (int i = 1; i <= 30; ++i) log << "line " << i << "\n";
  }
  rank->Exit(3);
  auto events = WaitEvents(1);
  ASSERT_TRUE(events.back().has_exit());
  const v1::RankExit& exit = events.back().exit();
  EXPECT_EQ(exit.exit_code(), 3);
  ASSERT_EQ(exit.stderr_tail_size(), 20);
  EXPECT_EQ(exit.stderr_tail(0), "line 11");
  EXPECT_EQ(exit.stderr_tail(19), "line 30");
}

TEST_F(AgentRankSupervisorTest, RankErrorGetsTheStderrTailFilledIn) {
  Start();
  supervisor_->Assign(MakeAssignment(1, {{0, 0}}));
  auto rank = launcher_.rank(0);
  testing::WriteText(rank->request.stderr_path, "Traceback\nCUDA out of memory\n");
  v1::RankMessage err;
  err.mutable_error()->set_message("OOM at step 3");
  rank->Send(err);
  auto events = WaitEvents(1);
  ASSERT_TRUE(events[0].message().has_error());
  EXPECT_EQ(events[0].message().error().message(), "OOM at step 3");
  ASSERT_EQ(events[0].message().error().stderr_tail_size(), 2);
  EXPECT_EQ(events[0].message().error().stderr_tail(1), "CUDA out of memory");
  rank->Exit(1);
}

TEST_F(AgentRankSupervisorTest, LaunchFailuresAreReportedNotFatal) {
  Start();
  launcher_.FailWith(
      absl::FailedPreconditionError("cannot execute /opt/ftune/bin/ftune-rank: No such file"));
  supervisor_->Assign(MakeAssignment(2, {{0, 0}, {1, 1}}));
  auto events = WaitEvents(2);
  ASSERT_EQ(events.size(), 2u);
  for (int i = 0; i < 2; ++i) {
    ASSERT_TRUE(events[i].has_launch_failed()) << events[i].DebugString();
    EXPECT_EQ(events[i].rank(), i);
    EXPECT_NE(events[i].launch_failed().message().find("cannot execute"), std::string::npos);
  }
  EXPECT_TRUE(supervisor_->Running().empty());
}

TEST_F(AgentRankSupervisorTest, BadAssignmentsBecomeLaunchFailedEvents) {
  Start();  // slots 0 and 1
  supervisor_->Assign(MakeAssignment(2, {{0, 0}}));
  ASSERT_EQ(launcher_.num_launches(), 1u);
  supervisor_->Assign(MakeAssignment(2, {{0, 0}}, "job-2"));      // slot busy
  supervisor_->Assign(MakeAssignment(2, {{0, 7}}, "job-3"));      // no such slot
  supervisor_->Assign(MakeAssignment(2, {{5, 1}}, "job-4"));      // rank >= world_size
  supervisor_->Assign(MakeAssignment(1, {{0, 1}}, "../escape"));  // unsafe job id
  EXPECT_EQ(launcher_.num_launches(), 1u);
  auto events = WaitEvents(4);
  ASSERT_EQ(events.size(), 4u);
  EXPECT_NE(events[0].launch_failed().message().find("slot 0 is busy with job job-1"),
            std::string::npos)
      << events[0].DebugString();
  EXPECT_NE(events[1].launch_failed().message().find("slot 7 does not exist"), std::string::npos);
  EXPECT_NE(events[2].launch_failed().message().find("outside world_size 2"), std::string::npos);
  EXPECT_NE(events[3].launch_failed().message().find("cannot name a directory"), std::string::npos);
  EXPECT_EQ(events[3].job_id(), "../escape");
  EXPECT_FALSE(std::filesystem::exists(dir_.path() + "/escape"));
  launcher_.rank(0)->Exit(0);
}

TEST_F(AgentRankSupervisorTest, UnwritableWorkDirIsALaunchFailure) {
  testing::WriteText(dir_.path() + "/not-a-dir", "x");
  options_.work_dir = dir_.path() + "/not-a-dir";
  Start();
  supervisor_->Assign(MakeAssignment(1, {{0, 0}}));
  EXPECT_EQ(launcher_.num_launches(), 0u);
  auto events = WaitEvents(1);
  ASSERT_TRUE(events[0].has_launch_failed());
  EXPECT_NE(events[0].launch_failed().message().find("--work-dir"), std::string::npos)
      << events[0].launch_failed().message();
}

TEST_F(AgentRankSupervisorTest, RepeatedAssignmentDoesNotStartRanksTwice) {
  Start();
  const v1::Assignment a = MakeAssignment(2, {{0, 0}, {1, 1}});
  supervisor_->Assign(a);
  supervisor_->Assign(a);  // the coordinator re-sends after a reconnect
  EXPECT_EQ(launcher_.num_launches(), 2u);
  launcher_.rank(0)->Exit(0);
  launcher_.rank(1)->Exit(0);
  ASSERT_TRUE(supervisor_->WaitIdle(absl::Seconds(10)));
  supervisor_->Assign(a);  // ...even once they have finished
  EXPECT_EQ(launcher_.num_launches(), 2u);
  // The next attempt is new work.
  supervisor_->Assign(MakeAssignment(2, {{0, 0}, {1, 1}}, "job-1", 1));
  EXPECT_EQ(launcher_.num_launches(), 4u);
  launcher_.rank(2)->Exit(0);
  launcher_.rank(3)->Exit(0);
}

TEST_F(AgentRankSupervisorTest, RendezvousGoesUpAtOnceAndDownOncePerRank) {
  Start();
  supervisor_->Assign(MakeAssignment(3, {{0, 0}, {1, 1}}));
  auto r0 = launcher_.rank(0);
  auto r1 = launcher_.rank(1);
  v1::RankMessage publish;
  publish.set_rendezvous_publish("nccl-id-bytes");
  r0->Send(publish);
  ASSERT_TRUE(WaitFor([&] {
    std::lock_guard<std::mutex> lock(mu_);
    return !published_.empty();
  }));
  {
    std::lock_guard<std::mutex> lock(mu_);
    ASSERT_EQ(published_.size(), 1u);
    EXPECT_EQ(published_[0].job_id(), "job-1");
    EXPECT_EQ(published_[0].attempt(), 0);
    EXPECT_EQ(published_[0].data(), "nccl-id-bytes");
  }
  EXPECT_EQ(spool_->num_unacked(), 0u);  // not spooled
  ASSERT_EQ(supervisor_->LocalPublications().size(), 1u);

  v1::RendezvousPublish down;
  down.set_job_id("job-1");
  down.set_attempt(0);
  down.set_data("nccl-id-bytes");
  supervisor_->DeliverRendezvous(down);
  supervisor_->DeliverRendezvous(down);  // a duplicate from the coordinator
  for (auto& r : {r0, r1}) {
    v1::AgentMessage m;
    ASSERT_TRUE(r->Receive(&m));
    EXPECT_EQ(m.rendezvous().data(), "nccl-id-bytes");
    EXPECT_FALSE(r->Receive(&m, 50)) << "delivered twice";
  }
  // Another attempt's rendezvous is not for these ranks.
  down.set_attempt(1);
  supervisor_->DeliverRendezvous(down);
  v1::AgentMessage m;
  EXPECT_FALSE(r0->Receive(&m, 50));

  // A rank of the attempt that starts later gets it right away.
  supervisor_.reset();  // (ends r0, r1 with SIGKILL)
  Start(CpuSlots(3));
  down.set_attempt(0);
  supervisor_->DeliverRendezvous(down);
  supervisor_->Assign(MakeAssignment(3, {{2, 2}}, "job-1", 0));
  auto r2 = launcher_.rank(2);
  ASSERT_NE(r2, nullptr);
  ASSERT_TRUE(r2->Receive(&m));
  EXPECT_EQ(m.rendezvous().data(), "nccl-id-bytes");
  r2->Exit(0);
  ASSERT_TRUE(supervisor_->WaitIdle(absl::Seconds(10)));
  EXPECT_TRUE(supervisor_->LocalPublications().empty());
}

TEST_F(AgentRankSupervisorTest, SilentRankIsKilledAndReportedHung) {
  Start();
  supervisor_->Assign(MakeAssignment(1, {{0, 0}}));
  auto rank = launcher_.rank(0);
  testing::WriteText(rank->request.stderr_path, "stuck in all_gather\n");
  clock_.Advance(absl::Seconds(599));
  supervisor_->CheckTimers();
  EXPECT_TRUE(rank->Signals().empty());
  rank->Send(Step(1));  // any message resets the silence clock
  ASSERT_TRUE(WaitFor([&] { return spool_->num_unacked() == 1; }));
  clock_.Advance(absl::Seconds(599));
  supervisor_->CheckTimers();
  EXPECT_TRUE(rank->Signals().empty());
  clock_.Advance(absl::Seconds(2));
  supervisor_->CheckTimers();
  EXPECT_EQ(rank->Signals(), std::vector<int>{SIGKILL});
  auto events = WaitEvents(2);
  ASSERT_TRUE(events[1].has_exit());
  EXPECT_TRUE(events[1].exit().hung());
  EXPECT_EQ(events[1].exit().exit_code(), -SIGKILL);
  ASSERT_EQ(events[1].exit().stderr_tail_size(), 1);
  EXPECT_EQ(events[1].exit().stderr_tail(0), "stuck in all_gather");
}

TEST_F(AgentRankSupervisorTest, StopSendsStopRankThenSigtermThenSigkill) {
  Start();
  supervisor_->Assign(MakeAssignment(2, {{0, 0}, {1, 1}}));
  auto r0 = launcher_.rank(0);
  auto r1 = launcher_.rank(1);
  r1->dies_on_sigterm = true;
  v1::StopJob stop;
  stop.set_job_id("job-1");
  stop.set_attempt(0);
  stop.set_save_checkpoint(true);
  stop.set_grace_seconds(10);
  stop.set_reason("cancelled by user");
  supervisor_->Stop(stop);
  for (auto& r : {r0, r1}) {
    v1::AgentMessage m;
    ASSERT_TRUE(r->Receive(&m));
    ASSERT_TRUE(m.has_stop());
    EXPECT_TRUE(m.stop().save_checkpoint());
    EXPECT_EQ(m.stop().reason(), "cancelled by user");
  }
  clock_.Advance(absl::Seconds(9));
  supervisor_->CheckTimers();
  EXPECT_TRUE(r0->Signals().empty());
  clock_.Advance(absl::Seconds(1));
  supervisor_->CheckTimers();
  EXPECT_EQ(r0->Signals(), std::vector<int>{SIGTERM});
  EXPECT_EQ(r1->Signals(), std::vector<int>{SIGTERM});  // and it died of it
  // Stopping ranks are not "hung", however long they take.
  clock_.Advance(absl::Seconds(9));
  supervisor_->CheckTimers();
  EXPECT_EQ(r0->Signals(), std::vector<int>{SIGTERM});
  clock_.Advance(absl::Seconds(1));
  supervisor_->CheckTimers();
  EXPECT_EQ(r0->Signals(), (std::vector<int>{SIGTERM, SIGKILL}));
  ASSERT_TRUE(supervisor_->WaitIdle(absl::Seconds(10)));
  int exits = 0;
  for (const v1::RankEvent& e : Events()) {
    if (!e.has_exit()) continue;
    ++exits;
    EXPECT_EQ(e.exit().exit_code(), e.rank() == 0 ? -SIGKILL : -SIGTERM);
    EXPECT_FALSE(e.exit().hung());
  }
  EXPECT_EQ(exits, 2);
}

TEST_F(AgentRankSupervisorTest, StopWithoutGraceUsesTheDefaultAndIgnoresOtherAttempts) {
  Start();
  supervisor_->Assign(MakeAssignment(1, {{0, 0}}));
  auto rank = launcher_.rank(0);
  v1::StopJob stop;
  stop.set_job_id("job-1");
  stop.set_attempt(1);  // not the running attempt
  supervisor_->Stop(stop);
  v1::AgentMessage m;
  EXPECT_FALSE(rank->Receive(&m, 50));
  stop.set_attempt(0);
  supervisor_->Stop(stop);
  ASSERT_TRUE(rank->Receive(&m));
  EXPECT_FALSE(m.stop().save_checkpoint());
  clock_.Advance(absl::Seconds(29));
  supervisor_->CheckTimers();
  EXPECT_TRUE(rank->Signals().empty());
  clock_.Advance(absl::Seconds(1));  // default_grace = 30 s
  supervisor_->CheckTimers();
  EXPECT_EQ(rank->Signals(), std::vector<int>{SIGTERM});
  rank->Exit(143);
}

TEST_F(AgentRankSupervisorTest, StaleRanksGetSigtermAtOnce) {
  Start();
  supervisor_->Assign(MakeAssignment(2, {{0, 0}, {1, 1}}));
  auto r0 = launcher_.rank(0);
  auto r1 = launcher_.rank(1);
  v1::RunningRank stale;
  stale.set_job_id("job-1");
  stale.set_attempt(0);
  stale.set_rank(1);
  supervisor_->StopStale({stale});
  // No StopRank: a rank stopped that way exits 0, which would read as done.
  v1::AgentMessage m;
  EXPECT_FALSE(r1->Receive(&m, 50));
  EXPECT_EQ(r1->Signals(), std::vector<int>{SIGTERM});
  EXPECT_TRUE(r0->Signals().empty());
  clock_.Advance(absl::Seconds(30));
  supervisor_->CheckTimers();
  EXPECT_EQ(r1->Signals(), (std::vector<int>{SIGTERM, SIGKILL}));
  r0->Exit(0);
}

// The coordinator gave up on attempt 0 (its agent was declared dead) and
// places attempt 1 on the same slot right after the agent registers again.
TEST_F(AgentRankSupervisorTest, NextAttemptWaitsForTheSlotOfAStaleRank) {
  Start();
  supervisor_->Assign(MakeAssignment(1, {{0, 0}}));
  auto old_rank = launcher_.rank(0);
  v1::RunningRank stale;
  stale.set_job_id("job-1");
  stale.set_attempt(0);
  stale.set_rank(0);
  supervisor_->StopStale({stale});
  supervisor_->Assign(MakeAssignment(1, {{0, 0}}, "job-1", 1));
  supervisor_->CheckTimers();
  EXPECT_EQ(launcher_.num_launches(), 1u);  // not yet, and not failed
  old_rank->Exit(143);
  EXPECT_TRUE(WaitFor([&] {
    supervisor_->CheckTimers();
    return launcher_.num_launches() == 2;
  }));
  auto events = WaitEvents(1);
  ASSERT_EQ(events.size(), 1u);
  EXPECT_TRUE(events[0].has_exit()) << events[0].DebugString();
  EXPECT_EQ(events[0].attempt(), 0);
  auto running = supervisor_->Running();
  ASSERT_EQ(running.size(), 1u);
  EXPECT_EQ(running[0].attempt(), 1);
  launcher_.rank(1)->Exit(0);
}

TEST_F(AgentRankSupervisorTest, AWaitingRankStoppedBeforeItStartsIsReported) {
  Start();
  supervisor_->Assign(MakeAssignment(1, {{0, 0}}));
  v1::RunningRank stale;
  stale.set_job_id("job-1");
  stale.set_attempt(0);
  stale.set_rank(0);
  supervisor_->StopStale({stale});
  supervisor_->Assign(MakeAssignment(1, {{0, 0}}, "job-1", 1));
  v1::StopJob stop;
  stop.set_job_id("job-1");
  stop.set_attempt(1);
  supervisor_->Stop(stop);
  auto events = WaitEvents(1);
  ASSERT_TRUE(events[0].has_launch_failed());
  EXPECT_EQ(events[0].attempt(), 1);
  launcher_.rank(0)->Exit(143);
  ASSERT_TRUE(supervisor_->WaitIdle(absl::Seconds(10)));
  supervisor_->CheckTimers();
  EXPECT_EQ(launcher_.num_launches(), 1u);
}

TEST_F(AgentRankSupervisorTest, GarbageOnTheChannelIsReportedAndTheRankKilled) {
  Start();
  supervisor_->Assign(MakeAssignment(1, {{0, 0}}));
  auto rank = launcher_.rank(0);
  const char garbage[] = "\xff\xff\xff\xff\x7f";  // a 34 GB length prefix
  ASSERT_EQ(::write(rank->channel->fd(), garbage, 5), 5);
  auto events = WaitEvents(2);
  ASSERT_TRUE(events[0].message().has_error());
  EXPECT_NE(events[0].message().error().message().find("unreadable channel"), std::string::npos);
  EXPECT_EQ(rank->Signals(), std::vector<int>{SIGKILL});
  EXPECT_EQ(events[1].exit().exit_code(), -SIGKILL);
}

TEST_F(AgentRankSupervisorTest, ShutdownTerminatesEveryRank) {
  Start();
  supervisor_->Assign(MakeAssignment(2, {{0, 0}, {1, 1}}));
  auto r0 = launcher_.rank(0);
  auto r1 = launcher_.rank(1);
  r0->dies_on_sigterm = true;
  r1->dies_on_sigterm = true;
  EXPECT_TRUE(supervisor_->Shutdown(absl::Seconds(5)));
  EXPECT_EQ(r0->Signals(), std::vector<int>{SIGTERM});
  EXPECT_EQ(r1->Signals(), std::vector<int>{SIGTERM});
  EXPECT_TRUE(supervisor_->Running().empty());
  for (const v1::RankEvent& e : Events())
    EXPECT_EQ(e.exit().exit_code(), -SIGTERM) << e.DebugString();
  // Work that arrives after the shutdown began is refused, visibly.
  supervisor_->Assign(MakeAssignment(1, {{0, 0}}, "job-2"));
  EXPECT_EQ(launcher_.num_launches(), 2u);
  auto events = Events();
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.back().job_id(), "job-2");
  EXPECT_EQ(events.back().launch_failed().message(), "the agent is shutting down");
}

}  // namespace
}  // namespace ftune::agent
