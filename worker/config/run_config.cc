#include "worker/config/run_config.h"

#include <sstream>
#include <vector>

#include "jobspec.h"

namespace ftune::trainer {
namespace {

std::string JoinLines(const std::vector<std::string>& lines) {
  std::string out;
  for (const std::string& l : lines) out += (out.empty() ? "" : "\n") + l;
  return out;
}

int DtypeBytes(const std::string& dtype) { return dtype == "float32" ? 4 : 2; }

}  // namespace

Result<RunConfig> MakeRunConfig(const v1::JobSpec& spec, DeviceKind device, int world_size) {
  if (const std::vector<std::string> problems = ValidateJobSpec(spec); !problems.empty()) {
    return InvalidArgumentError("invalid job spec (resolve it with LoadJobSpec/ResolveJobSpec):\n" +
                                JoinLines(problems));
  }
  const v1::TrainingSpec& t = spec.training();
  const v1::DatasetSpec& d = spec.dataset();
  RunConfig c;
  c.device = device;
  c.world_size = world_size > 0 ? world_size : spec.resources().num_ranks();

  ModelSettings& m = c.model;
  m.dir = spec.model().model_name_or_path();
  m.random_weights = spec.model().random_weights();
  m.random_seed = spec.model().random_weights_seed();
  m.quantize_base = spec.quantization().load_in_4bit();
  m.nf4_blocksize = spec.quantization().blocksize();
  m.double_quant = spec.quantization().bnb_4bit_use_double_quant();
  // CPU ranks compute in fp32 whatever the spec says (their parity tests
  // are fp32 against transformers); GPU ranks in bnb_4bit_compute_dtype.
  m.compute_dtype = device == DeviceKind::kCuda ? spec.quantization().bnb_4bit_compute_dtype()
                                                : "float32";
  if (t.has_gradient_checkpointing()) {
    m.activation_checkpointing = t.gradient_checkpointing();
  } else {
    // auto: a GPU rank checkpoints only what its memory needs; CPU ranks
    // have no device budget to plan against and keep every activation.
    m.activation_checkpointing = device == DeviceKind::kCuda;
    m.checkpointing_auto = device == DeviceKind::kCuda;
  }
  m.device_memory_limit_bytes = spec.fsdp().device_memory_limit_bytes();

  data::DatasetOptions& o = c.data;
  o.tokenizer_dir = m.dir;
  o.data_files.assign(d.data_files().begin(), d.data_files().end());
  o.eval_data_files.assign(d.eval_data_files().begin(), d.eval_data_files().end());
  o.format = d.format();
  o.chat_template = d.chat_template();
  o.eval_split_ratio = d.eval_split_ratio();
  o.skip_invalid = d.skip_invalid();
  o.completion_only_loss = d.completion_only_loss();
  o.max_seq_len = t.max_seq_len();
  o.packing = t.packing();
  o.seed = static_cast<uint64_t>(t.seed());

  LoraConfig& l = c.lora;
  l.r = spec.lora().r();
  l.lora_alpha = spec.lora().lora_alpha();
  l.lora_dropout = spec.lora().lora_dropout();
  l.use_rslora = spec.lora().use_rslora();
  l.target_modules.assign(spec.lora().target_modules().begin(),
                          spec.lora().target_modules().end());
  l.seed = static_cast<uint64_t>(t.seed());

  c.fsdp.reshard_after_forward = spec.fsdp().reshard_after_forward();
  c.fsdp.offload_params = spec.fsdp().offload_params();
  c.fsdp.prefetch = spec.fsdp().has_prefetch() ? spec.fsdp().prefetch()
                                               : device == DeviceKind::kCuda;

  c.adam.lr = t.learning_rate();
  c.adam.beta1 = t.adam_beta1();
  c.adam.beta2 = t.adam_beta2();
  c.adam.eps = t.adam_epsilon();
  c.adam.weight_decay = t.weight_decay();

  TrainingSettings& s = c.training;
  s.per_device_train_batch_size = t.per_device_train_batch_size();
  s.gradient_accumulation_steps = t.gradient_accumulation_steps();
  s.max_steps = t.max_steps();
  s.num_train_epochs = t.num_train_epochs();
  s.lr_scheduler_type = t.lr_scheduler_type();
  s.learning_rate = t.learning_rate();
  s.warmup_steps = t.warmup_steps();
  s.warmup_ratio = t.warmup_ratio();
  s.max_grad_norm = t.max_grad_norm();
  s.logging_steps = t.logging_steps();
  s.eval_steps = t.eval_steps();
  s.save_steps = t.save_steps();
  s.save_total_limit = t.save_total_limit();
  s.seed = static_cast<uint64_t>(t.seed());
  if (!t.profile_steps().empty()) {
    ParseStepRange(t.profile_steps(), &s.profile_first, &s.profile_last);  // validated
  }
  for (const std::string& to : t.report_to()) {
    if (to == "tensorboard" || to == "all") s.report_to_tensorboard = true;  // validated
  }
  s.run_name = spec.name();

  FTUNE_RETURN_IF_ERROR(l.Validate());
  FTUNE_RETURN_IF_ERROR(c.adam.Validate());

  MemoryPlanOptions& p = c.plan;
  p.world_size = c.world_size;
  p.micro_batch_size = s.per_device_train_batch_size;
  p.seq_len = o.max_seq_len;
  p.lora_r = l.r;
  p.target_modules = l.target_modules;
  p.offload_params = c.fsdp.offload_params;
  p.activation_checkpointing = m.activation_checkpointing;
  p.checkpoint_layers = m.checkpoint_layers;
  p.lora_dropout = l.lora_dropout > 0;
  p.reshard_after_forward = c.fsdp.reshard_after_forward;
  p.quantize_base = m.quantize_base;
  p.nf4_blocksize = m.nf4_blocksize;
  p.double_quant = m.double_quant;
  p.compute_dtype_bytes = DtypeBytes(m.compute_dtype);
  p.prefetch = c.fsdp.prefetch;
  p.random_weights = m.random_weights;
  FTUNE_RETURN_IF_ERROR(p.Validate());
  return c;
}

std::string DescribeRunConfig(const RunConfig& c) {
  std::ostringstream out;
  out.precision(17);
  const auto line = [&out](const char* key, const auto& value) {
    out << key << " = " << value << "\n";
  };
  const auto list = [](const std::vector<std::string>& v) {
    std::string s = "[";
    for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + v[i];
    return s + "]";
  };
  line("device", c.device == DeviceKind::kCuda ? "cuda" : "cpu");
  line("world_size", c.world_size);
  line("model.dir", c.model.dir);
  line("model.random_weights", c.model.random_weights);
  line("model.random_seed", c.model.random_seed);
  line("model.quantize_base", c.model.quantize_base);
  line("model.nf4_blocksize", c.model.nf4_blocksize);
  line("model.double_quant", c.model.double_quant);
  line("model.compute_dtype", c.model.compute_dtype);
  line("model.activation_checkpointing", c.model.activation_checkpointing);
  line("model.checkpoint_layers", c.model.checkpoint_layers);
  line("model.checkpointing_auto", c.model.checkpointing_auto);
  line("model.device_memory_limit_bytes", c.model.device_memory_limit_bytes);
  line("data.tokenizer_dir", c.data.tokenizer_dir);
  line("data.data_files", list(c.data.data_files));
  line("data.eval_data_files", list(c.data.eval_data_files));
  line("data.format", c.data.format);
  line("data.chat_template", c.data.chat_template);
  line("data.eval_split_ratio", c.data.eval_split_ratio);
  line("data.skip_invalid", c.data.skip_invalid);
  line("data.completion_only_loss", c.data.completion_only_loss);
  line("data.max_seq_len", c.data.max_seq_len);
  line("data.packing", c.data.packing);
  line("data.seed", c.data.seed);
  line("lora.r", c.lora.r);
  line("lora.lora_alpha", c.lora.lora_alpha);
  line("lora.lora_dropout", c.lora.lora_dropout);
  line("lora.use_rslora", c.lora.use_rslora);
  line("lora.target_modules", list(c.lora.target_modules));
  line("lora.seed", c.lora.seed);
  line("fsdp.reshard_after_forward", c.fsdp.reshard_after_forward);
  line("fsdp.offload_params", c.fsdp.offload_params);
  line("fsdp.prefetch", c.fsdp.prefetch);
  line("adam.lr", c.adam.lr);
  line("adam.beta1", c.adam.beta1);
  line("adam.beta2", c.adam.beta2);
  line("adam.eps", c.adam.eps);
  line("adam.weight_decay", c.adam.weight_decay);
  const TrainingSettings& s = c.training;
  line("training.per_device_train_batch_size", s.per_device_train_batch_size);
  line("training.gradient_accumulation_steps", s.gradient_accumulation_steps);
  line("training.max_steps", s.max_steps);
  line("training.num_train_epochs", s.num_train_epochs);
  line("training.lr_scheduler_type", s.lr_scheduler_type);
  line("training.learning_rate", s.learning_rate);
  line("training.warmup_steps", s.warmup_steps);
  line("training.warmup_ratio", s.warmup_ratio);
  line("training.max_grad_norm", s.max_grad_norm);
  line("training.logging_steps", s.logging_steps);
  line("training.eval_steps", s.eval_steps);
  line("training.save_steps", s.save_steps);
  line("training.save_total_limit", s.save_total_limit);
  line("training.seed", s.seed);
  line("training.profile_steps", std::to_string(s.profile_first) + "-" +
                                     std::to_string(s.profile_last));
  line("training.report_to_tensorboard", s.report_to_tensorboard);
  line("training.run_name", s.run_name);
  const MemoryPlanOptions& p = c.plan;
  line("plan.world_size", p.world_size);
  line("plan.micro_batch_size", p.micro_batch_size);
  line("plan.seq_len", p.seq_len);
  line("plan.lora_r", p.lora_r);
  line("plan.target_modules", list(p.target_modules));
  line("plan.offload_params", p.offload_params);
  line("plan.activation_checkpointing", p.activation_checkpointing);
  line("plan.checkpoint_layers", p.checkpoint_layers);
  line("plan.lora_dropout", p.lora_dropout);
  line("plan.reshard_after_forward", p.reshard_after_forward);
  line("plan.quantize_base", p.quantize_base);
  line("plan.nf4_blocksize", p.nf4_blocksize);
  line("plan.double_quant", p.double_quant);
  line("plan.compute_dtype_bytes", p.compute_dtype_bytes);
  line("plan.prefetch", p.prefetch);
  line("plan.random_weights", p.random_weights);
  return out.str();
}

}  // namespace ftune::trainer
