// JobSpec -> DatasetOptions: every mapped field, the JobSpec defaults, and
// the validator's dataset errors.
#include <string>

#include <gtest/gtest.h>

#include "jobspec.h"
#include "worker/data/from_spec.h"

namespace ftune::data {
namespace {

v1::JobSpec Parse(const std::string& yaml) {
  v1::JobSpec spec;
  std::vector<std::string> errors;
  EXPECT_TRUE(ParseJobSpecYaml(yaml, &spec, &errors)) << (errors.empty() ? "" : errors[0]);
  return spec;
}

TEST(DataFromSpecTest, MapsEveryField) {
  const v1::JobSpec spec = Parse(R"(
model: {model_name_or_path: /models/llama}
dataset:
  data_files: [a.jsonl, b.json]
  eval_data_files: [e.jsonl]
  format: messages
  chat_template: chatml
  skip_invalid: true
  completion_only_loss: false
training: {max_seq_len: 512, packing: true, seed: 7}
)");
  Result<DatasetOptions> o = DatasetOptionsFromSpec(spec);
  ASSERT_TRUE(o.ok()) << o.status().ToString();
  EXPECT_EQ(o->tokenizer_dir, "/models/llama");
  EXPECT_EQ(o->data_files, (std::vector<std::string>{"a.jsonl", "b.json"}));
  EXPECT_EQ(o->eval_data_files, (std::vector<std::string>{"e.jsonl"}));
  EXPECT_EQ(o->format, "messages");
  EXPECT_EQ(o->chat_template, "chatml");
  EXPECT_TRUE(o->skip_invalid);
  EXPECT_FALSE(o->completion_only_loss);
  EXPECT_EQ(o->max_seq_len, 512);
  EXPECT_TRUE(o->packing);
  EXPECT_EQ(o->seed, 7u);
}

TEST(DataFromSpecTest, AppliesJobSpecDefaults) {
  Result<DatasetOptions> o = DatasetOptionsFromSpec(Parse(R"(
model: {model_name_or_path: /m}
dataset: {data_files: [t.jsonl], eval_split_ratio: 0.1}
)"));
  ASSERT_TRUE(o.ok()) << o.status().ToString();
  EXPECT_EQ(o->format, "auto");
  EXPECT_EQ(o->chat_template, "auto");
  EXPECT_TRUE(o->completion_only_loss);
  EXPECT_EQ(o->max_seq_len, 1024);
  EXPECT_FALSE(o->packing);
  EXPECT_EQ(o->seed, 42u);
  EXPECT_DOUBLE_EQ(o->eval_split_ratio, 0.1);
}

TEST(DataFromSpecTest, DatasetErrorsNameTheKeys) {
  Result<DatasetOptions> o = DatasetOptionsFromSpec(Parse(R"(
model: {model_name_or_path: /m}
dataset: {data_files: [], format: csv}
)"));
  ASSERT_FALSE(o.ok());
  EXPECT_NE(o.status().message().find("dataset.data_files"), std::string::npos) << o.status().message();
  EXPECT_NE(o.status().message().find("dataset.format"), std::string::npos);
  // Problems outside the data pipeline's fields are not its business.
  Result<DatasetOptions> lora = DatasetOptionsFromSpec(Parse(R"(
model: {model_name_or_path: /m}
dataset: {data_files: [t.jsonl], chat_template: llama3.1}
lora: {r: -3}
)"));
  EXPECT_TRUE(lora.ok()) << lora.status().ToString();
}

}  // namespace
}  // namespace ftune::data
