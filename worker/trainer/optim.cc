// AdamW, clipping and schedules with torch/HF semantics; see optim.h.
#include "worker/trainer/optim.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <cmath>
#include <sstream>
#include <utility>

namespace ftune::trainer {

AdamW::AdamW(std::vector<at::Tensor> params, AdamWOptions options)
    : params_(std::move(params)), options_(options) {
  const Status s = options_.Validate();
  TORCH_CHECK(s.ok(), s.ToString());
  for (const at::Tensor& p : params_) {
    TORCH_CHECK(p.defined() && p.requires_grad(), "AdamW: every parameter must require grad");
  }
  steps_.assign(params_.size(), 0);
  exp_avg_.resize(params_.size());
  exp_avg_sq_.resize(params_.size());
}

void AdamW::Step(double lr) {
  c10::NoGradGuard no_grad;
  const double b1 = options_.beta1, b2 = options_.beta2;
  for (size_t i = 0; i < params_.size(); ++i) {
    at::Tensor& p = params_[i];
    const at::Tensor& g = p.grad();
    if (!g.defined()) continue;
    if (!exp_avg_[i].defined()) {
      exp_avg_[i] = at::zeros_like(p, at::MemoryFormat::Preserve);
      exp_avg_sq_[i] = at::zeros_like(p, at::MemoryFormat::Preserve);
    }
    const int64_t t = ++steps_[i];
    // Each line is one op of torch's _single_tensor_adam, with its Python
    // float arithmetic done in double here too.
    if (options_.weight_decay != 0) p.mul_(1 - lr * options_.weight_decay);
    exp_avg_[i].lerp_(g, 1 - b1);
    exp_avg_sq_[i].mul_(b2).addcmul_(g, g, 1 - b2);
    const double bias_correction1 = 1 - std::pow(b1, static_cast<double>(t));
    const double bias_correction2 = 1 - std::pow(b2, static_cast<double>(t));
    const double step_size = lr / bias_correction1;
    const double bias_correction2_sqrt = std::sqrt(bias_correction2);
    at::Tensor denom = (exp_avg_sq_[i].sqrt() / bias_correction2_sqrt).add_(options_.eps);
    p.addcdiv_(exp_avg_[i], denom, -step_size);
  }
}

Status AdamW::RestoreState(size_t i, int64_t step, const at::Tensor& exp_avg,
                           const at::Tensor& exp_avg_sq) {
  if (i >= params_.size()) {
    return InvalidArgumentError("AdamW state for parameter " + std::to_string(i) + " but only " +
                                std::to_string(params_.size()) + " parameters");
  }
  if (step < 0) return InvalidArgumentError("AdamW step (" + std::to_string(step) + ") < 0");
  steps_[i] = step;
  if (step == 0 && !exp_avg.defined()) {
    exp_avg_[i] = at::Tensor();
    exp_avg_sq_[i] = at::Tensor();
    return OkStatus();
  }
  const at::Tensor& p = params_[i];
  if (!exp_avg.defined() || !exp_avg_sq.defined() || exp_avg.numel() != p.numel() ||
      exp_avg_sq.numel() != p.numel()) {
    return InvalidArgumentError("AdamW state for parameter " + std::to_string(i) + " has " +
                                std::to_string(exp_avg.defined() ? exp_avg.numel() : 0) +
                                " elements, the parameter " + std::to_string(p.numel()));
  }
  c10::NoGradGuard no_grad;
  exp_avg_[i] = exp_avg.reshape(p.sizes()).to(p.options().requires_grad(false)).clone();
  exp_avg_sq_[i] = exp_avg_sq.reshape(p.sizes()).to(p.options().requires_grad(false)).clone();
  return OkStatus();
}

void AdamW::ZeroGrad() {
  for (at::Tensor& p : params_) p.mutable_grad().reset();
}

namespace {

// fp32 scalar tensor of the global norm (torch's _get_total_norm), or
// undefined when no parameter has a gradient.
at::Tensor TotalNorm(const std::vector<at::Tensor>& params) {
  std::vector<at::Tensor> norms;
  for (const at::Tensor& p : params) {
    if (p.grad().defined()) norms.push_back(at::linalg_vector_norm(p.grad(), 2));
  }
  if (norms.empty()) return at::Tensor();
  return at::linalg_vector_norm(at::stack(norms), 2);
}

}  // namespace

double GradNorm(const std::vector<at::Tensor>& params) {
  c10::NoGradGuard no_grad;
  at::Tensor total = TotalNorm(params);
  return total.defined() ? total.item<double>() : 0.0;
}

double ClipGradNorm(const std::vector<at::Tensor>& params, double max_norm) {
  TORCH_CHECK(max_norm > 0, "max_grad_norm (", max_norm, ") must be > 0");
  c10::NoGradGuard no_grad;
  at::Tensor total = TotalNorm(params);
  if (!total.defined()) return 0.0;
  // torch multiplies by the clamped coefficient unconditionally (no
  // data-dependent branch, so no device sync there); so do we.
  at::Tensor coef = at::clamp_max(at::reciprocal(total + 1e-6) * max_norm, 1.0);
  for (const at::Tensor& p : params) {
    if (p.grad().defined()) p.grad().mul_(coef.to(p.grad().device()));
  }
  return total.item<double>();
}

Result<LrSchedulerType> ParseLrSchedulerType(std::string_view name) {
  if (name == "constant") return LrSchedulerType::kConstant;
  if (name == "constant_with_warmup") return LrSchedulerType::kConstantWithWarmup;
  if (name == "linear") return LrSchedulerType::kLinear;
  if (name == "cosine") return LrSchedulerType::kCosine;
  return InvalidArgumentError("lr_scheduler_type '" + std::string(name) +
                              "' is not one of constant, constant_with_warmup, linear, cosine");
}

Result<LrSchedule> LrSchedule::Make(LrSchedulerType type, double base_lr,
                                    int64_t num_training_steps, int64_t warmup_steps,
                                    double warmup_ratio) {
  if (num_training_steps < 1) {
    return InvalidArgumentError("num_training_steps (" + std::to_string(num_training_steps) +
                                ") must be >= 1");
  }
  if (warmup_steps < 0) {
    return InvalidArgumentError("warmup_steps (" + std::to_string(warmup_steps) +
                                ") must be >= 0");
  }
  if (!(warmup_ratio >= 0 && warmup_ratio <= 1)) {
    return InvalidArgumentError("warmup_ratio (" + OptionValue(warmup_ratio) +
                                ") must be in [0, 1]");
  }
  if (!(base_lr >= 0)) {
    return InvalidArgumentError("learning_rate (" + OptionValue(base_lr) + ") must be >= 0");
  }
  const int64_t warmup =
      warmup_steps > 0
          ? warmup_steps
          : static_cast<int64_t>(std::ceil(static_cast<double>(num_training_steps) * warmup_ratio));
  return LrSchedule(type, base_lr, num_training_steps, warmup);
}

double LrSchedule::LrAt(int64_t step) const {
  const double s = static_cast<double>(step);
  const double w = static_cast<double>(warmup_), n = static_cast<double>(total_);
  double factor = 1.0;
  if (type_ != LrSchedulerType::kConstant && step < warmup_) {
    factor = s / std::max(1.0, w);
  } else if (type_ == LrSchedulerType::kLinear) {
    factor = std::max(0.0, (n - s) / std::max(1.0, n - w));
  } else if (type_ == LrSchedulerType::kCosine) {
    const double progress = (s - w) / std::max(1.0, n - w);
    factor = std::max(0.0, 0.5 * (1.0 + std::cos(M_PI * 0.5 * 2.0 * progress)));
  }
  return base_lr_ * factor;
}

}  // namespace ftune::trainer
