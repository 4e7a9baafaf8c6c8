// LoRA over frozen base layers; see lora.h for the semantics and seeding.
#include "worker/trainer/lora.h"
#include "worker/trainer/profiler.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <sstream>
#include <utility>

namespace ftune::trainer {

DenseLinear::DenseLinear(at::Tensor weight) : weight_(std::move(weight)) {
  TORCH_CHECK(weight_.dim() == 2, "DenseLinear: weight must be (out, in), got ", weight_.sizes());
  weight_ = weight_.detach();
  weight_.set_requires_grad(false);
}

int64_t DenseLinear::in_features() const { return weight_.size(1); }
int64_t DenseLinear::out_features() const { return weight_.size(0); }

at::Tensor DenseLinear::Forward(const at::Tensor& x) const {
  TORCH_CHECK(x.size(-1) == weight_.size(1), "DenseLinear: input ", x.sizes(),
              " does not match weight (out, in) = ", weight_.sizes());
  TORCH_CHECK(x.scalar_type() == weight_.scalar_type(), "DenseLinear: input dtype ",
              x.scalar_type(), " differs from the weight's ", weight_.scalar_type());
  return at::linear(x, weight_);  // (..., out)
}

at::Tensor DenseLinear::DenseWeight(c10::ScalarType dtype) const { return weight_.to(dtype); }

LoraLinear::LoraLinear(std::unique_ptr<BaseLinear> base) : base_(std::move(base)) {
  TORCH_CHECK(base_ != nullptr, "LoraLinear needs a base layer");
}

void LoraLinear::Attach(LoraAdapter adapter) {
  TORCH_CHECK(adapter.a.defined() && adapter.b.defined(), "LoRA adapter without tensors");
  TORCH_CHECK(adapter.a.dim() == 2 && adapter.b.dim() == 2 &&
                  adapter.a.size(1) == in_features() && adapter.b.size(0) == out_features() &&
                  adapter.b.size(1) == adapter.a.size(0),
              "LoRA adapter shapes A ", adapter.a.sizes(), " and B ", adapter.b.sizes(),
              " do not fit a base layer (out, in) = (", out_features(), ", ", in_features(),
              "): want A (r, in) and B (out, r)");
  TORCH_CHECK(adapter.a.scalar_type() == at::kFloat && adapter.b.scalar_type() == at::kFloat,
              "LoRA adapters are kept in fp32, got A ", adapter.a.scalar_type(), " and B ",
              adapter.b.scalar_type());
  TORCH_CHECK(adapter.dropout >= 0 && adapter.dropout < 1, "LoRA dropout (", adapter.dropout,
              ") must be in [0, 1)");
  adapter.a = adapter.a.detach().contiguous();
  adapter.b = adapter.b.detach().contiguous();
  adapter.a.set_requires_grad(true);
  adapter.b.set_requires_grad(true);
  adapter_ = std::make_unique<LoraAdapter>(std::move(adapter));
}

const LoraAdapter& LoraLinear::adapter() const {
  TORCH_CHECK(adapter_ != nullptr, "LoraLinear has no adapter");
  return *adapter_;
}

LoraAdapter& LoraLinear::mutable_adapter() {
  TORCH_CHECK(adapter_ != nullptr, "LoraLinear has no adapter");
  return *adapter_;
}

void LoraLinear::set_bias(at::Tensor bias) {
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == out_features(), "LoraLinear: bias ",
              bias.sizes(), " does not fit a base layer with ", out_features(), " outputs");
  bias_ = bias.detach().contiguous();
  bias_.set_requires_grad(false);
  has_bias_ = true;
}

at::Tensor LoraLinear::Forward(const at::Tensor& x, bool training) const {
  at::Tensor y = base_->Forward(x);  // (..., out) in x's dtype
  if (has_bias_) {
    TORCH_CHECK(bias_.defined(), "LoraLinear (", out_features(), ", ", in_features(),
                "): bias not resident (an FSDP unit used without being gathered)");
    y = y + bias_;  // F.linear(x, W, b) in the base layer, before the adapter
  }
  if (!adapter_) return y;
  const LoraAdapter& ad = *adapter_;
  FTUNE_RANGE("ftune::lora");
  if (x.scalar_type() != at::kFloat && !fp32_compute_) {
    // 16-bit compute, as PEFT runs under autocast: A and B are cast to the
    // compute dtype (their gradients flow back to the fp32 masters through
    // the casts), the scaling is folded into B, and B's product is added to
    // the base output by the GEMM itself (addmm, beta = 1).
    const c10::ScalarType dt = x.scalar_type();
    at::Tensor xa = training && ad.dropout > 0 ? at::dropout(x, ad.dropout, /*train=*/true) : x;
    at::Tensor t = at::linear(xa, ad.a.to(dt));                                // (..., r)
    at::Tensor bs = (ad.b * ad.scaling).to(dt);                                // (out, r)
    const int64_t out = y.size(-1), r = t.size(-1);
    return at::addmm(y.reshape({-1, out}), t.reshape({-1, r}), bs.t()).view(y.sizes());
  }
  // PEFT casts the input to the adapter's dtype (fp32) and the sum back to
  // the base output's dtype; doing the same keeps bf16 runs comparable.
  at::Tensor xa = x.to(at::kFloat);  // (..., in)
  if (training && ad.dropout > 0) xa = at::dropout(xa, ad.dropout, /*train=*/true);
  at::Tensor delta = at::linear(at::linear(xa, ad.a), ad.b) * ad.scaling;  // (..., out) fp32
  return (y + delta).to(y.scalar_type());
}

at::Tensor LoraLinear::MergedWeight(c10::ScalarType dtype) const {
  at::Tensor w = base_->DenseWeight(at::kFloat);  // (out, in)
  if (adapter_) {
    c10::NoGradGuard no_grad;
    w = w + at::matmul(adapter_->b, adapter_->a) * adapter_->scaling;
  }
  return w.to(dtype);
}

at::Tensor KaimingUniformA(int64_t r, int64_t in_features, uint64_t seed) {
  TORCH_CHECK(r >= 1 && in_features >= 1, "KaimingUniformA: bad shape (", r, ", ", in_features,
              ")");
  // torch.nn.init.kaiming_uniform_(a=sqrt(5)), step by step in double as
  // Python computes it, so the bound is the same double.
  const double a = std::sqrt(5.0);
  const double gain = std::sqrt(2.0 / (1 + a * a));
  const double std_dev = gain / std::sqrt(static_cast<double>(in_features));
  const double bound = std::sqrt(3.0) * std_dev;
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  at::Tensor out = at::empty({r, in_features}, at::TensorOptions().dtype(at::kFloat));
  out.uniform_(-bound, bound, gen);
  return out;  // (r, in)
}

uint64_t LoraModuleSeed(uint64_t seed, int64_t layer, const std::string& module) {
  // FNV-1a over the name, then splitmix64 finalisation of the combination:
  // cheap, portable and well mixed, so neighbouring layers get unrelated
  // streams.
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : module) {
    h ^= c;
    h *= 1099511628211ull;
  }
  uint64_t z = seed ^ (h + 0x9e3779b97f4a7c15ull * static_cast<uint64_t>(layer + 1));
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

LoraAdapter NewLoraAdapter(const LoraConfig& config, int64_t in_features, int64_t out_features,
                           uint64_t module_seed, c10::Device device) {
  LoraAdapter ad;
  ad.a = KaimingUniformA(config.r, in_features, module_seed).to(device);  // (r, in)
  ad.b = at::zeros({out_features, config.r},
                   at::TensorOptions().dtype(at::kFloat).device(device));  // (out, r)
  ad.scaling = config.Scaling();
  ad.dropout = config.lora_dropout;
  return ad;
}

}  // namespace ftune::trainer
