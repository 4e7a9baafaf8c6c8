// Nf4Linear and LlamaModel with NF4 base weights (ModelOptions::quantize_base).
//
// What must hold (nf4_linear.h): the layer equals a dense layer that holds the
// dequantized weight, exactly on the same device and dtype; gradients reach
// the input only; a whole model quantized this way gives the logits, loss and
// LoRA gradients of the dense model whose projections were replaced by their
// dequantized values; and it stores 4.127 bits per quantized parameter.
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <string>

#include "kernels/nf4.h"
#include "model_test_util.h"
#include "worker/modelio/llama_config.h"
#include "worker/trainer/model.h"
#include "worker/trainer/nf4_linear.h"
#include "worker/trainer/recompute.h"
#include "worker/trainer/weights.h"

namespace ftune::trainer {
namespace {

using testing::ComputeLossAndGrads;
using testing::GoldenDir;
using testing::GoldenFile;
using testing::LossAndGrads;
using testing::MaxAbsDiff;
using testing::RelDiff;

at::Tensor RandomWeight(int64_t out, int64_t in, uint64_t seed) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  return at::randn({out, in}, gen, at::TensorOptions().dtype(at::kFloat)) * 0.05;
}

// code_values[nibble] * absmax[block], straight from the bytes: an
// independent decoding of the format (high nibble first).
at::Tensor ReferenceDequant(const Nf4Weight& w, const at::Tensor& absmax) {
  at::Tensor p = w.packed.to(at::kLong);
  at::Tensor codes = at::stack({p.__rshift__(4), p.bitwise_and(15)}, 1).view({-1}).slice(0, 0, w.numel());
  const auto& cv = kernels::Nf4CodeValues();
  at::Tensor table = at::from_blob(const_cast<float*>(cv.data()), {16}, at::kFloat).clone();
  at::Tensor block = at::arange(w.numel(), at::kLong).div(w.blocksize, "floor");
  return (table.index_select(0, codes) * absmax.index_select(0, block)).view({w.out_features, w.in_features});
}

TEST(Nf4WeightTest, DequantizationDecodesTheBytes) {
  for (bool nested : {false, true}) {
    // 7 x 9 = 63 elements: odd count (last low nibble padding) and a partial block.
    for (auto [out, in] : {std::pair<int64_t, int64_t>{7, 9}, {96, 80}}) {
      const Nf4Weight w = QuantizeNf4Weight(RandomWeight(out, in, 1), {64, nested});
      ASSERT_EQ(w.nested(), nested);
      at::Tensor absmax = w.absmax;
      if (nested) {
        absmax = at::empty({w.num_blocks()}, at::kFloat);
        ASSERT_TRUE(kernels::DequantizeAbsmax(w.absmax.data_ptr<uint8_t>(),
                                              w.nested_absmax.data_ptr<float>(),
                                              w.offset.item<float>(), w.num_blocks(),
                                              absmax.data_ptr<float>())
                        .ok());
      }
      at::Tensor ref = ReferenceDequant(w, absmax);
      EXPECT_TRUE(at::equal(DequantizeNf4Weight(w, at::kFloat), ref)) << out << "x" << in;
      // bf16: the fp32 product rounded once.
      EXPECT_TRUE(at::equal(DequantizeNf4Weight(w, at::kBFloat16), ref.to(at::kBFloat16)));
    }
  }
}

TEST(Nf4WeightTest, QuantizesBf16FromItsOwnValues) {
  // bitsandbytes quantizes a bf16 weight as bf16: same codes as quantizing its
  // exact fp32 widening.
  at::Tensor wb = RandomWeight(32, 64, 2).to(at::kBFloat16);
  const Nf4Weight a = QuantizeNf4Weight(wb, {});
  const Nf4Weight b = QuantizeNf4Weight(wb.to(at::kFloat), {});
  EXPECT_TRUE(at::equal(a.packed, b.packed));
  EXPECT_TRUE(at::equal(a.absmax, b.absmax));
  EXPECT_TRUE(at::equal(a.nested_absmax, b.nested_absmax));
  EXPECT_TRUE(at::equal(a.offset, b.offset));
}

TEST(Nf4LinearTest, ForwardEqualsDenseOnDequantizedWeight) {
  for (bool nested : {false, true}) {
    auto layer = Nf4Linear::Quantize(RandomWeight(48, 80, 3), {64, nested});
    DenseLinear dense(layer->DenseWeight(at::kFloat));
    at::Generator gen = at::detail::createCPUGenerator(4);
    at::Tensor x = at::randn({2, 5, 80}, gen, at::TensorOptions().dtype(at::kFloat));  // (b, s, in)
    at::Tensor y = layer->Forward(x);
    ASSERT_EQ(y.sizes(), (std::vector<int64_t>{2, 5, 48}));
    EXPECT_TRUE(at::equal(y, dense.Forward(x)));  // exact in fp32
    // bf16 compute: dequantized straight to bf16, as bitsandbytes does.
    at::Tensor xb = x.to(at::kBFloat16);
    DenseLinear dense_bf16(layer->DenseWeight(at::kBFloat16));
    EXPECT_TRUE(at::equal(layer->Forward(xb), dense_bf16.Forward(xb)));
  }
}

TEST(Nf4LinearTest, GradientReachesInputOnly) {
  auto layer = Nf4Linear::Quantize(RandomWeight(24, 64, 5), {});
  DenseLinear dense(layer->DenseWeight(at::kFloat));
  at::Generator gen = at::detail::createCPUGenerator(6);
  at::Tensor x0 = at::randn({3, 64}, gen, at::TensorOptions().dtype(at::kFloat));
  at::Tensor g = at::randn({3, 24}, gen, at::TensorOptions().dtype(at::kFloat));
  at::Tensor x1 = x0.clone().set_requires_grad(true);
  at::Tensor x2 = x0.clone().set_requires_grad(true);
  at::Tensor y1 = layer->Forward(x1);
  EXPECT_TRUE(y1.requires_grad());
  (y1 * g).sum().backward();
  (dense.Forward(x2) * g).sum().backward();
  ASSERT_TRUE(x1.grad().defined());
  EXPECT_TRUE(at::equal(x1.grad(), x2.grad()));
  // The stored bytes are not parameters.
  EXPECT_FALSE(layer->weight().packed.requires_grad());
  EXPECT_FALSE(layer->weight().absmax.grad().defined());
  // Without grad, no graph.
  at::Tensor y3 = layer->Forward(x0);
  EXPECT_FALSE(y3.requires_grad());
}

TEST(Nf4LinearTest, PreQuantizedRoundTripAndValidation) {
  const Nf4Weight w = QuantizeNf4Weight(RandomWeight(16, 64, 7), {});
  Nf4Linear from_bytes(w);
  EXPECT_TRUE(at::equal(from_bytes.DenseWeight(at::kFloat), DequantizeNf4Weight(w, at::kFloat)));
  Nf4Weight bad = w;
  bad.packed = w.packed.slice(0, 0, 100);
  try {
    Nf4Linear l(bad);
    FAIL() << "short packed bytes accepted";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("packed must be contiguous uint8 (512), got [100]"),
              std::string::npos)
        << e.what();
  }
  Nf4Weight bad_abs = w;
  bad_abs.absmax = w.absmax.slice(0, 0, 3);
  EXPECT_THROW(Nf4Linear l(bad_abs), c10::Error);
  at::Tensor x = at::zeros({2, 65});
  EXPECT_THROW(from_bytes.Forward(x), c10::Error);
  EXPECT_THROW(QuantizeNf4Weight(RandomWeight(4, 64, 8), {48, true}), c10::Error);  // blocksize
}

TEST(Nf4LinearTest, BitsPerParameterAtScale) {
  // 1024 x 1024 with blocksize 64: n/2 packed + n/64 uint8 absmax + 4 bytes per
  // 256 blocks + a 4-byte offset = 524288 + 16384 + 256 + 4 bytes.
  const Nf4Weight w = QuantizeNf4Weight(RandomWeight(1024, 1024, 9), {});
  EXPECT_EQ(w.StorageBytes(), 540932);
  const double bits = 8.0 * w.StorageBytes() / w.numel();
  std::printf("NF4 1024x1024 double-quant: %.5f bits/param\n", bits);
  EXPECT_NEAR(bits, 4.127, 5e-4);
  const Nf4Weight plain = QuantizeNf4Weight(RandomWeight(1024, 1024, 9), {64, false});
  EXPECT_EQ(plain.StorageBytes(), 524288 + 16384 * 4);  // 4.5 bits
}

// --- CUDA (run on the GPU host; skipped where there is no GPU).

TEST(Nf4CudaTest, QuantizeAndDequantizeMatchCpu) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  const c10::Device dev(c10::kCUDA, 0);
  for (bool nested : {true, false}) {
    for (auto dtype : {at::kFloat, at::kBFloat16}) {
      // 2560 blocks: 10 nested blocks, the last one partial.
      at::Tensor w = RandomWeight(512, 320, 11).to(dtype);
      const Nf4Weight cpu = QuantizeNf4Weight(w, {64, nested});
      const Nf4Weight gpu = QuantizeNf4Weight(w.to(dev), {64, nested});
      ASSERT_EQ(gpu.device(), dev);
      EXPECT_TRUE(at::equal(cpu.packed, gpu.packed.cpu())) << nested << " " << dtype;
      EXPECT_TRUE(at::equal(cpu.absmax, gpu.absmax.cpu())) << nested << " " << dtype;
      if (nested) {
        EXPECT_TRUE(at::equal(cpu.nested_absmax, gpu.nested_absmax.cpu()));
        EXPECT_TRUE(at::equal(cpu.offset, gpu.offset.cpu()));
      }
      for (auto out : {at::kFloat, at::kBFloat16}) {
        EXPECT_TRUE(at::equal(DequantizeNf4Weight(gpu, out).cpu(), DequantizeNf4Weight(cpu, out)))
            << "dequantize to " << out << " nested " << nested;
      }
    }
  }
}

TEST(Nf4CudaTest, ForwardAndInputGradientEqualDense) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  const c10::Device dev(c10::kCUDA, 0);
  auto layer = Nf4Linear::Quantize(RandomWeight(96, 320, 12).to(dev), {});
  at::Generator gen = at::detail::createCPUGenerator(13);
  for (auto dtype : {at::kBFloat16, at::kFloat}) {
    DenseLinear dense(layer->DenseWeight(dtype));
    at::Tensor x0 = at::randn({4, 7, 320}, gen, at::TensorOptions().dtype(at::kFloat)).to(dev, dtype);
    at::Tensor g = at::randn({4, 7, 96}, gen, at::TensorOptions().dtype(at::kFloat)).to(dev, dtype);
    at::Tensor x1 = x0.clone().set_requires_grad(true), x2 = x0.clone().set_requires_grad(true);
    at::Tensor y1 = layer->Forward(x1), y2 = dense.Forward(x2);
    EXPECT_TRUE(at::equal(y1, y2)) << dtype;
    (y1 * g).sum().backward();
    (y2 * g).sum().backward();
    EXPECT_TRUE(at::equal(x1.grad(), x2.grad())) << dtype;
  }
}

// --- A whole model.

class Nf4ModelTest : public ::testing::TestWithParam<std::string> {
 protected:
  // The golden model with its golden adapter (non-zero B, so every LoRA
  // gradient is informative), NF4 base.
  std::unique_ptr<LlamaModel> Quantized(bool checkpointing = false) {
    ModelOptions o = DefaultModelOptions(c10::kCPU);
    o.quantize_base = true;
    o.activation_checkpointing = checkpointing;
    return testing::LoadGoldenModel(GetParam(), o, /*with_adapter=*/true);
  }

  // The same model, dense, with every projection replaced by the NF4 model's
  // dequantized weight (in the compute dtype, on the model's device).
  std::unique_ptr<LlamaModel> DequantizedDense(const LlamaModel& q) {
    ModelOptions o = DefaultModelOptions(q.options().device);
    o.fused_kernels = q.options().fused_kernels;
    const std::string dir = GoldenDir() + "/" + GetParam();
    auto config = LoadLlamaConfig(dir);
    EXPECT_TRUE(config.ok()) << config.status().ToString();
    auto st = SafetensorsModel::OpenDirectory(dir);
    EXPECT_TRUE(st.ok()) << st.status().ToString();
    const SafetensorsModel* stp = st->get();
    LlamaModel::TensorSource src = [&](const std::string& name) -> Result<at::Tensor> {
      for (int64_t i = 0; i < static_cast<int64_t>(q.layers().size()); ++i) {
        for (const std::string& m : LoraConfig::DefaultTargetModules()) {
          const std::string kind = (m == "gate_proj" || m == "up_proj" || m == "down_proj")
                                       ? "mlp." : "self_attn.";
          if (name == "model.layers." + std::to_string(i) + "." + kind + m + ".weight") {
            return q.layers()[i].Module(m)->base().DenseWeight(o.dtype);
          }
        }
      }
      return ReadTensor(*stp, name, o.dtype, o.device);
    };
    auto m = LlamaModel::Build(*config, src, o, "dequantized");
    EXPECT_TRUE(m.ok()) << m.status().ToString();
    Status s = (*m)->LoadAdapter(dir + "_adapter");
    EXPECT_TRUE(s.ok()) << s.ToString();
    return std::move(m).value();
  }
};

TEST_P(Nf4ModelTest, EqualsDenseModelWithDequantizedWeights) {
  GoldenFile golden(GetParam());
  auto q = Quantized();
  // Every projection is NF4; embeddings, norms and lm_head stay dense fp32.
  for (const DecoderLayer& l : q->layers()) {
    for (const std::string& m : LoraConfig::DefaultTargetModules()) {
      ASSERT_NE(dynamic_cast<const Nf4Linear*>(&l.Module(m)->base()), nullptr) << m;
    }
  }
  EXPECT_EQ(q->embed_tokens().scalar_type(), at::kFloat);
  EXPECT_EQ(q->lm_head().scalar_type(), at::kFloat);
  auto d = DequantizedDense(*q);
  const at::Tensor ids = golden.Get("p.input_ids"), pos = golden.Get("p.position_ids");
  const at::Tensor labels = golden.Get("p.labels");

  at::Tensor lq, ld;
  {
    c10::NoGradGuard no_grad;
    lq = q->Logits(ids, pos);
    ld = d->Logits(ids, pos);
  }
  const double logits_diff = MaxAbsDiff(lq, ld);
  // Quantization really happened: the logits moved away from the dense model's.
  const double vs_golden = MaxAbsDiff(lq, golden.Get("p.logits"));
  std::printf("NF4 %s logits max-abs vs dequantized dense %.3g, vs unquantized golden %.3g\n",
              GetParam().c_str(), logits_diff, vs_golden);
  EXPECT_LE(logits_diff, 1e-5);
  EXPECT_GT(vs_golden, 1e-3);

  for (bool checkpointing : {false, true}) {
    auto qc = checkpointing ? Quantized(true) : std::move(q);
    LossAndGrads gq = ComputeLossAndGrads(*qc, ids, pos, labels);
    LossAndGrads gd = ComputeLossAndGrads(*d, ids, pos, labels);
    EXPECT_NEAR(gq.loss, gd.loss, 1e-5 * std::abs(gd.loss));
    EXPECT_EQ(gq.num_tokens, gd.num_tokens);
    ASSERT_EQ(gq.grads.size(), gd.grads.size());
    double worst = 0;
    for (const auto& [name, g] : gq.grads) {
      const double rel = RelDiff(g, gd.grads.at(name));
      EXPECT_LE(rel, 1e-5) << name;
      worst = std::max(worst, rel);
    }
    std::printf("NF4 %s checkpointing=%d loss %.8f vs %.8f, %zu LoRA grads worst max-rel %.3g\n",
                GetParam().c_str(), checkpointing, gq.loss, gd.loss, gq.grads.size(), worst);
  }
}

TEST_P(Nf4ModelTest, QuantizedProjectionBytes) {
  auto q = Quantized();
  const LlamaConfig& c = q->config();
  int64_t bytes = 0, params = 0;
  for (const DecoderLayer& l : q->layers()) {
    for (const std::string& m : LoraConfig::DefaultTargetModules()) {
      const auto* nf4 = dynamic_cast<const Nf4Linear*>(&l.Module(m)->base());
      ASSERT_NE(nf4, nullptr);
      bytes += nf4->weight().StorageBytes();
      params += nf4->weight().numel();
    }
  }
  // Per layer: q, o (h x q_size), k, v (kv_size x h), gate, up, down (inter x h).
  const int64_t h = c.hidden_size, qs = c.q_size(), kv = c.kv_size(), inter = c.intermediate_size;
  EXPECT_EQ(params, c.num_hidden_layers * (2 * h * qs + 2 * kv * h + 3 * inter * h));
  // llama3_tiny: h 64, q 64, kv 32, inter 160 -> 43008 params, 672 blocks of
  // 64 and 7 tensors (each one nested block + one offset) per layer:
  // 2 x (43008/2 + 672 + 7*4 + 7*4) = 44464 bytes.
  // llama2_tiny: h 64, q 64, kv 64, inter 172 -> 49408 params, 772 blocks:
  // 2 x (24704 + 772 + 28 + 28) = 51064 bytes.
  const int64_t expected = GetParam() == "llama3_tiny" ? 44464 : 51064;
  EXPECT_EQ(bytes, expected);
  std::printf("NF4 %s: %lld bytes for %lld quantized params = %.4f bits/param "
              "(tiny tensors pay one nested block + offset each; 4.127 at scale)\n",
              GetParam().c_str(), static_cast<long long>(bytes), static_cast<long long>(params),
              8.0 * bytes / params);
}

// bf16 on CUDA (run on the GPU host; skipped elsewhere): the same model
// equality, with the NF4 weights quantized and dequantized by the CUDA kernels.
TEST_P(Nf4ModelTest, CudaBf16EqualsDenseModelWithDequantizedWeights) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  const c10::Device dev(c10::kCUDA, 0);
  ModelOptions o = DefaultModelOptions(dev);
  ASSERT_EQ(o.dtype, at::kBFloat16);
  o.quantize_base = true;
  // The op chains on both sides: NF4 bases would otherwise run the fused
  // q/k/v and gate/up GEMMs (LoRA's A rows in the same product), which a
  // dense model does not, and the comparison would measure that instead
  // (model_cuda_test's FusedKernelsMatchTheOpChains bounds it).
  o.fused_kernels = false;
  auto q = testing::LoadGoldenModel(GetParam(), o, /*with_adapter=*/true);
  auto d = DequantizedDense(*q);
  GoldenFile golden(GetParam());
  const at::Tensor ids = golden.Get("p.input_ids", dev), pos = golden.Get("p.position_ids", dev);
  double logits_diff;
  {
    c10::NoGradGuard no_grad;
    logits_diff = MaxAbsDiff(q->Logits(ids, pos), d->Logits(ids, pos));
  }
  LossAndGrads gq = ComputeLossAndGrads(*q, ids, pos, golden.Get("p.labels", dev));
  LossAndGrads gd = ComputeLossAndGrads(*d, ids, pos, golden.Get("p.labels", dev));
  double worst = 0;
  for (const auto& [name, g] : gq.grads) worst = std::max(worst, RelDiff(g, gd.grads.at(name)));
  std::printf("NF4 CUDA bf16 %s logits max-abs %.3g loss %.6f vs %.6f LoRA grads worst max-rel %.3g\n",
              GetParam().c_str(), logits_diff, gq.loss, gd.loss, worst);
  // Same kernels and ops on both sides: equal up to run-to-run order effects.
  EXPECT_LE(logits_diff, 1e-3);
  EXPECT_NEAR(gq.loss, gd.loss, 1e-4 * std::abs(gd.loss));
  EXPECT_LE(worst, 1e-3);
}

// Selective recompute (recompute.h): checkpointed layers that keep GEMM
// outputs for their recompute give the same loss and LoRA gradients as
// layers that recompute everything, bit for bit on the CPU, and the
// recompute really took the kept outputs (per checkpointed layer one for
// down_proj; seven for every projection, one per NF4 GEMM of the unfused
// path). With CUDA, bf16 with the fused GEMMs too (four per layer: q/k/v,
// o, gate/up, down).
TEST_P(Nf4ModelTest, SelectiveRecomputeGivesTheSameLossAndGradients) {
  struct Device {
    c10::Device device;
    int64_t all_projection_gemms;
  };
  std::vector<Device> devices = {{c10::Device(c10::kCPU), 7}};
  if (at::hasCUDA()) devices.push_back({c10::Device(c10::kCUDA, 0), 4});
  for (const Device& d : devices) {
    GoldenFile golden(GetParam());
    const at::Tensor ids = golden.Get("p.input_ids", d.device);
    const at::Tensor pos = golden.Get("p.position_ids", d.device);
    const at::Tensor labels = golden.Get("p.labels", d.device);
    auto run = [&](int64_t checkpoint_layers, RecomputeKeep keep) {
      ModelOptions o = DefaultModelOptions(d.device);
      o.quantize_base = true;
      o.activation_checkpointing = true;
      o.checkpoint_layers = checkpoint_layers;
      o.recompute_keep = keep;
      auto m = testing::LoadGoldenModel(GetParam(), o, /*with_adapter=*/true);
      return ComputeLossAndGrads(*m, ids, pos, labels);
    };
    for (int64_t layers : {int64_t{-1}, int64_t{1}}) {
      const LossAndGrads full = run(layers, RecomputeKeep::kNothing);
      const int64_t checkpointed = layers < 0 ? 2 : layers;  // the tiny models have 2 layers
      for (RecomputeKeep keep : {RecomputeKeep::kDownProj, RecomputeKeep::kAllProjections}) {
        SCOPED_TRACE(std::string(d.device.str()) + " checkpoint_layers " +
                     std::to_string(layers) + " keep " + RecomputeKeepName(keep));
        const int64_t taken_before = KeptGemmOutputsTaken();
        const LossAndGrads kept = run(layers, keep);
        const int64_t per_layer = keep == RecomputeKeep::kDownProj ? 1 : d.all_projection_gemms;
        EXPECT_EQ(KeptGemmOutputsTaken() - taken_before, checkpointed * per_layer);
        ASSERT_EQ(kept.grads.size(), full.grads.size());
        double worst = 0;
        for (const auto& [name, g] : kept.grads) {
          worst = std::max(worst, RelDiff(g, full.grads.at(name)));
          if (d.device.is_cpu()) EXPECT_TRUE(at::equal(g, full.grads.at(name))) << name;
        }
        if (d.device.is_cpu()) {
          EXPECT_EQ(kept.loss, full.loss);
        } else {
          // The same kernels on the same shapes; cuBLAS may pick another
          // split for a GEMM run in another order.
          EXPECT_NEAR(kept.loss, full.loss, 1e-5 * std::abs(full.loss));
          EXPECT_LE(worst, 1e-3);
        }
        std::printf("RECOMPUTE %s %s layers=%lld keep=%s loss %.8f vs %.8f worst grad rel %.3g\n",
                    GetParam().c_str(), d.device.str().c_str(), static_cast<long long>(layers),
                    RecomputeKeepName(keep), kept.loss, full.loss, worst);
      }
    }
  }
}

// Layers that keep their dequantized weights for backward give the same
// gradients, and their backward reads no NF4 bytes: overwriting every
// packed weight between the forward and the backward leaves those layers'
// gradients as they were, and changes them where a layer dequantizes again.
TEST_P(Nf4ModelTest, DequantizedWeightsKeptSkipTheBackwardDequantization) {
  std::vector<c10::Device> devices = {c10::Device(c10::kCPU)};
  if (at::hasCUDA()) devices.push_back(c10::Device(c10::kCUDA, 0));
  for (const c10::Device& device : devices) {
    GoldenFile golden(GetParam());
    const at::Tensor ids = golden.Get("p.input_ids", device);
    const at::Tensor pos = golden.Get("p.position_ids", device);
    const at::Tensor labels = golden.Get("p.labels", device);
    // checkpoint_layers < 0: none checkpointed.
    auto run = [&](int64_t checkpoint_layers, int64_t dense_layers, bool overwrite) {
      ModelOptions o = DefaultModelOptions(device);
      o.quantize_base = true;
      o.activation_checkpointing = checkpoint_layers >= 0;
      o.checkpoint_layers = std::max<int64_t>(checkpoint_layers, 0);
      o.dequantized_kept_layers = dense_layers;
      auto m = testing::LoadGoldenModel(GetParam(), o, /*with_adapter=*/true);
      LossOutput out = m->Loss(ids, pos, labels, /*training=*/true);
      at::Tensor loss = out.Mean();
      if (overwrite) {
        for (const DecoderLayer& l : m->layers()) {
          for (const char* name : {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                   "down_proj"}) {
            const auto* base = dynamic_cast<const Nf4Linear*>(&l.Module(name)->base());
            if (base == nullptr) {
              ADD_FAILURE() << name << " is not an NF4 layer";
              continue;
            }
            base->weight().packed.fill_(0x5a);
          }
        }
      }
      loss.backward();
      std::map<std::string, at::Tensor> grads;
      for (auto& p : m->LoraParameters()) grads[p.name] = p.tensor.grad().to(at::kFloat).cpu();
      return grads;
    };
    auto same = [&](const std::map<std::string, at::Tensor>& a,
                    const std::map<std::string, at::Tensor>& b) {
      double worst = 0;
      for (const auto& [name, g] : a) {
        if (device.is_cpu() && !at::equal(g, b.at(name))) return false;
        worst = std::max(worst, RelDiff(g, b.at(name)));
      }
      return worst <= 1e-3;
    };
    SCOPED_TRACE(device.str());
    const auto reference = run(-1, 0, /*overwrite=*/false);
    // Both layers keep theirs: the same gradients, with or without the
    // NF4 bytes after the forward.
    EXPECT_TRUE(same(run(-1, 2, false), reference));
    EXPECT_TRUE(same(run(-1, 2, true), reference));
    // A count above the layers not checkpointed keeps them all.
    EXPECT_TRUE(same(run(-1, 5, true), reference));
    // Only the first keeps its own: the second dequantizes the overwritten
    // bytes in its backward, and every gradient below it moves.
    EXPECT_TRUE(same(run(-1, 1, false), reference));
    EXPECT_FALSE(same(run(-1, 1, true), reference));
    EXPECT_FALSE(same(run(-1, 0, true), reference));
    // The first layer checkpointed (its recompute dequantizes in backward,
    // reading the overwritten bytes), the second keeping its weights.
    const auto one_checkpointed = run(1, 0, false);
    EXPECT_TRUE(same(run(1, 1, false), one_checkpointed));
    const auto second_only = run(1, 1, true);
    const std::string second = "base_model.model.model.layers.1.";
    for (const auto& [name, g] : second_only) {
      if (name.rfind(second, 0) == 0) {
        EXPECT_TRUE(same({{name, g}}, {{name, one_checkpointed.at(name)}})) << name;
      }
    }
    EXPECT_FALSE(same(second_only, one_checkpointed));
  }
}

INSTANTIATE_TEST_SUITE_P(Golden, Nf4ModelTest, ::testing::Values("llama3_tiny", "llama2_tiny"));

}  // namespace
}  // namespace ftune::trainer
