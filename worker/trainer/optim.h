// AdamW, global-norm gradient clipping and HF learning-rate schedules, with
// the semantics of torch.optim.AdamW, torch.nn.utils.clip_grad_norm_ and
// transformers.get_scheduler, so that a step here is a step there.
//
//   AdamW (torch's single-tensor path, decoupled weight decay):
//     t += 1;  p *= 1 - lr * wd;  m = lerp(m, g, 1 - b1);
//     v = b2 v + (1 - b2) g^2;  p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//   Clipping: total = || (||g_i||_2)_i ||_2;  g_i *= min(1, max_norm / (total + 1e-6)).
//   Schedules, as LambdaLR multipliers of the base lr at optimizer step s
//   (s = 0 for the first step; warmup w, total n):
//     constant 1;  constant_with_warmup s < w ? s / max(1, w) : 1;
//     linear       s < w ? s / max(1, w) : max(0, (n - s) / max(1, n - w));
//     cosine       s < w ? s / max(1, w) : max(0, 0.5 (1 + cos(pi * (s - w) / max(1, n - w)))).
//   warmup_ratio r gives w = ceil(n * r) (TrainingArguments); warmup_steps
//   wins when > 0.
// The optimizer state is per tensor and fp32 like the adapters, so a
// sharded optimizer (FSDP) runs the same update on flat shards.
//
// Thread-safety: an AdamW is used by one thread at a time; LrSchedule is a
// value.
#ifndef FTUNE_WORKER_TRAINER_OPTIM_H_
#define FTUNE_WORKER_TRAINER_OPTIM_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "ftune/status.h"
#include "worker/config/options.h"

namespace ftune::trainer {

// torch.optim.AdamW over fp32 leaves (options: worker/config/options.h).
class AdamW {
 public:
  // params: leaves that receive .grad(); state is allocated lazily like
  // torch's (zeros at the first step).
  AdamW(std::vector<at::Tensor> params, AdamWOptions options);

  // One update with learning rate `lr` (the schedule's value for this
  // step). Parameters without a gradient are skipped, as torch does.
  void Step(double lr);
  void ZeroGrad();  // set_to_none, torch's default

  const AdamWOptions& options() const { return options_; }
  const std::vector<at::Tensor>& params() const { return params_; }
  // Steps taken by parameter i (0 before its first update).
  int64_t step_count(size_t i) const { return steps_.at(i); }
  const at::Tensor& exp_avg(size_t i) const { return exp_avg_.at(i); }
  const at::Tensor& exp_avg_sq(size_t i) const { return exp_avg_sq_.at(i); }
  // Restores parameter i's state from a checkpoint (step 0 with undefined
  // moments = not yet updated). The moments are copied, shaped like the
  // parameter, onto its device.
  Status RestoreState(size_t i, int64_t step, const at::Tensor& exp_avg,
                      const at::Tensor& exp_avg_sq);

 private:
  std::vector<at::Tensor> params_;
  AdamWOptions options_;
  std::vector<int64_t> steps_;
  std::vector<at::Tensor> exp_avg_;
  std::vector<at::Tensor> exp_avg_sq_;
};

// Scales the gradients of `params` in place so their global L2 norm is at
// most max_norm; returns the norm before clipping (what HF logs as
// grad_norm). Parameters without a gradient are ignored.
double ClipGradNorm(const std::vector<at::Tensor>& params, double max_norm);
// The global L2 norm of the gradients, without clipping.
double GradNorm(const std::vector<at::Tensor>& params);

enum class LrSchedulerType { kConstant, kConstantWithWarmup, kLinear, kCosine };
// HF names: "constant", "constant_with_warmup", "linear", "cosine".
Result<LrSchedulerType> ParseLrSchedulerType(std::string_view name);

class LrSchedule {
 public:
  // warmup_steps > 0 wins over warmup_ratio (in [0, 1]).
  static Result<LrSchedule> Make(LrSchedulerType type, double base_lr, int64_t num_training_steps,
                                 int64_t warmup_steps, double warmup_ratio);

  // The learning rate of optimizer step `step` (0-based).
  double LrAt(int64_t step) const;
  int64_t warmup_steps() const { return warmup_; }
  int64_t num_training_steps() const { return total_; }

 private:
  LrSchedule(LrSchedulerType type, double base_lr, int64_t total, int64_t warmup)
      : type_(type), base_lr_(base_lr), total_(total), warmup_(warmup) {}

  LrSchedulerType type_;
  double base_lr_;
  int64_t total_;
  int64_t warmup_;
};

}  // namespace ftune::trainer

#endif  // FTUNE_WORKER_TRAINER_OPTIM_H_
