// The training loop over FSDP ranks, on CPU ranks over Gloo:
// 2, 3 and 4 ranks train like 1 rank with the same global batch; resuming
// from a checkpoint reproduces the uninterrupted run (exactly with the same
// ranks, to rounding with others); a rank that dies makes the others fail
// with the collective's error within the timeout.
//
// Ranks are forked processes (LocalRankGroup, Gloo over loopback), each
// calling Train() as `ftune-rank train` does; the parent never touches
// LibTorch (forking after LibTorch started its thread pools is unsafe) and
// compares results through files.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <map>
#include <fstream>
#include <sstream>
#include <thread>

#include <gmock/gmock.h>
#include <nlohmann/json.hpp>
#include <gtest/gtest.h>

#include "event_file_reader.h"
#include "jobspec.h"
#include "rank_harness.h"
#include "temp_dir.h"
#include "worker/comm/gloo_communicator.h"
#include "worker/comm/local_rendezvous.h"
#include "worker/trainer/bnb_checkpoint.h"
#include "ftune/file_util.h"
#include "worker/modelio/init_model.h"
#include "worker/modelio/safetensors.h"
#include "worker/trainer/merge.h"
#include "worker/trainer/train.h"

namespace ftune::trainer {
namespace {

using comm::testing::AllOk;
using comm::testing::Report;
using comm::testing::RunRanks;
using ::testing::HasSubstr;

testutil::TempDir* g_root_dir = nullptr;
std::string g_root;
std::string g_model;

class TrainTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    g_root_dir = new testutil::TempDir("ftune-train-test");
    g_root = g_root_dir->path();
    g_model = g_root + "/model";
    InitModelOptions o;
    o.out_dir = g_model;
    o.preset = "tiny";
    o.num_layers_override = 2;
    o.vocab_size = 384;
    o.tokenizer_corpus = std::string(FTUNE_EXAMPLES_DIR) + "/data/instructions.jsonl";
    const Status s = InitModel(o);
    ASSERT_TRUE(s.ok()) << s.ToString();
  }
  static void TearDownTestSuite() {
    delete g_root_dir;
    g_root_dir = nullptr;
  }

  static v1::JobSpec Spec(int per_device_batch, int steps, int save_steps) {
    v1::JobSpec s;
    s.mutable_model()->set_model_name_or_path(g_model);
    s.mutable_dataset()->add_data_files(std::string(FTUNE_EXAMPLES_DIR) +
                                        "/data/instructions.jsonl");
    s.mutable_lora()->set_r(4);
    s.mutable_lora()->set_lora_alpha(8);
    auto* t = s.mutable_training();
    t->set_max_steps(steps);
    t->set_save_steps(save_steps);
    t->set_per_device_train_batch_size(per_device_batch);
    t->set_gradient_accumulation_steps(2);
    t->set_max_seq_len(64);
    t->set_packing(true);
    t->set_learning_rate(3e-3);
    t->set_lr_scheduler_type("linear");
    t->set_warmup_steps(1);
    t->set_weight_decay(0.01);
    t->set_gradient_checkpointing(true);
    const Status resolved = ResolveJobSpec(&s);
    EXPECT_TRUE(resolved.ok()) << resolved.ToString();
    return s;
  }
};

// Everything a rank's test body needs, set before the fork.
struct RunConfig {
  v1::JobSpec spec;
  std::string output_dir;
  std::string resume_from;
  int world = 1;
  int die_rank = -1;      // this rank SIGKILLs itself...
  int64_t die_after = 0;  // ...after reporting this step
  int die_delay_ms = 0;   // ...this much later (mid-step), from a timer thread
  std::chrono::milliseconds timeout = std::chrono::seconds(60);
  // Rank 0 first writes the spec's model pre-quantized here (`ftune-rank
  // quantize`) and every rank trains from that directory.
  std::string quantize_to;
};

// Kills its own process after a given step: a rank dying mid-run.
class DieAfterStep final : public EventSink {
 public:
  DieAfterStep(int64_t step, int delay_ms) : step_(step), delay_ms_(delay_ms) {}
  void Emit(const v1::RankMessage& m) override {
    if (!m.has_step() || m.step().step() < step_) return;
    if (delay_ms_ == 0) ::raise(SIGKILL);
    std::thread([ms = delay_ms_] {
      std::this_thread::sleep_for(std::chrono::milliseconds(ms));
      ::raise(SIGKILL);
    }).detach();
  }

 private:
  int64_t step_;
  int delay_ms_;
};

std::vector<comm::RankExit> TrainRanks(const RunConfig& config) {
  return RunRanks(
      config.world,
      [&](int rank, const std::string& store) -> Status {
        std::unique_ptr<comm::Communicator> comm;
        if (config.world > 1) {
          std::unique_ptr<comm::LocalRendezvous> rv;
          FTUNE_RETURN_IF_ERROR(comm::LocalRendezvous::Connect(
              store, rank, config.world, std::chrono::seconds(30), &rv));
          comm::GlooOptions o;
          o.host = "127.0.0.1";
          o.timeout = config.timeout;
          o.setup_timeout = std::chrono::seconds(60);
          FTUNE_RETURN_IF_ERROR(comm::CreateGlooCommunicator(*rv, o, &comm));
        }
        v1::JobSpec spec = config.spec;
        if (!config.quantize_to.empty()) {
          if (rank == 0) {
            FTUNE_RETURN_IF_ERROR(QuantizeModelDirectory(
                spec.model().model_name_or_path(), config.quantize_to, QuantizeModelOptions{}));
          }
          if (comm != nullptr) FTUNE_RETURN_IF_ERROR(comm->Barrier(nullptr));
          spec.mutable_model()->set_model_name_or_path(config.quantize_to);
        }
        DieAfterStep die(config.die_after, config.die_delay_ms);
        RecordingEventSink events(rank == config.die_rank ? &die : nullptr);
        TrainContext ctx;
        ctx.rank = rank;
        ctx.world_size = config.world;
        ctx.output_dir = config.output_dir;
        ctx.resume_from = config.resume_from;
        ctx.data_cache_dir = g_root + "/data-cache";
        ctx.comm = comm.get();
        ctx.events = &events;
        FTUNE_ASSIGN_OR_RETURN(TrainResult r, Train(spec, ctx));
        std::ofstream out(config.output_dir + "/losses-" + std::to_string(rank) + ".txt");
        out.precision(17);
        for (double l : r.losses) out << l << "\n";
        // Each step's phase times and its duration (tokens / tokens per second).
        std::ofstream phases(config.output_dir + "/phases-" + std::to_string(rank) + ".txt");
        phases.precision(17);
        for (const v1::RankMessage& m : events.events()) {
          if (!m.has_step()) continue;
          const v1::StepMetrics& st = m.step();
          phases << st.forward_seconds() << " " << st.backward_seconds() << " "
                 << st.optimizer_seconds() << " " << st.exposed_comm_seconds() << " "
                 << static_cast<double>(st.tokens()) / st.tokens_per_second() << "\n";
        }
        return OkStatus();
      },
      std::chrono::minutes(5));
}

std::vector<double> Losses(const std::string& output_dir) {
  std::ifstream in(output_dir + "/losses-0.txt");
  std::vector<double> out;
  for (double v; in >> v;) out.push_back(v);
  return out;
}

// Every adapter tensor as floats, by name (no LibTorch in the parent).
std::map<std::string, std::vector<float>> Adapter(const std::string& dir) {
  std::map<std::string, std::vector<float>> out;
  auto f = SafetensorsFile::Open(dir + "/adapter_model.safetensors");
  EXPECT_TRUE(f.ok()) << f.status().ToString();
  if (!f.ok()) return out;
  for (const TensorInfo& t : (*f)->tensors()) {
    std::vector<float> v(t.num_elements());
    EXPECT_TRUE((*f)->Read(t.name, v.data()).ok());
    out[t.name] = std::move(v);
  }
  return out;
}

struct AdapterDiff {
  double max_rel = 0;  // max |a - b| / max |b|
  double l2_rel = 0;   // ||a - b|| / ||b|| over all tensors
};

AdapterDiff CompareAdapters(const std::string& a_dir, const std::string& b_dir) {
  auto a = Adapter(a_dir), b = Adapter(b_dir);
  EXPECT_EQ(a.size(), b.size());
  double diff = 0, scale = 0, d2 = 0, n2 = 0;
  for (const auto& [name, want] : b) {
    const auto& got = a[name];
    EXPECT_EQ(got.size(), want.size()) << name;
    for (size_t i = 0; i < want.size() && i < got.size(); ++i) {
      const double d = static_cast<double>(got[i]) - want[i];
      diff = std::max(diff, std::fabs(d));
      scale = std::max(scale, std::fabs(static_cast<double>(want[i])));
      d2 += d * d;
      n2 += static_cast<double>(want[i]) * want[i];
    }
  }
  return {diff / (scale > 0 ? scale : 1), std::sqrt(d2 / (n2 > 0 ? n2 : 1))};
}

// Adapters agree to fp32 reduction-order rounding. AdamW's first steps
// divide by sqrt(v) of tiny gradients, so single elements move by a few
// 1e-5 of the largest weight when the reduction order changes; the whole
// adapter agrees to 1e-5 in L2.
void ExpectSameAdapter(const std::string& a_dir, const std::string& b_dir,
                       const std::string& what) {
  const AdapterDiff d = CompareAdapters(a_dir, b_dir);
  EXPECT_LT(d.l2_rel, 1e-5) << what;
  EXPECT_LT(d.max_rel, 2e-4) << what;
  std::printf("%s: adapter max rel diff %.3g, L2 rel diff %.3g\n", what.c_str(), d.max_rel,
              d.l2_rel);
}

TEST_F(TrainTest, TwoThreeFourRanksTrainLikeOneRankWithTheSameGlobalBatch) {
  // Global batch per step: 12 rows x 2 accumulation.
  const std::string one = g_root + "/w1";
  auto exits = TrainRanks({Spec(12, 4, 0), one, "", 1});
  ASSERT_TRUE(AllOk(exits, 1)) << Report(exits);
  const std::vector<double> want = Losses(one);
  ASSERT_EQ(want.size(), 4u);
  EXPECT_LT(want.back(), want.front());
  for (int world : {2, 3, 4}) {
    const std::string dir = g_root + "/w" + std::to_string(world);
    exits = TrainRanks({Spec(12 / world, 4, 0), dir, "", world});
    ASSERT_TRUE(AllOk(exits, world)) << Report(exits);
    const std::vector<double> got = Losses(dir);
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < want.size(); ++i) {
      EXPECT_NEAR(got[i], want[i], 1e-5 * std::fabs(want[i])) << "world " << world << " step " << i;
    }
    ExpectSameAdapter(dir + "/adapter", one + "/adapter", "world " + std::to_string(world));
  }
}

// training.profile_steps: each rank writes a Chrome trace of exactly the
// steps asked for, with the engine's named ranges in it, and the traced run
// trains like an untraced one.
// Every step event says where the step's time went: forwards, backwards
// and the optimizer phase each took time, together most of the step and
// not more than it; with two Gloo ranks and no prefetch (CPU) the gathers
// are exposed, so exposed communication is reported too.
TEST_F(TrainTest, StepEventsCarryPhaseTimes) {
  const std::string dir = g_root + "/phases";
  auto exits = TrainRanks({Spec(6, 3, 0), dir, "", 2});
  ASSERT_TRUE(AllOk(exits, 2)) << Report(exits);
  for (int rank : {0, 1}) {
    std::ifstream in(dir + "/phases-" + std::to_string(rank) + ".txt");
    int steps = 0;
    for (double fwd, bwd, opt, comm, step; in >> fwd >> bwd >> opt >> comm >> step; ++steps) {
      SCOPED_TRACE("rank " + std::to_string(rank) + " step " + std::to_string(steps + 1));
      EXPECT_GT(fwd, 0);
      EXPECT_GT(bwd, 0);
      EXPECT_GT(opt, 0);
      EXPECT_GT(comm, 0);
      EXPECT_LE(fwd + bwd + opt, step * 1.001 + 1e-4);
      EXPECT_GT(fwd + bwd + opt, 0.5 * step);
    }
    EXPECT_EQ(steps, 3) << "rank " << rank;
  }
}

TEST_F(TrainTest, ProfileStepsWriteATraceOfThoseStepsPerRank) {
  const std::string plain = g_root + "/unprofiled";
  auto exits = TrainRanks({Spec(6, 4, 0), plain, "", 2});
  ASSERT_TRUE(AllOk(exits, 2)) << Report(exits);
  v1::JobSpec spec = Spec(6, 4, 0);
  spec.mutable_training()->set_profile_steps("2-3");
  ASSERT_TRUE(ResolveJobSpec(&spec).ok());
  const std::string dir = g_root + "/profiled";
  exits = TrainRanks({spec, dir, "", 2});
  ASSERT_TRUE(AllOk(exits, 2)) << Report(exits);
  EXPECT_EQ(Losses(dir), Losses(plain));
  for (int rank : {0, 1}) {
    const std::string path =
        dir + "/profile/rank-" + std::to_string(rank) + "-steps-2-3.trace.json";
    ASSERT_TRUE(IsRegularFile(path)) << path;
    std::ifstream in(path);
    const nlohmann::json trace = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
    ASSERT_TRUE(trace.is_object() && trace.contains("traceEvents")) << path;
    std::map<std::string, int> count;
    for (const auto& e : trace["traceEvents"]) {
      if (e.contains("name") && e["name"].is_string()) ++count[e["name"].get<std::string>()];
    }
    EXPECT_EQ(count["ftune::step"], 2) << "steps 2 and 3 only";
    for (const char* range : {"ftune::layer_forward", "ftune::attention", "ftune::lora",
                              "ftune::nf4_dequantize", "ftune::loss", "ftune::fsdp_gather",
                              "ftune::reduce_gradients", "ftune::optimizer",
                              "ftune::gather_lora"}) {
      EXPECT_GT(count[range], 0) << range << " missing from " << path;
    }
  }
  EXPECT_FALSE(IsDirectory(plain + "/profile"));
}

// training.report_to: [tensorboard]: rank 0 (only) writes an event file in
// output_dir/runs/<name> whose scalars are the run's own: the loss of every
// step, its learning rate, grad norm, throughput and memory, and the eval
// loss. Read back by the test's own reader (event_file_reader.h).
TEST_F(TrainTest, ReportToTensorBoardWritesTheScalarsOfEveryStep) {
  v1::JobSpec spec = Spec(3, 4, 0);
  spec.set_name("tiny run");
  spec.mutable_training()->add_report_to("tensorboard");
  spec.mutable_training()->set_logging_steps(1);
  spec.mutable_training()->set_eval_steps(3);
  spec.mutable_dataset()->set_eval_split_ratio(0.2);
  ASSERT_TRUE(ResolveJobSpec(&spec).ok());
  const std::string dir = g_root + "/tensorboard";
  auto exits = TrainRanks({spec, dir, "", 2});
  ASSERT_TRUE(AllOk(exits, 2)) << Report(exits);
  const std::vector<double> losses = Losses(dir);
  ASSERT_EQ(losses.size(), 4u);

  Result<std::vector<std::string>> files = ListDirectory(dir + "/runs/tiny_run");
  ASSERT_TRUE(files.ok()) << files.status().ToString();
  ASSERT_EQ(files->size(), 1u) << "rank 0 alone writes";
  EXPECT_THAT((*files)[0], ::testing::StartsWith("events.out.tfevents."));
  std::vector<testutil::TbEvent> events;
  std::string error;
  ASSERT_TRUE(testutil::ReadEventFile(dir + "/runs/tiny_run/" + (*files)[0], &events, &error))
      << error;
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events[0].file_version, "brain.Event:2");
  std::map<int64_t, std::map<std::string, float>> by_step;
  for (size_t i = 1; i < events.size(); ++i) {
    EXPECT_GT(events[i].wall_time, 1.6e9);
    for (const auto& [tag, value] : events[i].values) by_step[events[i].step][tag] = value;
  }
  ASSERT_EQ(by_step.size(), 4u);
  for (int64_t step = 1; step <= 4; ++step) {
    SCOPED_TRACE("step " + std::to_string(step));
    const auto& v = by_step[step];
    EXPECT_EQ(v.at("train/loss"), static_cast<float>(losses[step - 1]));
    // The warmup step's learning rate is 0 (HF), and a 0 is still written.
    if (step == 1) EXPECT_EQ(v.at("train/learning_rate"), 0.0f);
    else EXPECT_GT(v.at("train/learning_rate"), 0.0f);
    EXPECT_GT(v.at("train/grad_norm"), 0.0f);
    EXPECT_GT(v.at("train/tokens_per_second"), 0.0f);
    EXPECT_GT(v.at("train/epoch"), 0.0f);
    EXPECT_GT(v.at("memory/host_rss_gib"), 0.0f);
    EXPECT_GT(v.at("memory/device_peak_gib"), 0.0f);
    EXPECT_EQ(v.count("eval/loss"), step >= 3 ? 1u : 0u);
  }
  EXPECT_GT(by_step[3].at("eval/loss"), 0.0f);
  // Then linear decay.
  EXPECT_GT(by_step[2].at("train/learning_rate"), by_step[4].at("train/learning_rate"));
}

TEST_F(TrainTest, ResumeReproducesTheUninterruptedRun) {
  const std::string clean = g_root + "/clean";
  auto exits = TrainRanks({Spec(3, 6, 3), clean, "", 2});
  ASSERT_TRUE(AllOk(exits, 2)) << Report(exits);
  const std::vector<double> want = Losses(clean);
  ASSERT_EQ(want.size(), 6u);
  const std::string checkpoint = clean + "/checkpoints/checkpoint-3";
  ASSERT_TRUE(IsRegularFile(checkpoint + "/ftune_checkpoint.json"));
  ASSERT_TRUE(IsRegularFile(checkpoint + "/adapter/adapter_model.safetensors"));

  // Same ranks: bit for bit.
  const std::string same = g_root + "/resume-same";
  exits = TrainRanks({Spec(3, 6, 3), same, checkpoint, 2});
  ASSERT_TRUE(AllOk(exits, 2)) << Report(exits);
  const std::vector<double> resumed = Losses(same);
  ASSERT_EQ(resumed.size(), 3u);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(resumed[i], want[3 + i]) << "step " << 4 + i;
  EXPECT_EQ(CompareAdapters(same + "/adapter", clean + "/adapter").max_rel, 0.0);

  // Re-sharded onto 3 ranks (and onto 1), same global batch: to rounding.
  for (int world : {3, 1}) {
    const std::string dir = g_root + "/resume-" + std::to_string(world);
    exits = TrainRanks({Spec(6 / world, 6, 3), dir, checkpoint, world});
    ASSERT_TRUE(AllOk(exits, world)) << Report(exits);
    const std::vector<double> got = Losses(dir);
    ASSERT_EQ(got.size(), 3u);
    for (size_t i = 0; i < 3; ++i) {
      EXPECT_NEAR(got[i], want[3 + i], 1e-5 * std::fabs(want[3 + i])) << "world " << world;
    }
    ExpectSameAdapter(dir + "/adapter", clean + "/adapter",
                      "resumed on " + std::to_string(world) + " ranks");
  }
}

TEST_F(TrainTest, AKilledRankMakesTheOthersFailWithinTheTimeout) {
  RunConfig config{Spec(2, 50, 0), g_root + "/killed", "", 3};
  config.die_rank = 2;
  config.die_after = 2;
  config.timeout = std::chrono::seconds(15);
  const auto start = std::chrono::steady_clock::now();
  auto exits = TrainRanks(config);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ASSERT_EQ(exits.size(), 3u) << Report(exits);
  EXPECT_FALSE(exits[2].ok());
  for (int r : {0, 1}) {
    EXPECT_FALSE(exits[r].ok()) << Report(exits);
    EXPECT_FALSE(exits[r].killed_by_launcher) << "rank " << r << " hung: " << Report(exits);
    // The error names the backend and the collective that failed.
    EXPECT_THAT(exits[r].output, HasSubstr("RANK_ERROR")) << Report(exits);
    EXPECT_THAT(exits[r].output, HasSubstr("gloo")) << Report(exits);
  }
  EXPECT_LT(seconds, 120) << Report(exits);
}

TEST_F(TrainTest, APreQuantizedDirectoryTrainsLikeTheDenseModel) {
  // The NF4 bytes `quantize` stores are the ones load-time quantization
  // makes, so training from either gives the same run (1 and 2 ranks; with 2
  // the frozen weights are replicated rather than sharded).
  const std::string dense = g_root + "/from-dense";
  auto exits = TrainRanks({Spec(2, 3, 0), dense, "", 1});
  ASSERT_TRUE(AllOk(exits, 1)) << Report(exits);
  for (int world : {1, 2}) {
    RunConfig config{Spec(2 / world, 3, 0), g_root + "/from-q" + std::to_string(world), "", world};
    config.quantize_to = g_root + "/quantized" + std::to_string(world);
    exits = TrainRanks(config);
    ASSERT_TRUE(AllOk(exits, world)) << Report(exits);
    const std::vector<double> want = Losses(dense), got = Losses(config.output_dir);
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < want.size(); ++i) {
      EXPECT_NEAR(got[i], want[i], 1e-5 * std::fabs(want[i])) << "world " << world;
    }
    if (world == 1) EXPECT_EQ(got, want);  // same ops, same order: bit for bit
  }
}

TEST_F(TrainTest, ARankDyingMidStepMakesThePeersExitWithAnErrorNotACrash) {
  // Death lands inside a step (forward/backward gathers throw from inside
  // autograd): the peers still report the failure and exit 1, not abort.
  RunConfig config{Spec(2, 50, 0), g_root + "/killed-mid", "", 2};
  config.die_rank = 1;
  config.die_after = 1;
  config.die_delay_ms = 30;
  config.timeout = std::chrono::seconds(15);
  auto exits = TrainRanks(config);
  ASSERT_EQ(exits.size(), 2u) << Report(exits);
  EXPECT_FALSE(exits[1].ok());
  ASSERT_TRUE(exits[0].exited) << Report(exits);
  EXPECT_FALSE(exits[0].killed_by_launcher) << Report(exits);
  ASSERT_TRUE(WIFEXITED(exits[0].wait_status)) << "rank 0 crashed: " << Report(exits);
  EXPECT_EQ(WEXITSTATUS(exits[0].wait_status), 1) << Report(exits);
  EXPECT_THAT(exits[0].output, HasSubstr("RANK_ERROR")) << Report(exits);
  const size_t at = exits[0].output.find("RANK_ERROR");
  if (at != std::string::npos) {
    std::printf("rank 0 reported: %s\n",
                exits[0].output.substr(at, exits[0].output.find('\n', at) - at).c_str());
  }
}

// A small model of another family, as init-model writes one: the tiny
// model's shape and tokenizer, the family's config.json (LlamaConfigToJson)
// and init-model's random weights (Qwen2's q/k/v biases included).
std::string WriteFamilyModel(const std::string& name, ModelFamily family, bool tied,
                             std::optional<int64_t> sliding_window = std::nullopt) {
  const std::string dir = g_root + "/family-" + name;
  Result<LlamaConfig> c = LoadLlamaConfig(g_model);
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  c->family = family;
  c->tie_word_embeddings = tied;
  c->qkv_bias = family == ModelFamily::kQwen2;
  c->sliding_window = sliding_window;
  if (family != ModelFamily::kLlama) c->rope_theta = 1000000.0;
  if (family == ModelFamily::kLlama) {  // Llama 3.2: llama3 RoPE scaling, factor 32
    c->rope_scaling.type = RopeType::kLlama3;
    c->rope_scaling.factor = 32.0;
    c->rope_scaling.original_max_position_embeddings = 32;  // all three bands at seq 64
  }
  EXPECT_TRUE(MakeDirectory(dir).ok());
  for (const char* f : {"tokenizer.json", "tokenizer_config.json"}) {
    Result<std::string> text = ReadFileToString(g_model + "/" + f, 64u << 20);
    EXPECT_TRUE(text.ok()) << text.status().ToString();
    EXPECT_TRUE(WriteFileAtomically(dir + "/" + f, *text).ok());
  }
  const Status w = WriteRandomLlamaWeights(dir, *c, 5, 5'000'000'000, 1, nullptr);
  EXPECT_TRUE(w.ok()) << w.ToString();
  EXPECT_TRUE(WriteFileAtomically(dir + "/config.json", LlamaConfigToJson(*c)).ok());
  return dir;
}

// Llama 3.2 (tied, llama3 RoPE), Qwen2.5 (q/k/v biases, tied and untied) and
// Mistral models load, train on 1 and 2 ranks alike (the biases and the tied
// embedding sharded like any frozen tensor), save a PEFT adapter with
// PEFT's names and no bias, and merge into an export that keeps the biases
// and the tie.
TEST_F(TrainTest, OtherFamiliesTrainSaveAdaptersAndExportMerged) {
  struct Case {
    const char* name;
    ModelFamily family;
    bool tied;
  };
  for (const Case& fc : {Case{"llama3.2", ModelFamily::kLlama, true},
                         Case{"qwen2.5", ModelFamily::kQwen2, true},
                         Case{"qwen2.5-untied", ModelFamily::kQwen2, false},
                         Case{"mistral", ModelFamily::kMistral, false}}) {
    SCOPED_TRACE(fc.name);
    const std::string model = WriteFamilyModel(fc.name, fc.family, fc.tied);
    RunConfig one{Spec(4, 4, 0), g_root + "/" + fc.name + "-1", "", 1};
    one.spec.mutable_model()->set_model_name_or_path(model);
    auto exits = TrainRanks(one);
    ASSERT_TRUE(AllOk(exits, 1)) << Report(exits);
    const std::vector<double> want = Losses(one.output_dir);
    ASSERT_EQ(want.size(), 4u);
    EXPECT_LT(want.back(), want.front());
    RunConfig two{Spec(2, 4, 0), g_root + "/" + fc.name + "-2", "", 2};
    two.spec.mutable_model()->set_model_name_or_path(model);
    exits = TrainRanks(two);
    ASSERT_TRUE(AllOk(exits, 2)) << Report(exits);
    const std::vector<double> got = Losses(two.output_dir);
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < want.size(); ++i) {
      EXPECT_NEAR(got[i], want[i], 1e-5 * std::fabs(want[i])) << "step " << i;
    }
    ExpectSameAdapter(two.output_dir + "/adapter", one.output_dir + "/adapter", fc.name);

    // The adapter as PEFT writes it: lora_A/lora_B of 7 targets x 2 layers.
    const auto adapter = Adapter(one.output_dir + "/adapter");
    EXPECT_EQ(adapter.size(), 2u * 7u * 2u);
    for (const auto& [key, t] : adapter) {
      EXPECT_EQ(key.rfind("base_model.model.model.layers.", 0), 0u) << key;
      EXPECT_EQ(key.find("bias"), std::string::npos) << key;
    }

    // Merged export: every base tensor, biases byte for byte; no lm_head
    // when tied; the config unchanged.
    MergeOptions mo;
    mo.model_dir = model;
    mo.adapter_dir = one.output_dir + "/adapter";
    mo.out_dir = g_root + "/" + fc.name + "-merged";
    Result<MergeReport> merged = MergeAdapter(mo);
    ASSERT_TRUE(merged.ok()) << merged.status().ToString();
    EXPECT_EQ(merged->merged_projections, 7 * 2);
    auto base = SafetensorsFile::Open(model + "/model.safetensors");
    auto out = SafetensorsFile::Open(mo.out_dir + "/model.safetensors");
    ASSERT_TRUE(base.ok() && out.ok());
    ASSERT_EQ((*out)->tensors().size(), (*base)->tensors().size());
    int biases = 0;
    bool has_lm_head = false;
    for (const TensorInfo& t : (*base)->tensors()) {
      has_lm_head = has_lm_head || t.name == "lm_head.weight";
      if (t.name.size() < 5 || t.name.compare(t.name.size() - 5, 5, ".bias") != 0) continue;
      ++biases;
      auto a = (*base)->Data(t.name);
      auto b = (*out)->Data(t.name);
      ASSERT_TRUE(a.ok() && b.ok()) << t.name;
      ASSERT_EQ(a->size, b->size);
      EXPECT_EQ(std::memcmp(a->data, b->data, a->size), 0) << t.name;
    }
    EXPECT_EQ(biases, fc.family == ModelFamily::kQwen2 ? 3 * 2 : 0);
    EXPECT_EQ(has_lm_head, !fc.tied);
    Result<LlamaConfig> mc = LoadLlamaConfig(mo.out_dir);
    ASSERT_TRUE(mc.ok()) << mc.status().ToString();
    EXPECT_EQ(mc->family, fc.family);
    EXPECT_EQ(mc->tie_word_embeddings, fc.tied);
  }
}

TEST_F(TrainTest, AMistralWindowShorterThanTheSequencesIsRefused) {
  const std::string model =
      WriteFamilyModel("mistral-window", ModelFamily::kMistral, false, /*sliding_window=*/32);
  RunConfig config{Spec(2, 2, 0), g_root + "/mistral-window", "", 1};
  config.spec.mutable_model()->set_model_name_or_path(model);  // max_seq_len 64
  auto exits = TrainRanks(config);
  ASSERT_EQ(exits.size(), 1u);
  EXPECT_FALSE(exits[0].ok());
  EXPECT_THAT(exits[0].output, HasSubstr("training.max_seq_len (64) exceeds"));
  EXPECT_THAT(exits[0].output, HasSubstr("sliding_window (32)"));
}

TEST_F(TrainTest, BadSpecsAreRefusedNamingTheKey) {
  RunConfig config{Spec(2, 4, 0), g_root + "/bad", "", 1};
  config.spec.mutable_training()->set_gradient_accumulation_steps(-1);
  auto exits = TrainRanks(config);
  ASSERT_EQ(exits.size(), 1u);
  EXPECT_FALSE(exits[0].ok());
  EXPECT_THAT(exits[0].output, HasSubstr("training.gradient_accumulation_steps"));

  config.spec = Spec(2, 4, 0);
  config.spec.mutable_model()->set_model_name_or_path(g_root + "/no-such-model");
  exits = TrainRanks(config);
  ASSERT_EQ(exits.size(), 1u);
  EXPECT_FALSE(exits[0].ok());
  EXPECT_THAT(exits[0].output, HasSubstr("no-such-model"));
}

}  // namespace
}  // namespace ftune::trainer
