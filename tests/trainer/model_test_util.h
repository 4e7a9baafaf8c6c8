// Helpers shared by the model tests: golden files, tensor diffs, gradients.
#ifndef FTUNE_TESTS_TRAINER_MODEL_TEST_UTIL_H_
#define FTUNE_TESTS_TRAINER_MODEL_TEST_UTIL_H_

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <map>
#include <memory>
#include <string>

#include "worker/trainer/model.h"
#include "worker/modelio/safetensors.h"
#include "worker/trainer/weights.h"

namespace ftune::trainer::testing {

inline std::string GoldenDir() { return FTUNE_GOLDEN_MODEL_DIR; }

// One <model>_golden.safetensors written by tests/golden/model/make_golden.py.
class GoldenFile {
 public:
  explicit GoldenFile(const std::string& model) {
    auto f = SafetensorsFile::Open(GoldenDir() + "/" + model + "_golden.safetensors");
    if (!f.ok()) throw std::runtime_error(f.status().ToString());
    file_ = std::move(f).value();
  }
  // The tensor as stored (fp32/fp64/int64), on `device`.
  at::Tensor Get(const std::string& name, c10::Device device = c10::kCPU) const {
    auto t = ReadTensorAsStored(*file_, name);
    if (!t.ok()) throw std::runtime_error(t.status().ToString());
    return t.value().to(device);
  }
  std::string Meta(const std::string& key) const {
    auto it = file_->metadata().find(key);
    return it == file_->metadata().end() ? std::string() : it->second;
  }

 private:
  std::unique_ptr<SafetensorsFile> file_;
};

// max |a - b| in double.
inline double MaxAbsDiff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble).cpu() - b.to(at::kDouble).cpu()).abs().max().item<double>();
}
// max |a - ref| / max |ref|: relative error at the tensor's own scale.
inline double RelDiff(const at::Tensor& a, const at::Tensor& ref) {
  const double scale = ref.to(at::kDouble).abs().max().item<double>();
  return MaxAbsDiff(a, ref) / (scale > 0 ? scale : 1.0);
}
// ||a - ref||_2 / ||ref||_2.
inline double RelL2(const at::Tensor& a, const at::Tensor& ref) {
  at::Tensor r = ref.to(at::kDouble).cpu();
  const double n = r.norm().item<double>();
  return (a.to(at::kDouble).cpu() - r).norm().item<double>() / (n > 0 ? n : 1.0);
}

inline std::unique_ptr<LlamaModel> LoadGoldenModel(const std::string& model,
                                                   const ModelOptions& options,
                                                   bool with_adapter) {
  auto m = LlamaModel::Load(GoldenDir() + "/" + model, options);
  if (!m.ok()) throw std::runtime_error(m.status().ToString());
  std::unique_ptr<LlamaModel> out = std::move(m).value();
  if (with_adapter) {
    Status s = out->LoadAdapter(GoldenDir() + "/" + model + "_adapter");
    if (!s.ok()) throw std::runtime_error(s.ToString());
  }
  return out;
}

struct LossAndGrads {
  double loss = 0;
  int64_t num_tokens = 0;
  std::map<std::string, at::Tensor> grads;  // PEFT name -> fp32 CPU
};

// Mean loss and the LoRA gradients of one backward through it.
inline LossAndGrads ComputeLossAndGrads(const LlamaModel& model, const at::Tensor& ids,
                                        const at::Tensor& pos, const at::Tensor& labels) {
  for (auto& p : model.LoraParameters()) p.tensor.mutable_grad().reset();
  LossOutput out = model.Loss(ids, pos, labels, /*training=*/true);
  at::Tensor loss = out.Mean();
  loss.backward();
  LossAndGrads r;
  r.loss = loss.item<double>();
  r.num_tokens = out.num_tokens;
  for (auto& p : model.LoraParameters()) {
    EXPECT_TRUE(p.tensor.grad().defined()) << p.name << " got no gradient";
    if (p.tensor.grad().defined()) r.grads[p.name] = p.tensor.grad().to(at::kFloat).cpu().clone();
    p.tensor.mutable_grad().reset();
  }
  return r;
}

}  // namespace ftune::trainer::testing

#endif  // FTUNE_TESTS_TRAINER_MODEL_TEST_UTIL_H_
