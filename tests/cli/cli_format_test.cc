// Formatting of times, numbers, events, tables, summaries and JSON.
#include "cli/format.h"

#include <cmath>
#include <limits>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "cli/client.h"
#include "cli/commands.h"

namespace ftune::cli {
namespace {

using ::testing::HasSubstr;

constexpr int64_t kT0 = 1714564800000;  // 2024-05-01T12:00:00Z

TEST(CliFormatTest, IsoTimesAreUtcSeconds) {
  EXPECT_EQ(FormatIsoTime(kT0), "2024-05-01T12:00:00Z");
  EXPECT_EQ(FormatIsoTime(kT0 + 3999), "2024-05-01T12:00:03Z");
  EXPECT_EQ(FormatIsoTime(-1), "1969-12-31T23:59:59Z");
  EXPECT_EQ(FormatIsoTime(0), "-");
}

TEST(CliFormatTest, RelativeTimes) {
  EXPECT_EQ(FormatRelativeTime(kT0, kT0 + 400), "just now");
  EXPECT_EQ(FormatRelativeTime(kT0, kT0 + 42000), "42s ago");
  EXPECT_EQ(FormatRelativeTime(kT0, kT0 + 5 * 60000 + 59000), "5m ago");
  EXPECT_EQ(FormatRelativeTime(kT0, kT0 + 3 * 3600000), "3h ago");
  EXPECT_EQ(FormatRelativeTime(kT0, kT0 + 2 * 86400000LL + 5), "2d ago");
  EXPECT_EQ(FormatRelativeTime(kT0 + 300000, kT0), "in 5m");
  EXPECT_EQ(FormatRelativeTime(0, kT0), "-");
  EXPECT_EQ(FormatTimestamp(kT0, kT0 + 60000), "2024-05-01T12:00:00Z (1m ago)");
}

TEST(CliFormatTest, Numbers) {
  EXPECT_EQ(FormatFixed(1.23456, 4), "1.2346");
  EXPECT_EQ(FormatFixed(2, 1), "2.0");
  EXPECT_EQ(FormatFixed(std::nan(""), 4), "nan");
  EXPECT_EQ(FormatFixed(-std::numeric_limits<double>::infinity(), 4), "-inf");
  EXPECT_EQ(FormatScientific(0.0002), "2.000e-04");
  EXPECT_EQ(FormatScientific(0), "0.000e+00");
}

TEST(CliFormatTest, JobStates) {
  v1::JobState s;
  ASSERT_TRUE(ParseJobState("running", &s));
  EXPECT_EQ(s, v1::RUNNING);
  ASSERT_TRUE(ParseJobState("Cancelled", &s));
  EXPECT_EQ(s, v1::CANCELLED);
  EXPECT_FALSE(ParseJobState("JOB_STATE_UNSPECIFIED", &s));
  EXPECT_FALSE(ParseJobState("done", &s));
  EXPECT_FALSE(ParseJobState("", &s));
  EXPECT_EQ(JobStateName(v1::RESTARTING), "RESTARTING");
  EXPECT_EQ(JobStateName(static_cast<v1::JobState>(42)), "UNKNOWN(42)");
  EXPECT_TRUE(IsFinalState(v1::SUCCEEDED));
  EXPECT_TRUE(IsFinalState(v1::FAILED));
  EXPECT_TRUE(IsFinalState(v1::CANCELLED));
  EXPECT_FALSE(IsFinalState(v1::CANCELLING));
  EXPECT_FALSE(IsFinalState(v1::RESTARTING));
  EXPECT_EQ(ExitCodeForState(v1::SUCCEEDED), 0);
  EXPECT_EQ(ExitCodeForState(v1::FAILED), 1);
  EXPECT_EQ(ExitCodeForState(v1::CANCELLED), 3);
  EXPECT_EQ(ExitCodeForState(v1::RUNNING), kExitRpcError);
}

v1::JobEvent At(int64_t seq, int32_t rank, int32_t attempt = 0) {
  v1::JobEvent e;
  e.set_seq(seq);
  e.set_rank(rank);
  e.set_attempt(attempt);
  e.set_time_unix_ms(kT0 + 3000);
  return e;
}

TEST(CliFormatTest, EventLines) {
  v1::JobEvent e = At(1, 0);
  auto* m = e.mutable_step();
  m->set_step(10);
  m->set_loss(1.234567);
  m->set_learning_rate(2e-4);
  m->set_grad_norm(0.5123);
  m->set_tokens_per_second(1234.56);
  EXPECT_EQ(FormatEvent(e),
            "2024-05-01T12:00:03Z rank 0   step 10  loss 1.2346  lr 2.000e-04  "
            "grad_norm 0.512  tokens/s 1234.6\n");
  m->set_epoch(0.25);
  EXPECT_THAT(FormatEvent(e), HasSubstr("tokens/s 1234.6  epoch 0.25\n"));
  e.mutable_step()->set_forward_seconds(0.1234);
  e.mutable_step()->set_backward_seconds(0.25);
  e.mutable_step()->set_optimizer_seconds(0.002);
  EXPECT_THAT(FormatEvent(e),
              HasSubstr("epoch 0.25  fwd 0.123s  bwd 0.250s  opt 0.002s\n"));
  e.mutable_step()->set_exposed_comm_seconds(0.01);
  EXPECT_THAT(FormatEvent(e), HasSubstr("opt 0.002s  comm_exposed 0.010s\n"));

  e = At(2, 12, 1);
  e.mutable_memory()->set_allocated_bytes(1610612736);
  e.mutable_memory()->set_reserved_bytes(2147483648);
  e.mutable_memory()->set_peak_bytes(0);
  e.mutable_memory()->set_host_rss_bytes(1048576);
  e.mutable_memory()->set_device("cuda:0");
  EXPECT_EQ(FormatEvent(e),
            "2024-05-01T12:00:03Z rank 12  memory  allocated 1.5GiB  reserved 2GiB  peak -  "
            "host_rss 1MiB  device cuda:0  [attempt 1]\n");

  e = At(3, -1);
  e.mutable_state_change()->set_from(v1::RUNNING);
  e.mutable_state_change()->set_to(v1::RESTARTING);
  e.mutable_state_change()->set_reason("rank 1 exited with status 1");
  EXPECT_EQ(FormatEvent(e),
            "2024-05-01T12:00:03Z job      state RUNNING -> RESTARTING: rank 1 exited with "
            "status 1\n");

  e = At(4, 1);
  e.mutable_error()->set_message("rank 1 exited with status 1");
  e.mutable_error()->add_stderr_tail("line one");
  e.mutable_error()->add_stderr_tail("line two");
  EXPECT_EQ(FormatEvent(e),
            "2024-05-01T12:00:03Z rank 1   error: rank 1 exited with status 1\n"
            "    | line one\n"
            "    | line two\n");

  e = At(5, 0);
  e.mutable_checkpoint()->set_step(50);
  e.mutable_checkpoint()->set_path("/ckpt/50");
  e.mutable_checkpoint()->set_bytes(1024);
  e.mutable_checkpoint()->set_duration_seconds(2.25);
  EXPECT_THAT(FormatEvent(e), HasSubstr("checkpoint step 50  /ckpt/50  1KiB  2.2s  partial\n"));

  e = At(6, 0);
  e.mutable_eval()->set_step(50);
  e.mutable_eval()->set_eval_loss(0.9);
  e.mutable_eval()->set_eval_tokens(4096);
  EXPECT_THAT(FormatEvent(e), HasSubstr("eval step 50  eval_loss 0.9000  eval_tokens 4096\n"));

  e = At(7, 0);
  e.mutable_log()->set_level("WARNING");
  e.mutable_log()->set_text("skipped 3 invalid records");
  EXPECT_THAT(FormatEvent(e), HasSubstr("log WARNING  skipped 3 invalid records\n"));

  e = At(8, 0);
  e.mutable_done()->set_final_step(100);
  e.mutable_done()->set_final_loss(0.75);
  e.mutable_done()->set_adapter_path("/out/adapter");
  EXPECT_THAT(FormatEvent(e), HasSubstr("done final_step 100  final_loss 0.7500  adapter /out/adapter\n"));

  EXPECT_THAT(FormatEvent(At(9, 0)), HasSubstr("event of an unknown kind"));
}

TEST(CliFormatTest, SummaryUsesNewestAttemptThroughputAndPeakOverAll) {
  RunSummary summary;
  v1::Job job;
  job.set_id("j");
  EXPECT_EQ(summary.Format(job),
            "summary: steps -, final loss -, tokens/s -, peak memory -, adapter -");

  auto step = [](int64_t seq, int32_t rank, int32_t attempt, int64_t s, double loss, double tps) {
    v1::JobEvent e = At(seq, rank, attempt);
    e.mutable_step()->set_step(s);
    e.mutable_step()->set_loss(loss);
    e.mutable_step()->set_tokens_per_second(tps);
    return e;
  };
  auto memory = [](int64_t seq, int32_t rank, int32_t attempt, int64_t peak) {
    v1::JobEvent e = At(seq, rank, attempt);
    e.mutable_memory()->set_peak_bytes(peak);
    return e;
  };
  summary.Add(step(1, 0, 0, 5, 2.0, 500));
  summary.Add(step(2, 1, 0, 5, 2.1, 500));
  summary.Add(memory(3, 1, 0, 8LL << 30));
  // The gang restarts: attempt 1 measures from scratch, rank 1 not yet heard.
  summary.Add(step(4, 1, 1, 6, 1.9, 300));
  summary.Add(step(5, 0, 1, 6, 1.8, 400));
  summary.Add(memory(6, 0, 1, 4LL << 30));
  // A late event of the old attempt changes nothing but the peak.
  summary.Add(step(7, 1, 0, 5, 9.9, 9999));
  EXPECT_EQ(summary.Format(job),
            "summary: steps 6, final loss 1.8000, tokens/s 700.0, peak memory 8GiB, adapter -");

  v1::JobEvent done = At(8, 0, 1);
  done.mutable_done()->set_final_step(7);
  done.mutable_done()->set_final_loss(1.7);
  done.mutable_done()->set_adapter_path("/a");
  summary.Add(done);
  EXPECT_EQ(summary.Format(job),
            "summary: steps 7, final loss 1.7000, tokens/s 700.0, peak memory 8GiB, adapter /a");

  // The job record wins where it has values.
  job.set_last_step(8);
  job.set_last_loss(1.5);
  job.set_adapter_path("/final");
  EXPECT_EQ(summary.Format(job),
            "summary: steps 8, final loss 1.5000, tokens/s 700.0, peak memory 8GiB, "
            "adapter /final");
}

TEST(CliFormatTest, JobsTable) {
  v1::Job a;
  a.set_id("job-1");
  a.mutable_spec()->set_name("llama");
  a.mutable_spec()->mutable_resources()->set_num_ranks(8);
  a.set_state(v1::RUNNING);
  a.set_last_step(120);
  a.set_last_loss(1.23);
  a.set_restarts(1);
  a.set_create_time_unix_ms(kT0);
  a.set_owner("alice");
  v1::Job b;
  b.set_id("job-22");
  b.set_state(v1::QUEUED);
  b.set_state_reason("waiting for 2 free slots");
  b.set_create_time_unix_ms(kT0 + 3600000);
  EXPECT_EQ(FormatJobsTable({a, b}, kT0 + 2 * 3600000),
            "ID      NAME   OWNER  STATE    RANKS  STEP    LOSS  RESTARTS  AGE     REASON\n"
            "job-1   llama  alice  RUNNING      8   120  1.2300         1  2h ago\n"
            "job-22  -      -      QUEUED       0     -       -         0  1h ago  waiting for 2 "
            "free slots\n");
}

TEST(CliFormatTest, JobDetailsIncludeLabelsPlacementAndSpecYaml) {
  v1::Job job;
  job.set_id("job-1");
  job.set_state(v1::FAILED);
  job.set_state_reason("rank 1 hung");
  job.set_create_time_unix_ms(kT0);
  job.mutable_spec()->set_name("llama");
  job.mutable_spec()->set_max_restarts(3);
  job.mutable_spec()->mutable_model()->set_model_name_or_path("/models/x");
  (*job.mutable_spec()->mutable_labels())["team"] = "nlp";
  (*job.mutable_spec()->mutable_labels())["env"] = "dev";
  job.set_restarts(3);
  auto* p = job.add_placement();
  p->set_rank(1);
  p->set_host("h");
  p->set_slot(0);
  p->set_agent_id("a");
  const std::string text = FormatJobDetails(job, kT0 + 60000);
  EXPECT_THAT(text, HasSubstr("id:            job-1\n"));
  EXPECT_THAT(text, HasSubstr("owner:         -\n"));  // stored before owners existed
  EXPECT_THAT(text, HasSubstr("state:         FAILED\n"));
  EXPECT_THAT(text, HasSubstr("reason:        rank 1 hung\n"));
  EXPECT_THAT(text, HasSubstr("created:       2024-05-01T12:00:00Z (1m ago)\n"));
  EXPECT_THAT(text, HasSubstr("updated:       -\n"));
  EXPECT_THAT(text, HasSubstr("restarts:      3 of at most 3\n"));
  EXPECT_THAT(text, HasSubstr("labels:        env=dev, team=nlp\n"));
  EXPECT_THAT(text, HasSubstr("memory plan:   - (model config not readable"));
  job.set_planned_device_bytes(int64_t{21} << 30);
  EXPECT_THAT(FormatJobDetails(job, kT0), HasSubstr("memory plan:   21GiB per rank\n"));
  EXPECT_THAT(text, HasSubstr("placement:\n  RANK  HOST  SLOT  AGENT\n     1  h        0  a\n"));
  EXPECT_THAT(text, HasSubstr("spec:\n  name: llama\n"));
  EXPECT_THAT(text, HasSubstr("  model:\n    model_name_or_path: /models/x\n"));
}

TEST(CliFormatTest, OutcomeLine) {
  v1::Job job;
  job.set_id("j");
  job.set_state(v1::CANCELLED);
  EXPECT_EQ(FormatOutcome(job), "job j CANCELLED");
  job.set_state_reason("cancelled by user");
  EXPECT_EQ(FormatOutcome(job), "job j CANCELLED: cancelled by user");
}

TEST(CliFormatTest, JsonUsesProtoFieldNamesOnOneLine) {
  v1::JobEvent e = At(12, 0);
  e.set_job_id("job-1");
  e.mutable_step()->set_tokens_per_second(10);
  const std::string line = ToJsonLine(e);
  EXPECT_EQ(line.find('\n'), std::string::npos);
  nlohmann::json j = nlohmann::json::parse(line);
  EXPECT_EQ(j["job_id"], "job-1");
  EXPECT_EQ(j["seq"], "12");
  EXPECT_EQ(j["step"]["tokens_per_second"], 10);

  v1::Job job;
  job.set_state(v1::SUCCEEDED);
  job.set_adapter_path("/a");
  j = nlohmann::json::parse(ToJsonLine(job));
  EXPECT_EQ(j["state"], "SUCCEEDED");
  EXPECT_EQ(j["adapter_path"], "/a");
}

TEST(CliFormatTest, RpcErrorLinesSayWhatToDo) {
  ConnectionOptions options;
  options.coordinator = "10.0.0.1:7450";
  EXPECT_EQ(DescribeRpcError("cannot list jobs", options,
                             absl::UnavailableError("failed to connect to all addresses")),
            "cannot reach coordinator at 10.0.0.1:7450: failed to connect to all addresses "
            "(start ftune-coordinator or set --coordinator)");
  EXPECT_EQ(DescribeRpcError("cannot list jobs", options, absl::UnauthenticatedError("no token")),
            "cannot list jobs: no token (the coordinator wants a token: pass --token-file)");
  options.token = "t";
  EXPECT_EQ(DescribeRpcError("cannot list jobs", options, absl::UnauthenticatedError("bad")),
            "cannot list jobs: bad (check the token in --token-file)");
  EXPECT_EQ(DescribeRpcError("cannot get job x", options, absl::DeadlineExceededError("")),
            "cannot get job x: coordinator at 10.0.0.1:7450 did not answer within 30s");
  EXPECT_EQ(DescribeRpcError("cannot get job x", options, absl::NotFoundError("job x not found")),
            "cannot get job x: job x not found");
  EXPECT_TRUE(IsTransient(absl::UnavailableError("")));
  EXPECT_TRUE(IsTransient(absl::AbortedError("")));
  EXPECT_FALSE(IsTransient(absl::NotFoundError("")));
  EXPECT_FALSE(IsTransient(absl::DeadlineExceededError("")));
  EXPECT_EQ(FromGrpcStatus(grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "m")),
            absl::FailedPreconditionError("m"));
  EXPECT_TRUE(FromGrpcStatus(grpc::Status::OK).ok());
}

}  // namespace
}  // namespace ftune::cli
