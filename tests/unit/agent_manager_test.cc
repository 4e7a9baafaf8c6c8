// AgentManager alone: a fake job side (AgentListener), fake clock and links,
// real SQLite store. What the registry decides by itself: the first messages
// on a link, liveness, which link is current, and when a re-registered
// agent's lost-rank check is due.
#include <gtest/gtest.h>

#include "agent_manager.h"

namespace ftune::server {
namespace {

class FakeLink : public AgentLink {
 public:
  void Send(const v1::CoordinatorToAgent& msg) override { sent.push_back(msg); }
  void Disconnect() override { ++disconnects; }
  std::vector<v1::CoordinatorToAgent> sent;
  int disconnects = 0;
};

class FakeJobs : public AgentListener {
 public:
  std::vector<v1::RunningRank> UnwantedRanks(const std::string& agent_id,
                                             const std::vector<v1::RunningRank>& running) override {
    std::vector<v1::RunningRank> out;
    for (const auto& r : running)
      if (unwanted_jobs.count(r.job_id())) out.push_back(r);
    return out;
  }
  std::vector<v1::RankPlacement> SlotHolderPlacements() override { return placements; }
  void CheckLostRanks(const std::string& agent_id,
                      const std::vector<v1::RunningRank>& running) override {
    lost_checks.emplace_back(agent_id, running.size());
  }
  void AgentsDead(const std::set<std::string>& agent_ids) override {
    dead.push_back(agent_ids);
  }
  void FleetChanged() override { ++fleet_changes; }

  std::set<std::string> unwanted_jobs;
  std::vector<v1::RankPlacement> placements;
  std::vector<std::pair<std::string, size_t>> lost_checks;  // (agent, ranks reported)
  std::vector<std::set<std::string>> dead;
  int fleet_changes = 0;
};

v1::RunningRank Running(const std::string& job, int rank) {
  v1::RunningRank r;
  r.set_job_id(job);
  r.set_rank(rank);
  return r;
}

class AgentManagerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    store_ = std::move(*Store::Open(":memory:"));
    Restart();
  }
  void Restart() {
    agents_ = std::make_unique<AgentManager>(store_.get(), &clock_,
                                             AgentManager::Options{/*agent_timeout_ms=*/10000,
                                                                   /*heartbeat_interval_ms=*/500});
    agents_->SetListener(&jobs_);
    ASSERT_TRUE(agents_->Recover().ok());
  }
  v1::RegisterAgent Reg(const std::string& id, std::vector<v1::RunningRank> running = {},
                        int64_t last_seq = 0) {
    v1::RegisterAgent reg;
    reg.set_agent_id(id);
    reg.set_host(id + "-host");
    reg.add_slots()->set_index(0);
    for (auto& r : running) *reg.add_running() = r;
    reg.set_last_agent_seq(last_seq);
    return reg;
  }
  std::shared_ptr<FakeLink> Register(const v1::RegisterAgent& reg) {
    auto link = std::make_shared<FakeLink>();
    EXPECT_TRUE(agents_->RegisterAgent(reg, link).ok());
    return link;
  }
  v1::CoordinatorToAgent Stop() {
    v1::CoordinatorToAgent m;
    m.mutable_stop()->set_job_id("job-1");
    return m;
  }

  FakeClock clock_;
  FakeJobs jobs_;
  std::unique_ptr<Store> store_;
  std::unique_ptr<AgentManager> agents_;
};

TEST_F(AgentManagerTest, RegisteredThenAckAreTheFirstMessages) {
  jobs_.unwanted_jobs = {"job-old"};
  auto link = Register(Reg("a", {Running("job-old", 0), Running("job-1", 1)}));
  ASSERT_EQ(link->sent.size(), 2u);
  const auto& registered = link->sent[0].registered();
  EXPECT_EQ(registered.heartbeat_interval_ms(), 500);
  ASSERT_EQ(registered.stale_size(), 1);
  EXPECT_EQ(registered.stale(0).job_id(), "job-old");
  EXPECT_EQ(link->sent[1].ack().agent_seq(), 0);
  EXPECT_EQ(jobs_.fleet_changes, 1);
}

TEST_F(AgentManagerTest, RefusesAgentsWithoutIdOrSlots) {
  v1::RegisterAgent no_id = Reg("a");
  no_id.clear_agent_id();
  EXPECT_EQ(agents_->RegisterAgent(no_id, std::make_shared<FakeLink>()).code(),
            absl::StatusCode::kInvalidArgument);
  v1::RegisterAgent no_slots = Reg("a");
  no_slots.clear_slots();
  auto st = agents_->RegisterAgent(no_slots, std::make_shared<FakeLink>());
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("no slots"), std::string::npos) << st.message();
  EXPECT_TRUE(agents_->ListAgents().empty());
}

TEST_F(AgentManagerTest, LostRankCheckWaitsUntilTheSpoolIsStored) {
  auto first = Register(Reg("a"));
  ASSERT_EQ(jobs_.lost_checks.size(), 1u);  // nothing spooled: checked at once
  jobs_.lost_checks.clear();
  agents_->EventsAcked("a", 2);
  EXPECT_TRUE(jobs_.lost_checks.empty());  // no re-register, nothing to check

  // Back with events 3..5 still in its spool: the check waits for them.
  agents_->AgentDisconnected("a", first.get());
  Register(Reg("a", {Running("job-1", 0)}, /*last_seq=*/5));
  EXPECT_TRUE(jobs_.lost_checks.empty());
  agents_->EventsAcked("a", 4);
  EXPECT_TRUE(jobs_.lost_checks.empty());
  agents_->EventsAcked("a", 5);
  ASSERT_EQ(jobs_.lost_checks.size(), 1u);
  EXPECT_EQ(jobs_.lost_checks[0], std::make_pair(std::string("a"), size_t{1}));
  agents_->EventsAcked("a", 6);
  EXPECT_EQ(jobs_.lost_checks.size(), 1u);  // once per registration
}

TEST_F(AgentManagerTest, HeartbeatsAndEventsKeepAnAgentAliveSilenceKillsIt) {
  auto link = Register(Reg("a"));
  clock_.Advance(absl::Seconds(8));
  agents_->Heartbeat("a");
  clock_.Advance(absl::Seconds(8));
  ASSERT_TRUE(agents_->EventsArrived("a").ok());
  clock_.Advance(absl::Seconds(8));
  agents_->CheckLiveness();
  EXPECT_TRUE(jobs_.dead.empty());
  EXPECT_TRUE((*agents_->Fleet())[0].alive);

  clock_.Advance(absl::Seconds(3));  // 11 s since the last sign of life
  agents_->CheckLiveness();
  ASSERT_EQ(jobs_.dead.size(), 1u);
  EXPECT_EQ(jobs_.dead[0], std::set<std::string>{"a"});
  EXPECT_EQ(link->disconnects, 1);  // its stream is ended, so it registers again
  EXPECT_FALSE((*agents_->Fleet())[0].alive);
  EXPECT_FALSE(agents_->ListAgents()[0].alive());
  const size_t sent = link->sent.size();
  agents_->Send("a", Stop());  // its link is gone
  EXPECT_EQ(link->sent.size(), sent);
  agents_->CheckLiveness();
  EXPECT_EQ(jobs_.dead.size(), 1u);  // reported once
  EXPECT_EQ(link->disconnects, 1);
}

TEST_F(AgentManagerTest, ADeadAgentWhoseStreamStayedOpenComesBackByRegistering) {
  jobs_.unwanted_jobs = {"job-1"};
  auto paused = Register(Reg("a", {Running("job-1", 0)}));
  clock_.Advance(absl::Seconds(11));
  agents_->CheckLiveness();
  ASSERT_EQ(paused->disconnects, 1);
  // Heartbeats on the old stream (before the cancel reaches it) revive nothing.
  agents_->Heartbeat("a");
  EXPECT_FALSE((*agents_->Fleet())[0].alive);
  // The agent registers again on a new stream: alive, and told which of its
  // ranks no job wants any more.
  auto back = Register(Reg("a", {Running("job-1", 0)}));
  EXPECT_TRUE((*agents_->Fleet())[0].alive);
  ASSERT_TRUE(back->sent[0].has_registered());
  ASSERT_EQ(back->sent[0].registered().stale_size(), 1);
  EXPECT_EQ(back->sent[0].registered().stale(0).job_id(), "job-1");
  EXPECT_EQ(back->disconnects, 0);
}

TEST_F(AgentManagerTest, ASecondLiveRegistrationOfAnIdIsRefused) {
  auto first = Register(Reg("a"));
  clock_.Advance(absl::Milliseconds(1400));  // within 3 heartbeats (500 ms)
  auto impostor = std::make_shared<FakeLink>();
  v1::RegisterAgent other = Reg("a");
  other.set_host("elsewhere");
  const absl::Status st = agents_->RegisterAgent(other, impostor);
  EXPECT_EQ(st.code(), absl::StatusCode::kAlreadyExists) << st;
  EXPECT_NE(st.message().find("agent a is already connected (host a-host"), std::string::npos)
      << st;
  EXPECT_TRUE(impostor->sent.empty());
  EXPECT_EQ(first->disconnects, 0);
  EXPECT_EQ(agents_->ListAgents()[0].host(), "a-host");  // nothing of it stored
  agents_->Send("a", Stop());
  EXPECT_TRUE(first->sent.back().has_stop());

  // Once its stream has ended, the id registers again at once.
  agents_->AgentDisconnected("a", first.get());
  EXPECT_TRUE(agents_->RegisterAgent(other, impostor).ok());
  EXPECT_EQ(agents_->ListAgents()[0].host(), "elsewhere");
}

TEST_F(AgentManagerTest, AQuietStreamIsReplacedByANewRegistration) {
  // An agent whose connection broke without the coordinator noticing comes
  // back on a new stream: past three heartbeat intervals of silence the old
  // one is ended instead of refusing the agent until its timeout.
  auto first = Register(Reg("a"));
  clock_.Advance(absl::Milliseconds(1600));
  auto second = Register(Reg("a"));
  EXPECT_EQ(first->disconnects, 1);
  EXPECT_EQ(second->disconnects, 0);
}

TEST_F(AgentManagerTest, OnlyTheCurrentLinkIsForgottenOnDisconnect) {
  auto first = Register(Reg("a"));
  clock_.Advance(absl::Seconds(2));  // quiet: the next registration replaces it
  auto second = Register(Reg("a"));
  agents_->AgentDisconnected("a", first.get());  // the old stream ends late
  agents_->Send("a", Stop());
  EXPECT_TRUE(second->sent.back().has_stop());
  EXPECT_FALSE(first->sent.back().has_stop());
  agents_->AgentDisconnected("a", second.get());
  const size_t sent = second->sent.size();
  agents_->Send("a", Stop());
  EXPECT_EQ(second->sent.size(), sent);
}

TEST_F(AgentManagerTest, EventsFromAnUnknownAgentAreRefused) {
  EXPECT_EQ(agents_->EventsArrived("nobody").status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST_F(AgentManagerTest, RecoveredAgentsGetAFullTimeoutToComeBack) {
  Register(Reg("a"));
  ASSERT_TRUE(store_->SetAgentAck("a", 7).ok());
  clock_.Advance(absl::Seconds(60));
  Restart();  // a new coordinator process on the same store
  const std::vector<AgentView> fleet = *agents_->Fleet();
  ASSERT_EQ(fleet.size(), 1u);
  EXPECT_TRUE(fleet[0].alive);
  EXPECT_EQ(fleet[0].host, "a-host");
  EXPECT_EQ(agents_->EventsArrived("a")->acked_seq, 7);
  clock_.Advance(absl::Seconds(11));
  agents_->CheckLiveness();
  EXPECT_EQ(jobs_.dead.size(), 1u);
}

TEST_F(AgentManagerTest, ListAgentsShowsWhatJobsUse) {
  Register(Reg("a"));
  Register(Reg("b"));
  v1::RankPlacement p;
  p.set_job_id("job-1");
  p.set_agent_id("b");
  p.set_rank(0);
  jobs_.placements = {p};
  auto listed = agents_->ListAgents();
  ASSERT_EQ(listed.size(), 2u);
  EXPECT_EQ(listed[0].used_size(), 0);
  ASSERT_EQ(listed[1].used_size(), 1);
  EXPECT_EQ(listed[1].used(0).job_id(), "job-1");
}

}  // namespace
}  // namespace ftune::server
