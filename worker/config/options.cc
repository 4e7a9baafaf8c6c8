#include "worker/config/options.h"

#include <cmath>
#include <sstream>

#include "jobspec.h"

namespace ftune::trainer {

std::string OptionValue(double v) {
  std::ostringstream s;
  s << v;
  return s.str();
}

std::vector<std::string> LoraConfig::DefaultTargetModules() { return KnownLoraTargets(); }

double LoraConfig::Scaling() const {
  return use_rslora ? lora_alpha / std::sqrt(static_cast<double>(r))
                    : lora_alpha / static_cast<double>(r);
}

Status LoraConfig::Validate() const {
  if (r < 1) return InvalidArgumentError("lora r (" + std::to_string(r) + ") must be >= 1");
  if (!(lora_alpha > 0) || !std::isfinite(lora_alpha)) {
    return InvalidArgumentError("lora_alpha (" + OptionValue(lora_alpha) +
                                ") must be a positive number");
  }
  if (!(lora_dropout >= 0 && lora_dropout < 1)) {
    return InvalidArgumentError("lora_dropout (" + OptionValue(lora_dropout) +
                                ") must be in [0, 1)");
  }
  if (target_modules.empty()) return InvalidArgumentError("lora target_modules must not be empty");
  const std::vector<std::string>& known = KnownLoraTargets();
  for (const auto& t : target_modules) {
    bool found = false;
    for (const auto& k : known) found = found || (t == k);
    if (!found) {
      return InvalidArgumentError(
          "lora target_modules: unknown module '" + t +
          "' (Llama has q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)");
    }
  }
  return OkStatus();
}

Status AdamWOptions::Validate() const {
  if (!(lr >= 0) || !std::isfinite(lr)) {
    return InvalidArgumentError("learning_rate (" + OptionValue(lr) + ") must be >= 0");
  }
  if (!(beta1 >= 0 && beta1 < 1)) {
    return InvalidArgumentError("adam_beta1 (" + OptionValue(beta1) + ") must be in [0, 1)");
  }
  if (!(beta2 >= 0 && beta2 < 1)) {
    return InvalidArgumentError("adam_beta2 (" + OptionValue(beta2) + ") must be in [0, 1)");
  }
  if (!(eps >= 0)) {
    return InvalidArgumentError("adam_epsilon (" + OptionValue(eps) + ") must be >= 0");
  }
  if (!(weight_decay >= 0)) {
    return InvalidArgumentError("weight_decay (" + OptionValue(weight_decay) + ") must be >= 0");
  }
  return OkStatus();
}

}  // namespace ftune::trainer
