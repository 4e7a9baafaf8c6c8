// RunConfig: the one derivation of a job's options from a resolved spec.
// The key walk sets every JobSpec field, one at a time, from YAML, and
// asserts which RunConfig options it changes: a key that is parsed but
// reaches no option (or reaches a different one) fails here, and so does a
// new JobSpec field that nobody listed.
#include <gtest/gtest.h>

#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <google/protobuf/descriptor.h>

#include "jobspec.h"
#include "worker/config/plan_spec.h"
#include "worker/config/run_config.h"

namespace ftune::trainer {
namespace {

constexpr char kBase[] = R"(
model: {model_name_or_path: /models/llama}
dataset: {data_files: [/data/train.jsonl]}
)";

v1::JobSpec Parse(const std::string& yaml) {
  v1::JobSpec spec;
  std::vector<std::string> errors;
  EXPECT_TRUE(ParseJobSpecYaml(yaml, &spec, &errors)) << (errors.empty() ? "" : errors[0]);
  return spec;
}

// "key = value" lines of DescribeRunConfig, by key.
std::map<std::string, std::string> Lines(const RunConfig& c) {
  std::map<std::string, std::string> out;
  std::istringstream in(DescribeRunConfig(c));
  for (std::string line; std::getline(in, line);) {
    const size_t eq = line.find(" = ");
    out[line.substr(0, eq)] = line.substr(eq + 3);
  }
  return out;
}

RunConfig Resolve(v1::JobSpec spec, DeviceKind device = DeviceKind::kCuda) {
  const Status st = ResolveJobSpec(&spec);
  EXPECT_TRUE(st.ok()) << st.ToString();
  Result<RunConfig> c = MakeRunConfig(spec, device);
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  return c.ok() ? *c : RunConfig{};
}

// Every leaf field of a message, as YAML key paths ("training.seed").
void LeafPaths(const google::protobuf::Descriptor* d, const std::string& prefix,
               std::set<std::string>* out) {
  for (int i = 0; i < d->field_count(); ++i) {
    const google::protobuf::FieldDescriptor* f = d->field(i);
    const std::string path = prefix + f->name();
    if (f->type() == google::protobuf::FieldDescriptor::TYPE_MESSAGE && !f->is_map() &&
        !f->is_repeated()) {
      LeafPaths(f->message_type(), path + ".", out);
    } else {
      out->insert(path);
    }
  }
}

struct KeyCase {
  const char* key;       // JobSpec field path
  const char* yaml;      // sets it to a non-default value
  std::set<std::string> options;  // RunConfig lines it must change, exactly
};

// The engine's and the memory plan's keys. A plan.* line next to an engine
// option is the memory plan reading the same decision.
const std::vector<KeyCase>& RunKeys() {
  static const std::vector<KeyCase> kCases = {
      {"model.model_name_or_path", "model: {model_name_or_path: /models/other}",
       {"model.dir", "data.tokenizer_dir"}},
      {"model.random_weights", "model: {random_weights: true}",
       {"model.random_weights", "plan.random_weights"}},
      {"model.random_weights_seed", "model: {random_weights_seed: 9}", {"model.random_seed"}},
      {"dataset.data_files", "dataset: {data_files: [/data/more.jsonl]}", {"data.data_files"}},
      {"dataset.format", "dataset: {format: text}", {"data.format"}},
      {"dataset.chat_template", "dataset: {chat_template: chatml}", {"data.chat_template"}},
      {"dataset.eval_data_files", "dataset: {eval_data_files: [/data/eval.jsonl]}",
       {"data.eval_data_files"}},
      {"dataset.eval_split_ratio", "dataset: {eval_split_ratio: 0.1}", {"data.eval_split_ratio"}},
      {"dataset.skip_invalid", "dataset: {skip_invalid: true}", {"data.skip_invalid"}},
      {"dataset.completion_only_loss", "dataset: {completion_only_loss: false}",
       {"data.completion_only_loss"}},
      {"lora.r", "lora: {r: 32}", {"lora.r", "plan.lora_r"}},
      {"lora.lora_alpha", "lora: {lora_alpha: 64}", {"lora.lora_alpha"}},
      {"lora.lora_dropout", "lora: {lora_dropout: 0.1}", {"lora.lora_dropout", "plan.lora_dropout"}},
      {"lora.target_modules", "lora: {target_modules: [q_proj, v_proj]}",
       {"lora.target_modules", "plan.target_modules"}},
      {"lora.use_rslora", "lora: {use_rslora: true}", {"lora.use_rslora"}},
      {"quantization.load_in_4bit", "quantization: {load_in_4bit: false}",
       {"model.quantize_base", "plan.quantize_base"}},
      {"quantization.bnb_4bit_use_double_quant",
       "quantization: {bnb_4bit_use_double_quant: false}",
       {"model.double_quant", "plan.double_quant"}},
      {"quantization.bnb_4bit_compute_dtype", "quantization: {bnb_4bit_compute_dtype: float32}",
       {"model.compute_dtype", "plan.compute_dtype_bytes"}},
      {"quantization.blocksize", "quantization: {blocksize: 128}",
       {"model.nf4_blocksize", "plan.nf4_blocksize"}},
      {"fsdp.sharding_strategy", "fsdp: {sharding_strategy: SHARD_GRAD_OP}",
       {"fsdp.reshard_after_forward", "plan.reshard_after_forward"}},
      {"fsdp.offload_params", "fsdp: {offload_params: true}",
       {"fsdp.offload_params", "plan.offload_params"}},
      {"fsdp.reshard_after_forward", "fsdp: {reshard_after_forward: false}",
       {"fsdp.reshard_after_forward", "plan.reshard_after_forward"}},
      {"fsdp.prefetch", "fsdp: {prefetch: false}", {"fsdp.prefetch", "plan.prefetch"}},
      {"fsdp.device_memory_limit_bytes", "fsdp: {device_memory_limit: 24GiB}",
       {"model.device_memory_limit_bytes"}},
      {"training.learning_rate", "training: {learning_rate: 0.001}",
       {"adam.lr", "training.learning_rate"}},
      {"training.lr_scheduler_type", "training: {lr_scheduler_type: cosine}",
       {"training.lr_scheduler_type"}},
      {"training.warmup_ratio", "training: {warmup_ratio: 0.1}", {"training.warmup_ratio"}},
      {"training.warmup_steps", "training: {warmup_steps: 5}", {"training.warmup_steps"}},
      // max_steps wins over epochs (HF): the epochs default is not applied.
      {"training.max_steps", "training: {max_steps: 10}",
       {"training.max_steps", "training.num_train_epochs"}},
      {"training.num_train_epochs", "training: {num_train_epochs: 2}",
       {"training.num_train_epochs"}},
      {"training.per_device_train_batch_size", "training: {per_device_train_batch_size: 2}",
       {"training.per_device_train_batch_size", "plan.micro_batch_size"}},
      {"training.gradient_accumulation_steps", "training: {gradient_accumulation_steps: 4}",
       {"training.gradient_accumulation_steps"}},
      {"training.max_seq_len", "training: {max_seq_len: 512}",
       {"data.max_seq_len", "plan.seq_len"}},
      {"training.packing", "training: {packing: true}", {"data.packing"}},
      // Unset is auto on a GPU rank (every layer until the rank plans).
      {"training.gradient_checkpointing", "training: {gradient_checkpointing: false}",
       {"model.activation_checkpointing", "model.checkpointing_auto",
        "plan.activation_checkpointing"}},
      {"training.max_grad_norm", "training: {max_grad_norm: 0.5}", {"training.max_grad_norm"}},
      {"training.weight_decay", "training: {weight_decay: 0.1}", {"adam.weight_decay"}},
      {"training.seed", "training: {seed: 7}", {"data.seed", "lora.seed", "training.seed"}},
      {"training.logging_steps", "training: {logging_steps: 5}", {"training.logging_steps"}},
      {"training.eval_steps", "training: {eval_steps: 5}", {"training.eval_steps"}},
      {"training.save_steps", "training: {save_steps: 50}", {"training.save_steps"}},
      {"training.save_total_limit", "training: {save_total_limit: 2}",
       {"training.save_total_limit"}},
      {"training.adam_beta1", "training: {adam_beta1: 0.8}", {"adam.beta1"}},
      {"training.adam_beta2", "training: {adam_beta2: 0.95}", {"adam.beta2"}},
      {"training.adam_epsilon", "training: {adam_epsilon: 0.000001}", {"adam.eps"}},
      {"training.profile_steps", "training: {profile_steps: 5-7}", {"training.profile_steps"}},
      {"training.report_to", "training: {report_to: [tensorboard]}",
       {"training.report_to_tensorboard"}},
      // The job's name names its TensorBoard run (output_dir/runs/<name>).
      {"name", "name: other", {"training.run_name"}},
      {"resources.num_ranks", "resources: {num_ranks: 4}", {"world_size", "plan.world_size"}},
  };
  return kCases;
}

// Keys that are not the rank's options, with who reads them; each is still
// checked to leave RunConfig unchanged.
const std::map<std::string, std::string>& ControlPlaneKeys() {
  static const std::map<std::string, std::string> kKeys = {
      {"labels", "job labels (coordinator: ListJobs filters)"},
      {"priority", "queue order (coordinator scheduler)"},
      {"max_restarts", "gang restarts (coordinator JobManager)"},
      {"output_dir", "the rank's TrainContext.output_dir (agent, ftune-rank train)"},
      {"resources.gpus_per_host", "placement (coordinator scheduler)"},
      {"resources.min_gpu_memory_bytes", "placement without a plan (coordinator scheduler)"},
      {"resources.placement", "pack or spread (coordinator scheduler)"},
      // Validated only: nf4 is the one 4-bit type, anything else is refused.
      {"quantization.bnb_4bit_quant_type", "validation (ResolveJobSpec refuses all but nf4)"},
  };
  return kKeys;
}

const std::map<std::string, std::string>& ControlPlaneYaml() {
  static const std::map<std::string, std::string> kYaml = {
      {"labels", "labels: {team: nlp}"},
      {"priority", "priority: 5"},
      {"max_restarts", "max_restarts: 1"},
      {"output_dir", "output_dir: /out"},
      {"resources.gpus_per_host", "resources: {gpus_per_host: 1}"},
      {"resources.min_gpu_memory_bytes", "resources: {min_gpu_memory: 40GiB}"},
      {"resources.placement", "resources: {placement: spread}"},
  };
  return kYaml;
}

TEST(RunConfigKeyWalk, EveryJobSpecFieldIsListed) {
  std::set<std::string> fields;
  LeafPaths(v1::JobSpec::descriptor(), "", &fields);
  std::set<std::string> listed;
  for (const KeyCase& k : RunKeys()) listed.insert(k.key);
  for (const auto& [key, who] : ControlPlaneKeys()) {
    EXPECT_EQ(listed.count(key), 0u) << key << " is listed twice";
    listed.insert(key);
  }
  for (const std::string& f : fields) {
    EXPECT_EQ(listed.count(f), 1u)
        << "JobSpec field " << f << " reaches no RunConfig option and no control-plane reader: "
        << "map it in MakeRunConfig (worker/config/run_config.cc) and list it here";
  }
  for (const std::string& l : listed) EXPECT_EQ(fields.count(l), 1u) << l << " is not a JobSpec field";
}

TEST(RunConfigKeyWalk, EachKeyChangesExactlyItsOptions) {
  const std::map<std::string, std::string> base = Lines(Resolve(Parse(kBase)));
  for (const KeyCase& k : RunKeys()) {
    SCOPED_TRACE(k.key);
    v1::JobSpec spec = Parse(kBase);
    spec.MergeFrom(Parse(k.yaml));
    const std::map<std::string, std::string> changed = Lines(Resolve(spec));
    std::set<std::string> differ;
    for (const auto& [key, value] : changed) {
      if (base.at(key) != value) differ.insert(key);
    }
    EXPECT_EQ(differ, k.options);
  }
}

TEST(RunConfigKeyWalk, ControlPlaneKeysLeaveTheRunAlone) {
  const std::string base = DescribeRunConfig(Resolve(Parse(kBase)));
  for (const auto& [key, yaml] : ControlPlaneYaml()) {
    SCOPED_TRACE(key);
    v1::JobSpec spec = Parse(kBase);
    spec.MergeFrom(Parse(yaml));
    EXPECT_EQ(DescribeRunConfig(Resolve(spec)), base);
  }
  v1::JobSpec fp4 = Parse(std::string(kBase) + "quantization: {bnb_4bit_quant_type: fp4}\n");
  const Status st = ResolveJobSpec(&fp4);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("quantization.bnb_4bit_quant_type"), std::string::npos);
}

// What the agent hands its ranks is JobSpecToYaml of the stored spec: every
// key must survive the round trip, or a rank runs another job.
TEST(RunConfigKeyWalk, EveryKeySurvivesTheAgentsYaml) {
  for (const KeyCase& k : RunKeys()) {
    SCOPED_TRACE(k.key);
    v1::JobSpec spec = Parse(kBase);
    spec.MergeFrom(Parse(k.yaml));
    ASSERT_TRUE(ResolveJobSpec(&spec).ok());
    const v1::JobSpec again = Parse(JobSpecToYaml(spec));
    EXPECT_EQ(again.SerializeAsString(), spec.SerializeAsString()) << JobSpecToYaml(spec);
  }
}

TEST(RunConfigTest, MapsTheDatasetFields) {
  const RunConfig c = Resolve(Parse(R"(
model: {model_name_or_path: /models/llama}
dataset:
  data_files: [a.jsonl, b.json]
  eval_data_files: [e.jsonl]
  format: messages
  chat_template: chatml
  skip_invalid: true
  completion_only_loss: false
training: {max_seq_len: 512, packing: true, seed: 7}
)"));
  EXPECT_EQ(c.data.tokenizer_dir, "/models/llama");
  EXPECT_EQ(c.data.data_files, (std::vector<std::string>{"a.jsonl", "b.json"}));
  EXPECT_EQ(c.data.eval_data_files, (std::vector<std::string>{"e.jsonl"}));
  EXPECT_EQ(c.data.format, "messages");
  EXPECT_EQ(c.data.chat_template, "chatml");
  EXPECT_TRUE(c.data.skip_invalid);
  EXPECT_FALSE(c.data.completion_only_loss);
  EXPECT_EQ(c.data.max_seq_len, 512);
  EXPECT_TRUE(c.data.packing);
  EXPECT_EQ(c.data.seed, 7u);
}

TEST(RunConfigTest, DefaultsAreTheLibrariesDefaults) {
  const RunConfig c = Resolve(Parse(kBase));
  EXPECT_EQ(c.data.format, "auto");
  EXPECT_EQ(c.data.chat_template, "auto");
  EXPECT_TRUE(c.data.completion_only_loss);
  EXPECT_EQ(c.data.max_seq_len, 1024);
  EXPECT_FALSE(c.data.packing);
  EXPECT_EQ(c.data.seed, 42u);
  EXPECT_EQ(c.lora.r, 8);
  EXPECT_DOUBLE_EQ(c.lora.lora_alpha, 8);
  EXPECT_EQ(c.lora.target_modules, LoraConfig::DefaultTargetModules());
  EXPECT_DOUBLE_EQ(c.adam.lr, 5e-5);
  EXPECT_DOUBLE_EQ(c.adam.weight_decay, 0);
  EXPECT_EQ(c.training.save_steps, 500);
  EXPECT_TRUE(c.fsdp.reshard_after_forward);
  EXPECT_FALSE(c.fsdp.offload_params);
}

// One decision for prefetch, read by the engine and the plan alike: on for
// GPU ranks unless the spec says otherwise, off for CPU ranks.
TEST(RunConfigTest, PrefetchDefaultFollowsTheDevice) {
  const RunConfig gpu = Resolve(Parse(kBase), DeviceKind::kCuda);
  const RunConfig cpu = Resolve(Parse(kBase), DeviceKind::kCpu);
  EXPECT_TRUE(gpu.fsdp.prefetch);
  EXPECT_TRUE(gpu.plan.prefetch);
  EXPECT_FALSE(cpu.fsdp.prefetch);
  EXPECT_FALSE(cpu.plan.prefetch);
  const RunConfig forced = Resolve(Parse(std::string(kBase) + "fsdp: {prefetch: true}\n"),
                                   DeviceKind::kCpu);
  EXPECT_TRUE(forced.fsdp.prefetch);
}

// gradient_checkpointing unset (or "auto"): a GPU rank plans how many
// layers to checkpoint and starts from all of them; a CPU rank keeps every
// activation. true/false keep their meaning on both.
TEST(RunConfigTest, GradientCheckpointingAutoFollowsTheDevice) {
  const RunConfig gpu = Resolve(Parse(kBase), DeviceKind::kCuda);
  EXPECT_TRUE(gpu.model.activation_checkpointing);
  EXPECT_TRUE(gpu.model.checkpointing_auto);
  EXPECT_EQ(gpu.model.checkpoint_layers, -1);
  EXPECT_TRUE(gpu.plan.activation_checkpointing);
  const RunConfig cpu = Resolve(Parse(kBase), DeviceKind::kCpu);
  EXPECT_FALSE(cpu.model.activation_checkpointing);
  EXPECT_FALSE(cpu.model.checkpointing_auto);
  const std::string auto_yaml = std::string(kBase) + "training: {gradient_checkpointing: auto}\n";
  v1::JobSpec spelled = Parse(auto_yaml);
  EXPECT_FALSE(spelled.training().has_gradient_checkpointing());
  EXPECT_EQ(Lines(Resolve(spelled)), Lines(gpu));
  for (const char* v : {"true", "false"}) {
    SCOPED_TRACE(v);
    const std::string yaml =
        std::string(kBase) + "training: {gradient_checkpointing: " + v + "}\n";
    for (DeviceKind d : {DeviceKind::kCuda, DeviceKind::kCpu}) {
      const RunConfig c = Resolve(Parse(yaml), d);
      EXPECT_EQ(c.model.activation_checkpointing, std::string(v) == "true");
      EXPECT_FALSE(c.model.checkpointing_auto);
    }
  }
  v1::JobSpec bad;
  std::vector<std::string> errors;
  EXPECT_FALSE(ParseJobSpecYaml(std::string(kBase) + "training: {gradient_checkpointing: some}\n",
                                &bad, &errors));
  v1::JobSpec small = Parse(std::string(kBase) + "fsdp: {device_memory_limit: 512MiB}\n");
  const Status st = ResolveJobSpec(&small);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("fsdp.device_memory_limit"), std::string::npos) << st.message();
}

TEST(RunConfigTest, CpuRanksComputeInFp32) {
  const RunConfig cpu = Resolve(Parse(kBase), DeviceKind::kCpu);
  const RunConfig gpu = Resolve(Parse(kBase), DeviceKind::kCuda);
  EXPECT_EQ(cpu.model.compute_dtype, "float32");
  EXPECT_EQ(cpu.plan.compute_dtype_bytes, 4);
  EXPECT_EQ(gpu.model.compute_dtype, "bfloat16");
  EXPECT_EQ(gpu.plan.compute_dtype_bytes, 2);
}

TEST(RunConfigTest, OffloadIsOneDecisionForEngineAndPlan) {
  const RunConfig c = Resolve(Parse(std::string(kBase) + "fsdp: {offload_params: true}\n"));
  EXPECT_TRUE(c.fsdp.offload_params);
  EXPECT_TRUE(c.plan.offload_params);
  // The plan moves the LoRA shard and its AdamW moments to the host too.
  LlamaConfig shape;
  shape.hidden_size = 4096;
  shape.intermediate_size = 14336;
  shape.num_hidden_layers = 32;
  shape.num_attention_heads = 32;
  shape.num_key_value_heads = 8;
  shape.head_dim = 128;
  shape.vocab_size = 128256;
  v1::JobSpec on = Parse(std::string(kBase) + "fsdp: {offload_params: true}\nresources: {num_ranks: 2}\n");
  v1::JobSpec off = Parse(std::string(kBase) + "resources: {num_ranks: 2}\n");
  ASSERT_TRUE(ResolveJobSpec(&on).ok());
  ASSERT_TRUE(ResolveJobSpec(&off).ok());
  Result<MemoryPlan> with = PlanJob(on, 0, &shape);
  Result<MemoryPlan> without = PlanJob(off, 0, &shape);
  ASSERT_TRUE(with.ok()) << with.status().ToString();
  ASSERT_TRUE(without.ok()) << without.status().ToString();
  EXPECT_LT(with->device_peak_bytes, without->device_peak_bytes);
  EXPECT_GT(with->host_peak_bytes, without->host_peak_bytes);
}

TEST(RunConfigTest, ProfileStepsAreARangeOfOptimizerSteps) {
  const RunConfig c = Resolve(Parse(std::string(kBase) + "training: {profile_steps: 5-7}\n"));
  EXPECT_EQ(c.training.profile_first, 5);
  EXPECT_EQ(c.training.profile_last, 7);
  const RunConfig one = Resolve(Parse(std::string(kBase) + "training: {profile_steps: '3'}\n"));
  EXPECT_EQ(one.training.profile_first, 3);
  EXPECT_EQ(one.training.profile_last, 3);
  for (const char* bad : {"0-2", "7-5", "x", "5-", "-5", "1-2-3"}) {
    v1::JobSpec spec = Parse(std::string(kBase) + "training: {profile_steps: '" + bad + "'}\n");
    const Status st = ResolveJobSpec(&spec);
    ASSERT_FALSE(st.ok()) << bad;
    EXPECT_NE(st.message().find("training.profile_steps"), std::string::npos) << st.message();
  }
}

// training.report_to takes HF's spellings: a list or one string; "all" is
// every integration ftune has, "none" none. Anything else is refused with
// the supported values named.
TEST(RunConfigTest, ReportToTensorBoardAndItsSpellings) {
  EXPECT_FALSE(Resolve(Parse(kBase)).training.report_to_tensorboard);
  for (const char* yaml : {"[tensorboard]", "tensorboard", "all", "[all]"}) {
    const RunConfig c =
        Resolve(Parse(std::string(kBase) + "training: {report_to: " + yaml + "}\nname: my run\n"));
    EXPECT_TRUE(c.training.report_to_tensorboard) << yaml;
    EXPECT_EQ(c.training.run_name, "my run");
  }
  EXPECT_FALSE(Resolve(Parse(std::string(kBase) + "training: {report_to: none}\n"))
                   .training.report_to_tensorboard);
  for (const std::string bad : {"[wandb]", "[tensorboard, mlflow]", "[none, tensorboard]"}) {
    v1::JobSpec spec = Parse(std::string(kBase) + "training: {report_to: " + bad + "}\n");
    const Status st = ResolveJobSpec(&spec);
    ASSERT_FALSE(st.ok()) << bad;
    EXPECT_NE(st.message().find("training.report_to"), std::string::npos) << st.message();
  }
  v1::JobSpec wandb = Parse(std::string(kBase) + "training: {report_to: [wandb]}\n");
  EXPECT_NE(ResolveJobSpec(&wandb).message().find(
                "training.report_to ('wandb') must be one of: all, none, tensorboard"),
            std::string::npos)
      << ResolveJobSpec(&wandb).message();
}

TEST(RunConfigTest, AnUnresolvedSpecIsRefusedWithItsProblems) {
  v1::JobSpec spec = Parse(R"(
model: {model_name_or_path: /m}
dataset: {data_files: [], format: csv}
)");
  Result<RunConfig> c = MakeRunConfig(spec, DeviceKind::kCpu);
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("dataset.data_files"), std::string::npos)
      << c.status().message();
  EXPECT_NE(c.status().message().find("dataset.format"), std::string::npos);
  // One validation for the whole spec: a LoRA problem is reported too.
  v1::JobSpec lora = Parse(R"(
model: {model_name_or_path: /m}
dataset: {data_files: [t.jsonl]}
lora: {r: -3}
)");
  const Status st = ResolveJobSpec(&lora);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("lora.r"), std::string::npos) << st.message();
}

}  // namespace
}  // namespace ftune::trainer
