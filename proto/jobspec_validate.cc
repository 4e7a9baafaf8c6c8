// Defaults and validation of JobSpec. Defaults follow the libraries users
// know (HF TrainingArguments, PEFT LoraConfig, bitsandbytes' QLoRA recipe);
// the few deliberate departures are commented where they are set.
#include <algorithm>
#include <cmath>
#include <set>
#include <sstream>

#include "ftune/file_util.h"
#include "ftune/path_policy.h"
#include "jobspec.h"

namespace ftune {
namespace {

// Counts a spec may carry (docs/security.md, "Limits"). A spec is stored in
// every job row and sent with every assignment: it stays small.
constexpr int kMaxDataFiles = 1024;  // each of data_files, eval_data_files
constexpr int kMaxLabels = 64;
constexpr size_t kMaxLabelValueBytes = 256;

std::string Num(double v) {
  std::ostringstream s;
  s << v;
  return s.str();
}

bool OneOf(const std::string& v, const std::set<std::string>& allowed) {
  return allowed.count(v) > 0;
}

std::string List(const std::set<std::string>& allowed) {
  std::string out;
  for (const auto& a : allowed) out += (out.empty() ? "" : ", ") + a;
  return out;
}

class Checker {
 public:
  void Require(bool ok, const std::string& key, const std::string& value,
               const std::string& rule) {
    if (!ok) errors_.push_back(key + " (" + value + ") " + rule);
  }
  void Choice(const std::string& key, const std::string& value,
              const std::set<std::string>& allowed) {
    Require(OneOf(value, allowed), key, "'" + value + "'", "must be one of: " + List(allowed));
  }
  void AtLeast(const std::string& key, double value, double min) {
    Require(std::isfinite(value) && value >= min, key, Num(value), "must be >= " + Num(min));
  }
  void Range(const std::string& key, double value, double lo, double hi, bool hi_open) {
    const bool ok = std::isfinite(value) && value >= lo && (hi_open ? value < hi : value <= hi);
    Require(ok, key, Num(value),
            "must be in [" + Num(lo) + ", " + Num(hi) + (hi_open ? ")" : "]"));
  }
  std::vector<std::string> Take() { return std::move(errors_); }

 private:
  std::vector<std::string> errors_;
};

bool ValidLabelKey(const std::string& k) {
  if (k.empty() || k.size() > 63) return false;
  for (char c : k) {
    if (!(std::islower(static_cast<unsigned char>(c)) || std::isdigit(static_cast<unsigned char>(c)) ||
          c == '_' || c == '-' || c == '.' || c == '/'))
      return false;
  }
  return true;
}

}  // namespace

void ApplyJobSpecDefaults(v1::JobSpec* spec) {
  auto* d = spec->mutable_dataset();
  if (d->format().empty()) d->set_format("auto");
  if (d->chat_template().empty()) d->set_chat_template("auto");
  if (!d->has_completion_only_loss()) d->set_completion_only_loss(true);  // TRL SFT default

  auto* l = spec->mutable_lora();  // PEFT LoraConfig defaults
  if (l->r() == 0) l->set_r(8);
  if (l->lora_alpha() == 0) l->set_lora_alpha(8);
  if (l->target_modules().empty())
    for (const auto& t : KnownLoraTargets()) l->add_target_modules(t);

  auto* q = spec->mutable_quantization();  // QLoRA: NF4 + double quant + bf16 compute
  if (!q->has_load_in_4bit()) q->set_load_in_4bit(true);
  if (q->bnb_4bit_quant_type().empty()) q->set_bnb_4bit_quant_type("nf4");
  if (!q->has_bnb_4bit_use_double_quant()) q->set_bnb_4bit_use_double_quant(true);
  if (q->bnb_4bit_compute_dtype().empty()) q->set_bnb_4bit_compute_dtype("bfloat16");
  if (q->blocksize() == 0) q->set_blocksize(64);

  auto* f = spec->mutable_fsdp();
  if (f->sharding_strategy().empty()) {
    const bool reshard = !f->has_reshard_after_forward() || f->reshard_after_forward();
    f->set_sharding_strategy(reshard ? "FULL_SHARD" : "SHARD_GRAD_OP");
  }
  if (!f->has_reshard_after_forward())
    f->set_reshard_after_forward(f->sharding_strategy() == "FULL_SHARD");

  auto* t = spec->mutable_training();  // HF TrainingArguments defaults
  if (!t->has_learning_rate()) t->set_learning_rate(5e-5);
  if (t->lr_scheduler_type().empty()) t->set_lr_scheduler_type("linear");
  if (t->max_steps() == 0 && t->num_train_epochs() == 0) t->set_num_train_epochs(3);
  if (t->per_device_train_batch_size() == 0) t->set_per_device_train_batch_size(8);
  if (t->gradient_accumulation_steps() == 0) t->set_gradient_accumulation_steps(1);
  if (t->max_seq_len() == 0) t->set_max_seq_len(1024);  // TRL SFTConfig max_length
  if (!t->has_max_grad_norm()) t->set_max_grad_norm(1.0);
  if (!t->has_seed()) t->set_seed(42);
  // HF logs every 500 steps; a job that streams its loss logs every step.
  if (!t->has_logging_steps()) t->set_logging_steps(1);
  if (!t->has_save_steps()) t->set_save_steps(500);
  if (!t->has_adam_beta1()) t->set_adam_beta1(0.9);
  if (!t->has_adam_beta2()) t->set_adam_beta2(0.999);
  if (!t->has_adam_epsilon()) t->set_adam_epsilon(1e-8);

  auto* r = spec->mutable_resources();
  if (r->num_ranks() == 0) r->set_num_ranks(1);
  if (r->placement().empty()) r->set_placement("pack");

  if (!spec->has_max_restarts()) spec->set_max_restarts(3);
}

std::vector<std::string> ValidateJobSpec(const v1::JobSpec& spec) {
  Checker c;
  c.Require(spec.name().size() <= 128, "name", "'" + spec.name() + "'",
            "must be at most 128 characters");
  for (char ch : spec.name())
    if (std::iscntrl(static_cast<unsigned char>(ch))) {
      c.Require(false, "name", "'" + spec.name() + "'", "must not contain control characters");
      break;
    }

  c.Require(!spec.model().model_name_or_path().empty(), "model.model_name_or_path", "empty",
            "must name a Hugging Face model directory");
  // Where the paths may lead is the coordinator's and the agent's to check
  // (ftune/path_policy.h); their length is the spec's.
  const auto path_length = [&c](const std::string& key, const std::string& path) {
    c.Require(path.size() <= kMaxSpecPathBytes, key,
              "'" + path.substr(0, 64) + "...', " + std::to_string(path.size()) + " bytes",
              "must be at most " + std::to_string(kMaxSpecPathBytes) + " bytes long");
  };
  path_length("model.model_name_or_path", spec.model().model_name_or_path());
  path_length("output_dir", spec.output_dir());

  const auto& d = spec.dataset();
  c.Require(d.data_files_size() > 0, "dataset.data_files", "empty",
            "must list at least one JSONL or JSON file");
  for (int i = 0; i < d.data_files_size(); ++i)
    c.Require(!d.data_files(i).empty(), "dataset.data_files[" + std::to_string(i) + "]", "''",
              "must be a file path");
  c.Require(d.data_files_size() <= kMaxDataFiles, "dataset.data_files",
            std::to_string(d.data_files_size()) + " files",
            "must list at most " + std::to_string(kMaxDataFiles) + " files");
  c.Require(d.eval_data_files_size() <= kMaxDataFiles, "dataset.eval_data_files",
            std::to_string(d.eval_data_files_size()) + " files",
            "must list at most " + std::to_string(kMaxDataFiles) + " files");
  for (int i = 0; i < d.data_files_size() && i < kMaxDataFiles; ++i)
    path_length("dataset.data_files[" + std::to_string(i) + "]", d.data_files(i));
  for (int i = 0; i < d.eval_data_files_size() && i < kMaxDataFiles; ++i)
    path_length("dataset.eval_data_files[" + std::to_string(i) + "]", d.eval_data_files(i));
  c.Choice("dataset.format", d.format(), {"auto", "messages", "text", "prompt_completion"});
  c.Choice("dataset.chat_template", d.chat_template(),
           {"auto", "llama3", "llama3.1", "llama2", "chatml", "mistral", "qwen2.5",
            "mistral-v0.3"});
  c.Range("dataset.eval_split_ratio", d.eval_split_ratio(), 0, 1, true);
  c.Require(!(d.eval_data_files_size() > 0 && d.eval_split_ratio() > 0), "dataset.eval_split_ratio",
            Num(d.eval_split_ratio()), "must be 0 when dataset.eval_data_files is given");

  const auto& l = spec.lora();
  c.Range("lora.r", l.r(), 1, 4096, false);
  c.Require(std::isfinite(l.lora_alpha()) && l.lora_alpha() > 0, "lora.lora_alpha",
            Num(l.lora_alpha()), "must be > 0");
  c.Range("lora.lora_dropout", l.lora_dropout(), 0, 1, true);
  std::set<std::string> known(KnownLoraTargets().begin(), KnownLoraTargets().end());
  std::set<std::string> seen;
  c.Require(l.target_modules_size() > 0, "lora.target_modules", "empty",
            "must name at least one of: " + List(known));
  for (int i = 0; i < l.target_modules_size(); ++i) {
    const std::string key = "lora.target_modules[" + std::to_string(i) + "]";
    c.Choice(key, l.target_modules(i), known);
    c.Require(seen.insert(l.target_modules(i)).second, key, "'" + l.target_modules(i) + "'",
              "is listed twice");
  }

  const auto& q = spec.quantization();
  if (q.load_in_4bit()) {
    c.Require(q.bnb_4bit_quant_type() == "nf4", "quantization.bnb_4bit_quant_type",
              "'" + q.bnb_4bit_quant_type() + "'", "must be 'nf4' (the only 4-bit type ftune trains)");
    c.Choice("quantization.bnb_4bit_compute_dtype", q.bnb_4bit_compute_dtype(),
             {"bfloat16", "float16", "float32"});
    const int b = q.blocksize();
    c.Require(b >= 64 && b <= 4096 && (b & (b - 1)) == 0, "quantization.blocksize",
              std::to_string(b), "must be a power of two in [64, 4096]");
  }

  const auto& f = spec.fsdp();
  c.Choice("fsdp.sharding_strategy", f.sharding_strategy(),
           {"FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"});
  if (f.sharding_strategy() == "FULL_SHARD" || f.sharding_strategy() == "SHARD_GRAD_OP") {
    const bool want = f.sharding_strategy() == "FULL_SHARD";
    c.Require(f.reshard_after_forward() == want, "fsdp.reshard_after_forward",
              f.reshard_after_forward() ? "true" : "false",
              "contradicts fsdp.sharding_strategy " + f.sharding_strategy() +
                  " (FULL_SHARD reshards after forward, SHARD_GRAD_OP does not)");
  }

  c.Require(f.device_memory_limit_bytes() == 0 || f.device_memory_limit_bytes() >= (1LL << 30),
            "fsdp.device_memory_limit", std::to_string(f.device_memory_limit_bytes()) + " bytes",
            "must be 0 (the whole device) or at least 1GiB");

  const auto& t = spec.training();
  c.Require(std::isfinite(t.learning_rate()) && t.learning_rate() > 0 && t.learning_rate() < 1,
            "training.learning_rate", Num(t.learning_rate()), "must be in (0, 1)");
  c.Choice("training.lr_scheduler_type", t.lr_scheduler_type(),
           {"constant", "constant_with_warmup", "linear", "cosine"});
  c.Range("training.warmup_ratio", t.warmup_ratio(), 0, 1, false);
  c.AtLeast("training.warmup_steps", static_cast<double>(t.warmup_steps()), 0);
  c.AtLeast("training.max_steps", static_cast<double>(t.max_steps()), 0);
  c.AtLeast("training.num_train_epochs", t.num_train_epochs(), 0);
  c.Require(t.max_steps() > 0 || t.num_train_epochs() > 0, "training.max_steps",
            std::to_string(t.max_steps()), "or training.num_train_epochs must be > 0");
  c.Range("training.per_device_train_batch_size", t.per_device_train_batch_size(), 1, 65536,
          false);
  c.Range("training.gradient_accumulation_steps", t.gradient_accumulation_steps(), 1, 1 << 20,
          false);
  c.Range("training.max_seq_len", t.max_seq_len(), 8, 1 << 20, false);
  c.AtLeast("training.max_grad_norm", t.max_grad_norm(), 0);
  c.AtLeast("training.weight_decay", t.weight_decay(), 0);
  c.AtLeast("training.seed", static_cast<double>(t.seed()), 0);
  c.AtLeast("training.logging_steps", static_cast<double>(t.logging_steps()), 1);
  c.AtLeast("training.eval_steps", static_cast<double>(t.eval_steps()), 0);
  c.AtLeast("training.save_steps", static_cast<double>(t.save_steps()), 0);
  c.AtLeast("training.save_total_limit", t.save_total_limit(), 0);
  c.Range("training.adam_beta1", t.adam_beta1(), 0, 1, true);
  c.Range("training.adam_beta2", t.adam_beta2(), 0, 1, true);
  c.Require(std::isfinite(t.adam_epsilon()) && t.adam_epsilon() > 0, "training.adam_epsilon",
            Num(t.adam_epsilon()), "must be > 0");
  int64_t first = 0, last = 0;
  c.Require(t.profile_steps().empty() || ParseStepRange(t.profile_steps(), &first, &last),
            "training.profile_steps", "'" + t.profile_steps() + "'",
            "must be a step N or a range N-M of optimizer steps with 1 <= N <= M");
  for (const std::string& to : t.report_to()) {
    c.Choice("training.report_to", to, {"tensorboard", "all", "none"});
    c.Require(to != "none" || t.report_to_size() == 1, "training.report_to", "'none'",
              "must be the only entry when given");
  }

  const auto& r = spec.resources();
  c.Range("resources.num_ranks", r.num_ranks(), 1, 65536, false);
  c.AtLeast("resources.gpus_per_host", r.gpus_per_host(), 0);
  if (r.gpus_per_host() > 0 && r.num_ranks() > 0)
    c.Require(r.num_ranks() % r.gpus_per_host() == 0, "resources.num_ranks",
              std::to_string(r.num_ranks()),
              "must be a multiple of resources.gpus_per_host (" +
                  std::to_string(r.gpus_per_host()) + ")");
  c.AtLeast("resources.min_gpu_memory_bytes", static_cast<double>(r.min_gpu_memory_bytes()), 0);
  c.Choice("resources.placement", r.placement(), {"pack", "spread"});

  c.Range("priority", spec.priority(), -1000, 1000, false);
  c.Range("max_restarts", spec.max_restarts(), 0, 100, false);
  c.Require(spec.labels_size() <= kMaxLabels, "labels",
            std::to_string(spec.labels_size()) + " labels",
            "must be at most " + std::to_string(kMaxLabels));
  int checked = 0;
  for (const auto& kv : spec.labels()) {
    if (++checked > kMaxLabels) break;  // one message for too many, not one per label
    c.Require(ValidLabelKey(kv.first), "labels", "'" + kv.first.substr(0, 64) + "'",
              "keys must be 1-63 characters of a-z, 0-9, '_', '-', '.', '/'");
    c.Require(kv.second.size() <= kMaxLabelValueBytes, "labels." + kv.first.substr(0, 64),
              "'" + kv.second.substr(0, 32) + "...'",
              "must be at most " + std::to_string(kMaxLabelValueBytes) + " characters");
  }
  return c.Take();
}

bool ParseStepRange(const std::string& text, int64_t* first, int64_t* last) {
  const auto number = [](const std::string& s, int64_t* out) {
    if (s.empty() || s.size() > 12) return false;
    int64_t v = 0;
    for (char c : s) {
      if (c < '0' || c > '9') return false;
      v = v * 10 + (c - '0');
    }
    *out = v;
    return true;
  };
  const size_t dash = text.find('-');
  int64_t a = 0, b = 0;
  if (dash == std::string::npos) {
    if (!number(text, &a)) return false;
    b = a;
  } else if (!number(text.substr(0, dash), &a) || !number(text.substr(dash + 1), &b)) {
    return false;
  }
  if (a < 1 || b < a) return false;
  *first = a;
  *last = b;
  return true;
}

Status ResolveJobSpec(v1::JobSpec* spec, const std::string& base_dir) {
  if (!base_dir.empty()) MakeSpecPathsAbsolute(spec, base_dir);
  ApplyJobSpecDefaults(spec);
  const std::vector<std::string> problems = ValidateJobSpec(*spec);
  if (problems.empty()) return OkStatus();
  std::string message;
  for (const std::string& p : problems) message += (message.empty() ? "" : "\n") + p;
  return InvalidArgumentError(message);
}

Result<v1::JobSpec> LoadJobSpec(const std::string& path, const std::string& base_dir) {
  // A job spec is a few KiB; a huge "spec" is a mistake (or /dev/zero).
  constexpr uint64_t kMaxSpecBytes = 1 << 20;
  Result<std::string> text = ReadFileToString(path, kMaxSpecBytes);
  if (!text.ok()) {
    const std::string why = text.status().message();
    // ReadFileToString's messages already start with the path.
    const std::string message =
        why.rfind(path, 0) == 0 ? why : path + ": " + why;
    return Status(text.status().code(), message + " (cannot read the job spec)");
  }
  v1::JobSpec spec;
  std::vector<std::string> errors;
  if (!ParseJobSpecYaml(*text, &spec, &errors)) {
    std::string message;
    for (const std::string& e : errors) message += (message.empty() ? "" : "\n") + path + ": " + e;
    return InvalidArgumentError(message);
  }
  Status resolved = ResolveJobSpec(&spec, base_dir);
  if (!resolved.ok()) {
    std::string message;
    size_t start = 0;
    const std::string& all = resolved.message();
    while (start <= all.size()) {
      const size_t end = std::min(all.find('\n', start), all.size());
      message += (message.empty() ? "" : "\n") + path + ": " + all.substr(start, end - start);
      start = end + 1;
    }
    return InvalidArgumentError(message);
  }
  return spec;
}

}  // namespace ftune
