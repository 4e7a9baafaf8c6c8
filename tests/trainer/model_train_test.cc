// Training-step semantics against transformers + peft + torch: 20 AdamW
// steps with gradient accumulation 2, global-norm clipping and a cosine
// schedule with warmup, on the golden tiny Llamas with their PEFT adapters
// (tests/golden/model/make_golden.py records the reference run). Plus the
// optimizer pieces on their own: AdamW's update formula, clipping, and the
// HF schedules.
#include <ATen/ATen.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <string>

#include "model_test_util.h"
#include "worker/trainer/model.h"
#include "worker/trainer/optim.h"

namespace ftune::trainer {
namespace {

using ::testing::HasSubstr;
using testing::GoldenFile;
using testing::LoadGoldenModel;
using testing::RelDiff;

class GoldenTrainingTest : public ::testing::TestWithParam<std::string> {};

TEST_P(GoldenTrainingTest, TwentyAdamWStepsFollowPeft) {
  GoldenFile golden(GetParam());
  auto m = LoadGoldenModel(GetParam(), DefaultModelOptions(c10::kCPU), /*with_adapter=*/true);

  AdamWOptions o;
  o.lr = std::stod(golden.Meta("lr"));
  const std::string betas = golden.Meta("betas");
  o.beta1 = std::stod(betas.substr(0, betas.find(',')));
  o.beta2 = std::stod(betas.substr(betas.find(',') + 1));
  o.eps = std::stod(golden.Meta("eps"));
  o.weight_decay = std::stod(golden.Meta("weight_decay"));
  const double max_grad_norm = std::stod(golden.Meta("max_grad_norm"));
  const int64_t steps = std::stoll(golden.Meta("num_training_steps"));
  const int64_t accum = std::stoll(golden.Meta("gradient_accumulation_steps"));
  auto type = ParseLrSchedulerType(golden.Meta("lr_scheduler_type"));
  ASSERT_TRUE(type.ok());
  auto schedule = LrSchedule::Make(*type, o.lr, steps, std::stoll(golden.Meta("num_warmup_steps")),
                                   /*warmup_ratio=*/0.0);
  ASSERT_TRUE(schedule.ok());

  std::vector<at::Tensor> params;
  std::vector<std::string> names;
  for (auto& p : m->LoraParameters()) {
    params.push_back(p.tensor);
    names.push_back(p.name);
  }
  AdamW opt(params, o);

  const at::Tensor ids = golden.Get("train.input_ids");   // (steps * accum, 2, 16)
  const at::Tensor labels = golden.Get("train.labels");
  const at::Tensor ref_loss = golden.Get("train.loss");   // (steps) fp64
  const at::Tensor ref_norm = golden.Get("train.grad_norm");
  const at::Tensor ref_lr = golden.Get("train.lr");
  ASSERT_EQ(ids.size(0), steps * accum);

  double worst_loss = 0, worst_norm = 0, worst_lr = 0;
  for (int64_t step = 0; step < steps; ++step) {
    // transformers' Trainer: every micro-batch's loss sum is divided by the
    // token count of the whole accumulated step (num_items_in_batch).
    int64_t n_items = 0;
    for (int64_t k = 0; k < accum; ++k) {
      n_items += LlamaModel::CountLossTokens(labels[step * accum + k], at::Tensor());
    }
    double total = 0;
    for (int64_t k = 0; k < accum; ++k) {
      const int64_t i = step * accum + k;
      LossOutput out = m->Loss(ids[i], at::Tensor(), labels[i], /*training=*/true);
      (out.loss_sum / static_cast<double>(n_items)).backward();
      total += out.loss_sum.item<double>();
    }
    const double loss = total / static_cast<double>(n_items);
    const double norm = ClipGradNorm(params, max_grad_norm);
    const double lr = schedule->LrAt(step);
    opt.Step(lr);
    opt.ZeroGrad();

    const double rl = ref_loss[step].item<double>();
    const double loss_rel = std::abs(loss - rl) / std::abs(rl);
    const double norm_rel = std::abs(norm - ref_norm[step].item<double>()) /
                            ref_norm[step].item<double>();
    const double lr_abs = std::abs(lr - ref_lr[step].item<double>());
    worst_loss = std::max(worst_loss, loss_rel);
    worst_norm = std::max(worst_norm, norm_rel);
    worst_lr = std::max(worst_lr, lr_abs);
    EXPECT_LT(loss_rel, 1e-3) << "step " << step << " loss " << loss << " ref " << rl;
    EXPECT_LT(norm_rel, 1e-3) << "step " << step;
    EXPECT_LT(lr_abs, 1e-12) << "step " << step;
  }
  double worst_w = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const double rel = RelDiff(params[i], golden.Get("train.final." + names[i]));
    worst_w = std::max(worst_w, rel);
    EXPECT_LT(rel, 1e-3) << names[i];
  }
  std::printf("PARITY %s 20 AdamW steps: loss worst rel=%.3g, grad_norm worst rel=%.3g, "
              "lr worst abs=%.3g, final LoRA weights worst max-rel=%.3g\n",
              GetParam().c_str(), worst_loss, worst_norm, worst_lr, worst_w);
}

INSTANTIATE_TEST_SUITE_P(TinyModels, GoldenTrainingTest,
                         ::testing::Values("llama3_tiny", "llama2_tiny", "qwen2_tiny",
                                           "mistral_tiny"));

TEST(AdamW, OneStepIsTorchsFormula) {
  at::Tensor p = at::tensor({1.0f, -2.0f, 0.5f}).set_requires_grad(true);
  AdamWOptions o;
  o.lr = 0.1;
  o.weight_decay = 0.5;
  AdamW opt({p}, o);
  const std::vector<float> g1 = {0.3f, -0.1f, 0.0f}, g2 = {-0.2f, 0.4f, 1.0f};
  std::vector<double> x = {1.0, -2.0, 0.5}, m(3, 0), v(3, 0);
  int t = 0;
  for (const auto* g : {&g1, &g2}) {
    p.mutable_grad() = at::tensor(*g);
    opt.Step(o.lr);
    ++t;
    for (int i = 0; i < 3; ++i) {
      x[i] *= 1 - o.lr * o.weight_decay;
      m[i] = 0.9 * m[i] + 0.1 * (*g)[i];
      v[i] = 0.999 * v[i] + 0.001 * (*g)[i] * (*g)[i];
      const double mh = m[i] / (1 - std::pow(0.9, t)), vh = v[i] / (1 - std::pow(0.999, t));
      x[i] -= o.lr * mh / (std::sqrt(vh) + o.eps);
    }
  }
  EXPECT_EQ(opt.step_count(0), 2);
  for (int i = 0; i < 3; ++i) EXPECT_NEAR(p[i].item<double>(), x[i], 1e-6) << i;
  // No gradient: no update, no step counted.
  opt.ZeroGrad();
  at::Tensor before = p.detach().clone();
  opt.Step(o.lr);
  EXPECT_TRUE(at::equal(p.detach(), before));
  EXPECT_EQ(opt.step_count(0), 2);
}

TEST(AdamW, OptionsAreValidated) {
  AdamWOptions o;
  o.beta2 = 1.0;
  EXPECT_THAT(o.Validate().message(), HasSubstr("adam_beta2 (1) must be in [0, 1)"));
  o = AdamWOptions{};
  o.lr = -1;
  EXPECT_THAT(o.Validate().message(), HasSubstr("learning_rate (-1)"));
}

TEST(ClipGradNorm, ScalesOnlyAboveTheLimit) {
  at::Tensor a = at::zeros({2}).set_requires_grad(true), b = at::zeros({1}).set_requires_grad(true);
  a.mutable_grad() = at::tensor({3.0f, 0.0f});
  b.mutable_grad() = at::tensor({4.0f});
  EXPECT_NEAR(ClipGradNorm({a, b}, 10.0), 5.0, 1e-6);
  EXPECT_NEAR(a.grad()[0].item<double>(), 3.0, 1e-5);  // coefficient clamped to 1
  EXPECT_NEAR(ClipGradNorm({a, b}, 1.0), 5.0, 1e-6);
  EXPECT_NEAR(GradNorm({a, b}), 1.0, 1e-5);
  EXPECT_NEAR(b.grad()[0].item<double>(), 0.8, 1e-5);
}

TEST(LrSchedule, HfSchedules) {
  auto linear = LrSchedule::Make(LrSchedulerType::kLinear, 1.0, 10, 0, 0.25);
  ASSERT_TRUE(linear.ok());
  EXPECT_EQ(linear->warmup_steps(), 3);  // ceil(10 * 0.25)
  EXPECT_DOUBLE_EQ(linear->LrAt(0), 0.0);
  EXPECT_DOUBLE_EQ(linear->LrAt(2), 2.0 / 3.0);
  EXPECT_DOUBLE_EQ(linear->LrAt(3), 1.0);
  EXPECT_DOUBLE_EQ(linear->LrAt(5), 5.0 / 7.0);
  EXPECT_DOUBLE_EQ(linear->LrAt(10), 0.0);
  auto cw = LrSchedule::Make(LrSchedulerType::kConstantWithWarmup, 2.0, 10, 4, 0.5);
  EXPECT_EQ(cw->warmup_steps(), 4);  // warmup_steps wins over the ratio
  EXPECT_DOUBLE_EQ(cw->LrAt(1), 0.5);
  EXPECT_DOUBLE_EQ(cw->LrAt(7), 2.0);
  auto c = LrSchedule::Make(LrSchedulerType::kConstant, 2.0, 10, 4, 0);
  EXPECT_DOUBLE_EQ(c->LrAt(0), 2.0);
  auto cos = LrSchedule::Make(LrSchedulerType::kCosine, 1.0, 12, 2, 0);
  EXPECT_DOUBLE_EQ(cos->LrAt(2), 1.0);
  EXPECT_NEAR(cos->LrAt(7), 0.5, 1e-12);  // halfway through the decay
  EXPECT_THAT(ParseLrSchedulerType("polynomial").status().message(),
              HasSubstr("'polynomial' is not one of"));
  EXPECT_FALSE(LrSchedule::Make(LrSchedulerType::kLinear, 1.0, 0, 0, 0).ok());
}

}  // namespace
}  // namespace ftune::trainer
