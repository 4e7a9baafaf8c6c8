// Runs the real `ftune` binary against an in-process fake JobService on
// loopback and checks what a user sees: exit codes, stdout, stderr, and the
// requests that reached the coordinator (request ids, filters, page tokens,
// after_seq on resume, the bearer token).
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <netinet/in.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "fake_job_service.h"
#include "temp_dir.h"

namespace ftune {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::Not;
using testing::FakeCoordinator;

struct Result {
  int exit_code = -1;  // -1: killed at the deadline
  std::string out;
  std::string err;
};

// Runs ftune with `args` and the given extra environment (FTUNE_* variables
// of the test's own environment are not passed on). Killed after `timeout`.
Result RunFtune(const std::vector<std::string>& args, const std::vector<std::string>& env = {},
                std::chrono::seconds timeout = std::chrono::seconds(30)) {
  // Everything exec needs is built before fork: the test process has gRPC
  // threads, so the child may only call async-signal-safe functions.
  std::vector<std::string> argv_storage = {FTUNE_BINARY};
  argv_storage.insert(argv_storage.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& a : argv_storage) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::vector<std::string> env_storage;
  for (char** e = environ; *e != nullptr; ++e) {
    if (std::string(*e).rfind("FTUNE_", 0) != 0) env_storage.emplace_back(*e);
  }
  env_storage.insert(env_storage.end(), env.begin(), env.end());
  std::vector<char*> envp;
  for (std::string& e : env_storage) envp.push_back(e.data());
  envp.push_back(nullptr);

  int out_pipe[2], err_pipe[2];
  if (pipe2(out_pipe, O_CLOEXEC) != 0 || pipe2(err_pipe, O_CLOEXEC) != 0) {
    ADD_FAILURE() << "pipe failed";
    return {};
  }
  const pid_t pid = fork();
  if (pid == 0) {
    dup2(out_pipe[1], 1);
    dup2(err_pipe[1], 2);
    execve(argv[0], argv.data(), envp.data());
    _exit(127);
  }
  close(out_pipe[1]);
  close(err_pipe[1]);

  Result result;
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  bool killed = false;
  pollfd fds[2] = {{out_pipe[0], POLLIN, 0}, {err_pipe[0], POLLIN, 0}};
  std::string* sinks[2] = {&result.out, &result.err};
  int open_fds = 2;
  while (open_fds > 0) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      kill(pid, SIGKILL);
      killed = true;
      break;
    }
    if (poll(fds, 2, static_cast<int>(left.count())) < 0) break;
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || fds[i].revents == 0) continue;
      char buf[4096];
      const ssize_t n = read(fds[i].fd, buf, sizeof(buf));
      if (n > 0) {
        sinks[i]->append(buf, static_cast<size_t>(n));
      } else {
        close(fds[i].fd);
        fds[i].fd = -1;
        --open_fds;
      }
    }
  }
  for (pollfd& p : fds) {
    if (p.fd >= 0) close(p.fd);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  if (!killed && WIFEXITED(status)) result.exit_code = WEXITSTATUS(status);
  return result;
}

std::vector<std::string> Lines(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

int Count(const std::string& text, const std::string& needle) {
  int n = 0;
  for (size_t pos = text.find(needle); pos != std::string::npos;
       pos = text.find(needle, pos + needle.size())) {
    ++n;
  }
  return n;
}

constexpr char kValidSpec[] = R"(name: tiny-run
model: {model_name_or_path: /models/tiny}
dataset: {data_files: [train.jsonl], format: text}
lora: {r: 8, lora_alpha: 16}
training: {learning_rate: 2.0e-4, max_steps: 10}
resources: {num_ranks: 2}
labels: {team: nlp}
)";

v1::Job MakeJob(const std::string& id, v1::JobState state, const std::string& reason = "") {
  v1::Job job;
  job.set_id(id);
  job.set_state(state);
  job.set_state_reason(reason);
  job.mutable_spec()->set_name(id + "-name");
  job.mutable_spec()->mutable_resources()->set_num_ranks(2);
  job.set_create_time_unix_ms(1714564800000);
  return job;
}

v1::JobEvent Event(int64_t seq, int32_t rank) {
  v1::JobEvent e;
  e.set_seq(seq);
  e.set_rank(rank);
  e.set_time_unix_ms(1714564800000 + seq * 1000);
  return e;
}

// A job's whole life: scheduled, two steps on two ranks, memory, a
// checkpoint, rank 0 done, succeeded. Seqs 1..8.
std::vector<v1::JobEvent> SucceededRun(const std::string& job_id) {
  std::vector<v1::JobEvent> events;
  auto add = [&](v1::JobEvent e) {
    e.set_job_id(job_id);
    events.push_back(e);
    return &events.back();
  };
  v1::JobEvent e = Event(1, -1);
  e.mutable_state_change()->set_from(v1::SCHEDULED);
  e.mutable_state_change()->set_to(v1::RUNNING);
  e.mutable_state_change()->set_reason("all ranks said hello");
  add(e);
  for (int step = 1; step <= 2; ++step) {
    for (int rank = 0; rank < 2; ++rank) {
      e = Event(static_cast<int64_t>(1 + (step - 1) * 2 + rank + 1), rank);
      auto* m = e.mutable_step();
      m->set_step(step);
      m->set_loss(2.0 / step + rank * 0.01);
      m->set_learning_rate(2e-4);
      m->set_grad_norm(0.5);
      m->set_tokens_per_second(1000.0 + rank);
      add(e);
    }
  }
  e = Event(6, 0);
  e.mutable_memory()->set_allocated_bytes(1073741824);
  e.mutable_memory()->set_reserved_bytes(2147483648);
  e.mutable_memory()->set_peak_bytes(1610612736);
  e.mutable_memory()->set_host_rss_bytes(536870912);
  e.mutable_memory()->set_phase("train");
  add(e);
  e = Event(7, 0);
  e.mutable_checkpoint()->set_step(2);
  e.mutable_checkpoint()->set_path("/out/checkpoint-2");
  e.mutable_checkpoint()->set_bytes(33554432);
  e.mutable_checkpoint()->set_complete(true);
  e.mutable_checkpoint()->set_duration_seconds(1.5);
  add(e);
  e = Event(8, 0);
  e.mutable_done()->set_final_step(2);
  e.mutable_done()->set_final_loss(1.0);
  e.mutable_done()->set_adapter_path("/out/adapter");
  add(e);
  return events;
}

class CliIntegrationTest : public ::testing::Test {
 protected:

  std::string WriteFile(const std::string& name, const std::string& contents) {
    const std::string path = (dir_ / name).string();
    std::ofstream(path) << contents;
    return path;
  }

  // A finished run of job-1 whose stream ends in SUCCEEDED.
  void AddSucceededJob(const std::string& id) {
    auto& s = fake_.service();
    std::lock_guard<std::mutex> lock(s.mu);
    v1::Job job = MakeJob(id, v1::RUNNING);
    job.set_last_event_seq(8);
    s.jobs[id] = job;
    s.events[id] = SucceededRun(id);
    s.finish_on_watch_end[id] = {v1::SUCCEEDED, "all ranks exited 0"};
  }

  std::vector<std::string> Args(std::vector<std::string> args) {
    args.insert(args.begin(), "--coordinator");
    args.insert(args.begin() + 1, fake_.address());
    return args;
  }

  testutil::TempDir tmp_{"ftune_cli_test"};
  const std::filesystem::path dir_{tmp_.path()};
  FakeCoordinator fake_;
};

TEST_F(CliIntegrationTest, SubmitSendsDefaultedSpecAndPrintsJobId) {
  const std::string spec = WriteFile("job.yaml", kValidSpec);
  Result r = RunFtune(Args({"submit", spec, "--request-id", "req-42"}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "job-1\n");
  auto& s = fake_.service();
  std::lock_guard<std::mutex> lock(s.mu);
  ASSERT_EQ(s.create_requests.size(), 1u);
  const v1::CreateJobRequest& req = s.create_requests[0];
  EXPECT_EQ(req.request_id(), "req-42");
  EXPECT_EQ(req.spec().name(), "tiny-run");
  EXPECT_EQ(req.spec().resources().num_ranks(), 2);
  EXPECT_EQ(req.spec().labels().at("team"), "nlp");
  // Defaults were applied before sending.
  EXPECT_FALSE(req.spec().training().lr_scheduler_type().empty());
  EXPECT_GT(req.spec().lora().target_modules_size(), 0);
}

TEST_F(CliIntegrationTest, SubmitRetriesTransientFailureWithTheSameRandomRequestId) {
  fake_.service().fail_create_calls = 1;
  const std::string spec = WriteFile("job.yaml", kValidSpec);
  Result r = RunFtune(Args({"submit", spec, "-o", "json"}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  nlohmann::json job = nlohmann::json::parse(r.out);
  EXPECT_EQ(job["id"], "job-2");
  EXPECT_EQ(job["state"], "QUEUED");
  auto& s = fake_.service();
  std::lock_guard<std::mutex> lock(s.mu);
  ASSERT_EQ(s.create_requests.size(), 2u);
  const std::string id = s.create_requests[0].request_id();
  EXPECT_TRUE(std::regex_match(
      id, std::regex("[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")))
      << id;
  EXPECT_EQ(s.create_requests[1].request_id(), id);
  EXPECT_EQ(job["request_id"], id);
}

TEST_F(CliIntegrationTest, MalformedSpecExitsTwoNamingTheKeyWithoutAnyRpc) {
  const std::string spec = WriteFile(
      "bad.yaml", std::string(kValidSpec) + "fsdp: {sharding_strategy: FULL_SHARD, shard: x}\n");
  Result r = RunFtune(Args({"submit", spec}));
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("fsdp.shard"));
  EXPECT_THAT(r.err, HasSubstr(spec));
  EXPECT_EQ(r.out, "");

  const std::string bad_type = WriteFile(
      "bad_type.yaml",
      "name: x\nmodel: {model_name_or_path: /m}\ndataset: {data_files: [a.jsonl]}\n"
      "training: {learning_rate: fast, max_steps: 10}\n");
  r = RunFtune(Args({"submit", bad_type}));
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("training.learning_rate"));
  EXPECT_THAT(r.err, HasSubstr("fast"));

  std::lock_guard<std::mutex> lock(fake_.service().mu);
  EXPECT_EQ(fake_.service().num_calls, 0);
}

TEST_F(CliIntegrationTest, InvalidSpecPrintsEveryErrorOnItsOwnLine) {
  const std::string spec = WriteFile(
      "invalid.yaml",
      "model: {model_name_or_path: /m}\ndataset: {data_files: [a.jsonl]}\n"
      "training: {learning_rate: 1.5, max_steps: 10, gradient_accumulation_steps: -1}\n"
      "resources: {num_ranks: -2}\n");
  Result r = RunFtune(Args({"submit", spec}));
  EXPECT_EQ(r.exit_code, 2);
  std::vector<std::string> lines = Lines(r.err);
  EXPECT_GE(lines.size(), 3u) << r.err;
  EXPECT_THAT(r.err, HasSubstr("training.learning_rate (1.5)"));
  EXPECT_THAT(r.err, HasSubstr("training.gradient_accumulation_steps (-1)"));
  EXPECT_THAT(r.err, HasSubstr("resources.num_ranks (-2)"));
  for (const std::string& line : lines) EXPECT_EQ(line.rfind("ftune: " + spec + ": ", 0), 0u);
  std::lock_guard<std::mutex> lock(fake_.service().mu);
  EXPECT_EQ(fake_.service().num_calls, 0);
}

TEST_F(CliIntegrationTest, BearerTokenFromFileOrEnvironment) {
  fake_.service().required_token = "s3cret";
  const std::string token = WriteFile("token", "s3cret\n");

  Result r = RunFtune(Args({"agents"}));
  EXPECT_EQ(r.exit_code, 4);
  EXPECT_THAT(r.err, AllOf(HasSubstr("ftune: cannot list agents: missing or wrong client token"),
                           HasSubstr("--token-file")));

  r = RunFtune(Args({"--token-file", token, "agents"}));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "no agents\n");

  r = RunFtune(Args({"agents"}), {"FTUNE_TOKEN_FILE=" + token});
  EXPECT_EQ(r.exit_code, 0) << r.err;

  const std::string wrong = WriteFile("wrong", "nope");
  r = RunFtune(Args({"--token-file", wrong, "agents"}));
  EXPECT_EQ(r.exit_code, 4);
  EXPECT_THAT(r.err, HasSubstr("check the token"));

  auto& s = fake_.service();
  std::lock_guard<std::mutex> lock(s.mu);
  ASSERT_EQ(s.authorization.size(), 4u);
  EXPECT_EQ(s.authorization[0], "");
  EXPECT_EQ(s.authorization[1], "Bearer s3cret");
  EXPECT_EQ(s.authorization[2], "Bearer s3cret");
  EXPECT_EQ(s.authorization[3], "Bearer nope");
}

TEST_F(CliIntegrationTest, MissingTokenFileIsAUsageError) {
  Result r = RunFtune(Args({"--token-file", (dir_ / "absent").string(), "jobs"}));
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("cannot read token file"));
  std::lock_guard<std::mutex> lock(fake_.service().mu);
  EXPECT_EQ(fake_.service().num_calls, 0);
}

TEST_F(CliIntegrationTest, JobsPagesThroughEveryPageWithFilters) {
  {
    auto& s = fake_.service();
    std::lock_guard<std::mutex> lock(s.mu);
    s.max_page_size = 2;
    for (int i = 1; i <= 5; ++i) {
      v1::Job job = MakeJob("run-" + std::to_string(i), v1::RUNNING);
      (*job.mutable_spec()->mutable_labels())["team"] = "nlp";
      job.set_last_step(10 * i);
      job.set_last_loss(1.5);
      s.jobs[job.id()] = job;
    }
    s.jobs["other"] = MakeJob("other", v1::QUEUED);
  }
  Result r = RunFtune(Args({"jobs", "--state", "running", "--label", "team=nlp"}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::vector<std::string> lines = Lines(r.out);
  ASSERT_EQ(lines.size(), 6u) << r.out;
  EXPECT_THAT(lines[0], AllOf(HasSubstr("ID"), HasSubstr("STATE"), HasSubstr("LOSS")));
  for (int i = 1; i <= 5; ++i) {
    EXPECT_THAT(lines[i], AllOf(HasSubstr("run-" + std::to_string(i)), HasSubstr("RUNNING"),
                                HasSubstr("1.5000")));
  }
  EXPECT_THAT(r.out, Not(HasSubstr("other")));
  // Columns line up: STATE starts at the same offset on every line.
  const size_t col = lines[0].find("STATE");
  for (size_t i = 1; i < lines.size(); ++i) EXPECT_EQ(lines[i].find("RUNNING"), col);

  auto& s = fake_.service();
  std::lock_guard<std::mutex> lock(s.mu);
  ASSERT_EQ(s.list_requests.size(), 3u);
  EXPECT_EQ(s.list_requests[0].page_token(), "");
  EXPECT_EQ(s.list_requests[1].page_token(), "2");
  EXPECT_EQ(s.list_requests[2].page_token(), "4");
  for (const auto& req : s.list_requests) {
    ASSERT_EQ(req.states_size(), 1);
    EXPECT_EQ(req.states(0), v1::RUNNING);
    EXPECT_EQ(req.labels().at("team"), "nlp");
  }
}

TEST_F(CliIntegrationTest, JobsLimitStopsPaging) {
  {
    auto& s = fake_.service();
    std::lock_guard<std::mutex> lock(s.mu);
    s.max_page_size = 2;
    for (int i = 1; i <= 5; ++i) s.jobs["j" + std::to_string(i)] = MakeJob("j" + std::to_string(i), v1::QUEUED);
  }
  Result r = RunFtune(Args({"jobs", "--limit", "3", "--output", "json"}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  nlohmann::json all = nlohmann::json::parse(r.out);
  ASSERT_EQ(all["jobs"].size(), 3u);
  EXPECT_EQ(all["jobs"][2]["id"], "j3");
  auto& s = fake_.service();
  std::lock_guard<std::mutex> lock(s.mu);
  ASSERT_EQ(s.list_requests.size(), 2u);
  EXPECT_EQ(s.list_requests[0].page_size(), 3);
  EXPECT_EQ(s.list_requests[1].page_size(), 1);
}

TEST_F(CliIntegrationTest, DescribeShowsFieldsPlacementAndSpec) {
  {
    auto& s = fake_.service();
    std::lock_guard<std::mutex> lock(s.mu);
    v1::Job job = MakeJob("job-7", v1::RUNNING, "training");
    job.mutable_spec()->mutable_model()->set_model_name_or_path("/models/llama");
    auto* p = job.add_placement();
    p->set_rank(0);
    p->set_host("gpu-host-a");
    p->set_slot(3);
    p->set_agent_id("agent-a");
    s.jobs[job.id()] = job;
  }
  Result r = RunFtune(Args({"describe", "job-7"}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("state:         RUNNING\n"));
  EXPECT_THAT(r.out, HasSubstr("reason:        training\n"));
  EXPECT_THAT(r.out, HasSubstr("created:       2024-05-01T12:00:00Z ("));
  EXPECT_THAT(r.out, HasSubstr("placement:\n  RANK  HOST"));
  EXPECT_THAT(r.out, HasSubstr("gpu-host-a"));
  EXPECT_THAT(r.out, HasSubstr("spec:\n"));
  EXPECT_THAT(r.out, HasSubstr("model_name_or_path: /models/llama"));

  r = RunFtune(Args({"describe", "nope"}));
  EXPECT_EQ(r.exit_code, 4);
  EXPECT_EQ(r.err, "ftune: cannot get job nope: job nope not found\n");

  // Not found is final: no reconnect loop.
  r = RunFtune(Args({"watch", "nope"}));
  EXPECT_EQ(r.exit_code, 4);
  EXPECT_EQ(r.err, "ftune: cannot watch job nope: job nope not found\n");
  std::lock_guard<std::mutex> lock(fake_.service().mu);
  EXPECT_EQ(fake_.service().watch_requests.size(), 1u);
}

TEST_F(CliIntegrationTest, WatchResumesAfterDroppedStreamWithoutRepeatsOrGaps) {
  AddSucceededJob("job-1");
  fake_.service().drop_first_watch_after = 3;
  Result r = RunFtune(Args({"watch", "job-1"}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.err, HasSubstr("resuming after event 3"));
  // Every event exactly once, in order.
  EXPECT_EQ(Count(r.out, "state SCHEDULED -> RUNNING: all ranks said hello"), 1);
  EXPECT_EQ(Count(r.out, "rank 0   step 1  loss 2.0000  lr 2.000e-04  grad_norm 0.500  "
                         "tokens/s 1000.0"),
            1);
  EXPECT_EQ(Count(r.out, "rank 1   step 1 "), 1);
  EXPECT_EQ(Count(r.out, "rank 0   step 2 "), 1);
  EXPECT_EQ(Count(r.out, "rank 1   step 2 "), 1);
  EXPECT_EQ(Count(r.out, "memory (train)  allocated 1GiB  reserved 2GiB  peak 1.5GiB  "
                         "host_rss 512MiB"),
            1);
  EXPECT_EQ(Count(r.out, "checkpoint step 2  /out/checkpoint-2  32MiB  1.5s  complete"), 1);
  EXPECT_EQ(Count(r.out, "done final_step 2"), 1);
  std::vector<std::string> lines = Lines(r.out);
  ASSERT_EQ(lines.size(), 10u) << r.out;
  EXPECT_EQ(lines[8], "job job-1 SUCCEEDED: all ranks exited 0");
  EXPECT_EQ(lines[9],
            "summary: steps 2, final loss 1.0000, tokens/s 2001.0, peak memory 1.5GiB, "
            "adapter /out/adapter");

  auto& s = fake_.service();
  std::lock_guard<std::mutex> lock(s.mu);
  ASSERT_EQ(s.watch_requests.size(), 2u);
  EXPECT_EQ(s.watch_requests[0].after_seq(), 0);
  EXPECT_TRUE(s.watch_requests[0].follow());
  EXPECT_EQ(s.watch_requests[1].after_seq(), 3);
  EXPECT_TRUE(s.watch_requests[1].follow());
}

TEST_F(CliIntegrationTest, WatchDropsEventsAServerReplays) {
  AddSucceededJob("job-1");
  fake_.service().drop_first_watch_after = 5;
  fake_.service().replay_from_start_on_resume = true;
  Result r = RunFtune(Args({"watch", "job-1", "--output", "json"}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::vector<std::string> lines = Lines(r.out);
  ASSERT_EQ(lines.size(), 9u) << r.out;
  for (int i = 0; i < 8; ++i) {
    nlohmann::json e = nlohmann::json::parse(lines[i]);
    // proto3 JSON writes int64 as a string.
    EXPECT_EQ(e["seq"], std::to_string(i + 1));
    EXPECT_EQ(e["job_id"], "job-1");
  }
  nlohmann::json job = nlohmann::json::parse(lines[8]);
  EXPECT_EQ(job["state"], "SUCCEEDED");
}

TEST_F(CliIntegrationTest, WatchAfterSeqShowsOnlyLaterEvents) {
  AddSucceededJob("job-1");
  Result r = RunFtune(Args({"watch", "job-1", "--after-seq", "6"}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::vector<std::string> lines = Lines(r.out);
  ASSERT_EQ(lines.size(), 4u) << r.out;
  EXPECT_THAT(lines[0], HasSubstr("checkpoint step 2"));
  EXPECT_THAT(lines[1], HasSubstr("done final_step 2"));
  // No step or memory events were seen: the job record fills in what it can.
  EXPECT_EQ(lines[3], "summary: steps 2, final loss 1.0000, tokens/s -, peak memory -, "
                      "adapter /out/adapter");
}

TEST_F(CliIntegrationTest, SubmitFollowEndsWithTheJobsOutcomeAndStderrTail) {
  {
    auto& s = fake_.service();
    std::lock_guard<std::mutex> lock(s.mu);
    v1::JobEvent e = Event(1, 1);
    e.set_job_id("job-1");
    e.mutable_error()->set_message("rank 1 exited with status 1");
    e.mutable_error()->add_stderr_tail("Traceback (most recent call last):");
    e.mutable_error()->add_stderr_tail("RuntimeError: CUDA out of memory");
    s.events["job-1"] = {e};
    s.finish_on_watch_end["job-1"] = {v1::FAILED, "rank 1 exited with status 1"};
  }
  const std::string spec = WriteFile("job.yaml", kValidSpec);
  Result r = RunFtune(Args({"submit", spec, "--follow"}));
  EXPECT_EQ(r.exit_code, 1) << r.err;
  std::vector<std::string> lines = Lines(r.out);
  ASSERT_EQ(lines.size(), 6u) << r.out;
  EXPECT_EQ(lines[0], "job-1");
  EXPECT_EQ(lines[1], "2024-05-01T12:00:01Z rank 1   error: rank 1 exited with status 1");
  EXPECT_EQ(lines[2], "    | Traceback (most recent call last):");
  EXPECT_EQ(lines[3], "    | RuntimeError: CUDA out of memory");
  EXPECT_EQ(lines[4], "job job-1 FAILED: rank 1 exited with status 1");
  EXPECT_EQ(lines[5], "summary: steps -, final loss -, tokens/s -, peak memory -, adapter -");
}

TEST_F(CliIntegrationTest, WaitExitsWithTheOutcome) {
  {
    auto& s = fake_.service();
    std::lock_guard<std::mutex> lock(s.mu);
    s.jobs["ok"] = MakeJob("ok", v1::SUCCEEDED, "all ranks exited 0");
    s.jobs["bad"] = MakeJob("bad", v1::FAILED, "rank 0 hung");
    s.jobs["gone"] = MakeJob("gone", v1::CANCELLED, "cancelled by user");
  }
  Result r = RunFtune(Args({"wait", "ok"}));
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_EQ(r.out, "job ok SUCCEEDED: all ranks exited 0\n");
  r = RunFtune(Args({"wait", "bad"}));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_EQ(r.out, "job bad FAILED: rank 0 hung\n");
  r = RunFtune(Args({"wait", "gone"}));
  EXPECT_EQ(r.exit_code, 3);
  EXPECT_EQ(r.out, "job gone CANCELLED: cancelled by user\n");
  std::lock_guard<std::mutex> lock(fake_.service().mu);
  EXPECT_TRUE(fake_.service().watch_requests.empty());
}

TEST_F(CliIntegrationTest, WaitFollowsALiveJobFromItsNewestEvent) {
  AddSucceededJob("job-1");
  fake_.service().drop_first_watch_after = 0;
  Result r = RunFtune(Args({"wait", "job-1"}));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "job job-1 SUCCEEDED: all ranks exited 0\n");
  auto& s = fake_.service();
  std::lock_guard<std::mutex> lock(s.mu);
  ASSERT_EQ(s.watch_requests.size(), 2u);
  EXPECT_EQ(s.watch_requests[0].after_seq(), 8);
  EXPECT_EQ(s.watch_requests[1].after_seq(), 8);
}

TEST_F(CliIntegrationTest, CancelLiveJobAndRefusalOfFinishedOne) {
  {
    auto& s = fake_.service();
    std::lock_guard<std::mutex> lock(s.mu);
    s.jobs["live"] = MakeJob("live", v1::RUNNING);
    s.jobs["done"] = MakeJob("done", v1::SUCCEEDED);
  }
  Result r = RunFtune(Args({"cancel", "live"}));
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "job live CANCELLING\n");
  r = RunFtune(Args({"cancel", "done"}));
  EXPECT_EQ(r.exit_code, 4);
  EXPECT_EQ(r.err, "ftune: cannot cancel job done: job done already ended (SUCCEEDED)\n");
}

TEST_F(CliIntegrationTest, CheckpointsAndAgentsTables) {
  {
    auto& s = fake_.service();
    std::lock_guard<std::mutex> lock(s.mu);
    s.jobs["job-1"] = MakeJob("job-1", v1::RUNNING);
    v1::Checkpoint c;
    c.set_job_id("job-1");
    c.set_step(50);
    c.set_path("/out/checkpoint-50");
    c.set_bytes(3221225472);
    c.set_complete(true);
    c.set_create_time_unix_ms(1714564800000);
    s.checkpoints["job-1"] = {c};
    v1::Agent a;
    a.set_agent_id("agent-a");
    a.set_host("gpu-host-a");
    a.set_alive(true);
    for (int i = 0; i < 2; ++i) {
      v1::Slot* slot = a.add_slots();
      slot->set_index(i);
      slot->set_name("NVIDIA H100");
      slot->set_memory_bytes(85899345920);
    }
    v1::RankPlacement* used = a.add_used();
    used->set_rank(0);
    used->set_job_id("job-7");
    s.agents = {a};
  }
  Result r = RunFtune(Args({"checkpoints", "job-1"}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::vector<std::string> lines = Lines(r.out);
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_THAT(lines[1], AllOf(HasSubstr("50"), HasSubstr("3GiB"), HasSubstr("yes"),
                              HasSubstr("/out/checkpoint-50")));

  r = RunFtune(Args({"agents"}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  lines = Lines(r.out);
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_THAT(lines[1], AllOf(HasSubstr("agent-a"), HasSubstr("gpu-host-a"), HasSubstr("alive"),
                              HasSubstr("1/2 used"), HasSubstr("job-7"),
                              HasSubstr("2x NVIDIA H100 (80GiB)")));
}

TEST_F(CliIntegrationTest, CoordinatorFromEnvironmentAndUnreachableCoordinator) {
  Result r = RunFtune({"jobs"}, {"FTUNE_COORDINATOR=" + fake_.address()});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "no jobs\n");

  // A loopback port nothing listens on: bind one, then close it.
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  close(fd);
  const std::string dead = "127.0.0.1:" + std::to_string(ntohs(addr.sin_port));

  r = RunFtune({"--coordinator", dead, "jobs"});
  EXPECT_EQ(r.exit_code, 4);
  EXPECT_THAT(r.err, AllOf(HasSubstr("ftune: cannot reach coordinator at " + dead + ": "),
                           HasSubstr("(start ftune-coordinator or set --coordinator)")));
  EXPECT_EQ(Lines(r.err).size(), 1u);
}

// The first word of each line of the "Subcommands:" section of a help text.
std::vector<std::string> ListedSubcommands(const std::string& help) {
  std::vector<std::string> names;
  bool in_section = false;
  for (const std::string& line : Lines(help)) {
    if (line.rfind("Subcommands:", 0) == 0) {
      in_section = true;
      continue;
    }
    if (!in_section) continue;
    if (line.empty() || line[0] != ' ') break;  // the next section
    std::istringstream words(line);
    std::string name;
    if (words >> name) names.push_back(name);
  }
  return names;
}

TEST(CliHelpTest, HelpListsDataAmongTheSubcommands) {
  const Result r = RunFtune({"--help"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(ListedSubcommands(r.out),
              ::testing::ElementsAre("submit", "jobs", "describe", "watch", "cancel", "wait",
                                     "checkpoints", "agents", "data"))
      << r.out;

  // `ftune data --help` is the data tools' own help, not the list above.
  const Result data = RunFtune({"data", "--help"});
#ifdef FTUNE_CLI_HAS_DATA
  EXPECT_EQ(data.exit_code, 0) << data.err;
  EXPECT_THAT(ListedSubcommands(data.out),
              ::testing::ElementsAre("tokenize", "detokenize", "prepare", "inspect"))
      << data.out;
#else
  EXPECT_EQ(data.exit_code, 2);
  EXPECT_THAT(data.err, HasSubstr("`ftune data` is not part of this build"));
#endif
}

}  // namespace
}  // namespace ftune

namespace ftune {
namespace {

std::string ReadAll(const std::filesystem::path& path) {
  std::ifstream in(path);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// TLS: a self-signed certificate for 127.0.0.1 made with the openssl tool.
TEST(CliTlsIntegrationTest, TlsCaConnectsOverTlsAndPlaintextDoesNot) {
  testutil::TempDir tmp("ftune_cli_tls");
  const std::filesystem::path dir = tmp.path();
  const std::string key = (dir / "key.pem").string();
  const std::string cert = (dir / "cert.pem").string();
  const std::string cmd =
      "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=127.0.0.1 "
      "-addext subjectAltName=IP:127.0.0.1 -keyout " + key + " -out " + cert +
      " >/dev/null 2>&1";
  if (std::system(cmd.c_str()) != 0) {
    GTEST_SKIP() << "the openssl tool is not available to make a test certificate";
  }
  grpc::SslServerCredentialsOptions ssl;
  ssl.pem_key_cert_pairs.push_back({ReadAll(key), ReadAll(cert)});
  testing::FakeCoordinator fake(grpc::SslServerCredentials(ssl));

  Result r = RunFtune({"--coordinator", fake.address(), "--tls-ca", cert, "agents"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "no agents\n");

  r = RunFtune({"--coordinator", fake.address(), "agents"});
  EXPECT_EQ(r.exit_code, 4);
  EXPECT_THAT(r.err, HasSubstr("cannot reach coordinator at " + fake.address()));
}

}  // namespace
}  // namespace ftune
