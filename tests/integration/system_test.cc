// The whole control plane on loopback: ftune-coordinator + ftune-agent
// (--cpu-slots) + ranks (the scripted ftune-test-rank, until the trainer
// lands), driven through the public gRPC API.
#include <signal.h>

#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <thread>

#include <gtest/gtest.h>

#include "bad_specs.h"
#include "cluster.h"
#include "jobspec.h"

namespace ftune::testing {
namespace {

using std::chrono::seconds;

// Every event exactly once: seq 1..N with no gap, and no (attempt, rank,
// step) step event twice.
void ExpectGapFree(const std::vector<v1::JobEvent>& events) {
  std::set<std::tuple<int, int, int64_t>> steps;
  for (size_t i = 0; i < events.size(); ++i) {
    ASSERT_EQ(events[i].seq(), static_cast<int64_t>(i + 1)) << "gap or duplicate at " << i;
    if (events[i].has_step())
      EXPECT_TRUE(steps.insert({events[i].attempt(), events[i].rank(), events[i].step().step()})
                      .second)
          << "duplicate step event " << events[i].step().step() << " of rank "
          << events[i].rank();
  }
}

std::string AdapterOf(const v1::Job& job) {
  return ReadFile(job.adapter_path() + "/adapter_model.txt");
}

TEST(System, JobRunsToSuccessWithEventsCheckpointsAndAdapter) {
  Cluster c;
  c.StartCoordinator();
  c.StartAgent("host-a", 2);
  ASSERT_TRUE(c.WaitAgents(1));
  v1::Job job = c.Submit(c.Spec(2, 12, 4));
  ASSERT_TRUE(c.WaitState(job.id(), v1::SUCCEEDED)) << v1::JobState_Name(c.GetJob(job.id()).state());
  v1::Job done = c.GetJob(job.id());
  EXPECT_EQ(done.last_step(), 12);
  EXPECT_FALSE(done.adapter_path().empty());
  EXPECT_FALSE(AdapterOf(done).empty());
  auto events = c.Events(job.id());
  ExpectGapFree(events);
  int steps = 0;
  for (const auto& e : events) steps += e.has_step();
  EXPECT_EQ(steps, 24);  // 12 steps x 2 ranks
  auto ck = c.Checkpoints(job.id());
  ASSERT_EQ(ck.size(), 3u);  // steps 4, 8, 12
  EXPECT_EQ(ck[2].step(), 12);
}

TEST(System, CoordinatorKill9MidJobLosesAndDuplicatesNothing) {
  Cluster c;
  c.StartCoordinator();
  c.StartAgent("host-a", 2);
  ASSERT_TRUE(c.WaitAgents(1));
  v1::JobSpec spec = c.Spec(2, 40, 10);
  v1::Job job = c.Submit(spec);
  ASSERT_TRUE(c.WaitFor_Step(job.id(), 8));
  c.KillCoordinator(SIGKILL);
  std::this_thread::sleep_for(std::chrono::milliseconds(600));  // ranks keep stepping meanwhile
  c.StartCoordinator();
  ASSERT_TRUE(c.WaitState(job.id(), v1::SUCCEEDED, seconds(60)))
      << v1::JobState_Name(c.GetJob(job.id()).state()) << " " << c.GetJob(job.id()).state_reason();
  auto events = c.Events(job.id());
  ExpectGapFree(events);
  int steps = 0;
  for (const auto& e : events) steps += e.has_step();
  EXPECT_EQ(steps, 80);
  EXPECT_EQ(c.GetJob(job.id()).restarts(), 0);
}

TEST(System, RankCrashRestartsGangAndMatchesUninterruptedRun) {
  Cluster c;
  c.StartCoordinator();
  c.StartAgent("host-a", 2);
  ASSERT_TRUE(c.WaitAgents(1));
  v1::Job clean = c.Submit(c.Spec(2, 20, 5));
  ASSERT_TRUE(c.WaitState(clean.id(), v1::SUCCEEDED));
  v1::JobSpec spec = c.Spec(2, 20, 5);
  (*spec.mutable_labels())["test.crash_at_step"] = "12";
  (*spec.mutable_labels())["test.crash_rank"] = "1";
  (*spec.mutable_labels())["test.crash_attempt"] = "0";
  v1::Job crashed = c.Submit(spec);
  ASSERT_TRUE(c.WaitState(crashed.id(), v1::SUCCEEDED)) << c.GetJob(crashed.id()).state_reason();
  v1::Job done = c.GetJob(crashed.id());
  EXPECT_EQ(done.restarts(), 1);
  EXPECT_EQ(done.attempt(), 1);
  EXPECT_EQ(AdapterOf(done), AdapterOf(c.GetJob(clean.id())));
  bool saw_error = false, resumed = false;
  for (const auto& e : c.Events(crashed.id())) {
    if (e.has_error() && e.error().message().find("exited with code 3") != std::string::npos)
      saw_error = true;
    if (e.has_log() && e.log().text().find("resuming at step 10") != std::string::npos)
      resumed = true;
  }
  EXPECT_TRUE(saw_error);
  EXPECT_TRUE(resumed);
}

TEST(System, CrashWithNoRestartsLeftFails) {
  Cluster c;
  c.StartCoordinator();
  c.StartAgent("host-a", 1);
  ASSERT_TRUE(c.WaitAgents(1));
  v1::JobSpec spec = c.Spec(1, 20, 5);
  spec.set_max_restarts(0);
  (*spec.mutable_labels())["test.crash_at_step"] = "3";
  (*spec.mutable_labels())["test.crash_rank"] = "0";
  (*spec.mutable_labels())["test.crash_attempt"] = "0";
  v1::Job job = c.Submit(spec);
  ASSERT_TRUE(c.WaitState(job.id(), v1::FAILED));
  EXPECT_NE(c.GetJob(job.id()).state_reason().find("exited with code 3"), std::string::npos);
}

TEST(System, DeadAgentsJobIsRescheduledElsewhere) {
  Cluster c;
  c.StartCoordinator();
  int a = c.StartAgent("host-a", 1);
  ASSERT_TRUE(c.WaitAgents(1));
  v1::Job job = c.Submit(c.Spec(1, 60, 5));
  ASSERT_TRUE(c.WaitFor_Step(job.id(), 3));
  c.StartAgent("host-b", 1);
  ASSERT_TRUE(c.WaitAgents(2));
  c.agent(a).Signal(SIGKILL);
  c.agent(a).Wait(seconds(5));
  ASSERT_TRUE(WaitFor([&] { return c.GetJob(job.id()).restarts() == 1; }, seconds(30)));
  ASSERT_TRUE(c.WaitState(job.id(), v1::SUCCEEDED, seconds(60)))
      << c.GetJob(job.id()).state_reason();
  v1::Job done = c.GetJob(job.id());
  ASSERT_EQ(done.placement_size(), 1);
  EXPECT_EQ(done.placement(0).host(), "host-b");
}

TEST(System, CancelMidRunSavesCheckpointAndCancels) {
  Cluster c;
  c.StartCoordinator();
  c.StartAgent("host-a", 2);
  ASSERT_TRUE(c.WaitAgents(1));
  v1::Job job = c.Submit(c.Spec(2, 1000, 1000));
  ASSERT_TRUE(c.WaitFor_Step(job.id(), 5));
  ASSERT_TRUE(c.Cancel(job.id()).ok());
  ASSERT_TRUE(c.WaitState(job.id(), v1::CANCELLED, seconds(20)));
  auto ck = c.Checkpoints(job.id());
  ASSERT_GE(ck.size(), 1u);
  EXPECT_GE(ck[0].step(), 5);
  EXPECT_EQ(c.Cancel(job.id()).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
}

TEST(System, SecondJobWaitsForSlotsAndPriorityGoesFirst) {
  Cluster c;
  c.StartCoordinator();
  c.StartAgent("host-a", 2);
  ASSERT_TRUE(c.WaitAgents(1));
  v1::Job first = c.Submit(c.Spec(2, 15, 100));
  v1::Job low = c.Submit(c.Spec(2, 5, 100));
  v1::JobSpec urgent = c.Spec(2, 5, 100);
  urgent.set_priority(10);
  v1::Job high = c.Submit(urgent);
  v1::Job waiting = c.GetJob(low.id());
  EXPECT_EQ(waiting.state(), v1::QUEUED);
  EXPECT_EQ(waiting.reason_code(), "jobs_ahead");
  EXPECT_EQ(c.GetJob(high.id()).reason_code(), "slots_missing");
  ASSERT_TRUE(c.WaitState(low.id(), v1::SUCCEEDED, seconds(60)));
  EXPECT_LT(c.GetJob(high.id()).update_time_unix_ms(), c.GetJob(low.id()).update_time_unix_ms());
  auto hs = c.Events(high.id());
  auto ls = c.Events(low.id());
  int64_t high_sched = 0, low_sched = 0;
  for (const auto& e : hs)
    if (e.has_state_change() && e.state_change().to() == v1::SCHEDULED) high_sched = e.time_unix_ms();
  for (const auto& e : ls)
    if (e.has_state_change() && e.state_change().to() == v1::SCHEDULED) low_sched = e.time_unix_ms();
  EXPECT_LT(high_sched, low_sched);
}

// Live watchers, one from the start and one resuming mid-run with after_seq,
// see exactly the stored history; a watcher without a token is refused.
TEST(System, FollowingWatchersSeeEveryEventOnce) {
  Cluster c;
  c.StartCoordinator();
  c.StartAgent("host-a", 2);
  ASSERT_TRUE(c.WaitAgents(1));
  v1::Job job = c.Submit(c.Spec(2, 25, 5));
  auto stub = c.Client();
  auto follow = [&](int64_t after, std::vector<v1::JobEvent>* out, grpc::Status* st) {
    grpc::ClientContext ctx;
    c.AddAuth(&ctx);
    v1::WatchJobRequest req;
    req.set_job_id(job.id());
    req.set_after_seq(after);
    req.set_follow(true);
    auto reader = stub->WatchJob(&ctx, req);
    v1::WatchJobResponse r;
    while (reader->Read(&r))
      for (const auto& e : r.events()) out->push_back(e);
    *st = reader->Finish();
  };
  std::vector<v1::JobEvent> from_start, resumed;
  grpc::Status st1, st2;
  std::thread t1(follow, 0, &from_start, &st1);
  ASSERT_TRUE(c.WaitFor_Step(job.id(), 10));
  const int64_t mid = c.GetJob(job.id()).last_event_seq();
  std::thread t2(follow, mid, &resumed, &st2);
  t1.join();
  t2.join();
  ASSERT_TRUE(st1.ok()) << st1.error_message();
  ASSERT_TRUE(st2.ok()) << st2.error_message();
  auto stored = c.Events(job.id());
  ASSERT_EQ(from_start.size(), stored.size());
  for (size_t i = 0; i < stored.size(); ++i)
    EXPECT_EQ(from_start[i].SerializeAsString(), stored[i].SerializeAsString()) << i;
  ASSERT_EQ(resumed.size(), stored.size() - mid);
  EXPECT_EQ(resumed.front().seq(), mid + 1);
  EXPECT_EQ(from_start.back().state_change().to(), v1::SUCCEEDED);

  grpc::ClientContext ctx;  // no token
  v1::WatchJobRequest req;
  req.set_job_id(job.id());
  auto reader = stub->WatchJob(&ctx, req);
  v1::WatchJobResponse r;
  EXPECT_FALSE(reader->Read(&r));
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::UNAUTHENTICATED);
}

// The fifty malformed specs of bad_specs.h, sent the two ways users send
// them: `ftune submit` refuses each locally (exit 2, key named, no RPC), and
// CreateJob refuses every one that is a well-formed JobSpec with
// INVALID_ARGUMENT naming the key. Nothing is stored either way.
TEST(System, FiftyMalformedSpecsAreRefusedAndNothingIsStored) {
  Cluster c;
  c.StartCoordinator();
  c.StartAgent("host-a", 1);
  ASSERT_TRUE(c.WaitAgents(1));
  auto stub = c.Client();
  int via_grpc = 0;
  int i = 0;
  for (const BadSpec& b : kBadSpecs) {
    const std::string file = c.dir() + "/bad-" + std::to_string(i++) + ".yaml";
    { std::ofstream(file) << b.yaml; }
    const std::string out_file = file + ".out";
    const std::string cmd = std::string(FTUNE_CLI_BIN) + " --coordinator " + c.address() +
                            " --token-file " + c.dir() + "/client.token submit " + file + " >" +
                            out_file + " 2>&1";
    const int rc = std::system(cmd.c_str());
    ASSERT_TRUE(WIFEXITED(rc));
    EXPECT_EQ(WEXITSTATUS(rc), 2) << b.yaml;
    EXPECT_NE(ReadFile(out_file).find(b.key), std::string::npos)
        << "ftune submit output does not name '" << b.key << "': " << ReadFile(out_file);

    v1::JobSpec spec;
    std::vector<std::string> parse_errors;
    if (!ParseJobSpecYaml(b.yaml, &spec, &parse_errors)) continue;  // not a JobSpec at all
    grpc::ClientContext ctx;
    c.AddAuth(&ctx);
    v1::CreateJobRequest req;
    *req.mutable_spec() = spec;
    v1::Job job;
    grpc::Status st = stub->CreateJob(&ctx, req, &job);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << b.yaml;
    EXPECT_NE(st.error_message().find(b.key), std::string::npos)
        << "CreateJob error does not name '" << b.key << "': " << st.error_message();
    ++via_grpc;
  }
  EXPECT_GE(via_grpc, 35);
  grpc::ClientContext ctx;
  c.AddAuth(&ctx);
  v1::ListJobsResponse r;
  ASSERT_TRUE(stub->ListJobs(&ctx, {}, &r).ok());
  EXPECT_EQ(r.jobs_size(), 0);
}

TEST(System, AuthAndValidationErrorsStoreNothing) {
  Cluster c;
  c.StartCoordinator();
  c.StartAgent("host-a", 1);
  ASSERT_TRUE(c.WaitAgents(1));
  auto stub = c.Client();
  {
    grpc::ClientContext ctx;  // no token
    v1::ListJobsResponse r;
    EXPECT_EQ(stub->ListJobs(&ctx, {}, &r).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
  {
    grpc::ClientContext ctx;
    c.AddAuth(&ctx, c.agent_token());  // the agent token is not a client token
    v1::ListJobsResponse r;
    EXPECT_EQ(stub->ListJobs(&ctx, {}, &r).error_code(), grpc::StatusCode::PERMISSION_DENIED);
  }
  v1::JobSpec bad = c.Spec(1, 5, 5);
  bad.mutable_lora()->set_lora_dropout(3);
  grpc::ClientContext ctx;
  c.AddAuth(&ctx);
  v1::CreateJobRequest req;
  *req.mutable_spec() = bad;
  v1::Job job;
  auto st = stub->CreateJob(&ctx, req, &job);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(st.error_message().find("lora.lora_dropout (3)"), std::string::npos);
  v1::JobSpec huge = c.Spec(64, 5, 5);
  grpc::ClientContext ctx2;
  c.AddAuth(&ctx2);
  *req.mutable_spec() = huge;
  st = stub->CreateJob(&ctx2, req, &job);
  EXPECT_EQ(st.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  grpc::ClientContext ctx3;
  c.AddAuth(&ctx3);
  v1::ListJobsResponse r;
  ASSERT_TRUE(stub->ListJobs(&ctx3, {}, &r).ok());
  EXPECT_EQ(r.jobs_size(), 0);
}

}  // namespace
}  // namespace ftune::testing
