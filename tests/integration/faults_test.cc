// Faults and sizes a shared cluster sees, on loopback: real coordinator,
// agents and the scripted ftune-test-rank (labels script its faults).
//   * an agent paused past the heartbeat timeout with its TCP connection
//     alive (SIGSTOP, then SIGCONT) comes back; its old ranks die and move
//     nothing;
//   * a rank exiting 2 (bad spec or input) fails the job without a restart;
//   * following the watch of an ended job from its last event ends at once;
//   * a 5 MiB log line and a 20 MiB error from a rank arrive truncated and
//     the job goes on.
#include <signal.h>

#include <chrono>
#include <string>
#include <thread>

#include <gtest/gtest.h>

#include "cluster.h"

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

}  // namespace
}  // namespace ftune::testing
