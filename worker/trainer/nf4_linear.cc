// NF4 base linear layer; see nf4_linear.h for the design.
#include "worker/trainer/nf4_linear.h"
#include "worker/trainer/profiler.h"
#include "worker/trainer/recompute.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <utility>
#include <vector>

#if FTUNE_NF4_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "kernels/nf4_cuda.h"
#endif

namespace ftune::trainer {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

void CheckKernel(const kernels::Status& s, const char* what) {
  TORCH_CHECK(s.ok(), what, ": ", s.message());
}

at::TensorOptions U8(c10::Device d) { return at::TensorOptions().dtype(at::kByte).device(d); }
at::TensorOptions F32(c10::Device d) { return at::TensorOptions().dtype(at::kFloat).device(d); }

#if FTUNE_NF4_CUDA
cudaStream_t CurrentStream(c10::Device d) {
  return c10::cuda::getCurrentCUDAStream(d.index()).stream();
}
#endif

// The fp32 absmax per block, rebuilt from the nested statistics when the
// weight is double-quantized (two roundings, as bitsandbytes does).
at::Tensor BlockAbsmax(const Nf4Weight& w) {
  if (!w.nested()) return w.absmax;
  const int64_t nb = w.num_blocks();
  at::Tensor absmax = at::empty({nb}, F32(w.device()));  // (num_blocks)
  if (w.device().is_cpu()) {
    CheckKernel(kernels::DequantizeAbsmax(w.absmax.data_ptr<uint8_t>(),
                                          w.nested_absmax.data_ptr<float>(),
                                          w.offset.item<float>(), nb, absmax.data_ptr<float>()),
                "DequantizeAbsmax");
    return absmax;
  }
#if FTUNE_NF4_CUDA
  CheckKernel(kernels::DequantizeAbsmaxCuda(w.absmax.data_ptr<uint8_t>(),
                                            w.nested_absmax.data_ptr<float>(),
                                            w.offset.data_ptr<float>(), nb,
                                            absmax.data_ptr<float>(), CurrentStream(w.device())),
              "DequantizeAbsmaxCuda");
  return absmax;
#else
  TORCH_CHECK(false, "NF4 weight on ", w.device(), ": built without the CUDA kernels");
#endif
}

thread_local bool keep_dequantized = false;

// Backs Nf4Linear::Forward. Saves the quantized tensors only (refcounted, so
// the graph never points into a layer that might be gone), not the dense
// weight: backward dequantizes again, as bitsandbytes' MatMul4Bit does;
// except in a KeepDequantizedWeights scope, where it saves the dense weight.
struct Nf4MatMul : public torch::autograd::Function<Nf4MatMul> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const Nf4Weight& w) {
    if (GemmStashReplaying()) {
      // A checkpointed layer's recompute with this GEMM's output kept
      // (recompute.h): the same node, without the product.
      std::vector<int64_t> sizes = x.sizes().vec();
      sizes.back() = w.out_features;
      at::Tensor y = GemmStashTake(sizes, x.scalar_type());
      if (keep_dequantized) {
        ctx->saved_data["dense"] = DequantizeNf4Weight(w, x.scalar_type());
      } else {
        SaveQuantized(ctx, w);
      }
      return y;
    }
    at::Tensor dense = DequantizeNf4Weight(w, x.scalar_type());  // (out, in)
    if (keep_dequantized) {
      ctx->saved_data["dense"] = dense;
      at::Tensor y = at::linear(x, dense);  // (..., out)
      GemmStashPut(y);
      return y;
    }
    SaveQuantized(ctx, w);
    at::Tensor y = at::linear(x, dense);  // (..., out); `dense` is freed on return
    GemmStashPut(y);
    return y;
  }

  static void SaveQuantized(AutogradContext* ctx, const Nf4Weight& w) {
    ctx->saved_data["packed"] = w.packed;
    ctx->saved_data["absmax"] = w.absmax;
    ctx->saved_data["nested"] = w.nested();
    if (w.nested()) {
      ctx->saved_data["nested_absmax"] = w.nested_absmax;
      ctx->saved_data["offset"] = w.offset;
    }
    ctx->saved_data["out"] = w.out_features;
    ctx->saved_data["in"] = w.in_features;
    ctx->saved_data["blocksize"] = w.blocksize;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& gy = grads[0];  // (..., out)
    if (ctx->saved_data.count("dense") > 0) {
      at::Tensor dense = ctx->saved_data["dense"].toTensor();
      ctx->saved_data.erase("dense");
      return {gy.matmul(dense.to(gy.scalar_type())), at::Tensor()};
    }
    Nf4Weight w;
    w.packed = ctx->saved_data["packed"].toTensor();
    w.absmax = ctx->saved_data["absmax"].toTensor();
    if (ctx->saved_data["nested"].toBool()) {
      w.nested_absmax = ctx->saved_data["nested_absmax"].toTensor();
      w.offset = ctx->saved_data["offset"].toTensor();
    }
    w.out_features = ctx->saved_data["out"].toInt();
    w.in_features = ctx->saved_data["in"].toInt();
    w.blocksize = ctx->saved_data["blocksize"].toInt();
    at::Tensor dense = DequantizeNf4Weight(w, gy.scalar_type());  // (out, in)
    // The frozen weight gets no gradient; x's is grad_y W, the same mm that
    // at::linear's backward runs for a dense weight.
    return {gy.matmul(dense), at::Tensor()};
  }
};

}  // namespace

KeepDequantizedWeights::KeepDequantizedWeights() : previous_(keep_dequantized) {
  keep_dequantized = true;
}
KeepDequantizedWeights::~KeepDequantizedWeights() { keep_dequantized = previous_; }
bool KeepDequantizedWeights::active() { return keep_dequantized; }

int64_t Nf4Weight::StorageBytes() const {
  int64_t bytes = 0;
  for (const at::Tensor* t : {&packed, &absmax, &nested_absmax, &offset}) {
    if (t->defined()) bytes += t->numel() * static_cast<int64_t>(t->element_size());
  }
  return bytes;
}

void Nf4Weight::Validate() const {
  CheckKernel(kernels::ValidateNf4Blocksize(blocksize), "Nf4Weight");
  TORCH_CHECK(out_features >= 1 && in_features >= 1, "Nf4Weight: shape (", out_features, ", ",
              in_features, ") must be positive");
  const int64_t n = numel(), nb = num_blocks();
  TORCH_CHECK(packed.defined() && packed.scalar_type() == at::kByte && packed.dim() == 1 &&
                  packed.numel() == kernels::Nf4PackedBytes(n) && packed.is_contiguous(),
              "Nf4Weight (", out_features, ", ", in_features, "): packed must be contiguous uint8 (",
              kernels::Nf4PackedBytes(n), "), got ",
              packed.defined() ? packed.sizes() : at::IntArrayRef{}, " ",
              packed.defined() ? packed.scalar_type() : at::kByte);
  const at::ScalarType absmax_dtype = nested() ? at::kByte : at::kFloat;
  TORCH_CHECK(absmax.defined() && absmax.scalar_type() == absmax_dtype && absmax.dim() == 1 &&
                  absmax.numel() == nb && absmax.is_contiguous(),
              "Nf4Weight (", out_features, ", ", in_features, ") blocksize ", blocksize,
              ": absmax must be contiguous ", absmax_dtype, " (", nb, "), got ",
              absmax.defined() ? absmax.sizes() : at::IntArrayRef{});
  TORCH_CHECK(absmax.device() == packed.device(), "Nf4Weight: absmax on ", absmax.device(),
              " but packed on ", packed.device());
  if (nested()) {
    const int64_t nnb = kernels::Nf4NumNestedBlocks(nb);
    TORCH_CHECK(nested_absmax.scalar_type() == at::kFloat && nested_absmax.dim() == 1 &&
                    nested_absmax.numel() == nnb && nested_absmax.is_contiguous(),
                "Nf4Weight: nested_absmax must be contiguous fp32 (", nnb, "), got ",
                nested_absmax.sizes(), " ", nested_absmax.scalar_type());
    TORCH_CHECK(offset.defined() && offset.scalar_type() == at::kFloat && offset.numel() == 1,
                "Nf4Weight: nested offset must be one fp32 value");
    TORCH_CHECK(nested_absmax.device() == packed.device() && offset.device() == packed.device(),
                "Nf4Weight: nested statistics on ", nested_absmax.device(), "/", offset.device(),
                " but packed on ", packed.device());
  }
}

Nf4Weight Nf4Weight::To(c10::Device device) const {
  Nf4Weight w = *this;
  w.packed = packed.to(device);
  w.absmax = absmax.to(device);
  if (nested()) {
    w.nested_absmax = nested_absmax.to(device);
    w.offset = offset.to(device);
  }
  return w;
}

Nf4Weight QuantizeNf4Weight(const at::Tensor& weight, const Nf4Options& options) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) >= 1 && weight.size(1) >= 1,
              "QuantizeNf4Weight: weight must be (out, in), got ", weight.sizes());
  CheckKernel(kernels::ValidateNf4Blocksize(options.blocksize), "QuantizeNf4Weight");
  at::Tensor x = weight.detach();
  // fp16 -> fp32 is exact, and bitsandbytes' kernel widens each half to
  // float before scaling, so the codes are the same.
  if (x.scalar_type() != at::kBFloat16) x = x.to(at::kFloat);
  x = x.contiguous();
  const c10::Device dev = x.device();
  Nf4Weight w;
  w.out_features = weight.size(0);
  w.in_features = weight.size(1);
  w.blocksize = options.blocksize;
  const int64_t n = w.numel(), nb = w.num_blocks();
  w.packed = at::empty({kernels::Nf4PackedBytes(n)}, U8(dev));  // (ceil(n / 2))
  at::Tensor absmax = at::empty({nb}, F32(dev));                 // (num_blocks)
  if (dev.is_cpu()) {
    if (x.scalar_type() == at::kBFloat16) {
      CheckKernel(kernels::QuantizeNf4Bf16(reinterpret_cast<const uint16_t*>(x.data_ptr()), n,
                                           w.blocksize, w.packed.data_ptr<uint8_t>(),
                                           absmax.data_ptr<float>()),
                  "QuantizeNf4Bf16");
    } else {
      CheckKernel(kernels::QuantizeNf4(x.data_ptr<float>(), n, w.blocksize,
                                       w.packed.data_ptr<uint8_t>(), absmax.data_ptr<float>()),
                  "QuantizeNf4");
    }
    if (options.double_quant) {
      w.absmax = at::empty({nb}, U8(dev));
      w.nested_absmax = at::empty({kernels::Nf4NumNestedBlocks(nb)}, F32(dev));
      w.offset = at::empty({1}, F32(dev));
      CheckKernel(kernels::DoubleQuantizeAbsmax(absmax.data_ptr<float>(), nb,
                                                w.absmax.data_ptr<uint8_t>(),
                                                w.nested_absmax.data_ptr<float>(),
                                                w.offset.data_ptr<float>()),
                  "DoubleQuantizeAbsmax");
    } else {
      w.absmax = absmax;
    }
    return w;
  }
#if FTUNE_NF4_CUDA
  TORCH_CHECK(dev.is_cuda(), "QuantizeNf4Weight: unsupported device ", dev);
  c10::cuda::CUDAGuard guard(dev);
  cudaStream_t stream = CurrentStream(dev);
  if (x.scalar_type() == at::kBFloat16) {
    CheckKernel(kernels::QuantizeNf4Bf16Cuda(reinterpret_cast<const uint16_t*>(x.data_ptr()), n,
                                             w.blocksize, w.packed.data_ptr<uint8_t>(),
                                             absmax.data_ptr<float>(), stream),
                "QuantizeNf4Bf16Cuda");
  } else {
    CheckKernel(kernels::QuantizeNf4Cuda(x.data_ptr<float>(), n, w.blocksize,
                                         w.packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
                                         stream),
                "QuantizeNf4Cuda");
  }
  if (options.double_quant) {
    w.absmax = at::empty({nb}, U8(dev));
    w.nested_absmax = at::empty({kernels::Nf4NumNestedBlocks(nb)}, F32(dev));
    w.offset = at::empty({1}, F32(dev));
    CheckKernel(kernels::DoubleQuantizeAbsmaxCuda(absmax.data_ptr<float>(), nb,
                                                  w.absmax.data_ptr<uint8_t>(),
                                                  w.nested_absmax.data_ptr<float>(),
                                                  w.offset.data_ptr<float>(), stream),
                "DoubleQuantizeAbsmaxCuda");
    // `absmax` goes back to the caching allocator, which orders its reuse
    // after the work already queued on this stream.
  } else {
    w.absmax = absmax;
  }
  return w;
#else
  TORCH_CHECK(false, "QuantizeNf4Weight: weight on ", dev,
              " but ftune was built without the NF4 CUDA kernels (FTUNE_CUDA with a CUDA LibTorch)");
#endif
}

at::Tensor DequantizeNf4Weight(const Nf4Weight& w, c10::ScalarType dtype) {
  if (dtype != at::kFloat && dtype != at::kBFloat16) {
    // One rounding from the fp32 product, as bitsandbytes' kernel for fp16.
    return DequantizeNf4Weight(w, at::kFloat).to(dtype);
  }
  at::Tensor out = at::empty({w.out_features, w.in_features},
                             at::TensorOptions().dtype(dtype).device(w.device()));  // (out, in)
  DequantizeNf4WeightInto(w, out);
  return out;
}

void DequantizeNf4WeightInto(const Nf4Weight& w, const at::Tensor& out) {
  FTUNE_RANGE("ftune::nf4_dequantize");
  const c10::Device dev = w.device();
  const int64_t n = w.numel();
  const c10::ScalarType dtype = out.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && out.is_contiguous() &&
                  out.numel() == n && out.device() == dev,
              "DequantizeNf4WeightInto: out must be a contiguous fp32 or bf16 tensor of ", n,
              " values on ", dev, "; got ", out.sizes(), " ", dtype, " on ", out.device());
  if (dev.is_cpu()) {
    at::Tensor absmax = BlockAbsmax(w);  // (num_blocks) fp32
    if (dtype == at::kFloat) {
      CheckKernel(kernels::DequantizeNf4(w.packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(), n,
                                         w.blocksize, out.data_ptr<float>()),
                  "DequantizeNf4");
    } else {
      CheckKernel(kernels::DequantizeNf4Bf16(w.packed.data_ptr<uint8_t>(),
                                             absmax.data_ptr<float>(), n, w.blocksize,
                                             reinterpret_cast<uint16_t*>(out.data_ptr())),
                  "DequantizeNf4Bf16");
    }
    return;
  }
#if FTUNE_NF4_CUDA
  c10::cuda::CUDAGuard guard(dev);
  cudaStream_t stream = CurrentStream(dev);
  if (dtype == at::kBFloat16 && w.nested()) {
    // The training path: no fp32 absmax buffer at all.
    CheckKernel(kernels::DequantizeNf4Bf16NestedCuda(
                    w.packed.data_ptr<uint8_t>(), w.absmax.data_ptr<uint8_t>(),
                    w.nested_absmax.data_ptr<float>(), w.offset.data_ptr<float>(), n, w.blocksize,
                    reinterpret_cast<uint16_t*>(out.data_ptr()), stream),
                "DequantizeNf4Bf16NestedCuda");
    return;
  }
  at::Tensor absmax = BlockAbsmax(w);  // (num_blocks) fp32
  if (dtype == at::kFloat) {
    CheckKernel(kernels::DequantizeNf4Cuda(w.packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
                                           n, w.blocksize, out.data_ptr<float>(), stream),
                "DequantizeNf4Cuda");
  } else {
    CheckKernel(kernels::DequantizeNf4Bf16Cuda(w.packed.data_ptr<uint8_t>(),
                                               absmax.data_ptr<float>(), n, w.blocksize,
                                               reinterpret_cast<uint16_t*>(out.data_ptr()), stream),
                "DequantizeNf4Bf16Cuda");
  }
  return;
#else
  TORCH_CHECK(false, "DequantizeNf4Weight: weight on ", dev,
              " but ftune was built without the NF4 CUDA kernels");
#endif
}

Nf4NestedStats DoubleQuantizeNf4Absmax(const at::Tensor& absmax_in) {
  TORCH_CHECK(absmax_in.dim() == 1 && absmax_in.scalar_type() == at::kFloat &&
                  absmax_in.numel() >= 1,
              "DoubleQuantizeNf4Absmax: absmax must be a non-empty fp32 vector, got ",
              absmax_in.sizes(), " ", absmax_in.scalar_type());
  const at::Tensor absmax = absmax_in.contiguous();
  const c10::Device dev = absmax.device();
  const int64_t nb = absmax.numel();
  Nf4NestedStats s;
  s.qabsmax = at::empty({nb}, U8(dev));
  s.absmax2 = at::empty({kernels::Nf4NumNestedBlocks(nb)}, F32(dev));
  s.offset = at::empty({1}, F32(dev));
  if (dev.is_cpu()) {
    CheckKernel(kernels::DoubleQuantizeAbsmax(absmax.data_ptr<float>(), nb,
                                              s.qabsmax.data_ptr<uint8_t>(),
                                              s.absmax2.data_ptr<float>(), s.offset.data_ptr<float>()),
                "DoubleQuantizeAbsmax");
    return s;
  }
#if FTUNE_NF4_CUDA
  c10::cuda::CUDAGuard guard(dev);
  CheckKernel(kernels::DoubleQuantizeAbsmaxCuda(absmax.data_ptr<float>(), nb,
                                                s.qabsmax.data_ptr<uint8_t>(),
                                                s.absmax2.data_ptr<float>(),
                                                s.offset.data_ptr<float>(), CurrentStream(dev)),
              "DoubleQuantizeAbsmaxCuda");
  return s;
#else
  TORCH_CHECK(false, "DoubleQuantizeNf4Absmax: absmax on ", dev,
              " but ftune was built without the NF4 CUDA kernels");
#endif
}

Nf4Linear::Nf4Linear(Nf4Weight weight) : weight_(std::move(weight)) {
  weight_.Validate();
  nested_ = weight_.nested();
}

std::unique_ptr<Nf4Linear> Nf4Linear::Unmaterialized(int64_t out_features, int64_t in_features,
                                                     const Nf4Options& options) {
  TORCH_CHECK(out_features >= 1 && in_features >= 1, "Nf4Linear: shape (", out_features, ", ",
              in_features, ") must be positive");
  CheckKernel(kernels::ValidateNf4Blocksize(options.blocksize), "Nf4Linear");
  std::unique_ptr<Nf4Linear> l(new Nf4Linear());
  l->weight_.out_features = out_features;
  l->weight_.in_features = in_features;
  l->weight_.blocksize = options.blocksize;
  l->nested_ = options.double_quant;
  return l;
}

void Nf4Linear::SetWeight(Nf4Weight weight) {
  weight.Validate();
  TORCH_CHECK(weight.out_features == weight_.out_features &&
                  weight.in_features == weight_.in_features &&
                  weight.blocksize == weight_.blocksize && weight.nested() == nested_,
              "Nf4Linear::SetWeight: layer is (", weight_.out_features, ", ", weight_.in_features,
              ") blocksize ", weight_.blocksize, nested_ ? " nested" : " not nested",
              " but the weight is (", weight.out_features, ", ", weight.in_features,
              ") blocksize ", weight.blocksize, weight.nested() ? " nested" : " not nested");
  weight_ = std::move(weight);
}

void Nf4Linear::ReleaseWeight() {
  weight_.packed = at::Tensor();
  weight_.absmax = at::Tensor();
  weight_.nested_absmax = at::Tensor();
  weight_.offset = at::Tensor();
}

std::unique_ptr<Nf4Linear> Nf4Linear::Quantize(const at::Tensor& weight,
                                               const Nf4Options& options) {
  return std::make_unique<Nf4Linear>(QuantizeNf4Weight(weight, options));
}

at::Tensor Nf4Linear::Forward(const at::Tensor& x) const {
  TORCH_CHECK(resident(), "Nf4Linear (", weight_.out_features, ", ", weight_.in_features,
              "): its NF4 bytes are not resident (an FSDP unit used without being gathered)");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight_.in_features, "Nf4Linear: input ", x.sizes(),
              " does not match weight (out, in) = (", weight_.out_features, ", ",
              weight_.in_features, ")");
  TORCH_CHECK(x.device() == weight_.device(), "Nf4Linear: input on ", x.device(),
              " but the NF4 weight on ", weight_.device());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "Nf4Linear: input dtype ", x.scalar_type(),
              " is not a floating type");
  return Nf4MatMul::apply(x, weight_);
}

at::Tensor Nf4Linear::DenseWeight(c10::ScalarType dtype) const {
  TORCH_CHECK(resident(), "Nf4Linear (", weight_.out_features, ", ", weight_.in_features,
              "): its NF4 bytes are not resident (an FSDP unit used without being gathered)");
  return DequantizeNf4Weight(weight_, dtype);
}

}  // namespace ftune::trainer
