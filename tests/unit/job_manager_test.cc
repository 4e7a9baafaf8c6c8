// The coordinator's managers driven by hand, through the JobManager's eyes:
// fake clock, fake agent links, real SQLite store.
#include <chrono>
#include <future>
#include <memory>
#include <thread>

#include <gtest/gtest.h>

#include <mutex>
#include <utility>

#include "coordinator.h"
#include "full_disk.h"
#include "jobspec.h"
#include "temp_dir.h"

namespace ftune::server {
namespace {

class FakeLink : public AgentLink {
 public:
  void Send(const v1::CoordinatorToAgent& msg) override { sent.push_back(msg); }
  void Disconnect() override { disconnected = true; }
  std::vector<v1::Assignment> Assignments() const {
    std::vector<v1::Assignment> out;
    for (const auto& m : sent)
      if (m.has_assign()) out.push_back(m.assign());
    return out;
  }
  std::vector<v1::StopJob> Stops() const {
    std::vector<v1::StopJob> out;
    for (const auto& m : sent)
      if (m.has_stop()) out.push_back(m.stop());
    return out;
  }
  std::vector<v1::CoordinatorToAgent> sent;
  bool disconnected = false;
};

// What the managers reported: dropped events by reason, and which jobs
// started (with their restarts so far), restarted and ended.
class RecordingMetrics : public MetricsSink {
 public:
  void JobStates(const std::map<v1::JobState, int>&) override {}
  void Fleet(int, int, int, int) override {}
  void Step(const std::string&, int, const v1::StepMetrics&) override {}
  void Memory(const std::string&, int, const v1::MemoryStats&) override {}
  void CheckpointSaved(const std::string&, int64_t) override {}
  void JobStarted(const std::string& job, int64_t restarts) override {
    Log("started " + job + " " + std::to_string(restarts));
  }
  void Restarted(const std::string& job) override { Log("restarted " + job); }
  void JobEnded(const std::string& job) override { Log("ended " + job); }
  void EventsIngested(int) override {}
  void EventsDropped(const std::string& reason, int n) override {
    std::lock_guard<std::mutex> lock(mu);
    dropped[reason] += n;
  }
  // The job log since the last Take.
  std::vector<std::string> Take() {
    std::lock_guard<std::mutex> lock(mu);
    return std::exchange(log, {});
  }
  std::mutex mu;
  std::map<std::string, int> dropped;
  std::vector<std::string> log;

 private:
  void Log(std::string line) {
    std::lock_guard<std::mutex> lock(mu);
    log.push_back(std::move(line));
  }
};

class JobManagerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    store_ = std::move(*Store::Open(":memory:"));
    Restart();
  }
  void Restart() {
    ManagerOptions o = options_;
    o.agent_timeout_ms = 10000;
    o.grace_seconds = 5;
    o.plan_device_bytes = plan_;
    coordinator_.reset();
    coordinator_ = std::make_unique<Coordinator>(store_.get(), &clock_, &bus_, &metrics_, o);
    manager_ = &coordinator_->jobs();
    agents_ = &coordinator_->agents();
    events_ = &coordinator_->events();
    ASSERT_TRUE(coordinator_->Recover().ok());
  }
  std::shared_ptr<FakeLink> Register(const std::string& id, int slots,
                                     std::vector<v1::RunningRank> running = {},
                                     int64_t last_seq = 0, int64_t slot_memory = 80LL << 30) {
    v1::RegisterAgent reg;
    reg.set_agent_id(id);
    reg.set_host(id + "-host");
    for (int i = 0; i < slots; ++i) {
      auto* s = reg.add_slots();
      s->set_index(i);
      s->set_memory_bytes(slot_memory);
    }
    for (auto& r : running) *reg.add_running() = r;
    reg.set_last_agent_seq(last_seq);
    // A registering agent's previous stream has ended (a second live one
    // would be refused).
    if (auto old = links_.find(id); old != links_.end())
      agents_->AgentDisconnected(id, old->second.get());
    auto link = std::make_shared<FakeLink>();
    EXPECT_TRUE(agents_->RegisterAgent(reg, link).ok());
    links_[id] = link;
    return link;
  }
  v1::JobSpec Spec(int ranks, int max_restarts = 2, int priority = 0) {
    v1::JobSpec s;
    s.mutable_model()->set_model_name_or_path("/models/tiny");
    s.mutable_dataset()->add_data_files("/data/train.jsonl");
    s.mutable_resources()->set_num_ranks(ranks);
    s.set_max_restarts(max_restarts);
    s.set_priority(priority);
    return s;
  }
  // Sends one rank event from an agent, as the agent would.
  int64_t Send(const std::string& agent, const std::string& job, int attempt, int rank,
               const std::function<void(v1::RankEvent*)>& fill) {
    v1::RankEventBatch b;
    auto* e = b.add_events();
    e->set_agent_seq(++seq_[agent]);
    e->set_job_id(job);
    e->set_attempt(attempt);
    e->set_rank(rank);
    e->set_time_unix_ms(absl::ToUnixMillis(clock_.Now()));
    fill(e);
    last_batch_ = b;
    auto acked = events_->IngestEvents(agent, b);
    EXPECT_TRUE(acked.ok()) << acked.status();
    return acked.ok() ? *acked : -1;
  }
  void Hello(const std::string& agent, const std::string& job, int attempt, int rank) {
    Send(agent, job, attempt, rank, [&](v1::RankEvent* e) {
      e->mutable_message()->mutable_hello()->set_rank(rank);
    });
  }
  void Exit(const std::string& agent, const std::string& job, int attempt, int rank, int code) {
    Send(agent, job, attempt, rank, [&](v1::RankEvent* e) {
      e->mutable_exit()->set_exit_code(code);
      if (code != 0) e->mutable_exit()->add_stderr_tail("CUDA error: out of memory");
    });
  }
  void Checkpoint(const std::string& agent, const std::string& job, int attempt, int step) {
    Send(agent, job, attempt, 0, [&](v1::RankEvent* e) {
      auto* c = e->mutable_message()->mutable_checkpoint();
      c->set_step(step);
      c->set_path("/out/checkpoint-" + std::to_string(step));
      c->set_complete(true);
    });
  }
  v1::Job Get(const std::string& id) { return *manager_->GetJob(id); }
  // The store on disk from here on, so that KillAndReopen can start from its
  // file alone.
  void UseStoreOnDisk() {
    state_dir_ = std::make_unique<testutil::TempDir>("ftune-jm");
    coordinator_.reset();
    store_ = std::move(*Store::Open(state_dir_->path() + "/state"));
    Restart();
  }
  // As after kill -9 of the coordinator: only what the store committed is
  // left; the next process loads its job index from the rows.
  void KillAndReopen() {
    coordinator_.reset();
    store_.reset();
    auto reopened = Store::Open(state_dir_->path() + "/state");
    ASSERT_TRUE(reopened.ok()) << reopened.status();
    store_ = std::move(*reopened);
    Restart();
  }
  // The in-memory queue is what a fresh load of the stored rows gives.
  void ExpectIndexMatchesStore() {
    const absl::Status st = store_->CheckJobIndex();
    EXPECT_TRUE(st.ok()) << st;
  }
  // The queue in scheduling order, from the index.
  std::vector<std::string> Queue() {
    std::vector<std::string> ids;
    store_->ForEachQueuedJob([&](const IndexedJob& j) {
      ids.push_back(j.id);
      return true;
    });
    return ids;
  }
  std::vector<v1::JobEvent> Events(const std::string& id) {
    return *events_->ReadEvents(id, 0, 100000);
  }

  RecordingMetrics metrics_;
  // The coordinator's memory plan (main.cc wires PlanMemory); none by default.
  std::function<absl::StatusOr<int64_t>(const v1::JobSpec&)> plan_;
  // Paths, caps, retention: what Restart() builds the coordinator with.
  ManagerOptions options_;
  FakeClock clock_;
  EventBus bus_;
  std::unique_ptr<Store> store_;
  std::unique_ptr<Coordinator> coordinator_;
  JobManager* manager_ = nullptr;
  AgentManager* agents_ = nullptr;
  EventManager* events_ = nullptr;
  std::map<std::string, int64_t> seq_;
  std::map<std::string, std::shared_ptr<FakeLink>> links_;
  v1::RankEventBatch last_batch_;
  std::unique_ptr<testutil::TempDir> state_dir_;
};

TEST_F(JobManagerTest, MemoryPlanDecidesWhichSlotsAJobMayUse) {
  // The plan reads the model's config; here it is a table by model path.
  plan_ = [](const v1::JobSpec& spec) -> absl::StatusOr<int64_t> {
    const std::string& m = spec.model().model_name_or_path();
    if (m == "/models/70b") return int64_t{60} << 30;
    if (m == "/models/405b") return int64_t{100} << 30;
    return absl::NotFoundError(m + "/config.json: not readable here");
  };
  Restart();
  Register("small", 2, {}, 0, int64_t{40} << 30);
  Register("big", 2, {}, 0, int64_t{80} << 30);
  v1::JobSpec huge = Spec(1);
  huge.mutable_model()->set_model_name_or_path("/models/405b");
  auto r = manager_->CreateJob(huge, "");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(r.status().message().find("memory plan needs 100GiB"), std::string::npos)
      << r.status().message();
  EXPECT_TRUE(manager_->ListJobs({})->jobs.empty());  // nothing stored

  v1::JobSpec big = Spec(2);
  big.mutable_model()->set_model_name_or_path("/models/70b");
  r = manager_->CreateJob(big, "");
  ASSERT_TRUE(r.ok()) << r.status();
  v1::Job job = *manager_->GetJob(r->id());
  EXPECT_EQ(job.planned_device_bytes(), int64_t{60} << 30);
  ASSERT_EQ(job.placement_size(), 2);
  for (const auto& p : job.placement()) EXPECT_EQ(p.agent_id(), "big");

  // No plan (config not readable here): only the spec's own minimum counts.
  r = manager_->CreateJob(Spec(2), "");
  ASSERT_TRUE(r.ok()) << r.status();
  job = *manager_->GetJob(r->id());
  EXPECT_EQ(job.planned_device_bytes(), 0);
  ASSERT_EQ(job.placement_size(), 2);
  for (const auto& p : job.placement()) EXPECT_EQ(p.agent_id(), "small");
}

TEST_F(JobManagerTest, RefusesWhatNoFleetCanRunAndBadSpecs) {
  auto r = manager_->CreateJob(Spec(1), "");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
  Register("a", 2);
  r = manager_->CreateJob(Spec(3), "");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(r.status().message().find("needs 3 ranks"), std::string::npos);
  v1::JobSpec bad = Spec(1);
  bad.mutable_training()->set_gradient_accumulation_steps(-1);
  r = manager_->CreateJob(bad, "");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("training.gradient_accumulation_steps (-1)"),
            std::string::npos);
  EXPECT_TRUE(manager_->ListJobs({})->jobs.empty());  // nothing stored
}

TEST_F(JobManagerTest, HappyPathWithGapFreeEvents) {
  auto link = Register("a", 2);
  auto job = manager_->CreateJob(Spec(2), "req-1");
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->state(), v1::SCHEDULED);
  ASSERT_EQ(link->Assignments().size(), 1u);
  EXPECT_EQ(link->Assignments()[0].ranks_size(), 2);
  EXPECT_EQ(link->Assignments()[0].world_size(), 2);
  // Idempotent create.
  auto again = manager_->CreateJob(Spec(2), "req-1");
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->id(), job->id());
  EXPECT_EQ(manager_->ListJobs({})->jobs.size(), 1u);

  const std::string id = job->id();
  Hello("a", id, 0, 0);
  EXPECT_EQ(Get(id).state(), v1::SCHEDULED);
  Hello("a", id, 0, 1);
  EXPECT_EQ(Get(id).state(), v1::RUNNING);
  Send("a", id, 0, 0, [](v1::RankEvent* e) {
    e->mutable_message()->mutable_step()->set_step(1);
    e->mutable_message()->mutable_step()->set_loss(2.5);
  });
  Checkpoint("a", id, 0, 1);
  Send("a", id, 0, 0, [](v1::RankEvent* e) {
    e->mutable_message()->mutable_done()->set_adapter_path("/out/adapter");
  });
  Exit("a", id, 0, 0, 0);
  Exit("a", id, 0, 1, 0);
  v1::Job done = Get(id);
  EXPECT_EQ(done.state(), v1::SUCCEEDED);
  EXPECT_EQ(done.last_step(), 1);
  EXPECT_DOUBLE_EQ(done.last_loss(), 2.5);
  EXPECT_EQ(done.adapter_path(), "/out/adapter");
  EXPECT_EQ(manager_->ListCheckpoints(id)->size(), 1u);
  auto events = Events(id);
  for (size_t i = 0; i < events.size(); ++i) EXPECT_EQ(events[i].seq(), int64_t(i + 1));
  EXPECT_EQ(events.back().state_change().to(), v1::SUCCEEDED);
  EXPECT_EQ(done.last_event_seq(), events.back().seq());
}

TEST_F(JobManagerTest, ResentBatchIsStoredOnce) {
  Register("a", 1);
  auto job = manager_->CreateJob(Spec(1), "");
  Hello("a", job->id(), 0, 0);
  const size_t n = Events(job->id()).size();
  auto acked = events_->IngestEvents("a", last_batch_);  // the agent resends after a reconnect
  ASSERT_TRUE(acked.ok());
  EXPECT_EQ(*acked, 1);
  EXPECT_EQ(Events(job->id()).size(), n);
}

TEST_F(JobManagerTest, RankCrashRestartsGangFromLatestCheckpoint) {
  auto link = Register("a", 2);
  const std::string id = manager_->CreateJob(Spec(2, /*max_restarts=*/1), "")->id();
  Hello("a", id, 0, 0);
  Hello("a", id, 0, 1);
  Checkpoint("a", id, 0, 10);
  Exit("a", id, 0, 1, 3);
  v1::Job j = Get(id);
  EXPECT_EQ(j.state(), v1::RESTARTING);
  EXPECT_EQ(j.reason_code(), "rank_failed");
  EXPECT_NE(j.state_reason().find("exited with code 3: CUDA error: out of memory"),
            std::string::npos)
      << j.state_reason();
  ASSERT_EQ(link->Stops().size(), 1u);
  EXPECT_FALSE(link->Stops()[0].save_checkpoint());
  Exit("a", id, 0, 0, -15);  // the survivor, stopped
  j = Get(id);
  EXPECT_EQ(j.state(), v1::SCHEDULED);  // requeued and placed again
  EXPECT_EQ(j.attempt(), 1);
  EXPECT_EQ(j.restarts(), 1);
  ASSERT_EQ(link->Assignments().size(), 2u);
  EXPECT_EQ(link->Assignments()[1].attempt(), 1);
  EXPECT_EQ(link->Assignments()[1].resume_checkpoint(), "/out/checkpoint-10");
  // A late event of attempt 0 must not move attempt 1.
  Exit("a", id, 0, 1, 0);
  EXPECT_EQ(Get(id).state(), v1::SCHEDULED);
  // Second crash: no restarts left.
  Hello("a", id, 1, 0);
  Hello("a", id, 1, 1);
  Exit("a", id, 1, 0, 1);
  j = Get(id);
  EXPECT_EQ(j.state(), v1::FAILED);
  EXPECT_NE(j.state_reason().find("no restarts left"), std::string::npos);
}

TEST_F(JobManagerTest, ExitCode2FailsAtOnceWithoutRestarting) {
  auto link = Register("a", 2);
  const std::string id = manager_->CreateJob(Spec(2, /*max_restarts=*/3), "")->id();
  Hello("a", id, 0, 0);
  Hello("a", id, 0, 1);
  Exit("a", id, 0, 1, 2);  // bad spec or input
  v1::Job j = Get(id);
  EXPECT_EQ(j.state(), v1::FAILED);
  EXPECT_EQ(j.reason_code(), "bad_input");
  EXPECT_EQ(j.restarts(), 0);
  EXPECT_NE(j.state_reason().find("would not fix"), std::string::npos) << j.state_reason();
  ASSERT_EQ(link->Stops().size(), 1u);  // the survivor is stopped
  EXPECT_EQ(link->Assignments().size(), 1u);
}

TEST_F(JobManagerTest, DeadAgentFailsItsRanks) {
  Register("a", 1);
  const std::string id = manager_->CreateJob(Spec(1, /*max_restarts=*/0), "")->id();
  Hello("a", id, 0, 0);
  clock_.Advance(absl::Seconds(5));
  coordinator_->Tick();
  EXPECT_EQ(Get(id).state(), v1::RUNNING);
  clock_.Advance(absl::Seconds(20));
  coordinator_->Tick();
  v1::Job j = Get(id);
  EXPECT_EQ(j.state(), v1::FAILED);
  EXPECT_NE(j.state_reason().find("sent no heartbeat"), std::string::npos) << j.state_reason();
  auto agents = agents_->ListAgents();
  ASSERT_EQ(agents.size(), 1u);
  EXPECT_FALSE(agents[0].alive());
}

// An agent paused past the heartbeat timeout while its stream stayed open:
// its rank kept running. The gang restarts once; nothing the old rank says
// afterwards moves the job, and the agent, made to register again, is told
// to kill it.
TEST_F(JobManagerTest, RanksOfAnAttemptDeclaredLostMoveNothing) {
  auto paused = Register("a", 1);
  const std::string id = manager_->CreateJob(Spec(1, /*max_restarts=*/2), "")->id();
  Hello("a", id, 0, 0);
  Checkpoint("a", id, 0, 10);
  clock_.Advance(absl::Seconds(20));
  coordinator_->Tick();
  EXPECT_TRUE(paused->disconnected);
  v1::Job j = Get(id);
  EXPECT_EQ(j.state(), v1::QUEUED);  // requeued; its only agent is dead
  EXPECT_EQ(j.attempt(), 1);
  const size_t num_events = Events(id).size();

  // The old rank goes on: a checkpoint, the end with an adapter, its exit.
  Checkpoint("a", id, 0, 20);
  Send("a", id, 0, 0, [](v1::RankEvent* e) {
    e->mutable_message()->mutable_done()->set_adapter_path("/out/adapter");
  });
  Exit("a", id, 0, 0, 0);
  j = Get(id);
  EXPECT_EQ(j.state(), v1::QUEUED);
  EXPECT_EQ(j.resume_checkpoint(), "/out/checkpoint-10");
  EXPECT_TRUE(j.adapter_path().empty());
  EXPECT_EQ(manager_->ListCheckpoints(id)->size(), 1u);
  EXPECT_EQ(Events(id).size(), num_events);
  EXPECT_EQ(metrics_.dropped["stale_attempt"], 3);

  // Back on a new stream, still running the old rank: it is stale, and
  // attempt 1 starts from checkpoint 10.
  v1::RunningRank old;
  old.set_job_id(id);
  old.set_attempt(0);
  old.set_rank(0);
  auto back = Register("a", 1, {old}, /*last_seq=*/seq_["a"]);
  ASSERT_TRUE(back->sent[0].has_registered());
  ASSERT_EQ(back->sent[0].registered().stale_size(), 1);
  EXPECT_EQ(back->sent[0].registered().stale(0).attempt(), 0);
  coordinator_->Tick();
  ASSERT_EQ(back->Assignments().size(), 1u);
  EXPECT_EQ(back->Assignments()[0].attempt(), 1);
  EXPECT_EQ(back->Assignments()[0].resume_checkpoint(), "/out/checkpoint-10");
  EXPECT_EQ(Get(id).restarts(), 1);
}

TEST_F(JobManagerTest, EventsForARankPlacedOnAnotherAgentAreDropped) {
  Register("a", 1);
  Register("b", 1);
  const std::string id = manager_->CreateJob(Spec(1), "")->id();
  const std::string holder = Get(id).placement(0).agent_id();
  const std::string other = holder == "a" ? "b" : "a";
  Hello(holder, id, 0, 0);
  Checkpoint(other, id, 0, 5);
  Exit(other, id, 0, 0, 1);
  Hello(other, id, 0, 7);  // a rank the job does not have
  v1::Job j = Get(id);
  EXPECT_EQ(j.state(), v1::RUNNING);
  EXPECT_TRUE(j.resume_checkpoint().empty());
  EXPECT_EQ(metrics_.dropped["not_placed"], 3);
  Send("a", "job-nope", 0, 0, [](v1::RankEvent* e) {
    e->mutable_message()->mutable_log()->set_text("hi");
  });
  EXPECT_EQ(metrics_.dropped["unknown_job"], 1);
}

TEST_F(JobManagerTest, RendezvousOnlyFromTheAgentOfRank0) {
  auto a = Register("a", 1);
  auto b = Register("b", 1);
  auto c = Register("c", 1);
  v1::JobSpec spec = Spec(2);
  spec.mutable_resources()->set_placement("spread");
  const std::string id = manager_->CreateJob(spec, "")->id();
  const v1::Job job = Get(id);
  ASSERT_EQ(job.placement_size(), 2);
  std::string rank0, rank1;
  for (const auto& pl : job.placement()) (pl.rank() == 0 ? rank0 : rank1) = pl.agent_id();
  std::string outsider = "c";
  for (const std::string x : {"a", "b", "c"})
    if (x != rank0 && x != rank1) outsider = x;
  auto rendezvous_count = [&](const std::shared_ptr<FakeLink>& link) {
    int n = 0;
    for (const auto& m : link->sent) n += m.has_rendezvous();
    return n;
  };
  v1::RendezvousPublish pub;
  pub.set_job_id(id);
  pub.set_attempt(0);
  pub.set_data("tcp://evil:1");
  // Neither an agent outside the job nor the one of rank 1 leads its ranks.
  EXPECT_FALSE(manager_->Rendezvous(outsider, pub));
  EXPECT_FALSE(manager_->Rendezvous(rank1, pub));
  EXPECT_EQ(rendezvous_count(a) + rendezvous_count(b) + rendezvous_count(c), 0);
  EXPECT_EQ(metrics_.dropped["rendezvous_not_placed"], 2);
  pub.set_data("tcp://rank0:1");
  EXPECT_TRUE(manager_->Rendezvous(rank0, pub));
  EXPECT_EQ(rendezvous_count(a) + rendezvous_count(b) + rendezvous_count(c), 2);
}

TEST_F(JobManagerTest, JobsRecordTheirOwnerAndRequestIdsDoNotCrossOwners) {
  Register("a", 1);
  auto alice = manager_->CreateJob(Spec(1), "req-1", "alice");
  ASSERT_TRUE(alice.ok()) << alice.status();
  EXPECT_EQ(alice->owner(), "alice");
  EXPECT_EQ(Get(alice->id()).owner(), "alice");
  // Alice retrying gets her job; Bob with the same id neither gets it nor
  // learns its id.
  EXPECT_EQ(manager_->CreateJob(Spec(1), "req-1", "alice")->id(), alice->id());
  auto bob = manager_->CreateJob(Spec(1), "req-1", "bob");
  EXPECT_EQ(bob.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(bob.status().message().find(alice->id()), std::string::npos) << bob.status();
  ASSERT_TRUE(manager_->CreateJob(Spec(1), "req-2", "bob").ok());

  v1::ListJobsRequest req;
  req.set_owner("bob");
  auto listed = manager_->ListJobs(req);
  ASSERT_TRUE(listed.ok());
  ASSERT_EQ(listed->jobs.size(), 1u);
  EXPECT_EQ(listed->jobs[0].owner(), "bob");
  req.clear_owner();
  EXPECT_EQ(manager_->ListJobs(req)->jobs.size(), 2u);
}

TEST_F(JobManagerTest, CancelStopsWithCheckpointThenCancels) {
  auto link = Register("a", 1);
  const std::string id = manager_->CreateJob(Spec(1), "")->id();
  Hello("a", id, 0, 0);
  auto c = manager_->CancelJob(id);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->state(), v1::CANCELLING);
  ASSERT_EQ(link->Stops().size(), 1u);
  EXPECT_TRUE(link->Stops()[0].save_checkpoint());
  Checkpoint("a", id, 0, 7);
  Exit("a", id, 0, 0, 0);
  EXPECT_EQ(Get(id).state(), v1::CANCELLED);
  EXPECT_EQ(manager_->ListCheckpoints(id)->back().step(), 7);
  EXPECT_EQ(manager_->CancelJob(id).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(manager_->CancelJob("job-nope").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(JobManagerTest, SecondJobWaitsWithReasonThenRuns) {
  Register("a", 2);
  const std::string first = manager_->CreateJob(Spec(2), "")->id();
  const std::string second = manager_->CreateJob(Spec(1), "")->id();
  v1::Job w = Get(second);
  EXPECT_EQ(w.state(), v1::QUEUED);
  EXPECT_EQ(w.reason_code(), "slots_missing");
  EXPECT_NE(w.state_reason().find("0 such slots free"), std::string::npos) << w.state_reason();
  Hello("a", first, 0, 0);
  Hello("a", first, 0, 1);
  Exit("a", first, 0, 0, 0);
  Exit("a", first, 0, 1, 0);
  EXPECT_EQ(Get(second).state(), v1::SCHEDULED);
}

TEST_F(JobManagerTest, SurvivesCoordinatorRestart) {
  Register("a", 1);
  const std::string id = manager_->CreateJob(Spec(1), "")->id();
  Hello("a", id, 0, 0);
  Restart();  // same store, fresh manager: as after kill -9
  v1::RunningRank rr;
  rr.set_job_id(id);
  rr.set_attempt(0);
  rr.set_rank(0);
  auto link = Register("a", 1, {rr}, seq_["a"]);
  EXPECT_TRUE(link->sent[0].registered().stale().empty());
  EXPECT_EQ(link->sent[1].ack().agent_seq(), seq_["a"]);
  EXPECT_EQ(Get(id).state(), v1::RUNNING);
  Exit("a", id, 0, 0, 0);
  EXPECT_EQ(Get(id).state(), v1::SUCCEEDED);
}

// Per-job counters exist from the job's start (a dashboard's restarts panel
// has data before any restart): JobStarted when the gang runs, with the
// restarts so far, and again for live jobs a restarted coordinator recovers.
TEST_F(JobManagerTest, MetricsHearOfAJobWhenItStartsAndWhenItIsRecovered) {
  RecordingMetrics& metrics = metrics_;
  Register("a", 1);
  const std::string id = manager_->CreateJob(Spec(1, /*max_restarts=*/1), "")->id();
  metrics.Take();
  Hello("a", id, 0, 0);
  EXPECT_EQ(metrics.Take(), std::vector<std::string>{"started " + id + " 0"});
  Exit("a", id, 0, 0, 1);
  EXPECT_EQ(metrics.Take(), std::vector<std::string>{"restarted " + id});
  Hello("a", id, 1, 0);
  EXPECT_EQ(metrics.Take(), std::vector<std::string>{"started " + id + " 1"});
  Restart();  // a new coordinator over the same store
  EXPECT_EQ(metrics.Take(), std::vector<std::string>{"started " + id + " 1"});
  v1::RunningRank rr;
  rr.set_job_id(id);
  rr.set_attempt(1);
  rr.set_rank(0);
  Register("a", 1, {rr}, seq_["a"]);
  for (const std::string& e : metrics.Take()) EXPECT_EQ(e, "started " + id + " 1");
  Exit("a", id, 1, 0, 0);
  EXPECT_EQ(metrics.Take(), std::vector<std::string>{"ended " + id});
}

TEST_F(JobManagerTest, AgentRestartedWithoutItsRankMeansLost) {
  Register("a", 1);
  const std::string id = manager_->CreateJob(Spec(1, 0), "")->id();
  Hello("a", id, 0, 0);
  // The agent comes back with nothing running and nothing left in its spool.
  Register("a", 1, {}, seq_["a"]);
  v1::Job j = Get(id);
  EXPECT_EQ(j.state(), v1::FAILED);
  EXPECT_NE(j.state_reason().find("was lost"), std::string::npos);
}

TEST_F(JobManagerTest, RanksNoJobWantsAreStaleWhenTheirAgentRegisters) {
  Register("a", 2);
  const std::string live = manager_->CreateJob(Spec(1), "")->id();
  const std::string cancelled = manager_->CreateJob(Spec(1), "")->id();
  Hello("a", live, 0, 0);
  Hello("a", cancelled, 0, 0);
  ASSERT_TRUE(manager_->CancelJob(cancelled).ok());
  auto agents = agents_->ListAgents();
  ASSERT_EQ(agents.size(), 1u);
  ASSERT_EQ(agents[0].used_size(), 2);
  EXPECT_EQ(agents[0].used(0).job_id(), live);

  auto running = [](const std::string& job, int attempt) {
    v1::RunningRank r;
    r.set_job_id(job);
    r.set_attempt(attempt);
    r.set_rank(0);
    return r;
  };
  auto link = Register("a", 2,
                       {running(live, 0), running(live, 1), running(cancelled, 0),
                        running("job-999999", 0)},
                       seq_["a"]);
  const auto& stale = link->sent[0].registered().stale();
  ASSERT_EQ(stale.size(), 3);
  EXPECT_EQ(stale[0].job_id(), live);  // an attempt that is not the job's
  EXPECT_EQ(stale[0].attempt(), 1);
  EXPECT_EQ(stale[1].job_id(), cancelled);  // stopping
  EXPECT_EQ(stale[2].job_id(), "job-999999");  // unknown here
  EXPECT_EQ(Get(live).state(), v1::RUNNING);
}

TEST_F(JobManagerTest, ExitSpooledWhileCoordinatorWasAwayIsNotALoss) {
  Register("a", 1);
  const std::string id = manager_->CreateJob(Spec(1, 0), "")->id();
  Hello("a", id, 0, 0);
  Restart();
  // The agent's spool still holds the clean exit (seq + 1) when it registers.
  Register("a", 1, {}, seq_["a"] + 1);
  EXPECT_EQ(Get(id).state(), v1::RUNNING);
  Exit("a", id, 0, 0, 0);
  EXPECT_EQ(Get(id).state(), v1::SUCCEEDED);
}

TEST_F(JobManagerTest, ListJobsPagesAndFilters) {
  Register("a", 8);
  for (int i = 0; i < 5; ++i) {
    v1::JobSpec s = Spec(1);
    (*s.mutable_labels())["team"] = i < 2 ? "nlp" : "cv";
    ASSERT_TRUE(manager_->CreateJob(s, "").ok());
  }
  v1::ListJobsRequest req;
  req.set_page_size(2);
  std::vector<std::string> ids;
  for (;;) {
    auto page = manager_->ListJobs(req);
    ASSERT_TRUE(page.ok());
    for (auto& j : page->jobs) ids.push_back(j.id());
    if (page->next_page_token.empty()) break;
    req.set_page_token(page->next_page_token);
  }
  EXPECT_EQ(ids.size(), 5u);
  v1::ListJobsRequest by_label;
  (*by_label.mutable_labels())["team"] = "nlp";
  EXPECT_EQ(manager_->ListJobs(by_label)->jobs.size(), 2u);
  v1::ListJobsRequest bad;
  bad.set_page_token("garbage");
  EXPECT_EQ(manager_->ListJobs(bad).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(JobManagerTest, ListJobsPagesAreCappedInBytes) {
  Register("a", 8);
  for (int i = 0; i < 12; ++i) {
    v1::JobSpec s = Spec(1);
    for (int k = 0; k < 100; ++k)  // 300 KiB of paths a job
      s.mutable_dataset()->add_data_files("/data/" + std::string(3000, 'd') + std::to_string(k));
    ASSERT_TRUE(manager_->CreateJob(s, "").ok());
  }
  v1::ListJobsRequest req;
  req.set_page_size(100);
  size_t total = 0;
  int pages = 0;
  for (;;) {
    auto page = manager_->ListJobs(req);
    ASSERT_TRUE(page.ok());
    ++pages;
    size_t bytes = 0;
    for (const auto& j : page->jobs) bytes += j.ByteSizeLong();
    EXPECT_LE(bytes, kMaxListJobsBytes);
    total += page->jobs.size();
    if (page->next_page_token.empty()) break;
    req.set_page_token(page->next_page_token);
  }
  EXPECT_EQ(total, 12u);
  EXPECT_GE(pages, 2);
}

TEST_F(JobManagerTest, CreateJobChecksPathsAgainstTheAllowedRoots) {
  Register("a", 2);
  const auto refused = [&](const v1::JobSpec& spec, const std::string& words) {
    auto r = manager_->CreateJob(spec, "");
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
    EXPECT_NE(r.status().message().find(words), std::string::npos) << r.status().message();
  };
  // No roots (a loopback demo): any absolute path, but never a device.
  v1::JobSpec zero = Spec(1);
  zero.mutable_dataset()->set_data_files(0, "/dev/zero");
  refused(zero, "dataset.data_files[0] (/dev/zero) is not a regular file");
  v1::JobSpec relative = Spec(1);
  relative.mutable_dataset()->set_data_files(0, "train.jsonl");
  refused(relative, "must be an absolute path");
  v1::JobSpec dotdot = Spec(1);
  dotdot.set_output_dir("/data/../etc");
  refused(dotdot, "output_dir (/data/../etc) must not contain '..'");

  options_.paths = *PathPolicy::Create({"/data", "/models"});
  Restart();
  ASSERT_TRUE(manager_->CreateJob(Spec(1), "").ok());
  v1::JobSpec outside = Spec(1);
  outside.set_output_dir("/home/someone/out");
  refused(outside, "output_dir (/home/someone/out) is outside the allowed roots (/data, /models)");
  v1::JobSpec model = Spec(1);
  model.mutable_model()->set_model_name_or_path("/etc");
  refused(model, "model.model_name_or_path (/etc) is outside the allowed roots");
  EXPECT_EQ(manager_->ListJobs({})->jobs.size(), 1u);  // only the good one
}

TEST_F(JobManagerTest, QueuedJobsAreCappedPerUser) {
  options_.max_queued_jobs = 2;
  Restart();
  Register("a", 1);
  for (int i = 0; i < 3; ++i)
    ASSERT_TRUE(manager_->CreateJob(Spec(1), "", "alice").ok());  // 1 runs
  auto r = manager_->CreateJob(Spec(1), "", "alice");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(r.status().message().find("user 'alice' has 2 jobs queued"), std::string::npos)
      << r.status().message();
  EXPECT_NE(r.status().message().find("--max-queued-jobs 2"), std::string::npos);
  // Another user's queue is their own; the admin is held to the same cap.
  for (int i = 0; i < 2; ++i) EXPECT_TRUE(manager_->CreateJob(Spec(1), "", "bob").ok());
  EXPECT_EQ(manager_->CreateJob(Spec(1), "", "bob").status().code(),
            absl::StatusCode::kResourceExhausted);
  for (int i = 0; i < 2; ++i) EXPECT_TRUE(manager_->CreateJob(Spec(1), "", "root").ok());
  EXPECT_EQ(manager_->CreateJob(Spec(1), "", "root").status().code(),
            absl::StatusCode::kResourceExhausted);
  // Once one of alice's leaves the queue, she has room again, and only she.
  auto all = manager_->ListJobs({});
  ASSERT_TRUE(all.ok()) << all.status();
  std::string queued;
  for (const auto& job : all->jobs)
    if (job.owner() == "alice" && job.state() == v1::QUEUED) queued = job.id();
  ASSERT_FALSE(queued.empty());
  ASSERT_TRUE(manager_->CancelJob(queued).ok());
  EXPECT_TRUE(manager_->CreateJob(Spec(1), "", "alice").ok());
  EXPECT_EQ(manager_->CreateJob(Spec(1), "", "alice").status().code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(manager_->CreateJob(Spec(1), "", "bob").status().code(),
            absl::StatusCode::kResourceExhausted);
}

TEST_F(JobManagerTest, AStuckMemoryPlanDoesNotHoldCreateJobOrTheJobLock) {
  // A FIFO or a hung filesystem under config.json: the plan never returns
  // (until the test lets it go).
  auto release = std::make_shared<std::promise<void>>();
  std::shared_future<void> released = release->get_future().share();
  plan_ = [released](const v1::JobSpec&) -> absl::StatusOr<int64_t> {
    released.wait();
    return int64_t{1} << 30;
  };
  options_.plan_timeout_ms = 200;
  Restart();
  Register("a", 2);
  auto start = std::chrono::steady_clock::now();
  std::thread other([&] {
    // The job lock stays free meanwhile.
    EXPECT_TRUE(manager_->ListJobs({}).ok());
  });
  auto r = manager_->CreateJob(Spec(1), "");
  other.join();
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->planned_device_bytes(), 0);  // went on without a plan
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
  release->set_value();
}

TEST_F(JobManagerTest, EventsOfJobsEndedLongerAgoThanTheRetentionExpire) {
  options_.event_retention_ms = 3600 * 1000;
  Restart();
  Register("a", 2);
  const std::string ended = manager_->CreateJob(Spec(1), "")->id();
  Hello("a", ended, 0, 0);
  Exit("a", ended, 0, 0, 0);
  ASSERT_EQ(Get(ended).state(), v1::SUCCEEDED);
  const std::string running = manager_->CreateJob(Spec(1), "")->id();
  Hello("a", running, 0, 0);
  const size_t ended_events = Events(ended).size();
  const size_t running_events = Events(running).size();
  ASSERT_GT(ended_events, 2u);

  manager_->ExpireEvents();  // ended just now: kept
  EXPECT_EQ(Events(ended).size(), ended_events);
  clock_.Advance(absl::Hours(2));
  manager_->ExpireEvents();
  auto left = Events(ended);
  ASSERT_EQ(left.size(), 1u);  // how it ended stays
  EXPECT_EQ(left[0].state_change().to(), v1::SUCCEEDED);
  EXPECT_EQ(left[0].seq(), Get(ended).last_event_seq());
  EXPECT_EQ(Events(running).size(), running_events);
}

TEST_F(JobManagerTest, ListJobsRefusesForeignPageTokens) {
  v1::ListJobsRequest bad;
  bad.set_page_token("garbage");
  EXPECT_EQ(manager_->ListJobs(bad).status().code(), absl::StatusCode::kInvalidArgument);
}

// --- the queue in memory (store.h's job index) against the stored rows

// Priorities, a cancel while queued, a gang restart back into the queue: at
// each step the in-memory queue is the rows', the order is priority then
// submission, and a gang is placed whole or not at all, never past the job
// at the head (no backfill).
TEST_F(JobManagerTest, QueueInMemoryFollowsEveryChangeOfTheRows) {
  Register("a", 2);
  const std::string j1 = manager_->CreateJob(Spec(2, /*max_restarts=*/1), "")->id();
  const std::string j2 = manager_->CreateJob(Spec(1), "")->id();
  EXPECT_EQ(Get(j2).reason_code(), "slots_missing");
  ExpectIndexMatchesStore();
  const std::string j3 = manager_->CreateJob(Spec(1, 2, /*priority=*/5), "")->id();
  const std::string j4 = manager_->CreateJob(Spec(1), "")->id();
  ExpectIndexMatchesStore();
  EXPECT_EQ(Queue(), (std::vector<std::string>{j3, j2, j4}));
  // The head says what it misses; the others wait behind it, in the same
  // words whoever the head is (j2 was the head before j3 came).
  EXPECT_EQ(Get(j3).reason_code(), "slots_missing");
  EXPECT_EQ(Get(j2).reason_code(), "jobs_ahead");
  EXPECT_EQ(Get(j2).state_reason(), kJobsAheadReason);
  EXPECT_EQ(Get(j4).state_reason(), kJobsAheadReason);

  ASSERT_TRUE(manager_->CancelJob(j2).ok());
  ExpectIndexMatchesStore();
  EXPECT_EQ(Queue(), (std::vector<std::string>{j3, j4}));

  // j1's gang restarts: back in the queue, ahead of j4 (submitted earlier).
  Hello("a", j1, 0, 0);
  Hello("a", j1, 0, 1);
  Exit("a", j1, 0, 0, 1);
  EXPECT_EQ(Get(j1).state(), v1::RESTARTING);
  ExpectIndexMatchesStore();
  Exit("a", j1, 0, 1, 0);
  ExpectIndexMatchesStore();
  // j3 took one of the two slots; j1 needs both, so it waits with no rank
  // placed, and j4, which would fit the free slot, waits behind it.
  EXPECT_EQ(Get(j3).state(), v1::SCHEDULED);
  v1::Job restarted = Get(j1);
  EXPECT_EQ(restarted.state(), v1::QUEUED);
  EXPECT_EQ(restarted.attempt(), 1);
  EXPECT_EQ(restarted.placement_size(), 0);
  EXPECT_EQ(restarted.reason_code(), "slots_missing");
  EXPECT_NE(restarted.state_reason().find("1 such slots free"), std::string::npos)
      << restarted.state_reason();
  EXPECT_EQ(Get(j4).state(), v1::QUEUED);
  EXPECT_EQ(Get(j4).reason_code(), "jobs_ahead");
  EXPECT_EQ(Queue(), (std::vector<std::string>{j1, j4}));
  EXPECT_EQ(store_->UsedSlots().at("a").size(), 1u);

  // j3 ends: j1 gets both slots, then j4 waits for one.
  Hello("a", j3, 0, 0);
  Exit("a", j3, 0, 0, 0);
  ExpectIndexMatchesStore();
  EXPECT_EQ(Get(j1).state(), v1::SCHEDULED);
  EXPECT_EQ(Get(j1).placement_size(), 2);
  EXPECT_EQ(Get(j4).reason_code(), "slots_missing");
  EXPECT_EQ(Queue(), (std::vector<std::string>{j4}));
}

// A coordinator killed and started again loads its queue from the rows: the
// same order (priority, then submission), the same reasons, and the jobs it
// had placed stay placed.
TEST_F(JobManagerTest, RestartRecoversTheQueueInOrder) {
  UseStoreOnDisk();
  Register("a", 1);
  const std::string running = manager_->CreateJob(Spec(1), "")->id();
  Hello("a", running, 0, 0);
  const std::string p0a = manager_->CreateJob(Spec(1), "")->id();
  const std::string p3a = manager_->CreateJob(Spec(1, 2, 3), "")->id();
  const std::string p0b = manager_->CreateJob(Spec(1), "")->id();
  const std::string p3b = manager_->CreateJob(Spec(1, 2, 3), "")->id();
  const std::vector<std::string> order = {p3a, p3b, p0a, p0b};
  EXPECT_EQ(Queue(), order);

  KillAndReopen();
  ExpectIndexMatchesStore();
  EXPECT_EQ(Queue(), order);
  EXPECT_EQ(Get(p3a).reason_code(), "slots_missing");
  for (const auto& id : {p3b, p0a, p0b}) EXPECT_EQ(Get(id).reason_code(), "jobs_ahead") << id;
  v1::RunningRank rr;
  rr.set_job_id(running);
  rr.set_rank(0);
  Register("a", 1, {rr}, seq_["a"]);
  EXPECT_EQ(Get(running).state(), v1::RUNNING);
  manager_->Tick();
  EXPECT_EQ(Queue(), order);  // the slot is still taken

  // Each job that ends lets the next one in, in that order.
  std::string last = running;
  for (const auto& next : order) {
    Exit("a", last, 0, 0, 0);
    ASSERT_EQ(Get(next).state(), v1::SCHEDULED) << next;
    ExpectIndexMatchesStore();
    Hello("a", next, 0, 0);
    last = next;
  }
  EXPECT_TRUE(Queue().empty());
}

// A job submitted behind a queued one is stored as waiting behind it; when
// the pass that follows finds the queue moving (an agent came since the last
// tick), it corrects that reason.
TEST_F(JobManagerTest, ANewJobsFirstReasonIsCorrectedWhenTheQueueMoves) {
  Register("a", 1);
  const std::string first = manager_->CreateJob(Spec(1), "")->id();
  const std::string second = manager_->CreateJob(Spec(1), "")->id();
  EXPECT_EQ(Get(second).state(), v1::QUEUED);
  Register("b", 1);  // no pass until the next tick or change
  EXPECT_EQ(Get(second).state(), v1::QUEUED);
  const std::string third = manager_->CreateJob(Spec(1), "")->id();
  EXPECT_EQ(Get(first).state(), v1::SCHEDULED);
  EXPECT_EQ(Get(second).state(), v1::SCHEDULED);
  EXPECT_EQ(Get(third).state(), v1::QUEUED);
  EXPECT_EQ(Get(third).reason_code(), "slots_missing");
  ExpectIndexMatchesStore();
}

// A pass whose transaction cannot be stored (here: the disk is full) sends
// nothing and leaves the rows and the queue as they were; the next pass
// places the job. Nothing stored before is lost.
TEST_F(JobManagerTest, APassThatCannotBeStoredChangesNothing) {
  UseStoreOnDisk();
  Register("a", 1);
  const std::string first = manager_->CreateJob(Spec(1), "")->id();
  Hello("a", first, 0, 0);
  const std::string second = manager_->CreateJob(Spec(1), "")->id();
  auto b = Register("b", 1);
  {
    testutil::FullDisk full(0);
    manager_->Tick();
  }
  EXPECT_EQ(Get(second).state(), v1::QUEUED);
  EXPECT_TRUE(b->Assignments().empty());
  ExpectIndexMatchesStore();
  EXPECT_EQ(Queue(), (std::vector<std::string>{second}));
  EXPECT_EQ(Get(first).state(), v1::RUNNING);

  manager_->Tick();
  EXPECT_EQ(Get(second).state(), v1::SCHEDULED);
  ASSERT_EQ(b->Assignments().size(), 1u);
  EXPECT_EQ(b->Assignments()[0].job_id(), second);
  ExpectIndexMatchesStore();
  KillAndReopen();
  EXPECT_EQ(Get(second).state(), v1::SCHEDULED);
  EXPECT_EQ(Get(first).state(), v1::RUNNING);
  ExpectIndexMatchesStore();
}

}  // namespace
}  // namespace ftune::server
