// JobSpec YAML mapping, defaults and validation.
#include <gtest/gtest.h>

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

// 50 malformed specs: each must be rejected with a message naming the key.
struct Bad {
  const char* yaml;
  const char* key;  // must appear in some error
};

const Bad kBad[] = {
    {"", "empty"},
    {"[1, 2]", "expected a mapping"},
    {"model: /m\ndataset: {data_files: [a]\n", "not valid YAML"},
    {"dataset: {data_files: [a]}", "model.model_name_or_path"},
    {"model: {model_name_or_path: ''}\ndataset: {data_files: [a]}", "model.model_name_or_path"},
    {"model: /m", "dataset.data_files"},
    {"model: /m\ndataset: {data_files: ['']}", "dataset.data_files[0]"},
    {"model: /m\ndataset: {data_files: [a], format: csv}", "dataset.format"},
    {"model: /m\ndataset: {data_files: [a], chat_template: vicuna}", "dataset.chat_template"},
    {"model: /m\ndataset: {data_files: [a], eval_split_ratio: 1.5}", "dataset.eval_split_ratio"},
    {"model: /m\ndataset: {data_files: [a], eval_split_ratio: 0.1, eval_data_files: [b]}",
     "dataset.eval_split_ratio"},
    {"model: /m\ndataset: {data_files: [a], skip_invalid: maybe}", "dataset.skip_invalid"},
    {"model: /m\ndataset: {data_files: {x: 1}}", "dataset.data_files"},
    {"model: /m\ndataset: {data_files: [a]}\nlora: {r: -1}", "lora.r"},
    {"model: /m\ndataset: {data_files: [a]}\nlora: {r: 9999}", "lora.r"},
    {"model: /m\ndataset: {data_files: [a]}\nlora: {r: eight}", "lora.r"},
    {"model: /m\ndataset: {data_files: [a]}\nlora: {lora_alpha: -16}", "lora.lora_alpha"},
    {"model: /m\ndataset: {data_files: [a]}\nlora: {lora_dropout: 1.0}", "lora.lora_dropout"},
    {"model: /m\ndataset: {data_files: [a]}\nlora: {target_modules: [qkv_proj]}",
     "lora.target_modules[0]"},
    {"model: /m\ndataset: {data_files: [a]}\nlora: {target_modules: [q_proj, q_proj]}",
     "lora.target_modules[1]"},
    {"model: /m\ndataset: {data_files: [a]}\nlora: {rank: 8}", "lora.rank"},
    {"model: /m\ndataset: {data_files: [a]}\nquantization: {bnb_4bit_quant_type: fp4}",
     "quantization.bnb_4bit_quant_type"},
    {"model: /m\ndataset: {data_files: [a]}\nquantization: {bnb_4bit_compute_dtype: int8}",
     "quantization.bnb_4bit_compute_dtype"},
    {"model: /m\ndataset: {data_files: [a]}\nquantization: {blocksize: 100}",
     "quantization.blocksize"},
    {"model: /m\ndataset: {data_files: [a]}\nquantization: {load_in_4bit: 2}",
     "quantization.load_in_4bit"},
    {"model: /m\ndataset: {data_files: [a]}\nfsdp: {sharding_strategy: HYBRID}",
     "fsdp.sharding_strategy"},
    {"model: /m\ndataset: {data_files: [a]}\nfsdp: {sharding_strategy: FULL_SHARD, "
     "reshard_after_forward: false}",
     "fsdp.reshard_after_forward"},
    {"model: /m\ndataset: {data_files: [a]}\ntraining: {learning_rate: 0}",
     "training.learning_rate"},
    {"model: /m\ndataset: {data_files: [a]}\ntraining: {learning_rate: 5}",
     "training.learning_rate"},
    {"model: /m\ndataset: {data_files: [a]}\ntraining: {learning_rate: fast}",
     "training.learning_rate"},
    {"model: /m\ndataset: {data_files: [a]}\ntraining: {lr_scheduler_type: polynomial}",
     "training.lr_scheduler_type"},
    {"model: /m\ndataset: {data_files: [a]}\ntraining: {warmup_ratio: 2}", "training.warmup_ratio"},
    {"model: /m\ndataset: {data_files: [a]}\ntraining: {warmup_steps: -5}",
     "training.warmup_steps"},
    {"model: /m\ndataset: {data_files: [a]}\ntraining: {max_steps: -7}", "training.max_steps"},
    {"model: /m\ndataset: {data_files: [a]}\ntraining: {num_train_epochs: -1}",
     "training.num_train_epochs"},
    {"model: /m\ndataset: {data_files: [a]}\ntraining: {per_device_train_batch_size: 0.5}",
     "training.per_device_train_batch_size"},
    {"model: /m\ndataset: {data_files: [a]}\ntraining: {gradient_accumulation_steps: -1}",
     "training.gradient_accumulation_steps"},
    {"model: /m\ndataset: {data_files: [a]}\ntraining: {max_seq_len: 4}", "training.max_seq_len"},
    {"model: /m\ndataset: {data_files: [a]}\ntraining: {max_grad_norm: -1}",
     "training.max_grad_norm"},
    {"model: /m\ndataset: {data_files: [a]}\ntraining: {weight_decay: -0.1}",
     "training.weight_decay"},
    {"model: /m\ndataset: {data_files: [a]}\ntraining: {logging_steps: 0}",
     "training.logging_steps"},
    {"model: /m\ndataset: {data_files: [a]}\ntraining: {adam_beta2: 1}", "training.adam_beta2"},
    {"model: /m\ndataset: {data_files: [a]}\ntraining: {adam_epsilon: 0}", "training.adam_epsilon"},
    {"model: /m\ndataset: {data_files: [a]}\nresources: {num_ranks: -4}", "resources.num_ranks"},
    {"model: /m\ndataset: {data_files: [a]}\nresources: {num_ranks: 6, gpus_per_host: 4}",
     "resources.num_ranks"},
    {"model: /m\ndataset: {data_files: [a]}\nresources: {min_gpu_memory: lots}",
     "resources.min_gpu_memory"},
    {"model: /m\ndataset: {data_files: [a]}\nresources: {placement: random}",
     "resources.placement"},
    {"model: /m\ndataset: {data_files: [a]}\npriority: 5000", "priority"},
    {"model: /m\ndataset: {data_files: [a]}\nmax_restarts: -1", "max_restarts"},
    {"model: /m\ndataset: {data_files: [a]}\nlabels: {Team: x}", "labels"},
    {"model: /m\ndataset: {data_files: [a]}\nlabels: [a, b]", "labels"},
};

TEST(JobSpecValidate, FiftyMalformedSpecsAreEachRejectedNamingTheKey) {
  ASSERT_GE(sizeof(kBad) / sizeof(kBad[0]), 50u);
  for (const Bad& b : kBad) {
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
