// What a job may touch, on loopback: real coordinator, agents and the
// scripted ftune-test-rank.
//   * a FIFO named config.json does not hang CreateJob (the memory plan
//     reads it);
//   * /dev/zero, '..' and symlink escapes are refused at submit;
//   * an agent with stricter roots than the coordinator fails the job as
//     bad input, without restarts and without starting a rank;
//   * two jobs naming one output_dir keep their own checkpoints;
//   * watchers of one job past --max-watchers-per-job are refused.
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "cluster.h"
#include "ftune/file_util.h"

namespace ftune::testing {
namespace {

using std::chrono::seconds;

std::string Describe(const v1::Job& job) {
  return v1::JobState_Name(job.state()) + " (" + job.state_reason() + ")";
}

grpc::Status Create(Cluster& c, const v1::JobSpec& spec, v1::Job* job) {
  auto stub = c.Client();
  grpc::ClientContext ctx;
  c.AddAuth(&ctx);
  ctx.set_deadline(std::chrono::system_clock::now() + seconds(30));
  v1::CreateJobRequest req;
  *req.mutable_spec() = spec;
  return stub->CreateJob(&ctx, req, job);
}

TEST(Paths, AFifoAsConfigJsonDoesNotHangCreateJob) {
  Cluster c;
  // A plan timeout far above the test's bound: only a read that does not
  // block can make CreateJob this quick.
  c.StartCoordinator({"--plan-timeout=120"});
  c.StartAgent("host-a", 1);
  ASSERT_TRUE(c.WaitAgents(1));
  const std::string model = c.dir() + "/fifo-model";
  ASSERT_TRUE(MakeDirectories(model).ok());
  ASSERT_EQ(::mkfifo((model + "/config.json").c_str(), 0600), 0);
  v1::JobSpec spec = c.Spec(1, 3, 0);
  spec.mutable_model()->set_model_name_or_path(model);
  const auto start = std::chrono::steady_clock::now();
  v1::Job job;
  const grpc::Status st = Create(c, spec, &job);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_LT(std::chrono::steady_clock::now() - start, seconds(5));
  EXPECT_EQ(job.planned_device_bytes(), 0);  // no plan: config.json is not a file
  ASSERT_TRUE(c.WaitState(job.id(), v1::SUCCEEDED, seconds(30))) << Describe(c.GetJob(job.id()));
}

TEST(Paths, DevZeroDotDotAndSymlinkEscapesAreRefusedAtSubmit) {
  Cluster c;
  const std::string data = c.dir() + "/data";
  ASSERT_TRUE(MakeDirectories(data).ok());
  std::ofstream(c.dir() + "/secret.jsonl") << "{\"text\": \"x\"}\n";
  ASSERT_EQ(::symlink((c.dir() + "/secret.jsonl").c_str(), (data + "/link.jsonl").c_str()), 0);
  c.StartCoordinator({"--allowed-root=" + data});
  c.StartAgent("host-a", 1);
  ASSERT_TRUE(c.WaitAgents(1));

  struct Case {
    std::string data_file, output_dir, words;
  };
  const std::vector<Case> cases = {
      {"/dev/zero", "", "dataset.data_files[0] (/dev/zero) is outside the allowed roots"},
      {data + "/../secret.jsonl", "", "must not contain '..' components"},
      {data + "/link.jsonl", "",
       "which resolves to " + c.dir() + "/secret.jsonl, is outside the allowed roots (" + data},
      {data + "/train.jsonl", "/tmp/elsewhere", "output_dir (/tmp/elsewhere) is outside"},
  };
  for (const Case& k : cases) {
    v1::JobSpec spec = c.Spec(1, 3, 0);
    spec.mutable_model()->set_model_name_or_path(data + "/model");
    spec.mutable_dataset()->set_data_files(0, k.data_file);
    spec.set_output_dir(k.output_dir.empty() ? data + "/out" : k.output_dir);
    v1::Job job;
    const grpc::Status st = Create(c, spec, &job);
    EXPECT_EQ(st.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << k.data_file;
    EXPECT_NE(st.error_message().find(k.words), std::string::npos) << st.error_message();
  }
}

TEST(Paths, AnAgentWithStricterRootsFailsTheJobAsBadInput) {
  Cluster c;
  const std::string data = c.dir() + "/data";
  ASSERT_TRUE(MakeDirectories(data).ok());
  std::ofstream(c.dir() + "/other.jsonl") << "{\"text\": \"x\"}\n";
  c.StartCoordinator();  // no roots: any absolute path
  c.StartAgent("host-a", 2, {"--allowed-root=" + data});
  ASSERT_TRUE(c.WaitAgents(1));
  v1::JobSpec spec = c.Spec(2, 3, 0);
  spec.mutable_model()->set_model_name_or_path(data + "/model");
  spec.mutable_dataset()->set_data_files(0, c.dir() + "/other.jsonl");
  spec.set_output_dir(data + "/out");
  spec.set_max_restarts(3);
  const v1::Job job = c.Submit(spec);
  ASSERT_TRUE(c.WaitState(job.id(), v1::FAILED, seconds(30))) << Describe(c.GetJob(job.id()));
  const v1::Job failed = c.GetJob(job.id());
  EXPECT_EQ(failed.restarts(), 0);
  EXPECT_EQ(failed.reason_code(), "bad_input");
  EXPECT_NE(failed.state_reason().find("dataset.data_files[0] (" + c.dir() +
                                       "/other.jsonl) is outside the allowed roots"),
            std::string::npos)
      << failed.state_reason();
  for (const auto& e : c.Events(job.id()))
    EXPECT_FALSE(e.has_log() && e.log().text().find(" started on ") != std::string::npos)
        << "a rank started: " << e.log().text();
}

TEST(Paths, TwoJobsWithOneOutputDirKeepTheirOwnCheckpoints) {
  Cluster c;
  c.StartCoordinator();
  c.StartAgent("host-a", 2);
  ASSERT_TRUE(c.WaitAgents(1));
  const std::string out = c.dir() + "/shared-out";
  std::vector<v1::Job> jobs;
  for (int i = 0; i < 2; ++i) {
    v1::JobSpec spec = c.Spec(1, 8, 2);
    spec.set_output_dir(out);
    jobs.push_back(c.Submit(spec));
  }
  for (const v1::Job& job : jobs) {
    ASSERT_TRUE(c.WaitState(job.id(), v1::SUCCEEDED, seconds(60)))
        << Describe(c.GetJob(job.id()));
    const std::string own = out + "/" + job.id() + "/";
    const auto checkpoints = c.Checkpoints(job.id());
    ASSERT_FALSE(checkpoints.empty());
    for (const auto& ck : checkpoints)
      EXPECT_EQ(ck.path().rfind(own, 0), 0u) << ck.path() << " is not under " << own;
    EXPECT_EQ(c.GetJob(job.id()).adapter_path().rfind(own, 0), 0u);
  }
  EXPECT_NE(c.GetJob(jobs[0].id()).adapter_path(), c.GetJob(jobs[1].id()).adapter_path());
}

TEST(Paths, WatchersOfOneJobPastTheCapAreRefused) {
  Cluster c;
  c.StartCoordinator({"--max-watchers-per-job=2"});
  c.StartAgent("host-a", 1);
  ASSERT_TRUE(c.WaitAgents(1));
  const v1::Job job = c.Submit(c.Spec(1, 400, 0));
  ASSERT_TRUE(c.WaitFor_Step(job.id(), 1));
  auto stub = c.Client();
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
  std::vector<std::unique_ptr<grpc::ClientReader<v1::WatchJobResponse>>> readers;
  for (int i = 0; i < 3; ++i) {
    contexts.push_back(std::make_unique<grpc::ClientContext>());
    c.AddAuth(contexts.back().get());
    v1::WatchJobRequest req;
    req.set_job_id(job.id());
    req.set_follow(true);
    readers.push_back(stub->WatchJob(contexts.back().get(), req));
    v1::WatchJobResponse r;
    if (i < 2) ASSERT_TRUE(readers.back()->Read(&r)) << "watcher " << i;
  }
  v1::WatchJobResponse r;
  EXPECT_FALSE(readers[2]->Read(&r));
  const grpc::Status st = readers[2]->Finish();
  EXPECT_EQ(st.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_NE(st.error_message().find("--max-watchers-per-job"), std::string::npos)
      << st.error_message();
  for (auto& ctx : contexts) ctx->TryCancel();
  for (int i = 0; i < 2; ++i) readers[i]->Finish();
  EXPECT_TRUE(c.Cancel(job.id()).ok());
}

}  // namespace
}  // namespace ftune::testing
