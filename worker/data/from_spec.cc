// See from_spec.h.
#include "worker/data/from_spec.h"

#include <string>
#include <vector>

#include "jobspec.h"

namespace ftune::data {
namespace {

bool Concerns(const std::string& message) {
  for (const char* prefix : {"dataset.", "model.model_name_or_path", "training.max_seq_len",
                             "training.seed"}) {
    if (message.rfind(prefix, 0) == 0) return true;
  }
  return false;
}

}  // namespace

Result<DatasetOptions> DatasetOptionsFromSpec(const ftune::v1::JobSpec& input) {
  ftune::v1::JobSpec spec = input;
  ApplyJobSpecDefaults(&spec);
  std::string errors;
  for (const std::string& message : ValidateJobSpec(spec)) {
    // llama3.1 is a data-pipeline template name the spec validator may not list yet.
    if (message.rfind("dataset.chat_template", 0) == 0 && spec.dataset().chat_template() == "llama3.1") continue;
    if (Concerns(message)) errors += (errors.empty() ? "" : "; ") + message;
  }
  if (!errors.empty()) return InvalidArgumentError("job spec: " + errors);
  const auto& d = spec.dataset();
  DatasetOptions o;
  o.tokenizer_dir = spec.model().model_name_or_path();
  o.data_files.assign(d.data_files().begin(), d.data_files().end());
  o.eval_data_files.assign(d.eval_data_files().begin(), d.eval_data_files().end());
  o.format = d.format();
  o.chat_template = d.chat_template();
  o.eval_split_ratio = d.eval_split_ratio();
  o.skip_invalid = d.skip_invalid();
  o.completion_only_loss = d.completion_only_loss();
  o.max_seq_len = spec.training().max_seq_len();
  o.packing = spec.training().packing();
  o.seed = static_cast<uint64_t>(spec.training().seed());
  return o;
}

}  // namespace ftune::data
