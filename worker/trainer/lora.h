// LoRA adapters with PEFT's semantics over frozen base linear layers.
//
//   y = base(x) + B(A(dropout(x))) * scaling
//   A: (r, in)  kaiming_uniform(a = sqrt(5)), seeded;  B: (out, r) zeros
//   scaling = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora
// Adapters are kept in fp32 whatever the compute dtype (the trainable
// masters, their gradients and optimizer state). With an fp32 input the
// adapter path computes in fp32 as PEFT does. With a 16-bit input (bf16 on
// CUDA) it computes in that dtype, as PEFT under autocast does: A and B are
// cast for the product, the scaling is folded into B and B's product is
// accumulated into the base output by one addmm; set_fp32_compute(true)
// keeps PEFT's default instead (the input cast to fp32, the sum cast back).
//
// The base weight sits behind BaseLinear so that the same LoraLinear runs
// over a dense weight today and an NF4 weight that is dequantized on the fly
// later: a base layer only has to compute x W^T (and give its dense W for
// merging and export); it decides itself what autograd keeps for backward.
//
// Bias: a base layer with a bias (Qwen2's q/k/v projections) keeps it here,
// frozen, in the compute dtype and unquantized, as bitsandbytes' Linear4bit
// keeps its bias: y = (x W^T + bias) + adapter, PEFT's order. Merging leaves
// the bias as it is (LoRA with bias="none" trains none).
//
// Seeding: every adapter's A is drawn from its own CPU generator seeded by
// LoraModuleSeed(seed, layer, module), so the initial adapter does not depend
// on the order modules are built in, on the device, or on how FSDP shards
// the model. KaimingUniformA(r, in, s) is bit-for-bit what Python's
// torch.manual_seed(s); kaiming_uniform_(torch.empty(r, in), a=sqrt(5)) gives.
//
// Thread-safety: a LoraLinear is read-only during Forward (any number of
// threads may run forwards at once); Attach/Detach need exclusive access.
#ifndef FTUNE_WORKER_TRAINER_LORA_H_
#define FTUNE_WORKER_TRAINER_LORA_H_

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "ftune/status.h"
#include "worker/config/options.h"

namespace ftune::trainer {

// A frozen base linear layer: y = x W^T, W (out, in).
class BaseLinear {
 public:
  virtual ~BaseLinear() = default;
  virtual int64_t in_features() const = 0;
  virtual int64_t out_features() const = 0;
  // x (..., in) in the compute dtype -> (..., out) in x's dtype. Gradients
  // flow to x only.
  virtual at::Tensor Forward(const at::Tensor& x) const = 0;
  // W (out, in) as a dense tensor of `dtype` on the layer's device (merging,
  // export, tests).
  virtual at::Tensor DenseWeight(c10::ScalarType dtype) const = 0;
};

// A plain dense weight held in the compute dtype.
class DenseLinear final : public BaseLinear {
 public:
  explicit DenseLinear(at::Tensor weight);  // (out, in); stored frozen
  int64_t in_features() const override;
  int64_t out_features() const override;
  at::Tensor Forward(const at::Tensor& x) const override;
  at::Tensor DenseWeight(c10::ScalarType dtype) const override;
  const at::Tensor& weight() const { return weight_; }

 private:
  at::Tensor weight_;  // (out, in)
};

// One adapter's trainable tensors (fp32 leaves with requires_grad).
struct LoraAdapter {
  at::Tensor a;  // (r, in)
  at::Tensor b;  // (out, r)
  double scaling = 1.0;
  double dropout = 0.0;
};

class LoraLinear {
 public:
  explicit LoraLinear(std::unique_ptr<BaseLinear> base);

  const BaseLinear& base() const { return *base_; }
  int64_t in_features() const { return base_->in_features(); }
  int64_t out_features() const { return base_->out_features(); }

  // Checks shapes ((r, in) and (out, r)) and dtypes (fp32); makes a and b
  // leaves that require grad.
  void Attach(LoraAdapter adapter);
  void Detach() { adapter_.reset(); }
  bool has_adapter() const { return adapter_ != nullptr; }
  const LoraAdapter& adapter() const;
  LoraAdapter& mutable_adapter();

  // The adapter path in fp32 also for a 16-bit input (see the file comment).
  void set_fp32_compute(bool on) { fp32_compute_ = on; }
  bool fp32_compute() const { return fp32_compute_; }

  // The frozen bias (out) in the compute dtype, or undefined for none. The
  // FSDP engine points it at a view of a gathered unit.
  const at::Tensor& bias() const { return bias_; }
  at::Tensor& mutable_bias() { return bias_; }
  void set_bias(at::Tensor bias);  // (out); stored frozen
  // Whether the layer has a bias, resident or not (FSDP).
  bool has_bias() const { return has_bias_; }
  void set_has_bias(bool on) { has_bias_ = on; }

  // x (..., in) -> (..., out) in x's dtype. Dropout on the adapter input only
  // while training.
  at::Tensor Forward(const at::Tensor& x, bool training) const;
  // W + scaling * B A in `dtype` (W alone without an adapter).
  at::Tensor MergedWeight(c10::ScalarType dtype) const;

 private:
  std::unique_ptr<BaseLinear> base_;
  std::unique_ptr<LoraAdapter> adapter_;
  bool fp32_compute_ = false;
  at::Tensor bias_;  // (out), frozen; undefined when none or not resident
  bool has_bias_ = false;
};

// PEFT's default A: uniform(-b, b) with b = sqrt(3) * sqrt(2 / (1 + 5)) /
// sqrt(in), drawn on the CPU from a generator seeded with `seed`. fp32 (r, in).
at::Tensor KaimingUniformA(int64_t r, int64_t in_features, uint64_t seed);

// Seed of one module's A: a 64-bit mix of the config seed, the layer index and
// the module name, so modules draw independent streams.
uint64_t LoraModuleSeed(uint64_t seed, int64_t layer, const std::string& module);

// A fresh adapter as PEFT initialises one: A from KaimingUniformA, B zeros,
// both fp32 on `device`.
LoraAdapter NewLoraAdapter(const LoraConfig& config, int64_t in_features, int64_t out_features,
                           uint64_t module_seed, c10::Device device);

}  // namespace ftune::trainer

#endif  // FTUNE_WORKER_TRAINER_LORA_H_
