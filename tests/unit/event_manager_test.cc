// EventManager with a fake job side (RankEventHandler) and a fake metrics
// sink; real AgentManager (with a do-nothing listener), SQLite store and
// EventBus. What ingest decides by itself: which events are resends, that the
// ack moves only with a committed batch, the words of lifecycle events, and
// that Publish reaches watchers and metrics.
#include <gtest/gtest.h>

#include "event_manager.h"

namespace ftune::server {
namespace {

class NoJobs : public AgentListener {
 public:
  std::vector<v1::RunningRank> UnwantedRanks(const std::string&,
                                             const std::vector<v1::RunningRank>&) override {
    return {};
  }
  std::vector<v1::RankPlacement> SlotHolderPlacements() override { return {}; }
  void CheckLostRanks(const std::string&, const std::vector<v1::RunningRank>&) override {}
  void AgentsDead(const std::set<std::string>&) override {}
  void FleetChanged() override {}
};

class NullLink : public AgentLink {
 public:
  void Send(const v1::CoordinatorToAgent&) override {}
  void Disconnect() override {}
};

// Stores what it is given, as the job side does: every event of a job
// whose id starts with "job-", with consecutive seqs, in one transaction.
class FakeHandler : public RankEventHandler {
 public:
  explicit FakeHandler(Store* store, EventManager* events) : store_(store), events_(events) {}
  absl::StatusOr<int> ApplyRankEvents(
      std::vector<IngestedEvent> events,
      const std::function<absl::Status()>& also_in_transaction) override {
    batches.emplace_back();
    std::vector<v1::JobEvent> stored;
    for (auto& in : events) {
      batches.back().push_back(in.rank_event->agent_seq());
      if (in.rank_event->job_id().rfind("job-", 0) != 0) continue;
      in.job_event.set_job_id(in.rank_event->job_id());
      in.job_event.set_seq(++seq_);
      stored.push_back(std::move(in.job_event));
    }
    auto st = store_->Transaction([&]() -> absl::Status {
      if (auto s = events_->Append(stored); !s.ok()) return s;
      if (fail) return absl::InternalError("disk full");
      return also_in_transaction();
    });
    if (!st.ok()) return st;
    events_->Publish(stored);
    return static_cast<int>(stored.size());
  }
  std::vector<std::vector<int64_t>> batches;  // agent_seqs handed over, per call
  bool fail = false;

 private:
  Store* store_;
  EventManager* events_;
  int64_t seq_ = 0;
};

class CountingMetrics : public MetricsSink {
 public:
  void JobStates(const std::map<v1::JobState, int>&) override {}
  void Fleet(int, int, int, int) override {}
  void Step(const std::string&, int, const v1::StepMetrics&) override { ++steps; }
  void Memory(const std::string&, int, const v1::MemoryStats&) override { ++memory; }
  void CheckpointSaved(const std::string&, int64_t) override { ++checkpoints; }
  void JobStarted(const std::string&, int64_t) override {}
  void Restarted(const std::string&) override {}
  void JobEnded(const std::string&) override {}
  void EventsIngested(int n) override { ingested += n; }
  void EventsDropped(const std::string&, int) override {}
  int steps = 0, memory = 0, checkpoints = 0, ingested = 0;
};

class Watcher : public EventBus::Listener {
 public:
  void OnEvents(const std::vector<SharedEvent>& events) override {
    for (const auto& e : events) seqs.push_back(e->seq());
  }
  std::vector<int64_t> seqs;
};

class EventManagerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    store_ = std::move(*Store::Open(":memory:"));
    agents_ = std::make_unique<AgentManager>(store_.get(), &clock_, AgentManager::Options{});
    agents_->SetListener(&no_jobs_);
    events_ = std::make_unique<EventManager>(store_.get(), &bus_, &metrics_, agents_.get());
    handler_ = std::make_unique<FakeHandler>(store_.get(), events_.get());
    events_->SetHandler(handler_.get());
    v1::RegisterAgent reg;
    reg.set_agent_id("a");
    reg.set_host("host-a");
    reg.add_slots()->set_index(0);
    ASSERT_TRUE(agents_->RegisterAgent(reg, std::make_shared<NullLink>()).ok());
  }
  static v1::RankEventBatch Batch(std::vector<int64_t> seqs, const std::string& job = "job-1") {
    v1::RankEventBatch b;
    for (int64_t s : seqs) {
      auto* e = b.add_events();
      e->set_agent_seq(s);
      e->set_job_id(job);
      e->mutable_message()->mutable_step()->set_step(s);
    }
    return b;
  }
  int64_t StoredAck() { return (*store_->ListAgents())[0].acked_seq; }

  FakeClock clock_;
  EventBus bus_;
  CountingMetrics metrics_;
  NoJobs no_jobs_;
  std::unique_ptr<Store> store_;
  std::unique_ptr<AgentManager> agents_;
  std::unique_ptr<EventManager> events_;
  std::unique_ptr<FakeHandler> handler_;
};

TEST_F(EventManagerTest, ResendsAreDroppedAndTheAckIsStoredWithTheBatch) {
  EXPECT_EQ(*events_->IngestEvents("a", Batch({1, 2})), 2);
  EXPECT_EQ(StoredAck(), 2);
  // After a reconnect the agent resends from its last ack it saw.
  EXPECT_EQ(*events_->IngestEvents("a", Batch({1, 2, 3})), 3);
  ASSERT_EQ(handler_->batches.size(), 2u);
  EXPECT_EQ(handler_->batches[1], std::vector<int64_t>{3});
  // Nothing new: no transaction at all, same ack.
  EXPECT_EQ(*events_->IngestEvents("a", Batch({2, 3})), 3);
  EXPECT_EQ(handler_->batches.size(), 2u);
  EXPECT_EQ(events_->ReadEvents("job-1", 0, 100)->size(), 3u);
  EXPECT_EQ(metrics_.ingested, 3);
}

TEST_F(EventManagerTest, AFailedBatchLeavesTheAckWhereItWas) {
  ASSERT_TRUE(events_->IngestEvents("a", Batch({1})).ok());
  handler_->fail = true;
  EXPECT_EQ(events_->IngestEvents("a", Batch({2, 3})).status().code(),
            absl::StatusCode::kInternal);
  EXPECT_EQ(StoredAck(), 1);
  EXPECT_EQ(events_->ReadEvents("job-1", 0, 100)->size(), 1u);
  handler_->fail = false;
  EXPECT_EQ(*events_->IngestEvents("a", Batch({2, 3})), 3);  // taken again, whole
  EXPECT_EQ(handler_->batches.back(), (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(StoredAck(), 3);
}

TEST_F(EventManagerTest, EventsOfUnknownJobsAreAckedNotStored) {
  EXPECT_EQ(*events_->IngestEvents("a", Batch({1, 2}, "gone")), 2);
  EXPECT_EQ(StoredAck(), 2);
  EXPECT_EQ(metrics_.ingested, 0);
}

TEST_F(EventManagerTest, UnregisteredAgentIsRefused) {
  EXPECT_EQ(events_->IngestEvents("b", Batch({1})).status().code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(handler_->batches.empty());
}

TEST_F(EventManagerTest, PublishReachesWatchersOfTheJobAndTheMetrics) {
  Watcher w1, w2;
  bus_.Subscribe("job-1", &w1);
  bus_.Subscribe("job-2", &w2);
  ASSERT_TRUE(events_->IngestEvents("a", Batch({1, 2})).ok());
  EXPECT_EQ(w1.seqs, (std::vector<int64_t>{1, 2}));
  EXPECT_TRUE(w2.seqs.empty());
  EXPECT_EQ(metrics_.steps, 2);

  std::vector<v1::JobEvent> more(3);
  for (auto& e : more) e.set_job_id("job-2");
  more[0].mutable_memory()->set_peak_bytes(1);
  more[1].mutable_checkpoint()->set_complete(true);  // rank 0: counts
  more[2].set_rank(1);
  more[2].mutable_checkpoint()->set_complete(true);  // rank 1: does not
  events_->Publish(more);
  EXPECT_EQ(w2.seqs.size(), 3u);
  EXPECT_EQ(metrics_.memory, 1);
  EXPECT_EQ(metrics_.checkpoints, 1);
  bus_.Unsubscribe("job-1", &w1);
  bus_.Unsubscribe("job-2", &w2);
}

TEST(JobEventFor, PutsLifecycleEventsInWords) {
  v1::RankEvent ev;
  ev.set_rank(1);
  ev.set_attempt(2);
  ev.set_time_unix_ms(123);
  auto* hello = ev.mutable_message()->mutable_hello();
  hello->set_device("cuda:1");
  hello->set_pid(42);
  hello->set_start_step(10);
  v1::JobEvent je = JobEventFor(ev, "gpu-7");
  EXPECT_EQ(je.rank(), 1);
  EXPECT_EQ(je.attempt(), 2);
  EXPECT_EQ(je.time_unix_ms(), 123);
  EXPECT_EQ(je.log().text(), "rank 1 started on gpu-7 (cuda:1, pid 42, resuming at step 10)");

  ev.mutable_exit()->set_exit_code(3);
  ev.mutable_exit()->add_stderr_tail("CUDA error: out of memory");
  je = JobEventFor(ev, "gpu-7");
  EXPECT_EQ(je.error().message(), "rank 1 on gpu-7 exited with code 3");
  ASSERT_EQ(je.error().stderr_tail_size(), 1);

  ev.mutable_exit()->set_exit_code(-9);
  EXPECT_EQ(JobEventFor(ev, "gpu-7").error().message(), "rank 1 on gpu-7 was killed by signal 9");
  ev.mutable_exit()->set_exit_code(0);
  ev.mutable_exit()->set_hung(true);
  EXPECT_EQ(JobEventFor(ev, "gpu-7").error().message(),
            "rank 1 on gpu-7 was silent too long and was killed");
  ev.mutable_exit()->set_hung(false);
  je = JobEventFor(ev, "gpu-7");
  EXPECT_FALSE(je.has_error());
  EXPECT_EQ(je.log().text(), "rank 1 on gpu-7 exited with code 0");

  ev.mutable_launch_failed()->set_message("no such file");
  EXPECT_EQ(JobEventFor(ev, "gpu-7").error().message(),
            "rank 1 could not start on gpu-7: no such file");
}

}  // namespace
}  // namespace ftune::server
