// Real fine-tunes through the whole system on CPU. A coordinator,
// agents with CPU slots and the real ftune-rank (NF4 + LoRA + FSDP over
// Gloo) train a tiny random Llama written by `ftune-rank init-model` on the
// examples/ instruction dataset, and the failure cases of the control plane
// are replayed with real training: the adapters must come out identical to
// an uninterrupted run (or to `ftune-rank train` standalone).
#include <dirent.h>
#include <signal.h>
#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <thread>

#include <gtest/gtest.h>

#include "cluster.h"
#include "jobspec.h"
#include "temp_dir.h"

namespace ftune::testing {
namespace {

using std::chrono::seconds;

testutil::TempDir* g_model_root = nullptr;  // written once per test binary
std::string g_model_dir;

// Runs a command, returns its exit code; output goes to `log`.
int RunCommand(const std::string& command, const std::string& log) {
  return std::system((command + " >" + log + " 2>&1").c_str());
}

class TrainE2e : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    g_model_root = new testutil::TempDir("ftune-e2e-model");
    const std::string root = g_model_root->path();
    g_model_dir = root + "/tiny";
    const int rc = RunCommand(std::string(FTUNE_RANK_BIN) + " init-model --preset tiny --layers 2" +
                           " --vocab-size 512 --tokenizer-corpus " + FTUNE_EXAMPLES_DIR +
                           "/data/instructions.jsonl --out " + g_model_dir,
                       root + "/init.log");
    ASSERT_EQ(rc, 0) << ReadFile(root + "/init.log");
  }
  static void TearDownTestSuite() {
    delete g_model_root;
    g_model_root = nullptr;
  }

  // A coordinator and one agent with 2 CPU slots running the real ftune-rank.
  static bool StartWithRealRanks(Cluster& c, const std::string& host) {
    c.StartCoordinator();
    c.StartAgent(host, 2, {}, FTUNE_RANK_BIN);
    return c.WaitAgents(1);
  }

  // A real job: 2 ranks, NF4 + LoRA, FSDP, checkpoints every `save_steps`.
  v1::JobSpec Spec(Cluster& c, int steps, int save_steps, const std::string& name) {
    v1::JobSpec s;
    s.set_name(name);
    s.mutable_model()->set_model_name_or_path(g_model_dir);
    s.mutable_dataset()->add_data_files(std::string(FTUNE_EXAMPLES_DIR) +
                                        "/data/instructions.jsonl");
    s.mutable_lora()->set_r(8);
    s.mutable_lora()->set_lora_alpha(16);
    auto* t = s.mutable_training();
    t->set_max_steps(steps);
    t->set_save_steps(save_steps);
    t->set_per_device_train_batch_size(2);
    t->set_max_seq_len(128);
    t->set_packing(true);
    t->set_learning_rate(2e-3);
    t->set_lr_scheduler_type("cosine");
    t->set_gradient_checkpointing(true);
    s.mutable_resources()->set_num_ranks(2);
    s.set_output_dir(c.dir() + "/out-" + name);
    return s;
  }
};

std::string AdapterBytes(const std::string& dir) {
  return ReadFile(dir + "/adapter_model.safetensors");
}

// The pid of a running `ftune-rank run` for (job, rank), from /proc.
// The rank process of this cluster's job (job ids repeat across clusters
// running at once: its spec lies under the cluster's directory).
pid_t FindRank(const Cluster& c, const std::string& job_id, int rank) {
  DIR* d = ::opendir("/proc");
  pid_t found = -1;
  while (const dirent* e = ::readdir(d)) {
    const pid_t pid = std::atoi(e->d_name);
    if (pid <= 0) continue;
    std::ifstream f("/proc/" + std::string(e->d_name) + "/cmdline");
    std::string cmd((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    for (char& ch : cmd) ch = ch == '\0' ? ' ' : ch;
    if (cmd.find(" run ") != std::string::npos &&
        cmd.find("--spec=" + c.dir() + "/") != std::string::npos &&
        cmd.find("--job-id=" + job_id + " ") != std::string::npos &&
        cmd.find("--rank=" + std::to_string(rank) + " ") != std::string::npos) {
      found = pid;
      break;
    }
  }
  ::closedir(d);
  return found;
}

void ExpectGapFree(const std::vector<v1::JobEvent>& events) {
  std::set<std::tuple<int, int, int64_t>> steps;
  for (size_t i = 0; i < events.size(); ++i) {
    ASSERT_EQ(events[i].seq(), static_cast<int64_t>(i + 1)) << "gap or duplicate at " << i;
    if (events[i].has_step()) {
      EXPECT_TRUE(
          steps.insert({events[i].attempt(), events[i].rank(), events[i].step().step()}).second)
          << "duplicate step " << events[i].step().step();
    }
  }
}

std::vector<double> Rank0Losses(const std::vector<v1::JobEvent>& events, int attempt) {
  std::vector<double> out;
  for (const auto& e : events) {
    if (e.has_step() && e.rank() == 0 && e.attempt() == attempt) out.push_back(e.step().loss());
  }
  return out;
}

TEST_F(TrainE2e, JobTrainsLikeStandaloneAndStreamsToWatch) {
  Cluster c;
  ASSERT_TRUE(StartWithRealRanks(c, "host-a"));
  v1::JobSpec spec = Spec(c, 12, 4, "clean");
  v1::Job job = c.Submit(spec);
  ASSERT_TRUE(c.WaitState(job.id(), v1::SUCCEEDED, seconds(240)))
      << c.GetJob(job.id()).state_reason();
  v1::Job done = c.GetJob(job.id());
  EXPECT_EQ(done.last_step(), 12);
  ASSERT_FALSE(done.adapter_path().empty());
  EXPECT_TRUE(std::filesystem::exists(done.adapter_path() + "/adapter_config.json"));
  auto events = c.Events(job.id());
  ExpectGapFree(events);
  const std::vector<double> losses = Rank0Losses(events, 0);
  ASSERT_EQ(losses.size(), 12u);
  EXPECT_LT(losses.back(), losses.front()) << "the loss should fall";
  auto ck = c.Checkpoints(job.id());
  ASSERT_EQ(ck.size(), 3u);  // steps 4, 8, 12
  EXPECT_EQ(ck.back().step(), 12);

  // `ftune watch` replays the stream and ends with the summary line.
  const std::string watch_log = c.dir() + "/watch.log";
  ASSERT_EQ(RunCommand(std::string(FTUNE_CLI_BIN) + " --coordinator " + c.address() +
                    " --token-file " + c.dir() + "/client.token watch " + job.id(),
                watch_log),
            0)
      << ReadFile(watch_log);
  const std::string watched = ReadFile(watch_log);
  EXPECT_NE(watched.find("step 12"), std::string::npos) << watched;
  EXPECT_NE(watched.find("summary: steps 12"), std::string::npos) << watched;
  EXPECT_NE(watched.find(done.adapter_path()), std::string::npos) << watched;

  // The same spec run standalone gives the same adapter, byte for byte.
  spec.set_output_dir(c.dir() + "/standalone");
  const std::string spec_path = c.dir() + "/standalone.yaml";
  std::ofstream(spec_path) << JobSpecToYaml(spec);
  const std::string log = c.dir() + "/standalone.log";
  ASSERT_EQ(RunCommand(std::string(FTUNE_RANK_BIN) + " train --nproc 2 --spec " + spec_path, log), 0)
      << ReadFile(log);
  EXPECT_EQ(AdapterBytes(c.dir() + "/standalone/adapter"), AdapterBytes(done.adapter_path()));
}

TEST_F(TrainE2e, KilledRankRestartsGangFromCheckpointWithTheSameAdapter) {
  Cluster c;
  ASSERT_TRUE(StartWithRealRanks(c, "host-a"));
  v1::Job clean = c.Submit(Spec(c, 30, 5, "clean"));
  ASSERT_TRUE(c.WaitState(clean.id(), v1::SUCCEEDED, seconds(240)));
  v1::Job job = c.Submit(Spec(c, 30, 5, "killed"));
  ASSERT_TRUE(c.WaitFor_Step(job.id(), 5, seconds(180)));
  const pid_t victim = FindRank(c, job.id(), 1);
  ASSERT_GT(victim, 0);
  ASSERT_EQ(::kill(victim, SIGKILL), 0);
  ASSERT_TRUE(c.WaitState(job.id(), v1::SUCCEEDED, seconds(240)))
      << c.GetJob(job.id()).state_reason();
  v1::Job done = c.GetJob(job.id());
  EXPECT_EQ(done.restarts(), 1);
  EXPECT_EQ(AdapterBytes(done.adapter_path()),
            AdapterBytes(c.GetJob(clean.id()).adapter_path()));
  // The resumed attempt continues the clean run's loss curve exactly.
  auto events = c.Events(job.id());
  const std::vector<double> clean_losses = Rank0Losses(c.Events(clean.id()), 0);
  const std::vector<double> resumed = Rank0Losses(events, 1);
  ASSERT_FALSE(resumed.empty());
  ASSERT_EQ(clean_losses.size(), 30u);
  for (size_t i = 0; i < resumed.size(); ++i) {
    EXPECT_EQ(resumed[resumed.size() - 1 - i], clean_losses[clean_losses.size() - 1 - i]);
  }
}

// A rank killed -9 in the middle of the run (maybe in the middle of a
// checkpoint write), and the latest complete checkpoint damaged on disk: the
// restart resumes from the one before it, says so, and the job finishes.
TEST_F(TrainE2e, ADamagedLatestCheckpointResumesFromThePreviousOne) {
  Cluster c;
  ASSERT_TRUE(StartWithRealRanks(c, "host-a"));
  v1::Job job = c.Submit(Spec(c, 20, 4, "damaged"));
  ASSERT_TRUE(WaitFor(
      [&] {
        const std::string r = c.GetJob(job.id()).resume_checkpoint();
        return r.size() > 13 && r.compare(r.size() - 13, 13, "/checkpoint-8") == 0;
      },
      seconds(180)))
      << c.GetJob(job.id()).resume_checkpoint();
  const pid_t rank0 = FindRank(c, job.id(), 0), rank1 = FindRank(c, job.id(), 1);
  ASSERT_GT(rank0, 0);
  ASSERT_GT(rank1, 0);
  // Freeze the gang so nothing newer completes, then damage the checkpoint
  // the coordinator will hand the restart, and kill a rank.
  ASSERT_EQ(::kill(rank0, SIGSTOP), 0);
  ASSERT_EQ(::kill(rank1, SIGSTOP), 0);
  const std::string latest = c.GetJob(job.id()).resume_checkpoint();
  const std::string root = latest.substr(0, latest.rfind('/'));
  const int step = std::atoi(latest.substr(latest.rfind('-') + 1).c_str());
  const std::string previous = root + "/checkpoint-" + std::to_string(step - 4);
  ASSERT_EQ(::truncate((latest + "/shard-1-of-2.safetensors").c_str(), 64), 0);
  ASSERT_EQ(::kill(rank1, SIGKILL), 0);
  ASSERT_EQ(::kill(rank0, SIGCONT), 0);

  ASSERT_TRUE(c.WaitState(job.id(), v1::SUCCEEDED, seconds(240)))
      << c.GetJob(job.id()).state_reason();
  const v1::Job done = c.GetJob(job.id());
  EXPECT_EQ(done.restarts(), 1);
  bool warned = false;
  int resumed = 0;
  for (const auto& e : c.Events(job.id())) {
    if (e.attempt() != 1 || !e.has_log()) continue;
    if (e.log().text().find("resuming at step " + std::to_string(step - 4) + ")") !=
        std::string::npos)
      ++resumed;  // each rank's hello
    if (e.log().level() == "WARNING" &&
        e.log().text().find("cannot be resumed from") != std::string::npos) {
      warned = true;
      EXPECT_NE(e.log().text().find("resuming from the previous complete checkpoint " + previous),
                std::string::npos)
          << e.log().text();
    }
  }
  EXPECT_TRUE(warned) << "no event says the run fell back";
  EXPECT_EQ(resumed, 2);
  EXPECT_TRUE(std::filesystem::is_directory(root + "/damaged-checkpoint-" + std::to_string(step)));
  EXPECT_TRUE(std::filesystem::exists(done.adapter_path() + "/adapter_model.safetensors"));
}

TEST_F(TrainE2e, CoordinatorKill9MidRunLosesNothing) {
  Cluster c;
  ASSERT_TRUE(StartWithRealRanks(c, "host-a"));
  // Enough steps that the job is still running when the coordinator is back
  // (a step takes ~0.1-0.3 s on 2 cores).
  v1::Job job = c.Submit(Spec(c, 60, 20, "coordkill"));
  ASSERT_TRUE(c.WaitFor_Step(job.id(), 3, seconds(180)));
  c.KillCoordinator(SIGKILL);
  std::this_thread::sleep_for(std::chrono::seconds(2));  // ranks keep training meanwhile
  c.StartCoordinator();
  ASSERT_TRUE(c.WaitState(job.id(), v1::SUCCEEDED, seconds(240)))
      << c.GetJob(job.id()).state_reason();
  auto events = c.Events(job.id());
  ExpectGapFree(events);
  EXPECT_EQ(Rank0Losses(events, 0).size(), 60u);
}

TEST_F(TrainE2e, CancelSavesACheckpointAndStops) {
  Cluster c;
  ASSERT_TRUE(StartWithRealRanks(c, "host-a"));
  v1::Job job = c.Submit(Spec(c, 1000, 1000, "cancel"));
  ASSERT_TRUE(c.WaitFor_Step(job.id(), 2, seconds(180)));
  ASSERT_TRUE(c.Cancel(job.id()).ok());
  ASSERT_TRUE(c.WaitState(job.id(), v1::CANCELLED, seconds(60)))
      << v1::JobState_Name(c.GetJob(job.id()).state());
  auto ck = c.Checkpoints(job.id());
  ASSERT_GE(ck.size(), 1u);
  EXPECT_GE(ck.back().step(), 2);
  EXPECT_TRUE(std::filesystem::exists(ck.back().path() + "/ftune_checkpoint.json"));
}

TEST_F(TrainE2e, DeadAgentsJobMovesToAnotherAgentAndFinishes) {
  Cluster c;
  ASSERT_TRUE(StartWithRealRanks(c, "host-a"));
  v1::JobSpec spec = Spec(c, 40, 5, "agentkill");
  v1::Job job = c.Submit(spec);
  ASSERT_TRUE(c.WaitFor_Step(job.id(), 4, seconds(180)));
  c.StartAgent("host-b", 2, {}, FTUNE_RANK_BIN);  // agent 1
  ASSERT_TRUE(c.WaitAgents(2));
  c.agent(0).Signal(SIGKILL);
  c.agent(0).Wait(seconds(5));
  // Its orphaned ranks notice the closed channel and stop.
  ASSERT_TRUE(c.WaitState(job.id(), v1::SUCCEEDED, seconds(240)))
      << c.GetJob(job.id()).state_reason();
  v1::Job done = c.GetJob(job.id());
  EXPECT_GE(done.restarts(), 1);
  ASSERT_EQ(done.placement_size(), 2);
  EXPECT_EQ(done.placement(0).host(), "host-b");
}

TEST_F(TrainE2e, SecondJobWaitsWithAReasonAndRunsWhenSlotsFree) {
  Cluster c;
  ASSERT_TRUE(StartWithRealRanks(c, "host-a"));
  v1::Job first = c.Submit(Spec(c, 4, 100, "first"));
  v1::Job low = c.Submit(Spec(c, 2, 100, "low"));
  v1::JobSpec urgent = Spec(c, 2, 100, "urgent");
  urgent.set_priority(10);
  v1::Job high = c.Submit(urgent);
  EXPECT_EQ(c.GetJob(low.id()).reason_code(), "jobs_ahead");
  EXPECT_EQ(c.GetJob(high.id()).reason_code(), "slots_missing");
  ASSERT_TRUE(c.WaitState(low.id(), v1::SUCCEEDED, seconds(300)));
  EXPECT_EQ(c.GetJob(first.id()).state(), v1::SUCCEEDED);
  EXPECT_EQ(c.GetJob(high.id()).state(), v1::SUCCEEDED);
  EXPECT_LT(c.GetJob(high.id()).update_time_unix_ms(), c.GetJob(low.id()).update_time_unix_ms());
}

}  // namespace
}  // namespace ftune::testing
