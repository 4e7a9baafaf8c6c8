#include <gtest/gtest.h>

#include "scheduler.h"

namespace ftune::server {
namespace {

AgentView Host(const std::string& id, int slots, int64_t mem_gib = 80) {
  AgentView a;
  a.agent_id = id;
  a.host = id + ".example";
  for (int i = 0; i < slots; ++i) {
    v1::Slot s;
    s.set_index(i);
    s.set_memory_bytes(mem_gib << 30);
    a.slots.push_back(s);
  }
  return a;
}

PendingJob Job(const std::string& id, int ranks, int priority = 0, int64_t ordinal = 1,
               int per_host = 0, const std::string& placement = "pack") {
  PendingJob j;
  j.job_id = id;
  j.priority = priority;
  j.ordinal = ordinal;
  j.resources.set_num_ranks(ranks);
  j.resources.set_gpus_per_host(per_host);
  j.resources.set_placement(placement);
  return j;
}

std::map<std::string, int> PerHost(const Decision& d) {
  std::map<std::string, int> out;
  for (const auto& p : d.placement) out[p.agent_id()]++;
  return out;
}

TEST(Scheduler, GangAllOrNothing) {
  auto d = Schedule({Job("a", 5)}, {Host("h1", 2), Host("h2", 2)});
  ASSERT_EQ(d.size(), 1u);
  EXPECT_FALSE(d[0].placed);
  EXPECT_TRUE(d[0].placement.empty());
  EXPECT_EQ(d[0].reason_code, "slots_missing");
  EXPECT_NE(d[0].reason.find("needs 5 ranks"), std::string::npos) << d[0].reason;
  EXPECT_NE(d[0].reason.find("4 such slots free on 2 live hosts"), std::string::npos);
}

TEST(Scheduler, PriorityThenFifoAndNoBackfill) {
  // b (priority 5) goes first even though submitted later; c waits behind a.
  auto d = Schedule({Job("a", 4, 0, 1), Job("b", 2, 5, 2), Job("c", 1, 0, 3)},
                    {Host("h1", 4)});
  ASSERT_EQ(d.size(), 3u);
  EXPECT_EQ(d[0].job_id, "b");
  EXPECT_TRUE(d[0].placed);
  EXPECT_EQ(d[1].job_id, "a");
  EXPECT_FALSE(d[1].placed);
  EXPECT_EQ(d[2].job_id, "c");
  EXPECT_FALSE(d[2].placed);
  EXPECT_EQ(d[2].reason_code, "jobs_ahead");
  // The same words for every job behind the blocked one: they do not change
  // when the head of the queue does.
  EXPECT_EQ(d[2].reason, kJobsAheadReason);
  EXPECT_EQ(d[1].reason_code, "slots_missing");
}

TEST(Scheduler, PackPrefersOneHostBestFit) {
  auto d = Schedule({Job("a", 2)}, {Host("big", 8), Host("small", 2)});
  ASSERT_TRUE(d[0].placed);
  EXPECT_EQ(PerHost(d[0]), (std::map<std::string, int>{{"small", 2}}));
}

TEST(Scheduler, SpreadUsesEveryHost) {
  auto d = Schedule({Job("a", 4, 0, 1, 0, "spread")}, {Host("h1", 4), Host("h2", 4)});
  ASSERT_TRUE(d[0].placed);
  EXPECT_EQ(PerHost(d[0]), (std::map<std::string, int>{{"h1", 2}, {"h2", 2}}));
}

TEST(Scheduler, GpusPerHostAndRanksNumberedHostByHost) {
  auto d = Schedule({Job("a", 4, 0, 1, 2)}, {Host("h1", 4), Host("h2", 3), Host("h3", 1)});
  ASSERT_TRUE(d[0].placed);
  auto ph = PerHost(d[0]);
  EXPECT_EQ(ph.size(), 2u);
  for (auto& [h, n] : ph) EXPECT_EQ(n, 2);
  EXPECT_EQ(d[0].placement[0].agent_id(), d[0].placement[1].agent_id());
  EXPECT_EQ(d[0].placement[2].agent_id(), d[0].placement[3].agent_id());
  for (int r = 0; r < 4; ++r) EXPECT_EQ(d[0].placement[r].rank(), r);
}

TEST(Scheduler, SkipsUsedSlotsDeadAgentsAndSmallGpus) {
  AgentView h1 = Host("h1", 4);
  h1.used = {0, 1, 2};
  AgentView dead = Host("dead", 8);
  dead.alive = false;
  AgentView small = Host("small", 8, 24);
  PendingJob j = Job("a", 2);
  j.resources.set_min_gpu_memory_bytes(40LL << 30);
  auto d = Schedule({j}, {h1, dead, small});
  EXPECT_FALSE(d[0].placed);
  PendingJob one = Job("b", 1);
  one.resources.set_min_gpu_memory_bytes(40LL << 30);
  d = Schedule({one}, {h1, dead, small});
  ASSERT_TRUE(d[0].placed);
  EXPECT_EQ(d[0].placement[0].agent_id(), "h1");
  EXPECT_EQ(d[0].placement[0].slot(), 3);
}

TEST(Scheduler, CheckFitsNamesTheNumbers) {
  v1::ResourceSpec r;
  r.set_num_ranks(16);
  r.set_placement("pack");
  auto st = CheckFits(r, {Host("h1", 8), Host("h2", 4)});
  EXPECT_EQ(st.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(st.message().find("needs 16 ranks"), std::string::npos) << st.message();
  EXPECT_NE(st.message().find("12 such slots"), std::string::npos) << st.message();
  r.set_num_ranks(12);
  EXPECT_TRUE(CheckFits(r, {Host("h1", 8), Host("h2", 4)}).ok());
  r.set_gpus_per_host(8);
  r.set_num_ranks(16);
  EXPECT_FALSE(CheckFits(r, {Host("h1", 8), Host("h2", 4)}).ok());
  EXPECT_EQ(CheckFits(r, {}).code(), absl::StatusCode::kResourceExhausted);
}

}  // namespace
}  // namespace ftune::server
