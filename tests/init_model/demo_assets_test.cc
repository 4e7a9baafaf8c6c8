// The README demo's assets fit together: examples/tiny-qlora.yaml is a valid
// job; a tiny model made by InitModel from examples/data/instructions.jsonl
// has a tokenizer whose chat template the data pipeline detects as llama3;
// and the pipeline prepares the demo dataset with that model into packed
// 256-token rows with assistant-only labels, as a rank would train on them.
// (LibTorch-free.)
#include <ftw.h>
#include <stdlib.h>

#include <cstdio>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "jobspec.h"
#include "worker/data/bpe_trainer.h"
#include "worker/data/chat_template.h"
#include "worker/config/run_config.h"
#include "worker/data/prepare.h"
#include "worker/data/token_file.h"
#include "worker/data/tokenizer.h"
#include "worker/modelio/init_model.h"
#include "temp_dir.h"

namespace ftune {
namespace {

class TempDir : public testutil::TempDir {
 public:
  TempDir() : testutil::TempDir("ftune_demo_assets_test") {}
};

const std::string kSource = FTUNE_SOURCE_DIR;

TEST(DemoAssetsTest, TrainedTokenizerTemplateIsDetectedAsLlama3) {
  auto kind = data::DetectChatTemplate(data::kLlama3ChatTemplate, "tokenizer_config.json");
  ASSERT_TRUE(kind.ok()) << kind.status().ToString();
  EXPECT_EQ(*kind, data::ChatTemplateKind::kLlama3);
}

TEST(DemoAssetsTest, TinyJobPreparesTheDemoDataset) {
  // The job as `ftune submit` would run it from the source directory.
  Result<v1::JobSpec> loaded = LoadJobSpec(kSource + "/examples/tiny-qlora.yaml", kSource);
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  v1::JobSpec spec = *loaded;
  EXPECT_EQ(spec.resources().num_ranks(), 2);
  EXPECT_EQ(spec.training().max_seq_len(), 256);
  EXPECT_EQ(spec.lora().r(), 16);
  EXPECT_TRUE(spec.quantization().load_in_4bit());
  EXPECT_EQ(spec.fsdp().sharding_strategy(), "FULL_SHARD");

  // The model the README's init-model command writes.
  TempDir tmp;
  trainer::InitModelOptions init;
  init.out_dir = tmp.path() + "/tiny-llama";
  init.tokenizer_corpus = kSource + "/examples/data/instructions.jsonl";
  Status st = trainer::InitModel(init);
  ASSERT_TRUE(st.ok()) << st.ToString();

  spec.mutable_model()->set_model_name_or_path(init.out_dir);
  Result<trainer::RunConfig> run = trainer::MakeRunConfig(spec, trainer::DeviceKind::kCpu);
  ASSERT_TRUE(run.ok()) << run.status().ToString();
  data::DatasetOptions options = run->data;
  options.num_threads = 1;
  auto prepared = data::PrepareDataset(options, tmp.path() + "/cache");
  ASSERT_TRUE(prepared.ok()) << prepared.status().ToString();
  EXPECT_EQ(prepared->chat_template, "llama3");
  EXPECT_EQ(prepared->format, "messages");
  EXPECT_EQ(prepared->train_documents, 400);
  EXPECT_EQ(prepared->eval_documents, 40);
  EXPECT_EQ(prepared->skipped_records, 0);
  EXPECT_EQ(prepared->truncated_documents, 0);
  EXPECT_GT(prepared->eval_rows, 0);
  std::printf(
      "demo dataset with the tiny tokenizer: %lld train rows of <= 256 tokens (%lld tokens, "
      "%lld with labels), %lld eval rows; 80 steps x 2 ranks x 1 row = %.2f epochs\n",
      static_cast<long long>(prepared->train_rows), static_cast<long long>(prepared->train_tokens),
      static_cast<long long>(prepared->train_trained_tokens),
      static_cast<long long>(prepared->eval_rows),
      160.0 / static_cast<double>(prepared->train_rows));
  // Enough rows that each of the 2 ranks gets a share; assistant-only labels.
  EXPECT_GE(prepared->train_rows, 40);
  EXPECT_GT(prepared->train_trained_tokens, prepared->train_tokens / 5);
  EXPECT_LT(prepared->train_trained_tokens, prepared->train_tokens);

  auto tok = data::Tokenizer::Load(init.out_dir);
  ASSERT_TRUE(tok.ok());
  auto file = data::TokenFile::Open(prepared->train_path);
  ASSERT_TRUE(file.ok()) << file.status().ToString();
  EXPECT_EQ((*file)->max_seq_len(), 256);
  const data::TokenRow row = (*file)->row(0);
  std::vector<int32_t> ids(row.input_ids, row.input_ids + row.length);
  std::vector<int32_t> labelled;
  for (int64_t i = 0; i < row.length; ++i) {
    ASSERT_GE(row.input_ids[i], 0);
    ASSERT_LT(row.input_ids[i], (*tok)->vocab_size());
    if (row.labels[i] != -100) labelled.push_back(row.labels[i]);
  }
  const std::string text = (*tok)->Decode(ids, false);
  EXPECT_EQ(text.rfind("<|begin_of_text|><|start_header_id|>", 0), 0u) << text;
  EXPECT_NE(text.find("<|start_header_id|>assistant<|end_header_id|>\n\n"), std::string::npos);
  // Labels cover assistant replies (ending with <|eot_id|>), never headers.
  const std::string answers = (*tok)->Decode(labelled, false);
  EXPECT_NE(answers.find("<|eot_id|>"), std::string::npos) << answers;
  EXPECT_EQ(answers.find("<|start_header_id|>"), std::string::npos) << answers;
}

}  // namespace
}  // namespace ftune
