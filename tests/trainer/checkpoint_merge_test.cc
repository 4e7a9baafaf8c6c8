// Sharded checkpoints (re-sharding on load, completeness, pruning) and
// merging a PEFT adapter into its base model.
#include <ATen/ATen.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <string>

#include "model_test_util.h"
#include "temp_dir.h"
#include "worker/trainer/checkpoint.h"
#include "ftune/file_util.h"
#include "worker/trainer/merge.h"
#include "worker/trainer/model.h"
#include "worker/modelio/safetensors.h"
#include "worker/trainer/weights.h"

namespace ftune::trainer {
namespace {

using ::testing::HasSubstr;

class TempDir : public testutil::TempDir {
 public:
  TempDir() : testutil::TempDir("ftune-ckpt") {}
};

// A flat state of `total` values written by `world` ranks the way the
// trainer does: each rank's padded shard ceil(total/world), padding dropped.
TrainerState WriteFlatCheckpoint(const std::string& dir, const at::Tensor& values,
                                 const at::Tensor& m, const at::Tensor& v, int world,
                                 int64_t step) {
  const int64_t total = values.numel();
  const int64_t per = (total + world - 1) / world;
  for (int r = 0; r < world; ++r) {
    const int64_t begin = std::min(total, r * per);
    const int64_t n = std::max<int64_t>(0, std::min(per, total - begin));
    ShardState s;
    s.begin = begin;
    s.lora = values.narrow(0, begin, n);
    s.exp_avg = m.narrow(0, begin, n);
    s.exp_avg_sq = v.narrow(0, begin, n);
    s.adam_step = step;
    s.rng_state = at::full({8}, r + 1, at::kByte);
    EXPECT_TRUE(WriteCheckpointShard(dir, r, world, s).ok());
  }
  TrainerState state;
  state.step = step;
  state.micro_batches = step * 3;
  state.tokens_total = 1234;
  state.loss = 2.5;
  state.world_size = world;
  state.total_numel = total;
  state.layout = {{"a", 0, total - 3, {total - 3}}, {"b", total - 3, 3, {3, 1}}};
  state.seed = 7;
  EXPECT_TRUE(WriteCheckpointManifest(dir, state).ok());
  return state;
}

TEST(CheckpointTest, ResumesOnAnyNumberOfRanks) {
  TempDir tmp;
  const int64_t total = 23;
  at::Tensor values = at::arange(total, at::kFloat).mul(0.5);
  at::Tensor m = at::arange(total, at::kFloat).add(100);
  at::Tensor v = at::arange(total, at::kFloat).add(1000);
  for (int written_by : {1, 2, 3, 4}) {
    const std::string dir = tmp.path() + "/w" + std::to_string(written_by);
    WriteFlatCheckpoint(dir, values, m, v, written_by, 5);
    auto state = ReadCheckpointManifest(dir);
    ASSERT_TRUE(state.ok()) << state.status().ToString();
    EXPECT_EQ(state->world_size, written_by);
    EXPECT_EQ(state->step, 5);
    EXPECT_EQ(state->micro_batches, 15);
    EXPECT_EQ(state->tokens_total, 1234);
    ASSERT_EQ(state->layout.size(), 2u);
    EXPECT_EQ(state->layout[1].shape, (std::vector<int64_t>{3, 1}));
    for (int read_by : {1, 2, 3, 4, 5}) {
      const int64_t per = (total + read_by - 1) / read_by;
      for (int r = 0; r < read_by; ++r) {
        auto slice = ReadCheckpointSlice(dir, *state, r * per, per, r);
        ASSERT_TRUE(slice.ok()) << slice.status().ToString();
        // Padding past the end reads as zeros, like a fresh shard's padding.
        at::Tensor want = at::zeros({per}, at::kFloat);
        at::Tensor want_m = at::zeros({per}, at::kFloat);
        const int64_t real = std::max<int64_t>(0, std::min(per, total - r * per));
        if (real > 0) {
          want.narrow(0, 0, real).copy_(values.narrow(0, r * per, real));
          want_m.narrow(0, 0, real).copy_(m.narrow(0, r * per, real));
        }
        EXPECT_TRUE(at::equal(slice->lora, want)) << written_by << "->" << read_by << " r" << r;
        EXPECT_TRUE(at::equal(slice->exp_avg, want_m));
        EXPECT_EQ(slice->adam_step, 5);
        // The RNG stream belongs to one rank of one layout.
        EXPECT_EQ(slice->rng_state.defined(), read_by == written_by && real > 0);
        if (slice->rng_state.defined()) EXPECT_EQ(slice->rng_state[0].item<int>(), r + 1);
      }
    }
  }
}

TEST(CheckpointTest, IncompleteCheckpointsAreNeverResumedAndArePruned) {
  TempDir tmp;
  const std::string root = tmp.path() + "/checkpoints";
  at::Tensor x = at::ones({8});
  WriteFlatCheckpoint(root + "/" + CheckpointDirName(10), x, x, x, 2, 10);
  WriteFlatCheckpoint(root + "/" + CheckpointDirName(20), x, x, x, 2, 20);
  // A crash between the shards and the manifest: shards only.
  ShardState s;
  s.lora = x;
  ASSERT_TRUE(WriteCheckpointShard(root + "/" + CheckpointDirName(30), 0, 2, s).ok());
  ASSERT_TRUE(WriteCheckpointShard(root + "/" + CheckpointDirName(15), 0, 2, s).ok());

  auto latest = LatestCompleteCheckpoint(tmp.path());
  ASSERT_TRUE(latest.ok());
  EXPECT_EQ(*latest, root + "/checkpoint-20");
  auto incomplete = ReadCheckpointManifest(root + "/checkpoint-30");
  EXPECT_EQ(incomplete.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_THAT(incomplete.status().message(), HasSubstr("not a complete ftune checkpoint"));

  // A manifest cannot be written while a rank's shard is missing.
  auto missing = WriteCheckpointManifest(root + "/checkpoint-30", TrainerState{30, 0, 0, 0, 2});
  EXPECT_EQ(missing.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_THAT(missing.status().message(), HasSubstr("missing rank 1's shard"));

  ASSERT_TRUE(PruneCheckpoints(tmp.path(), 1).ok());
  EXPECT_FALSE(IsDirectory(root + "/checkpoint-10"));  // beyond the limit
  EXPECT_FALSE(IsDirectory(root + "/checkpoint-15"));  // incomplete, older than 20
  EXPECT_TRUE(IsDirectory(root + "/checkpoint-20"));
  EXPECT_TRUE(IsDirectory(root + "/checkpoint-30"));   // may still be being written
  EXPECT_TRUE(LatestCompleteCheckpoint(tmp.path() + "/nowhere")->empty());
}

TEST(CheckpointTest, ADamagedLatestCheckpointFallsBackToThePreviousOne) {
  TempDir tmp;
  const std::string root = tmp.path() + "/checkpoints";
  at::Tensor x = at::arange(10, at::kFloat);
  for (int step : {10, 20, 30})
    WriteFlatCheckpoint(root + "/" + CheckpointDirName(step), x, x, x, 2, step);
  const std::string c10 = root + "/checkpoint-10", c20 = root + "/checkpoint-20",
                    c30 = root + "/checkpoint-30";
  auto same = ChooseResumePoint(c30, /*set_aside=*/false);
  ASSERT_TRUE(same.ok()) << same.status().message();
  EXPECT_EQ(same->dir, c30);
  EXPECT_EQ(same->state.step, 30);
  EXPECT_TRUE(same->fallback.empty());

  // A shard cut short (a rank killed while writing it, a disk that lost the
  // tail): every rank sees the same sizes, so every rank falls back alike.
  const std::string shard = c30 + "/" + ShardFileName(1, 2);
  ASSERT_EQ(::truncate(shard.c_str(), 100), 0);
  EXPECT_THAT(VerifyCheckpoint(c30).message(), HasSubstr("the manifest says"));
  auto back = ChooseResumePoint(c30, /*set_aside=*/false);
  ASSERT_TRUE(back.ok()) << back.status().message();
  EXPECT_EQ(back->dir, c20);
  EXPECT_EQ(back->state.step, 20);
  EXPECT_THAT(back->fallback, HasSubstr("checkpoint " + c30 + " cannot be resumed from"));
  EXPECT_THAT(back->fallback, HasSubstr("resuming from the previous complete checkpoint " + c20));
  EXPECT_TRUE(IsDirectory(c30));  // only rank 0 moves it

  // Rank 0 moves it aside: no later save, prune or latest-lookup takes it
  // for a checkpoint, and a resume asked for it (the coordinator's record)
  // finds it gone and falls back the same way.
  back = ChooseResumePoint(c30, /*set_aside=*/true);
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(back->dir, c20);
  EXPECT_THAT(back->fallback, HasSubstr("moved to " + root + "/damaged-checkpoint-30"));
  EXPECT_FALSE(IsDirectory(c30));
  EXPECT_EQ(*LatestCompleteCheckpoint(tmp.path()), c20);
  back = ChooseResumePoint(c30, /*set_aside=*/true);
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(back->dir, c20);
  EXPECT_THAT(back->fallback, HasSubstr("does not exist"));

  // A manifest that is garbage; then nothing earlier is left: the start.
  ASSERT_TRUE(WriteFileAtomically(c20 + "/" + kCheckpointManifestName, "{not json").ok());
  back = ChooseResumePoint(c20, /*set_aside=*/false);
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(back->dir, c10);
  ASSERT_EQ(::unlink((c10 + "/" + ShardFileName(0, 2)).c_str()), 0);
  back = ChooseResumePoint(c20, /*set_aside=*/false);
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(back->dir, "");
  EXPECT_EQ(back->state.step, 0);
  EXPECT_THAT(back->fallback,
              HasSubstr("no earlier complete checkpoint: starting from the beginning"));
}

TEST(CheckpointTest, CorruptManifestIsDataLoss) {
  TempDir tmp;
  ASSERT_TRUE(WriteFileAtomically(tmp.path() + "/" + kCheckpointManifestName,
                                  "{\"format\": \"ftune-checkpoint\", \"version\": 1}")
                  .ok());
  auto r = ReadCheckpointManifest(tmp.path());
  EXPECT_EQ(r.status().code(), StatusCode::kDataLoss);
  EXPECT_THAT(r.status().message(), HasSubstr(kCheckpointManifestName));
}

TEST(MergeTest, MergedModelComputesWhatBasePlusAdapterComputes) {
  TempDir tmp;
  for (const std::string model : {"llama2_tiny", "llama3_tiny", "qwen2_tiny", "mistral_tiny"}) {
    const std::string base = testing::GoldenDir() + "/" + model;
    MergeOptions o;
    o.model_dir = base;
    o.adapter_dir = base + "_adapter";
    o.out_dir = tmp.path() + "/" + model + "_merged";
    auto report = MergeAdapter(o);
    ASSERT_TRUE(report.ok()) << report.status().ToString();
    auto config = LoadLlamaConfig(base + "/config.json");
    ASSERT_TRUE(config.ok());
    EXPECT_EQ(report->merged_projections, 7 * config->num_hidden_layers);

    ModelOptions options;  // fp32 CPU
    auto with_adapter = testing::LoadGoldenModel(model, options, /*with_adapter=*/true);
    auto merged = LlamaModel::Load(o.out_dir, options);
    ASSERT_TRUE(merged.ok()) << merged.status().ToString();
    at::Tensor ids = at::randint(config->vocab_size, {2, 12}, at::kLong);
    at::Tensor want = with_adapter->Logits(ids, at::Tensor());
    at::Tensor got = (*merged)->Logits(ids, at::Tensor());
    EXPECT_LT(testing::MaxAbsDiff(got, want), 1e-4) << model;
    // And the merge really moved the weights (the adapter is not zero).
    auto base_model = testing::LoadGoldenModel(model, options, /*with_adapter=*/false);
    EXPECT_GT(testing::MaxAbsDiff(base_model->Logits(ids, at::Tensor()), want), 1e-3);

    // Shards, index and side files come along; untouched tensors are the
    // same bytes.
    auto in = SafetensorsModel::OpenDirectory(base);
    auto out = SafetensorsModel::OpenDirectory(o.out_dir);
    ASSERT_TRUE(in.ok() && out.ok());
    EXPECT_EQ((*in)->shards().size(), (*out)->shards().size());
    // Qwen2's biases are untouched by a LoRA with bias="none"; a tied model
    // gets no lm_head.
    std::vector<std::string> same = {"model.embed_tokens.weight"};
    if (config->has_qkv_bias()) {
      for (const char* b : {"q_proj", "k_proj", "v_proj"}) {
        same.push_back(std::string("model.layers.1.self_attn.") + b + ".bias");
      }
    }
    for (const std::string& name : same) {
      auto a = (*in)->Data(name);
      auto b = (*out)->Data(name);
      ASSERT_TRUE(a.ok() && b.ok()) << model << " " << name;
      ASSERT_EQ(a->size, b->size);
      EXPECT_EQ(std::memcmp(a->data, b->data, a->size), 0) << model << " " << name;
    }
    EXPECT_EQ((*out)->Find("lm_head.weight").ok(), !config->tie_word_embeddings) << model;
  }
}

TEST(MergeTest, AdapterOfAnotherModelIsRefusedBeforeWritingAnything) {
  TempDir tmp;
  MergeOptions o;
  o.model_dir = testing::GoldenDir() + "/llama2_tiny";
  o.adapter_dir = testing::GoldenDir() + "/llama3_tiny_adapter";
  o.out_dir = tmp.path() + "/out";
  auto r = MergeAdapter(o);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("llama3_tiny_adapter"));
  EXPECT_FALSE(IsDirectory(o.out_dir));
}

}  // namespace
}  // namespace ftune::trainer
