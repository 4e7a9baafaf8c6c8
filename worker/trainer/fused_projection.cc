// Projections of one input as one GEMM; see fused_projection.h.
#include "worker/trainer/fused_projection.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <string>

#include "worker/trainer/fused_ops.h"
#include "worker/trainer/nf4_linear.h"
#include "worker/trainer/profiler.h"
#include "worker/trainer/recompute.h"

namespace ftune::trainer {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const Nf4Linear* Nf4Base(const LoraLinear& m) { return dynamic_cast<const Nf4Linear*>(&m.base()); }

// The modules' layout in the shared buffer: base rows first, module by
// module, then every adapter's A rows in the same order.
struct Layout {
  std::vector<int64_t> out, out_offset, r, r_offset;
  std::vector<double> scaling;
  int64_t base_rows = 0, lora_rows = 0;
};

Layout MakeLayout(const std::vector<const LoraLinear*>& modules) {
  Layout l;
  for (const LoraLinear* m : modules) {
    l.out.push_back(m->out_features());
    l.out_offset.push_back(l.base_rows);
    l.base_rows += m->out_features();
    const int64_t r = m->has_adapter() ? m->adapter().a.size(0) : 0;
    l.r.push_back(r);
    l.r_offset.push_back(l.lora_rows);
    l.lora_rows += r;
    l.scaling.push_back(m->has_adapter() ? m->adapter().scaling : 0.0);
  }
  return l;
}

// [W_1; ...; W_n; A_1; ...; A_n] in bf16: the NF4 weights dequantized in
// place, the fp32 A rows cast.
at::Tensor StackedWeights(const std::vector<Nf4Weight>& weights, const std::vector<at::Tensor>& a,
                          const Layout& l, const at::TensorOptions& options) {
  const int64_t in = weights.front().in_features;
  at::Tensor w = at::empty({l.base_rows + l.lora_rows, in}, options);  // (rows, in)
  for (size_t i = 0; i < weights.size(); ++i) {
    DequantizeNf4WeightInto(weights[i], w.narrow(0, l.out_offset[i], l.out[i]));
    if (l.r[i] > 0) w.narrow(0, l.base_rows + l.r_offset[i], l.r[i]).copy_(a[i]);
  }
  return w;
}

void SaveWeight(AutogradContext* ctx, size_t i, const Nf4Weight& w) {
  const std::string k = "w" + std::to_string(i) + ".";
  ctx->saved_data[k + "packed"] = w.packed;
  ctx->saved_data[k + "absmax"] = w.absmax;
  ctx->saved_data[k + "nested"] = w.nested();
  if (w.nested()) {
    ctx->saved_data[k + "nested_absmax"] = w.nested_absmax;
    ctx->saved_data[k + "offset"] = w.offset;
  }
  ctx->saved_data[k + "out"] = w.out_features;
  ctx->saved_data[k + "in"] = w.in_features;
  ctx->saved_data[k + "blocksize"] = w.blocksize;
}

Nf4Weight SavedWeight(AutogradContext* ctx, size_t i) {
  const std::string k = "w" + std::to_string(i) + ".";
  Nf4Weight w;
  w.packed = ctx->saved_data[k + "packed"].toTensor();
  w.absmax = ctx->saved_data[k + "absmax"].toTensor();
  if (ctx->saved_data[k + "nested"].toBool()) {
    w.nested_absmax = ctx->saved_data[k + "nested_absmax"].toTensor();
    w.offset = ctx->saved_data[k + "offset"].toTensor();
  }
  w.out_features = ctx->saved_data[k + "out"].toInt();
  w.in_features = ctx->saved_data[k + "in"].toInt();
  w.blocksize = ctx->saved_data[k + "blocksize"].toInt();
  return w;
}

// Inputs: x, then each adapter's (A, B) in module order (fp32 leaves);
// outputs: one tensor per module, or with `swiglu` (two modules of equal
// width: gate, up) the one tensor silu(gate) * up.
struct FusedProjectionFunction : public torch::autograd::Function<FusedProjectionFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList adapters,
                               const std::vector<const LoraLinear*>& modules, bool swiglu) {
    FTUNE_RANGE("ftune::fused_projection");
    const Layout l = MakeLayout(modules);
    const c10::ScalarType dt = x.scalar_type();
    const int64_t in = x.size(-1);
    const at::Tensor x2 = x.reshape({-1, in});  // (T, in)
    std::vector<Nf4Weight> weights;
    std::vector<at::Tensor> a(modules.size()), bs(modules.size());
    for (size_t i = 0, j = 0; i < modules.size(); ++i) {
      weights.push_back(Nf4Base(*modules[i])->weight());
      if (l.r[i] > 0) {
        a[i] = adapters[j++];
        bs[i] = (adapters[j++] * l.scaling[i]).to(dt);  // (out, r), scaling folded in
      }
    }
    const bool keep = KeepDequantizedWeights::active();
    at::Tensor w, y;  // the stacked weights; (T, base_rows + lora_rows)
    if (GemmStashReplaying()) {
      // A checkpointed layer's recompute with this GEMM's finished output
      // kept (recompute.h): biases and adapters are in it already, and the
      // weights are dequantized only for the backward.
      y = GemmStashTake({x2.size(0), l.base_rows + l.lora_rows}, dt);
      if (keep) w = StackedWeights(weights, a, l, x.options());
    } else {
      w = StackedWeights(weights, a, l, x.options());
      y = at::mm(x2, w.t());
      const at::Tensor xa = y.narrow(1, l.base_rows, l.lora_rows);  // (T, R): x A^T
      for (size_t i = 0; i < modules.size(); ++i) {
        at::Tensor yi = y.narrow(1, l.out_offset[i], l.out[i]);
        // The frozen bias before the adapter, as LoraLinear adds it.
        if (modules[i]->has_bias()) yi.add_(modules[i]->bias());
        if (l.r[i] > 0) yi.addmm_(xa.narrow(1, l.r_offset[i], l.r[i]), bs[i].t());
      }
      GemmStashPut(y);
    }
    // (T, R): x A^T. With swiglu y is saved whole, so a view does; otherwise
    // y is freed after the outputs are copied out of it.
    const at::Tensor xa = swiglu ? y.narrow(1, l.base_rows, l.lora_rows)
                                 : y.narrow(1, l.base_rows, l.lora_rows).clone();
    // Saved: x, x A^T, the cast Bs; the buffer itself or how to rebuild it.
    std::vector<at::Tensor> saved = {x2, swiglu ? y : xa};
    for (size_t i = 0; i < modules.size(); ++i) {
      if (l.r[i] > 0) saved.push_back(bs[i]);
    }
    ctx->save_for_backward(saved);
    if (keep) {
      ctx->saved_data["stacked"] = w;
    } else {
      for (size_t i = 0; i < weights.size(); ++i) SaveWeight(ctx, i, weights[i]);
      for (size_t i = 0; i < modules.size(); ++i) {
        if (l.r[i] > 0) ctx->saved_data["a" + std::to_string(i)] = a[i].to(dt);
      }
    }
    ctx->saved_data["modules"] = static_cast<int64_t>(modules.size());
    ctx->saved_data["swiglu"] = swiglu;
    ctx->saved_data["lead"] = x.sizes().slice(0, x.dim() - 1).vec();
    for (size_t i = 0; i < modules.size(); ++i) {
      ctx->saved_data["out" + std::to_string(i)] = l.out[i];
      ctx->saved_data["r" + std::to_string(i)] = l.r[i];
      ctx->saved_data["scaling" + std::to_string(i)] = l.scaling[i];
    }
    std::vector<int64_t> shape = x.sizes().vec();
    if (swiglu) {
      // Gate and up read in place from y: no copies of them.
      shape.back() = l.out[0];
      return {SwigluOfPacked(y, l.out[0]).view(shape)};
    }
    variable_list outputs;
    for (size_t i = 0; i < modules.size(); ++i) {
      shape.back() = l.out[i];
      // A contiguous copy per module keeps the outputs plain tensors
      // (autograd forbids views of one forward output across outputs).
      outputs.push_back(y.narrow(1, l.out_offset[i], l.out[i]).contiguous().view(shape));
    }
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    FTUNE_RANGE("ftune::fused_projection_backward");
    const size_t n = static_cast<size_t>(ctx->saved_data["modules"].toInt());
    Layout l;
    for (size_t i = 0; i < n; ++i) {
      l.out.push_back(ctx->saved_data["out" + std::to_string(i)].toInt());
      l.out_offset.push_back(l.base_rows);
      l.base_rows += l.out.back();
      l.r.push_back(ctx->saved_data["r" + std::to_string(i)].toInt());
      l.r_offset.push_back(l.lora_rows);
      l.lora_rows += l.r.back();
      l.scaling.push_back(ctx->saved_data["scaling" + std::to_string(i)].toDouble());
    }
    const variable_list saved = ctx->get_saved_variables();
    const bool swiglu = ctx->saved_data["swiglu"].toBool();
    const at::Tensor& x2 = saved[0];  // (T, in)
    // (T, R); with swiglu saved[1] is the GEMM's whole output y.
    const at::Tensor xa = swiglu ? saved[1].narrow(1, l.base_rows, l.lora_rows) : saved[1];
    const int64_t T = x2.size(0), in = x2.size(1);
    // [dY_1, ..., dY_n, dY_1 B_1, ..., dY_n B_n]: the gradient of the GEMM's
    // whole output, A's part included.
    at::Tensor g = at::empty({T, l.base_rows + l.lora_rows}, x2.options());
    if (swiglu && grads[0].defined()) {
      // d(gate) and d(up) written straight into their columns of g.
      SwigluOfPackedBackward(grads[0], saved[1], l.out[0], g);
    } else if (swiglu) {
      g.narrow(1, 0, l.base_rows).zero_();
    }
    for (size_t i = 0; i < n && !swiglu; ++i) {
      at::Tensor gi = g.narrow(1, l.out_offset[i], l.out[i]);
      if (grads[i].defined()) {
        gi.copy_(grads[i].reshape({T, l.out[i]}));
      } else {
        gi.zero_();
      }
    }
    variable_list result(1);
    for (size_t i = 0, b = 2; i < n; ++i) {
      if (l.r[i] == 0) continue;
      const at::Tensor& bs = saved[b++];  // (out, r), scaled
      const at::Tensor gi = g.narrow(1, l.out_offset[i], l.out[i]);
      at::Tensor gxa = g.narrow(1, l.base_rows + l.r_offset[i], l.r[i]);
      at::mm_out(gxa, gi, bs);  // (T, r)
      const at::Tensor da = at::mm(gxa.t(), x2).to(at::kFloat);  // (r, in)
      // B's gradient through the scaling folded into it.
      const at::Tensor db =
          at::mm(gi.t(), xa.narrow(1, l.r_offset[i], l.r[i])).to(at::kFloat) * l.scaling[i];
      result.push_back(da);
      result.push_back(db);
    }
    at::Tensor w;
    if (ctx->saved_data.count("stacked") > 0) {
      w = ctx->saved_data["stacked"].toTensor();
      ctx->saved_data.erase("stacked");
    } else {
      std::vector<Nf4Weight> weights;
      std::vector<at::Tensor> a(n);
      for (size_t i = 0; i < n; ++i) {
        weights.push_back(SavedWeight(ctx, i));
        if (l.r[i] > 0) a[i] = ctx->saved_data["a" + std::to_string(i)].toTensor();
      }
      w = StackedWeights(weights, a, l, x2.options());
    }
    std::vector<int64_t> shape = ctx->saved_data["lead"].toIntVector();
    shape.push_back(in);
    result[0] = at::mm(g, w).view(shape);  // (T, in): every path's gradient at once
    result.emplace_back();                 // `modules` is not differentiable
    result.emplace_back();                 // nor `swiglu`
    return result;
  }
};

}  // namespace

bool FusedProjectionsApply(const std::vector<const LoraLinear*>& modules, const at::Tensor& x,
                           bool training) {
  if (modules.empty() || x.scalar_type() != at::kBFloat16 || x.dim() < 1) return false;
  for (const LoraLinear* m : modules) {
    const Nf4Linear* base = Nf4Base(*m);
    if (base == nullptr || !base->resident() || base->weight().device() != x.device() ||
        m->in_features() != x.size(-1)) {
      return false;
    }
    if (m->has_bias() && (!m->bias().defined() || m->bias().scalar_type() != x.scalar_type())) {
      return false;
    }
    if (m->has_adapter()) {
      if (m->fp32_compute()) return false;
      if (training && m->adapter().dropout > 0) return false;
    }
  }
  return true;
}

std::vector<at::Tensor> FusedLoraProjections(const std::vector<const LoraLinear*>& modules,
                                             const at::Tensor& x, bool training) {
  TORCH_CHECK(FusedProjectionsApply(modules, x, training),
              "FusedLoraProjections: these modules cannot be fused for this input (",
              x.scalar_type(), " ", x.sizes(), ")");
  std::vector<at::Tensor> adapters;
  for (const LoraLinear* m : modules) {
    if (!m->has_adapter()) continue;
    adapters.push_back(m->adapter().a);
    adapters.push_back(m->adapter().b);
  }
  return FusedProjectionFunction::apply(x, at::TensorList(adapters), modules, /*swiglu=*/false);
}

at::Tensor GateUpSwiglu(const LoraLinear& gate, const LoraLinear& up, const at::Tensor& x,
                        bool training, bool fuse) {
  const std::vector<const LoraLinear*> modules = {&gate, &up};
  if (fuse && gate.out_features() == up.out_features() &&
      FusedProjectionsApply(modules, x, training) && FusedOpsApply(x)) {
    std::vector<at::Tensor> adapters;
    for (const LoraLinear* m : modules) {
      if (!m->has_adapter()) continue;
      adapters.push_back(m->adapter().a);
      adapters.push_back(m->adapter().b);
    }
    return FusedProjectionFunction::apply(x, at::TensorList(adapters), modules,
                                          /*swiglu=*/true)[0];
  }
  const at::Tensor g = gate.Forward(x, training), u = up.Forward(x, training);
  if (fuse && FusedOpsApply(g)) return FusedSwiglu(g, u);
  return at::silu(g) * u;
}

std::vector<at::Tensor> LoraProjections(const std::vector<const LoraLinear*>& modules,
                                        const at::Tensor& x, bool training, bool fuse) {
  if (fuse && FusedProjectionsApply(modules, x, training)) {
    return FusedLoraProjections(modules, x, training);
  }
  std::vector<at::Tensor> out;
  for (const LoraLinear* m : modules) out.push_back(m->Forward(x, training));
  return out;
}

}  // namespace ftune::trainer
