// Prometheus series: names and labels as documented, and per-job series
// removed when the job ends.
#include <gtest/gtest.h>
#include <prometheus/registry.h>
#include <prometheus/text_serializer.h>

#include "metrics.h"

namespace ftune::server {
namespace {

std::string Scrape(Metrics& m) {
  return prometheus::TextSerializer().Serialize(m.registry()->Collect());
}

TEST(Metrics, PerJobSeriesAppearAndGoAwayWhenTheJobEnds) {
  Metrics m;
  v1::StepMetrics s;
  s.set_step(7);
  s.set_loss(1.25);
  s.set_learning_rate(1e-4);
  s.set_tokens(4096);
  s.set_tokens_per_second(2000);
  m.Step("job-000002", 1, s);
  s.set_forward_seconds(0.125);
  s.set_backward_seconds(0.25);
  s.set_optimizer_seconds(0.5);
  m.Step("job-000001", 0, s);
  v1::MemoryStats mem;
  mem.set_peak_bytes(1 << 30);
  m.Memory("job-000001", 0, mem);
  m.CheckpointSaved("job-000001", 1700000000000);
  m.Restarted("job-000001");
  m.EventsIngested(3);
  std::string text = Scrape(m);
  EXPECT_NE(text.find("ftune_job_loss{job_id=\"job-000001\",rank=\"0\"} 1.25"), std::string::npos)
      << text;
  EXPECT_NE(text.find("ftune_job_tokens_total{job_id=\"job-000001\",rank=\"0\"} 4096"),
            std::string::npos);
  EXPECT_NE(text.find("ftune_job_gpu_memory_peak_bytes{job_id=\"job-000001\",rank=\"0\"} 1073741824"),
            std::string::npos);
  EXPECT_NE(text.find("ftune_job_restarts_total{job_id=\"job-000001\"} 1"), std::string::npos);
  EXPECT_NE(text.find("ftune_events_ingested_total 3"), std::string::npos);
  EXPECT_NE(text.find("ftune_job_step_phase_seconds{job_id=\"job-000001\",phase=\"backward\","
                      "rank=\"0\"} 0.25"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("ftune_job_step_phase_seconds{job_id=\"job-000001\",phase=\"exposed_comm\","
                      "rank=\"0\"} 0"),
            std::string::npos);
  // A rank that reports no phases (an older rank) gets no phase series.
  EXPECT_EQ(text.find("ftune_job_step_phase_seconds{job_id=\"job-000002\""), std::string::npos);
  m.JobEnded("job-000001");
  text = Scrape(m);
  EXPECT_EQ(text.find("job-000001"), std::string::npos) << text;
  EXPECT_NE(text.find("ftune_job_step{job_id=\"job-000002\",rank=\"1\"} 7"), std::string::npos);
}

// Every per-job counter is on the first scrape after the job starts, at 0:
// a dashboard's "restarts per job" has data before any restart. A recovered
// coordinator resumes the count at the job's stored restarts.
TEST(Metrics, PerJobCountersStartAtZeroWhenTheJobStarts) {
  Metrics m;
  m.JobStarted("job-000001", 0);
  std::string text = Scrape(m);
  EXPECT_NE(text.find("ftune_job_restarts_total{job_id=\"job-000001\"} 0"), std::string::npos)
      << text;
  EXPECT_NE(text.find("ftune_job_checkpoints_total{job_id=\"job-000001\"} 0"), std::string::npos);
  m.Restarted("job-000001");
  m.JobStarted("job-000001", 1);  // the next attempt: no change
  m.CheckpointSaved("job-000001", 1700000000000);
  m.JobStarted("job-000002", 2);  // found live by a recovered coordinator
  text = Scrape(m);
  EXPECT_NE(text.find("ftune_job_restarts_total{job_id=\"job-000001\"} 1"), std::string::npos)
      << text;
  EXPECT_NE(text.find("ftune_job_checkpoints_total{job_id=\"job-000001\"} 1"), std::string::npos);
  EXPECT_NE(text.find("ftune_job_restarts_total{job_id=\"job-000002\"} 2"), std::string::npos);
  m.JobEnded("job-000001");
  m.JobEnded("job-000002");
  text = Scrape(m);
  EXPECT_EQ(text.find("job-00000"), std::string::npos) << text;
}

// The fleet counters are on the first scrape, at 0, before anything has
// failed or been dropped: the dashboard's "store errors / s" and "events
// dropped / s by reason" have data on a healthy coordinator.
TEST(Metrics, FleetCountersStartAtZero) {
  Metrics m;
  std::string text = Scrape(m);
  EXPECT_NE(text.find("\nftune_store_errors_total 0\n"), std::string::npos) << text;
  // The reasons docs/control-plane.md lists, spelled out.
  for (const std::string reason :
       {"stale_attempt", "not_placed", "unknown_job", "rendezvous_not_placed"})
    EXPECT_NE(text.find("\nftune_events_dropped_total{reason=\"" + reason + "\"} 0\n"),
              std::string::npos)
        << reason << "\n"
        << text;
  m.StoreError();
  m.EventsDropped(kDropStaleAttempt, 2);
  text = Scrape(m);
  EXPECT_NE(text.find("\nftune_store_errors_total 1\n"), std::string::npos) << text;
  EXPECT_NE(text.find("ftune_events_dropped_total{reason=\"stale_attempt\"} 2"), std::string::npos);
  EXPECT_NE(text.find("ftune_events_dropped_total{reason=\"unknown_job\"} 0"), std::string::npos);
}

TEST(Metrics, FleetAndStateGauges) {
  Metrics m;
  m.JobStates({{v1::QUEUED, 2}, {v1::RUNNING, 1}});
  m.Fleet(3, 1, 5, 7);
  const std::string text = Scrape(m);
  EXPECT_NE(text.find("ftune_jobs{state=\"QUEUED\"} 2"), std::string::npos) << text;
  EXPECT_NE(text.find("ftune_queue_depth 2"), std::string::npos);
  EXPECT_NE(text.find("ftune_agents{state=\"dead\"} 1"), std::string::npos);
  EXPECT_NE(text.find("ftune_slots{state=\"used\"} 7"), std::string::npos);
  EXPECT_NE(text.find("ftune_build_info{version=\"0.1.0\"} 1"), std::string::npos);
}

}  // namespace
}  // namespace ftune::server
