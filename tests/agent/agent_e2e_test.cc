// The real ftune-agent binary, with ftune-test-rank as its rank binary and
// --cpu-slots 2, against a fake AgentService running in this test on
// 127.0.0.1. The fake stores events the way the coordinator does (exactly
// once, dropping agent_seq at or below what it has), and its state outlives
// server restarts, like the coordinator's SQLite store. Covers the agent side
// of docs/control-plane.md "Agent stream" end to end: registration, ordered
// and acknowledged event delivery, rendezvous relay, StopJob, failures,
// reconnection with resend, auth, shutdown.
#include <dlfcn.h>
#include <fcntl.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <condition_variable>
#include <filesystem>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "ftune/v1/agent_service.grpc.pb.h"
#include "temp_dir.h"
#include "tests/agent/test_util.h"

namespace ftune::agent {
namespace {

using testutil::TempDir;
using testing::WaitFor;
using Stream = grpc::ServerReaderWriter<v1::CoordinatorToAgent, v1::AgentToCoordinator>;
using namespace std::chrono_literals;

constexpr char kToken[] = "agent-secret";

// What the fake coordinator knows; shared by successive server instances.
struct CoordinatorState {
  std::mutex mu;
  // Stored events in arrival order, each agent_seq once.
  std::vector<v1::RankEvent> stored;
  int64_t stored_seq = 0;
  int duplicates = 0;
  // agent_seq values that arrived out of order (a gap before them).
  std::vector<int64_t> gaps;
  // While false, batches are received but neither stored nor acknowledged,
  // as if the coordinator died before its transaction committed.
  bool store = true;
  std::vector<int64_t> dropped;
  std::vector<v1::RegisterAgent> registrations;
  std::vector<v1::RendezvousPublish> rendezvous;
  int heartbeats = 0;
  int32_t heartbeat_interval_ms = 100;
  // Ends every stream right after registering it (as a coordinator whose
  // store refuses every write does).
  bool end_after_register = false;
  std::vector<v1::RunningRank> stale_on_register;

  std::mutex write_mu;
  Stream* active = nullptr;  // guarded by write_mu

  bool Send(const v1::CoordinatorToAgent& msg) {
    std::lock_guard<std::mutex> lock(write_mu);
    return active != nullptr && active->Write(msg);
  }
};

class FakeAgentService final : public v1::AgentService::Service {
 public:
  explicit FakeAgentService(CoordinatorState* state) : s_(state) {}

  grpc::Status Connect(grpc::ServerContext* ctx, Stream* stream) override {
    auto auth = ctx->client_metadata().find("authorization");
    if (auth == ctx->client_metadata().end() ||
        std::string(auth->second.data(), auth->second.size()) != std::string("Bearer ") + kToken) {
      return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "missing or wrong agent token");
    }
    v1::AgentToCoordinator msg;
    if (!stream->Read(&msg) || !msg.has_register_()) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "RegisterAgent must come first");
    }
    v1::CoordinatorToAgent registered, ack;
    {
      std::lock_guard<std::mutex> lock(s_->mu);
      registered.mutable_registered()->set_heartbeat_interval_ms(s_->heartbeat_interval_ms);
      for (const auto& r : s_->stale_on_register) *registered.mutable_registered()->add_stale() = r;
      ack.mutable_ack()->set_agent_seq(s_->stored_seq);
    }
    {
      std::lock_guard<std::mutex> lock(s_->write_mu);
      stream->Write(registered);
      stream->Write(ack);
      s_->active = stream;
    }
    {
      // Counted once the stream is active, so a test that saw the
      // registration can Send at once.
      std::lock_guard<std::mutex> lock(s_->mu);
      s_->registrations.push_back(msg.register_());
    }
    bool end_now = false;
    {
      std::lock_guard<std::mutex> lock(s_->mu);
      end_now = s_->end_after_register;
    }
    if (end_now) {
      std::lock_guard<std::mutex> lock(s_->write_mu);
      s_->active = nullptr;
      return grpc::Status(grpc::StatusCode::UNAVAILABLE, "store refused the write");
    }
    while (stream->Read(&msg)) {
      if (msg.has_events()) {
        v1::CoordinatorToAgent reply;
        bool send = false;
        {
          std::lock_guard<std::mutex> lock(s_->mu);
          for (const v1::RankEvent& e : msg.events().events()) {
            if (!s_->store) {
              s_->dropped.push_back(e.agent_seq());
            } else if (e.agent_seq() <= s_->stored_seq) {
              ++s_->duplicates;
            } else {
              if (e.agent_seq() != s_->stored_seq + 1) s_->gaps.push_back(e.agent_seq());
              s_->stored.push_back(e);
              s_->stored_seq = e.agent_seq();
            }
          }
          send = s_->store;
          reply.mutable_ack()->set_agent_seq(s_->stored_seq);
        }
        if (send) s_->Send(reply);
      } else if (msg.has_rendezvous()) {
        {
          std::lock_guard<std::mutex> lock(s_->mu);
          s_->rendezvous.push_back(msg.rendezvous());
        }
        // The coordinator relays to every agent of the job, the sender too.
        v1::CoordinatorToAgent relay;
        *relay.mutable_rendezvous() = msg.rendezvous();
        s_->Send(relay);
      } else if (msg.has_heartbeat()) {
        std::lock_guard<std::mutex> lock(s_->mu);
        ++s_->heartbeats;
      }
    }
    std::lock_guard<std::mutex> lock(s_->write_mu);
    if (s_->active == stream) s_->active = nullptr;
    return grpc::Status::OK;
  }

 private:
  CoordinatorState* s_;
};

class FakeCoordinator {
 public:
  explicit FakeCoordinator(CoordinatorState* state) : state_(state) {}
  ~FakeCoordinator() { Stop(); }

  // Port 0 picks a free one; later restarts reuse it.
  void Start(int port = 0,
             std::shared_ptr<grpc::ServerCredentials> creds = grpc::InsecureServerCredentials()) {
    service_ = std::make_unique<FakeAgentService>(state_);
    grpc::ServerBuilder builder;
    builder.AddListeningPort(absl::StrCat("127.0.0.1:", port), creds, &port_);
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    ASSERT_GT(port_, 0);
  }
  // Ends every stream at once, like a crash of the coordinator process.
  void Stop() {
    if (server_ == nullptr) return;
    server_->Shutdown(std::chrono::system_clock::now());
    server_->Wait();
    server_.reset();
    service_.reset();
  }
  int port() const { return port_; }

 private:
  CoordinatorState* state_;
  std::unique_ptr<FakeAgentService> service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
};

class AgentProcess {
 public:
  AgentProcess(const std::string& dir, std::vector<std::string> args) : log_(dir + "/agent.log") {
    args.insert(args.begin(), FTUNE_AGENT_BINARY);
    std::vector<char*> argv;
    for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    const int fd = ::open(log_.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    pid_ = ::fork();
    if (pid_ == 0) {
      ::dup2(fd, 1);
      ::dup2(fd, 2);
      ::execv(argv[0], argv.data());
      ::_exit(127);
    }
    ::close(fd);
  }
  ~AgentProcess() {
    if (!reaped_) Stop();
  }
  // SIGTERM, then waits; SIGKILL after the timeout. Exit code or -signal.
  int Stop(std::chrono::seconds timeout = 30s) {
    if (reaped_) return code_;
    ::kill(pid_, SIGTERM);
    return Wait(timeout);
  }
  // Waits for the agent to exit by itself; SIGKILL after the timeout.
  int Wait(std::chrono::seconds timeout = 30s) {
    if (reaped_) return code_;
    int status = 0;
    if (!WaitFor([&] { return ::waitpid(pid_, &status, WNOHANG) == pid_; }, timeout)) {
      ADD_FAILURE() << "ftune-agent did not exit within " << timeout.count() << " s; log:\n"
                    << log();
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, &status, 0);
    }
    reaped_ = true;
    code_ = WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
    return code_;
  }
  std::string log() const { return testing::ReadText(log_); }

 private:
  std::string log_;
  pid_t pid_ = -1;
  bool reaped_ = false;
  int code_ = 0;
};

class AgentE2ETest : public ::testing::Test {
 protected:
  void SetUp() override {
    coordinator_.Start();
    testing::WriteText(dir_.path() + "/token", std::string(kToken) + "\n");
  }

  void TearDown() override {
    if (agent_ != nullptr) {
      const int code = agent_->Stop();
      EXPECT_EQ(code, 0) << agent_->log();
    }
    // FTUNE_TEST_VERBOSE=1 shows the agent's story for passing tests too.
    if ((HasFailure() || std::getenv("FTUNE_TEST_VERBOSE") != nullptr) && agent_ != nullptr)
      std::cerr << "---- ftune-agent log ----\n" << agent_->log();
  }

  void StartAgent(const std::string& rank_binary = FTUNE_TEST_RANK_BINARY,
                  const std::vector<std::string>& extra = {}) {
    std::vector<std::string> args = {
        "--coordinator",   absl::StrCat("127.0.0.1:", coordinator_.port()),
        "--token-file",    dir_.path() + "/token",
        "--work-dir",      work_dir(),
        "--cpu-slots",     "2",
        "--host",          "test-host",
        "--rank-binary",   rank_binary,
        "--grace-seconds", "2"};
    args.insert(args.end(), extra.begin(), extra.end());
    agent_ = std::make_unique<AgentProcess>(dir_.path(), args);
  }

  std::string work_dir() const { return dir_.path() + "/work"; }

  bool WaitRegistrations(size_t n, std::chrono::milliseconds timeout = 20s) {
    return WaitFor(
        [&] {
          std::lock_guard<std::mutex> lock(state_.mu);
          return state_.registrations.size() >= n;
        },
        timeout);
  }

  static v1::CoordinatorToAgent Assignment(const std::map<std::string, std::string>& labels,
                                           int64_t save_steps = 0,
                                           const std::string& job = "job-1") {
    v1::CoordinatorToAgent msg;
    v1::Assignment* a = msg.mutable_assign();
    a->set_job_id(job);
    a->set_attempt(0);
    a->set_world_size(2);
    a->mutable_spec()->set_name("e2e");
    for (const auto& [k, v] : labels) (*a->mutable_spec()->mutable_labels())[k] = v;
    if (save_steps > 0) a->mutable_spec()->mutable_training()->set_save_steps(save_steps);
    for (int r = 0; r < 2; ++r) {
      v1::RankAssignment* ra = a->add_ranks();
      ra->set_rank(r);
      ra->set_slot(r);
    }
    return msg;
  }

  std::vector<v1::RankEvent> Stored() {
    std::lock_guard<std::mutex> lock(state_.mu);
    return state_.stored;
  }

  // Stored exit events once there are n (RankExit or launch_failed).
  std::map<int, v1::RankEvent> WaitExits(size_t n, std::chrono::milliseconds timeout = 30s) {
    std::map<int, v1::RankEvent> exits;
    const bool ok = WaitFor(
        [&] {
          exits.clear();
          for (const v1::RankEvent& e : Stored()) {
            if (e.has_exit() || e.has_launch_failed()) exits[e.rank()] = e;
          }
          return exits.size() >= n;
        },
        timeout);
    EXPECT_TRUE(ok) << "only " << exits.size() << " of " << n << " ranks ended; stored:\n"
                    << DumpStored();
    return exits;
  }

  bool WaitStep(int rank, int64_t step) {
    return WaitFor([&] {
      for (const v1::RankEvent& e : Stored()) {
        if (e.rank() == rank && e.has_message() && e.message().step().step() >= step) return true;
      }
      return false;
    });
  }

  std::string DumpStored() {
    std::string out;
    for (const v1::RankEvent& e : Stored()) out += e.ShortDebugString() + "\n";
    return out;
  }

  // Every stored agent_seq is the previous + 1, starting at 1.
  void ExpectContiguousFromOne() {
    std::lock_guard<std::mutex> lock(state_.mu);
    EXPECT_TRUE(state_.gaps.empty()) << "gaps before " << absl::StrJoin(state_.gaps, ",");
    for (size_t i = 0; i < state_.stored.size(); ++i) {
      ASSERT_EQ(state_.stored[i].agent_seq(), static_cast<int64_t>(i + 1));
    }
  }

  // Waits until the agent's spool holds nothing unacknowledged.
  void ExpectSpoolTrimmed() {
    const std::string log = work_dir() + "/spool/events.log";
    EXPECT_TRUE(WaitFor([&] {
      return std::filesystem::exists(log) && std::filesystem::file_size(log) == 0;
    })) << "events.log still has "
        << std::filesystem::file_size(log) << " bytes";
    int64_t stored_seq;
    {
      std::lock_guard<std::mutex> lock(state_.mu);
      stored_seq = state_.stored_seq;
    }
    EXPECT_TRUE(WaitFor([&] {
      return testing::ReadText(work_dir() + "/spool/acked") == absl::StrCat(stored_seq, "\n");
    }));
  }

  TempDir dir_{"agent_e2e_test"};
  CoordinatorState state_;
  FakeCoordinator coordinator_{&state_};
  std::unique_ptr<AgentProcess> agent_;
};

TEST_F(AgentE2ETest, RunsAnAssignedJobAndDeliversEveryEventInOrder) {
  StartAgent();
  ASSERT_TRUE(WaitRegistrations(1)) << agent_->log();
  {
    std::lock_guard<std::mutex> lock(state_.mu);
    const v1::RegisterAgent& reg = state_.registrations[0];
    EXPECT_EQ(reg.agent_id().size(), 32u);
    EXPECT_EQ(reg.host(), "test-host");
    ASSERT_EQ(reg.slots_size(), 2);
    EXPECT_EQ(reg.slots(1).index(), 1);
    EXPECT_EQ(reg.slots(1).device_uuid(), "cpu-1");
    EXPECT_EQ(reg.slots(1).name(), "CPU");
    EXPECT_GT(reg.slots(1).memory_bytes(), 0);
    EXPECT_EQ(reg.running_size(), 0);
    EXPECT_FALSE(reg.version().empty());
    EXPECT_EQ(reg.agent_id(), testing::ReadText(work_dir() + "/spool/agent_id").substr(0, 32));
  }
  ASSERT_TRUE(
      state_.Send(Assignment({{"test.steps", "10"}, {"test.step_ms", "20"}}, /*save_steps=*/5)));
  auto exits = WaitExits(2);
  for (auto& [rank, e] : exits) EXPECT_EQ(e.exit().exit_code(), 0) << e.DebugString();
  ExpectContiguousFromOne();

  for (int rank = 0; rank < 2; ++rank) {
    std::vector<std::string> kinds;
    std::vector<int64_t> steps;
    for (const v1::RankEvent& e : Stored()) {
      if (e.rank() != rank) continue;
      EXPECT_EQ(e.job_id(), "job-1");
      EXPECT_GT(e.time_unix_ms(), 0);
      if (e.has_exit()) kinds.push_back("exit");
      if (!e.has_message()) continue;
      const v1::RankMessage& m = e.message();
      if (m.has_hello()) kinds.push_back("hello");
      if (m.has_step()) steps.push_back(m.step().step());
      if (m.has_checkpoint()) {
        kinds.push_back(absl::StrCat("ckpt", m.checkpoint().step()));
        EXPECT_TRUE(m.checkpoint().complete());
      }
      if (m.has_done()) kinds.push_back("done");
    }
    EXPECT_EQ(steps, (std::vector<int64_t>{1, 2, 3, 4, 5, 6, 7, 8, 9, 10})) << "rank " << rank;
    if (rank == 0) {
      EXPECT_EQ(kinds, (std::vector<std::string>{"hello", "ckpt5", "ckpt10", "done", "exit"}));
    } else {
      EXPECT_EQ(kinds, (std::vector<std::string>{"hello", "done", "exit"}));
    }
  }
  {
    std::lock_guard<std::mutex> lock(state_.mu);
    ASSERT_EQ(state_.rendezvous.size(), 1u);
    EXPECT_EQ(state_.rendezvous[0].job_id(), "job-1");
    EXPECT_EQ(state_.rendezvous[0].attempt(), 0);
    EXPECT_EQ(state_.rendezvous[0].data(), "rdzv:job-1:0");
    EXPECT_EQ(state_.duplicates, 0);
  }
  // Heartbeats at the interval Registered asked for (100 ms).
  EXPECT_TRUE(WaitFor([&] {
    std::lock_guard<std::mutex> lock(state_.mu);
    return state_.heartbeats >= 3;
  }));
  ExpectSpoolTrimmed();
  EXPECT_TRUE(std::filesystem::exists(work_dir() + "/jobs/job-1/output/adapter/adapter_model.txt"));
  EXPECT_TRUE(std::filesystem::exists(work_dir() + "/jobs/job-1/attempt-0/spec.yaml"));
}

TEST_F(AgentE2ETest, StopJobMakesRanksCheckpointAndExit) {
  StartAgent();
  ASSERT_TRUE(WaitRegistrations(1)) << agent_->log();
  ASSERT_TRUE(state_.Send(Assignment({{"test.steps", "100000"}, {"test.step_ms", "10"}})));
  ASSERT_TRUE(WaitStep(0, 3) && WaitStep(1, 3)) << DumpStored();
  v1::CoordinatorToAgent stop;
  stop.mutable_stop()->set_job_id("job-1");
  stop.mutable_stop()->set_attempt(0);
  stop.mutable_stop()->set_save_checkpoint(true);
  stop.mutable_stop()->set_grace_seconds(30);
  stop.mutable_stop()->set_reason("cancelled");
  ASSERT_TRUE(state_.Send(stop));
  auto exits = WaitExits(2, 20s);
  for (auto& [rank, e] : exits) EXPECT_EQ(e.exit().exit_code(), 0) << e.DebugString();
  int64_t checkpoint_step = -1;
  for (const v1::RankEvent& e : Stored()) {
    if (e.has_message() && e.message().has_checkpoint()) {
      checkpoint_step = e.message().checkpoint().step();
      EXPECT_TRUE(e.message().checkpoint().complete());
      EXPECT_EQ(e.message().checkpoint().path(),
                absl::StrCat(work_dir(), "/jobs/job-1/output/checkpoint-", checkpoint_step));
    }
  }
  ASSERT_GE(checkpoint_step, 3);
  const std::string dir =
      absl::StrCat(work_dir(), "/jobs/job-1/output/checkpoint-", checkpoint_step);
  EXPECT_TRUE(std::filesystem::exists(dir + "/manifest.json"));
  EXPECT_EQ(testing::ReadText(dir + "/rank-0.state"), testing::ReadText(dir + "/rank-1.state"));
  ExpectContiguousFromOne();
}

TEST_F(AgentE2ETest, CrashedRankReportsItsExitCodeAndStderrTail) {
  StartAgent();
  ASSERT_TRUE(WaitRegistrations(1)) << agent_->log();
  ASSERT_TRUE(state_.Send(Assignment({{"test.steps", "50"},
                                      {"test.step_ms", "10"},
                                      {"test.crash_at_step", "3"},
                                      {"test.crash_rank", "1"}})));
  auto exits = WaitExits(1);
  ASSERT_TRUE(exits.count(1)) << DumpStored();
  const v1::RankExit& exit = exits[1].exit();
  EXPECT_EQ(exit.exit_code(), 3);
  EXPECT_FALSE(exit.hung());
  const std::string tail = absl::StrJoin(exit.stderr_tail(), "\n");
  EXPECT_NE(tail.find("simulated crash at step 3"), std::string::npos) << tail;
  EXPECT_LE(exit.stderr_tail_size(), 20);

  // Rank 0 now waits for its dead peer, as in a collective. The coordinator
  // stops it; it cannot finish the step, so SIGTERM after the grace ends it.
  v1::CoordinatorToAgent stop;
  stop.mutable_stop()->set_job_id("job-1");
  stop.mutable_stop()->set_grace_seconds(1);
  ASSERT_TRUE(state_.Send(stop));
  exits = WaitExits(2);
  EXPECT_EQ(exits[0].exit().exit_code(), 143);
  ExpectContiguousFromOne();
}

TEST_F(AgentE2ETest, ReconnectsAfterCoordinatorRestartAndResendsUnstoredEvents) {
  StartAgent();
  ASSERT_TRUE(WaitRegistrations(1)) << agent_->log();
  ASSERT_TRUE(state_.Send(Assignment({{"test.steps", "80"}, {"test.step_ms", "20"}})));
  ASSERT_TRUE(WaitStep(0, 5) && WaitStep(1, 5)) << DumpStored();

  // The coordinator keeps receiving but stops committing, then dies: what it
  // received after this point never reached its store.
  {
    std::lock_guard<std::mutex> lock(state_.mu);
    state_.store = false;
  }
  ASSERT_TRUE(WaitFor([&] {
    std::lock_guard<std::mutex> lock(state_.mu);
    return state_.dropped.size() >= 6;
  }));
  coordinator_.Stop();
  const int64_t stored_before = [&] {
    std::lock_guard<std::mutex> lock(state_.mu);
    return state_.stored_seq;
  }();

  // Ranks keep running: their events pile up in the agent's spool while it
  // fails to reconnect.
  const std::string spool_log = work_dir() + "/spool/events.log";
  const auto size_at_stop = std::filesystem::file_size(spool_log);
  ASSERT_TRUE(WaitFor([&] { return agent_->log().find("cannot connect to") != std::string::npos; }))
      << agent_->log();
  ASSERT_TRUE(WaitFor([&] { return std::filesystem::file_size(spool_log) > size_at_stop + 200; }));

  {
    std::lock_guard<std::mutex> lock(state_.mu);
    state_.store = true;
  }
  coordinator_.Start(coordinator_.port());
  ASSERT_TRUE(WaitRegistrations(2)) << agent_->log();
  {
    std::lock_guard<std::mutex> lock(state_.mu);
    const v1::RegisterAgent& reg = state_.registrations[1];
    EXPECT_EQ(reg.agent_id(), state_.registrations[0].agent_id());
    std::set<int> running;
    for (const v1::RunningRank& r : reg.running()) {
      EXPECT_EQ(r.job_id(), "job-1");
      running.insert(r.rank());
    }
    EXPECT_EQ(running, (std::set<int>{0, 1}));
    EXPECT_GT(reg.last_agent_seq(), stored_before);
  }

  auto exits = WaitExits(2, 60s);
  for (auto& [rank, e] : exits) EXPECT_EQ(e.exit().exit_code(), 0) << e.DebugString();
  ExpectContiguousFromOne();
  {
    std::lock_guard<std::mutex> lock(state_.mu);
    // The events the dead coordinator had received but not stored arrived
    // again, and are now stored exactly once.
    ASSERT_FALSE(state_.dropped.empty());
    EXPECT_EQ(state_.dropped.front(), stored_before + 1);
    EXPECT_LE(state_.dropped.back(), state_.stored_seq);
  }
  for (int rank = 0; rank < 2; ++rank) {
    std::vector<int64_t> steps;
    for (const v1::RankEvent& e : Stored()) {
      if (e.rank() == rank && e.has_message() && e.message().has_step())
        steps.push_back(e.message().step().step());
    }
    ASSERT_EQ(steps.size(), 80u) << "rank " << rank;
    for (size_t i = 0; i < steps.size(); ++i) EXPECT_EQ(steps[i], static_cast<int64_t>(i + 1));
  }
  ExpectSpoolTrimmed();
}

TEST_F(AgentE2ETest, EventsSpooledWhileTheCoordinatorIsDownSurviveAnAgentRestart) {
  StartAgent();
  ASSERT_TRUE(WaitRegistrations(1)) << agent_->log();
  ASSERT_TRUE(state_.Send(Assignment({{"test.steps", "40"}, {"test.step_ms", "20"}})));
  ASSERT_TRUE(WaitStep(0, 1)) << DumpStored();
  coordinator_.Stop();
  // The job ends while nobody listens (the agent logs each exit once it is
  // spooled); then the agent itself goes away.
  ASSERT_TRUE(WaitFor([&] {
    const std::string log = agent_->log();
    return log.find("rank 0 exited with code 0") != std::string::npos &&
           log.find("rank 1 exited with code 0") != std::string::npos;
  }));
  ASSERT_EQ(agent_->Stop(), 0) << agent_->log();
  std::string first_id;
  int64_t stored_before;
  {
    std::lock_guard<std::mutex> lock(state_.mu);
    first_id = state_.registrations[0].agent_id();
    stored_before = state_.stored_seq;
  }

  coordinator_.Start(coordinator_.port());
  StartAgent();
  ASSERT_TRUE(WaitRegistrations(2)) << agent_->log();
  {
    std::lock_guard<std::mutex> lock(state_.mu);
    const v1::RegisterAgent& reg = state_.registrations[1];
    EXPECT_EQ(reg.agent_id(), first_id);  // the same agent, from its spool
    EXPECT_EQ(reg.running_size(), 0);
    EXPECT_GT(reg.last_agent_seq(), stored_before + 2);  // at least the two exits
  }
  auto exits = WaitExits(2);
  for (auto& [rank, e] : exits) EXPECT_EQ(e.exit().exit_code(), 0) << e.DebugString();
  ExpectContiguousFromOne();
  for (int rank = 0; rank < 2; ++rank) {
    std::vector<int64_t> steps;
    for (const v1::RankEvent& e : Stored()) {
      if (e.rank() == rank && e.has_message() && e.message().has_step())
        steps.push_back(e.message().step().step());
    }
    ASSERT_EQ(steps.size(), 40u) << "rank " << rank;
    for (size_t i = 0; i < steps.size(); ++i) EXPECT_EQ(steps[i], static_cast<int64_t>(i + 1));
  }
  ExpectSpoolTrimmed();
}

TEST_F(AgentE2ETest, WaitsForACoordinatorThatIsNotUpYet) {
  const int port = coordinator_.port();
  coordinator_.Stop();
  StartAgent();
  ASSERT_TRUE(WaitFor([&] { return agent_->log().find("cannot connect to") != std::string::npos; }))
      << agent_->log();
  coordinator_.Start(port);
  // Backoff is capped at 5 s.
  ASSERT_TRUE(WaitRegistrations(1, 15s)) << agent_->log();
}

// A coordinator that ends each stream right after registering it is not
// reconnected to in a tight loop: the backoff keeps doubling until a
// connection stays up, up to the heartbeat interval the coordinator asks
// for (a registration is what keeps the agent alive there; 2 s here). At
// the initial 100 ms backoff the agent would register about 40 times in
// 4 s; doubling from 100 ms, at most 6.
TEST_F(AgentE2ETest, StreamsEndedAtRegistrationBackOff) {
  {
    std::lock_guard<std::mutex> lock(state_.mu);
    state_.end_after_register = true;
    state_.heartbeat_interval_ms = 2000;
  }
  StartAgent();
  ASSERT_TRUE(WaitRegistrations(1, 15s)) << agent_->log();
  std::this_thread::sleep_for(4s);
  size_t n = 0;
  {
    std::lock_guard<std::mutex> lock(state_.mu);
    n = state_.registrations.size();
    state_.end_after_register = false;
  }
  EXPECT_LE(n, 8u) << agent_->log();
  EXPECT_GE(n, 2u) << agent_->log();  // it did retry
  // Once the coordinator keeps the stream, the agent stays registered.
  ASSERT_TRUE(WaitFor([&] {
    std::lock_guard<std::mutex> lock(state_.mu);
    return state_.heartbeats > 0;
  }, 30s)) << agent_->log();
}

TEST_F(AgentE2ETest, WrongTokenIsRejectedWithAnActionableLogLine) {
  testing::WriteText(dir_.path() + "/token", "not-the-token\n");
  StartAgent();
  ASSERT_TRUE(WaitFor([&] { return agent_->log().find("--token-file") != std::string::npos; }))
      << agent_->log();
  EXPECT_NE(agent_->log().find("UNAUTHENTICATED"), std::string::npos) << agent_->log();
  std::lock_guard<std::mutex> lock(state_.mu);
  EXPECT_TRUE(state_.registrations.empty());
}

TEST_F(AgentE2ETest, ConnectsOverTlsWhenGivenTheCoordinatorsCa) {
  const std::string d = dir_.path();
  const std::string cmd =
      "openssl req -x509 -newkey rsa:2048 -nodes -keyout " + d + "/key.pem -out " + d +
      "/cert.pem -days 1 -subj /CN=localhost -addext subjectAltName=IP:127.0.0.1,DNS:localhost"
      " >/dev/null 2>&1";
  if (std::system(cmd.c_str()) != 0)
    GTEST_SKIP() << "openssl is not installed; cannot make a test certificate";
  coordinator_.Stop();
  grpc::SslServerCredentialsOptions ssl;
  ssl.pem_key_cert_pairs.push_back(
      {testing::ReadText(d + "/key.pem"), testing::ReadText(d + "/cert.pem")});
  coordinator_.Start(0, grpc::SslServerCredentials(ssl));
  StartAgent(FTUNE_TEST_RANK_BINARY, {"--tls-ca", d + "/cert.pem"});
  ASSERT_TRUE(WaitRegistrations(1)) << agent_->log();
  ASSERT_TRUE(state_.Send(Assignment({{"test.steps", "3"}, {"test.step_ms", "1"}})));
  auto exits = WaitExits(2);
  for (auto& [rank, e] : exits) EXPECT_EQ(e.exit().exit_code(), 0) << e.DebugString();
}

TEST_F(AgentE2ETest, HostWithoutSlotsExitsWithAnActionableMessage) {
  void* nvml = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
  if (nvml != nullptr) {
    dlclose(nvml);
    GTEST_SKIP() << "this host has NVML, so it has GPU slots";
  }
  AgentProcess agent(dir_.path(), {"--coordinator", absl::StrCat("127.0.0.1:", coordinator_.port()),
                                   "--work-dir", work_dir()});
  EXPECT_EQ(agent.Wait(10s), 1);
  EXPECT_NE(agent.log().find("pass --cpu-slots N"), std::string::npos) << agent.log();
}

TEST_F(AgentE2ETest, LaunchFailureIsReportedUpstream) {
  StartAgent(dir_.path() + "/missing-rank");
  ASSERT_TRUE(WaitRegistrations(1)) << agent_->log();
  ASSERT_TRUE(state_.Send(Assignment({})));
  auto exits = WaitExits(2);
  for (auto& [rank, e] : exits) {
    ASSERT_TRUE(e.has_launch_failed()) << e.DebugString();
    EXPECT_NE(e.launch_failed().message().find(dir_.path() + "/missing-rank"), std::string::npos);
  }
  EXPECT_NE(agent_->log().find("is not executable"), std::string::npos);
}

TEST_F(AgentE2ETest, StaleRanksNamedInRegisteredAreStopped) {
  StartAgent();
  ASSERT_TRUE(WaitRegistrations(1)) << agent_->log();
  ASSERT_TRUE(state_.Send(Assignment({{"test.steps", "100000"}, {"test.step_ms", "10"}})));
  ASSERT_TRUE(WaitStep(0, 2) && WaitStep(1, 2)) << DumpStored();
  coordinator_.Stop();
  {
    // After its restart the coordinator no longer wants rank 1 (say the
    // attempt was restarted elsewhere meanwhile).
    std::lock_guard<std::mutex> lock(state_.mu);
    v1::RunningRank stale;
    stale.set_job_id("job-1");
    stale.set_rank(1);
    state_.stale_on_register.push_back(stale);
  }
  coordinator_.Start(coordinator_.port());
  auto exits = WaitExits(1, 10s);
  ASSERT_TRUE(exits.count(1)) << DumpStored();
  // Terminated, not asked to stop: a non-zero exit, never a clean finish.
  EXPECT_EQ(exits[1].exit().exit_code(), 143);
}

TEST_F(AgentE2ETest, SigtermStopsRanksAndFlushesTheirExitsFirst) {
  StartAgent();
  ASSERT_TRUE(WaitRegistrations(1)) << agent_->log();
  ASSERT_TRUE(state_.Send(Assignment({{"test.steps", "100000"}, {"test.step_ms", "10"}})));
  ASSERT_TRUE(WaitStep(0, 2) && WaitStep(1, 2)) << DumpStored();
  EXPECT_EQ(agent_->Stop(20s), 0) << agent_->log();
  // The exits were spooled and delivered before the agent went away.
  std::map<int, v1::RankEvent> exits;
  for (const v1::RankEvent& e : Stored()) {
    if (e.has_exit()) exits[e.rank()] = e;
  }
  EXPECT_EQ(exits.size(), 2u) << DumpStored();
  for (auto& [rank, e] : exits) EXPECT_EQ(e.exit().exit_code(), 143) << e.DebugString();
  EXPECT_NE(agent_->log().find("agent stopped"), std::string::npos);
}

}  // namespace
}  // namespace ftune::agent
