// JobSpec YAML mapping, defaults and validation.
#include <iterator>

#include <gtest/gtest.h>

#include "bad_specs.h"
#include "jobspec.h"

namespace ftune {
namespace {

const char kGood[] = R"(
name: llama3-8b
model: {model_name_or_path: /models/llama3-8b}
dataset:
  data_files: [train.jsonl, more.jsonl]
  format: messages
lora: {r: 16, lora_alpha: 32, lora_dropout: 0.05, target_modules: [q_proj, v_proj]}
quantization: {bnb_4bit_use_double_quant: false}
fsdp: {sharding_strategy: SHARD_GRAD_OP, offload_params: true}
training:
  learning_rate: 2.0e-4
  max_steps: 100
  gradient_accumulation_steps: 4
  max_seq_length: 2048
  warmup_ratio: 0.03
  lr_scheduler_type: cosine
resources: {num_ranks: 4, gpus_per_host: 2, min_gpu_memory: 40GiB}
priority: 5
labels: {team: nlp}
)";

v1::JobSpec ParseOk(const std::string& text) {
  v1::JobSpec spec;
  std::vector<std::string> errors;
  EXPECT_TRUE(ParseJobSpecYaml(text, &spec, &errors)) << (errors.empty() ? "" : errors[0]);
  return spec;
}

std::vector<std::string> Problems(const std::string& text) {
  v1::JobSpec spec;
  std::vector<std::string> errors;
  if (!ParseJobSpecYaml(text, &spec, &errors)) return errors;
  ApplyJobSpecDefaults(&spec);
  return ValidateJobSpec(spec);
}

TEST(JobSpecYaml, ParsesHfNamedKeys) {
  v1::JobSpec spec = ParseOk(kGood);
  EXPECT_EQ(spec.name(), "llama3-8b");
  EXPECT_EQ(spec.model().model_name_or_path(), "/models/llama3-8b");
  ASSERT_EQ(spec.dataset().data_files_size(), 2);
  EXPECT_EQ(spec.lora().r(), 16);
  EXPECT_DOUBLE_EQ(spec.lora().lora_alpha(), 32);
  EXPECT_EQ(spec.lora().target_modules_size(), 2);
  EXPECT_TRUE(spec.quantization().has_bnb_4bit_use_double_quant());
  EXPECT_FALSE(spec.quantization().bnb_4bit_use_double_quant());
  EXPECT_DOUBLE_EQ(spec.training().learning_rate(), 2e-4);
  EXPECT_EQ(spec.training().max_seq_len(), 2048);  // TRL's max_seq_length spelling
  EXPECT_EQ(spec.resources().min_gpu_memory_bytes(), 40LL << 30);
  EXPECT_EQ(spec.labels().at("team"), "nlp");
  ApplyJobSpecDefaults(&spec);
  EXPECT_TRUE(ValidateJobSpec(spec).empty());
  EXPECT_FALSE(spec.fsdp().reshard_after_forward());  // from SHARD_GRAD_OP
}

TEST(JobSpecYaml, DefaultsFollowHfPeftBitsandbytes) {
  v1::JobSpec spec = ParseOk("model: /m\ndataset: {data_files: [a.jsonl]}\n");
  ApplyJobSpecDefaults(&spec);
  EXPECT_TRUE(ValidateJobSpec(spec).empty());
  EXPECT_EQ(spec.lora().r(), 8);
  EXPECT_EQ(spec.lora().target_modules_size(), 7);
  EXPECT_TRUE(spec.quantization().load_in_4bit());
  EXPECT_TRUE(spec.quantization().bnb_4bit_use_double_quant());
  EXPECT_EQ(spec.quantization().blocksize(), 64);
  EXPECT_EQ(spec.fsdp().sharding_strategy(), "FULL_SHARD");
  EXPECT_TRUE(spec.fsdp().reshard_after_forward());
  EXPECT_DOUBLE_EQ(spec.training().learning_rate(), 5e-5);
  EXPECT_DOUBLE_EQ(spec.training().num_train_epochs(), 3);
  EXPECT_DOUBLE_EQ(spec.training().max_grad_norm(), 1.0);
  EXPECT_EQ(spec.training().seed(), 42);
  EXPECT_EQ(spec.max_restarts(), 3);
  // Idempotent.
  v1::JobSpec again = spec;
  ApplyJobSpecDefaults(&again);
  EXPECT_EQ(again.SerializeAsString(), spec.SerializeAsString());
}

TEST(JobSpecYaml, ExplicitZeroIsKeptWhereZeroMeansSomething) {
  v1::JobSpec spec =
      ParseOk("model: /m\ndataset: {data_files: [a]}\ntraining: {max_grad_norm: 0, seed: 0}\n"
              "max_restarts: 0\n");
  ApplyJobSpecDefaults(&spec);
  EXPECT_DOUBLE_EQ(spec.training().max_grad_norm(), 0);
  EXPECT_EQ(spec.training().seed(), 0);
  EXPECT_EQ(spec.max_restarts(), 0);
}

TEST(JobSpecYaml, RoundTripsThroughYaml) {
  v1::JobSpec spec = ParseOk(kGood);
  ApplyJobSpecDefaults(&spec);
  v1::JobSpec back = ParseOk(JobSpecToYaml(spec));
  EXPECT_EQ(back.SerializeAsString(), spec.SerializeAsString()) << JobSpecToYaml(spec);
}

TEST(JobSpecYaml, UnknownKeyAtWrongLevelSuggestsSection) {
  auto errors = Problems("model: /m\ndataset: {data_files: [a]}\nlearning_rate: 0.1\n");
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_NE(errors[0].find("learning_rate: unknown key; did you mean 'training.learning_rate'"),
            std::string::npos)
      << errors[0];
}

TEST(JobSpecValidate, ErrorNamesKeyAndValue) {
  auto errors = Problems(
      "model: /m\ndataset: {data_files: [a]}\ntraining: {gradient_accumulation_steps: -2}\n");
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_EQ(errors[0], "training.gradient_accumulation_steps (-2) must be in [1, 1.04858e+06]");
}

TEST(JobSpecValidate, CountsAndLengthsAreCappedWithTheLimitInTheMessage) {
  v1::JobSpec spec;
  spec.mutable_model()->set_model_name_or_path("/m/" + std::string(5000, 'x'));
  for (int i = 0; i < 1025; ++i) spec.mutable_dataset()->add_data_files("/d/" + std::to_string(i));
  for (int i = 0; i < 65; ++i) (*spec.mutable_labels())["k" + std::to_string(i)] = "v";
  (*spec.mutable_labels())["k0"] = std::string(300, 'v');
  ApplyJobSpecDefaults(&spec);
  std::string all;
  for (const std::string& e : ValidateJobSpec(spec)) all += e + "\n";
  EXPECT_NE(all.find("model.model_name_or_path"), std::string::npos) << all;
  EXPECT_NE(all.find("5003 bytes) must be at most 4096 bytes long"), std::string::npos) << all;
  EXPECT_NE(all.find("dataset.data_files (1025 files) must list at most 1024 files"),
            std::string::npos)
      << all;
  EXPECT_NE(all.find("labels (65 labels) must be at most 64"), std::string::npos) << all;

  v1::JobSpec ok;
  ok.mutable_model()->set_model_name_or_path("/m");
  for (int i = 0; i < 1024; ++i) ok.mutable_dataset()->add_data_files("/d/" + std::to_string(i));
  for (int i = 0; i < 64; ++i) (*ok.mutable_labels())["k" + std::to_string(i)] = "v";
  (*ok.mutable_labels())["k0"] = std::string(256, 'v');
  ApplyJobSpecDefaults(&ok);
  EXPECT_TRUE(ValidateJobSpec(ok).empty());
  (*ok.mutable_labels())["k0"] = std::string(257, 'v');
  ASSERT_EQ(ValidateJobSpec(ok).size(), 1u);
  EXPECT_NE(ValidateJobSpec(ok)[0].find("must be at most 256 characters"), std::string::npos);
}

TEST(ByteSize, ParsesAndFormats) {
  int64_t b = 0;
  ASSERT_TRUE(ParseByteSize("80 GB", &b));
  EXPECT_EQ(b, 80000000000LL);
  ASSERT_TRUE(ParseByteSize("1.5GiB", &b));
  EXPECT_EQ(b, 3LL << 29);
  ASSERT_TRUE(ParseByteSize("123", &b));
  EXPECT_EQ(b, 123);
  EXPECT_FALSE(ParseByteSize("lots", &b));
  EXPECT_FALSE(ParseByteSize("12 parsecs", &b));
  EXPECT_EQ(FormatByteSize(40LL << 30), "40GiB");
  EXPECT_EQ(FormatByteSize(1536), "1.5KiB");
}

TEST(JobSpecValidate, FiftyMalformedSpecsAreEachRejectedNamingTheKey) {
  ASSERT_GE(std::size(testing::kBadSpecs), 50u);
  for (const testing::BadSpec& b : testing::kBadSpecs) {
    auto errors = Problems(b.yaml);
    ASSERT_FALSE(errors.empty()) << "accepted: " << b.yaml;
    bool named = false;
    for (const auto& e : errors) named = named || e.find(b.key) != std::string::npos;
    EXPECT_TRUE(named) << "spec:\n" << b.yaml << "\nerrors do not name '" << b.key
                       << "': " << errors[0];
  }
}

}  // namespace
}  // namespace ftune

namespace ftune {
namespace {

TEST(JobSpecPaths, RelativePathsBecomeAbsoluteAgainstTheSubmitDirectory) {
  v1::JobSpec spec;
  spec.mutable_model()->set_model_name_or_path("./models/tiny");
  spec.mutable_dataset()->add_data_files("data/a.jsonl");
  spec.mutable_dataset()->add_data_files("/abs/b.jsonl");
  spec.mutable_dataset()->add_eval_data_files("eval.jsonl");
  spec.set_output_dir("out");
  MakeSpecPathsAbsolute(&spec, "/home/u/proj");
  EXPECT_EQ(spec.model().model_name_or_path(), "/home/u/proj/models/tiny");
  EXPECT_EQ(spec.dataset().data_files(0), "/home/u/proj/data/a.jsonl");
  EXPECT_EQ(spec.dataset().data_files(1), "/abs/b.jsonl");
  EXPECT_EQ(spec.dataset().eval_data_files(0), "/home/u/proj/eval.jsonl");
  EXPECT_EQ(spec.output_dir(), "/home/u/proj/out");
  // Unset stays unset: the agent picks the output dir then.
  v1::JobSpec empty;
  MakeSpecPathsAbsolute(&empty, "/x");
  EXPECT_TRUE(empty.output_dir().empty());
  EXPECT_TRUE(empty.model().model_name_or_path().empty());
}

}  // namespace
}  // namespace ftune
