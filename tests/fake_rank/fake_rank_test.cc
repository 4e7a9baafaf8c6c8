// Tests of ftune-test-rank itself, driven over its channel the way the agent
// drives it: protocol order, checkpoints, resume determinism, stop handling,
// faults. Other control-plane tests rely on this behaviour.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "channel.h"
#include "ftune/v1/rank_channel.pb.h"
#include "jobspec.h"
#include "temp_dir.h"

namespace {

namespace fs = std::filesystem;
using ftune::v1::AgentMessage;
using ftune::v1::RankMessage;
using Clock = std::chrono::steady_clock;

constexpr auto kTimeout = std::chrono::seconds(20);

std::string ReadAll(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A fresh directory per test, removed at its end.
class TempDir : public ftune::testutil::TempDir {
 public:
  TempDir() : ftune::testutil::TempDir("fake_rank_test") {}
};

struct RankConfig {
  std::string job = "job-1";
  int attempt = 0;
  int rank = 0;
  int world_size = 1;
  std::string output_dir;
  std::string resume_from;
  std::map<std::string, std::string> labels;
  int64_t save_steps = 0;
};

// One ftune-test-rank process and the agent's end of its channel.
class RankProcess {
 public:
  RankProcess(const std::string& dir, const RankConfig& c)
      : log_(dir + "/rank-" + std::to_string(c.rank) + ".log") {
    ftune::v1::JobSpec spec;
    spec.set_name("fake-rank-test");
    for (const auto& [k, v] : c.labels) (*spec.mutable_labels())[k] = v;
    if (c.save_steps > 0) spec.mutable_training()->set_save_steps(c.save_steps);
    const std::string spec_path = dir + "/spec-" + std::to_string(c.rank) + ".yaml";
    std::ofstream(spec_path) << ftune::JobSpecToYaml(spec);

    int fds[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds), 0);
    std::vector<std::string> args = {FTUNE_TEST_RANK_BINARY,
                                     "run",
                                     "--channel-fd",
                                     std::to_string(fds[1]),
                                     "--spec",
                                     spec_path,
                                     "--job-id",
                                     c.job,
                                     "--attempt",
                                     std::to_string(c.attempt),
                                     "--rank",
                                     std::to_string(c.rank),
                                     "--world-size",
                                     std::to_string(c.world_size),
                                     "--device",
                                     "cpu",
                                     "--output-dir",
                                     c.output_dir};
    if (!c.resume_from.empty()) {
      args.push_back("--resume-from");
      args.push_back(c.resume_from);
    }
    Spawn(args, fds[1]);
    ::close(fds[1]);
    channel_ = std::make_unique<ftune::Channel>(fds[0]);
  }

  // Raw argv, for argument-error tests; no channel.
  explicit RankProcess(const std::string& dir, const std::vector<std::string>& args)
      : log_(dir + "/raw.log") {
    Spawn(args, -1);
  }

  ~RankProcess() {
    if (pid_ > 0 && !reaped_) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }

  // Next message within the timeout; false at end of stream or timeout.
  bool Next(RankMessage* msg, std::chrono::milliseconds timeout =
                                  std::chrono::duration_cast<std::chrono::milliseconds>(kTimeout)) {
    struct pollfd p {
      channel_->fd(), POLLIN, 0
    };
    if (::poll(&p, 1, static_cast<int>(timeout.count())) <= 0) return false;
    return channel_->Read(msg);
  }

  // Reads until a message of the given payload case arrives (others go to
  // *skipped when given).
  bool NextOf(RankMessage::PayloadCase kind, RankMessage* msg,
              std::vector<RankMessage>* skipped = nullptr) {
    const auto deadline = Clock::now() + kTimeout;
    while (Clock::now() < deadline) {
      if (!Next(msg,
                std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now())))
        return false;
      if (msg->payload_case() == kind) return true;
      if (skipped != nullptr) skipped->push_back(*msg);
    }
    return false;
  }

  void Send(const AgentMessage& msg) { ASSERT_TRUE(channel_->Write(msg)) << channel_->error(); }

  void SendRendezvous(const std::string& data) {
    AgentMessage m;
    m.mutable_rendezvous()->set_data(data);
    Send(m);
  }

  void SendStop(bool save) {
    AgentMessage m;
    m.mutable_stop()->set_reason("test");
    m.mutable_stop()->set_save_checkpoint(save);
    Send(m);
  }

  // Exit code (or -signal); kills the process and fails after the timeout.
  int Wait() {
    const auto deadline = Clock::now() + kTimeout;
    int status = 0;
    while (Clock::now() < deadline) {
      pid_t r = ::waitpid(pid_, &status, WNOHANG);
      if (r == pid_) {
        reaped_ = true;
        return WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    ADD_FAILURE() << "rank did not exit; its log:\n" << log();
    return -1000;
  }

  void CloseChannel() { ::shutdown(channel_->fd(), SHUT_RDWR); }
  pid_t pid() const { return pid_; }
  std::string log() const { return ReadAll(log_); }

 private:
  void Spawn(const std::vector<std::string>& args, int keep_fd) {
    std::vector<char*> argv;
    for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    const int log_fd = ::open(log_.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    pid_ = ::fork();
    if (pid_ == 0) {
      ::dup2(log_fd, 2);
      if (keep_fd >= 0) ::fcntl(keep_fd, F_SETFD, 0);
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
    ::close(log_fd);
  }

  std::string log_;
  pid_t pid_ = -1;
  bool reaped_ = false;
  std::unique_ptr<ftune::Channel> channel_;
};

// Plays the agent for a single-rank run to the end; returns the messages
// after the rendezvous.
std::vector<RankMessage> RunToEnd(RankProcess* p, const RankConfig& c, int64_t expect_start_step) {
  RankMessage msg;
  EXPECT_TRUE(p->Next(&msg));
  EXPECT_TRUE(msg.has_hello()) << msg.DebugString();
  EXPECT_EQ(msg.hello().start_step(), expect_start_step);
  EXPECT_EQ(msg.hello().rank(), c.rank);
  EXPECT_EQ(msg.hello().device(), "cpu");
  EXPECT_TRUE(p->Next(&msg));
  EXPECT_EQ(msg.rendezvous_publish(), "rdzv:" + c.job + ":" + std::to_string(c.attempt));
  p->SendRendezvous(msg.rendezvous_publish());
  std::vector<RankMessage> out;
  while (p->Next(&msg)) out.push_back(msg);
  return out;
}

TEST(FakeRankTest, RunsToCompletionWithCheckpointsAndAdapter) {
  TempDir dir;
  RankConfig c;
  c.output_dir = dir.path() + "/out";
  c.labels = {{"test.steps", "10"}, {"test.step_ms", "1"}};
  c.save_steps = 5;
  RankProcess p(dir.path(), c);
  std::vector<RankMessage> msgs = RunToEnd(&p, c, 0);
  EXPECT_EQ(p.Wait(), 0) << p.log();

  std::vector<int64_t> steps, checkpoints;
  int memory = 0;
  double last_loss = 0;
  for (const RankMessage& m : msgs) {
    if (m.has_step()) {
      steps.push_back(m.step().step());
      EXPECT_GT(m.step().loss(), 0);
      EXPECT_GT(m.step().learning_rate(), 0);
      EXPECT_EQ(m.step().tokens_total(), m.step().tokens() * m.step().step());
      EXPECT_GT(m.step().forward_seconds(), 0);
      EXPECT_GT(m.step().backward_seconds(), m.step().forward_seconds());
      EXPECT_EQ(m.step().exposed_comm_seconds(), 0);  // one rank
      last_loss = m.step().loss();
    }
    if (m.has_memory()) ++memory;
    if (m.has_checkpoint()) {
      checkpoints.push_back(m.checkpoint().step());
      EXPECT_TRUE(m.checkpoint().complete());
      EXPECT_GT(m.checkpoint().bytes(), 0);
      EXPECT_TRUE(fs::exists(m.checkpoint().path() + "/manifest.json"));
      EXPECT_TRUE(fs::exists(m.checkpoint().path() + "/rank-0.state"));
    }
  }
  EXPECT_EQ(steps, (std::vector<int64_t>{1, 2, 3, 4, 5, 6, 7, 8, 9, 10}));
  EXPECT_EQ(checkpoints, (std::vector<int64_t>{5, 10}));
  EXPECT_EQ(memory, 2);
  ASSERT_FALSE(msgs.empty());
  ASSERT_TRUE(msgs.back().has_done()) << msgs.back().DebugString();
  EXPECT_EQ(msgs.back().done().final_step(), 10);
  EXPECT_DOUBLE_EQ(msgs.back().done().final_loss(), last_loss);
  EXPECT_EQ(msgs.back().done().adapter_path(), c.output_dir + "/adapter");
  EXPECT_EQ(ReadAll(c.output_dir + "/adapter/adapter_model.txt").size(), 17u);
  // Atomic writes leave no temporary files behind.
  for (const auto& e : fs::recursive_directory_iterator(c.output_dir)) {
    EXPECT_EQ(e.path().string().find(".tmp"), std::string::npos) << e.path();
  }
}

TEST(FakeRankTest, ResumedRunWritesTheSameAdapterAsAnUninterruptedOne) {
  TempDir dir;
  RankConfig full;
  full.output_dir = dir.path() + "/full";
  full.labels = {{"test.steps", "12"}, {"test.step_ms", "1"}};
  full.save_steps = 4;
  {
    RankProcess p(dir.path(), full);
    RunToEnd(&p, full, 0);
    ASSERT_EQ(p.Wait(), 0) << p.log();
  }

  RankConfig crashing = full;
  crashing.output_dir = dir.path() + "/resumed";
  crashing.labels["test.crash_at_step"] = "7";
  {
    RankProcess p(dir.path(), crashing);
    std::vector<RankMessage> msgs = RunToEnd(&p, crashing, 0);
    EXPECT_EQ(p.Wait(), 3);
    EXPECT_NE(p.log().find("simulated crash at step 7"), std::string::npos) << p.log();
    ASSERT_FALSE(msgs.empty());
    EXPECT_EQ(msgs.back().step().step(), 6);  // step 7 never ran
  }

  RankConfig resumed = crashing;
  resumed.attempt = 1;  // test.crash_attempt defaults to 0: attempt 1 runs clean
  resumed.resume_from = crashing.output_dir + "/checkpoint-4";
  RankProcess p(dir.path(), resumed);
  RankMessage msg;
  ASSERT_TRUE(p.Next(&msg));
  EXPECT_EQ(msg.hello().start_step(), 4);
  ASSERT_TRUE(p.Next(&msg));
  EXPECT_EQ(msg.log().text(), "resuming at step 4 from " + resumed.resume_from);
  ASSERT_TRUE(p.Next(&msg));
  EXPECT_EQ(msg.rendezvous_publish(), "rdzv:job-1:1");
  p.SendRendezvous(msg.rendezvous_publish());
  std::vector<RankMessage> msgs;
  while (p.Next(&msg)) msgs.push_back(msg);
  EXPECT_EQ(p.Wait(), 0) << p.log();
  ASSERT_FALSE(msgs.empty());
  ASSERT_TRUE(msgs.front().has_step());
  EXPECT_EQ(msgs.front().step().step(), 5);
  EXPECT_EQ(msgs.back().done().final_step(), 12);
  const std::string a = ReadAll(full.output_dir + "/adapter/adapter_model.txt");
  EXPECT_FALSE(a.empty());
  EXPECT_EQ(ReadAll(resumed.output_dir + "/adapter/adapter_model.txt"), a);
  EXPECT_EQ(ReadAll(resumed.output_dir + "/checkpoint-12/rank-0.state"),
            ReadAll(full.output_dir + "/checkpoint-12/rank-0.state"));
}

TEST(FakeRankTest, StopRankWithCheckpointSavesTheCurrentStepAndExits0) {
  TempDir dir;
  RankConfig c;
  c.output_dir = dir.path() + "/out";
  c.labels = {{"test.steps", "100000"}, {"test.step_ms", "5"}};
  RankProcess p(dir.path(), c);
  RankMessage msg;
  ASSERT_TRUE(p.NextOf(RankMessage::kRendezvousPublish, &msg));
  p.SendRendezvous(msg.rendezvous_publish());
  do {
    ASSERT_TRUE(p.NextOf(RankMessage::kStep, &msg));
  } while (msg.step().step() < 3);
  int64_t last_step = msg.step().step();
  p.SendStop(/*save=*/true);
  std::vector<RankMessage> skipped;
  ASSERT_TRUE(p.NextOf(RankMessage::kCheckpoint, &msg, &skipped));
  for (const RankMessage& m : skipped) {
    if (m.has_step()) last_step = m.step().step();
  }
  EXPECT_EQ(msg.checkpoint().step(), last_step);
  EXPECT_TRUE(msg.checkpoint().complete());
  EXPECT_EQ(ReadAll(msg.checkpoint().path() + "/rank-0.state")
                .substr(0, std::to_string(last_step).size() + 1),
            std::to_string(last_step) + " ");
  EXPECT_EQ(p.Wait(), 0) << p.log();
}

TEST(FakeRankTest, StopRankWithoutCheckpointJustExits) {
  TempDir dir;
  RankConfig c;
  c.output_dir = dir.path() + "/out";
  c.labels = {{"test.steps", "100000"}, {"test.step_ms", "5"}};
  RankProcess p(dir.path(), c);
  RankMessage msg;
  ASSERT_TRUE(p.NextOf(RankMessage::kRendezvousPublish, &msg));
  p.SendRendezvous(msg.rendezvous_publish());
  ASSERT_TRUE(p.NextOf(RankMessage::kStep, &msg));
  p.SendStop(/*save=*/false);
  std::vector<RankMessage> rest;
  while (p.Next(&msg)) rest.push_back(msg);
  for (const RankMessage& m : rest) EXPECT_FALSE(m.has_checkpoint()) << m.DebugString();
  EXPECT_EQ(p.Wait(), 0) << p.log();
  EXPECT_FALSE(fs::exists(c.output_dir + "/adapter"));
}

TEST(FakeRankTest, TwoRanksStopAfterTheSameStepAndWriteOneCompleteCheckpoint) {
  TempDir dir;
  RankConfig c0;
  c0.output_dir = dir.path() + "/out";
  c0.world_size = 2;
  c0.labels = {{"test.steps", "100000"}, {"test.step_ms", "3"}};
  RankConfig c1 = c0;
  c1.rank = 1;
  RankProcess p0(dir.path(), c0);
  RankProcess p1(dir.path(), c1);
  RankMessage msg;
  ASSERT_TRUE(p0.NextOf(RankMessage::kRendezvousPublish, &msg));
  p0.SendRendezvous(msg.rendezvous_publish());
  p1.SendRendezvous(msg.rendezvous_publish());
  ASSERT_TRUE(p1.NextOf(RankMessage::kStep, &msg));
  const int64_t seen1 = msg.step().step();
  // Only rank 1 is asked; the barrier makes rank 0 stop after the same step.
  p1.SendStop(/*save=*/true);
  std::vector<RankMessage> rest0, rest1;
  while (p0.Next(&msg)) rest0.push_back(msg);
  while (p1.Next(&msg)) rest1.push_back(msg);
  EXPECT_EQ(p0.Wait(), 0) << p0.log();
  EXPECT_EQ(p1.Wait(), 0) << p1.log();
  int64_t last0 = 0, last1 = seen1, checkpoint_step = -1;
  for (const RankMessage& m : rest0) {
    if (m.has_step()) last0 = m.step().step();
    if (m.has_checkpoint()) {
      checkpoint_step = m.checkpoint().step();
      EXPECT_TRUE(m.checkpoint().complete());
    }
  }
  for (const RankMessage& m : rest1) {
    if (m.has_step()) last1 = m.step().step();
    EXPECT_FALSE(m.has_checkpoint()) << "only rank 0 reports checkpoints";
  }
  EXPECT_EQ(last0, last1);
  EXPECT_EQ(checkpoint_step, last0);
  const std::string ckpt = c0.output_dir + "/checkpoint-" + std::to_string(last0);
  EXPECT_TRUE(fs::exists(ckpt + "/manifest.json"));
  // Same step, same checksum on both ranks.
  EXPECT_EQ(ReadAll(ckpt + "/rank-0.state"), ReadAll(ckpt + "/rank-1.state"));
}

TEST(FakeRankTest, CrashTargetsOnlyTheConfiguredRankAndAttempt) {
  TempDir dir;
  RankConfig c;
  c.output_dir = dir.path() + "/out";
  c.labels = {{"test.steps", "5"},
              {"test.step_ms", "1"},
              {"test.crash_at_step", "2"},
              {"test.crash_rank", "1"}};
  {
    RankProcess p(dir.path(), c);  // rank 0: not targeted
    RunToEnd(&p, c, 0);
    EXPECT_EQ(p.Wait(), 0) << p.log();
  }
  c.labels["test.crash_rank"] = "0";
  c.labels["test.crash_attempt"] = "2";
  c.attempt = 1;  // targeted rank, other attempt
  {
    RankProcess p(dir.path(), c);
    RunToEnd(&p, c, 0);
    EXPECT_EQ(p.Wait(), 0) << p.log();
  }
  c.attempt = 2;
  RankProcess p(dir.path(), c);
  RunToEnd(&p, c, 0);
  EXPECT_EQ(p.Wait(), 3) << p.log();
}

TEST(FakeRankTest, HangStopsSendingAndSigtermExits143) {
  TempDir dir;
  RankConfig c;
  c.output_dir = dir.path() + "/out";
  c.labels = {{"test.steps", "100"}, {"test.step_ms", "1"}, {"test.hang_at_step", "3"}};
  RankProcess p(dir.path(), c);
  RankMessage msg;
  ASSERT_TRUE(p.NextOf(RankMessage::kRendezvousPublish, &msg));
  p.SendRendezvous(msg.rendezvous_publish());
  int64_t last = 0;
  while (p.Next(&msg, std::chrono::milliseconds(300))) {
    if (msg.has_step()) last = msg.step().step();
  }
  EXPECT_EQ(last, 2);
  p.SendStop(/*save=*/true);  // a hung rank does not react
  EXPECT_FALSE(p.Next(&msg, std::chrono::milliseconds(200)));
  ::kill(p.pid(), SIGTERM);
  EXPECT_EQ(p.Wait(), 143);
}

TEST(FakeRankTest, RendezvousMismatchAndInjectedFailureAreReported) {
  TempDir dir;
  RankConfig c;
  c.output_dir = dir.path() + "/out";
  {
    RankProcess p(dir.path(), c);
    RankMessage msg;
    ASSERT_TRUE(p.NextOf(RankMessage::kRendezvousPublish, &msg));
    p.SendRendezvous("rdzv:someone-else:0");
    ASSERT_TRUE(p.NextOf(RankMessage::kError, &msg));
    EXPECT_NE(msg.error().message().find("mismatch"), std::string::npos) << msg.error().message();
    EXPECT_EQ(p.Wait(), 5);
  }
  c.labels["test.fail_rendezvous"] = "true";
  RankProcess p(dir.path(), c);
  RankMessage msg;
  ASSERT_TRUE(p.NextOf(RankMessage::kRendezvousPublish, &msg));
  p.SendRendezvous(msg.rendezvous_publish());
  ASSERT_TRUE(p.NextOf(RankMessage::kError, &msg));
  EXPECT_NE(msg.error().message().find("test.fail_rendezvous"), std::string::npos);
  EXPECT_EQ(p.Wait(), 5);
}

TEST(FakeRankTest, ClosedChannelEndsTheRank) {
  TempDir dir;
  RankConfig c;
  c.output_dir = dir.path() + "/out";
  c.labels = {{"test.steps", "100000"}};
  RankProcess p(dir.path(), c);
  RankMessage msg;
  ASSERT_TRUE(p.NextOf(RankMessage::kRendezvousPublish, &msg));
  // What an agent crash does to its ranks: the channel ends.
  p.CloseChannel();
  EXPECT_EQ(p.Wait(), 4);
  EXPECT_NE(p.log().find("closed the channel"), std::string::npos) << p.log();
}

TEST(FakeRankTest, BadArgumentsAndLabelsExit2WithAMessage) {
  TempDir dir;
  {
    RankProcess p(dir.path(), std::vector<std::string>{FTUNE_TEST_RANK_BINARY, "train"});
    EXPECT_EQ(p.Wait(), 2);
    EXPECT_NE(p.log().find("usage: ftune-test-rank run"), std::string::npos) << p.log();
  }
  RankConfig c;
  c.output_dir = dir.path() + "/out";
  c.labels = {{"test.steps", "many"}};
  RankProcess p(dir.path(), c);
  EXPECT_EQ(p.Wait(), 2);
  EXPECT_NE(p.log().find("test.steps ('many')"), std::string::npos) << p.log();
}

}  // namespace
