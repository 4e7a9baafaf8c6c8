// A frozen linear layer whose weight is stored in NF4, as bitsandbytes'
// Linear4bit stores it (load_in_4bit), and dequantized on the fly.
//
// Storage (bitsandbytes' Linear4bit layout): the row-major flattened weight (out, in) in
// blocks of `blocksize`; packed codes, two per byte (element 2j in the high
// nibble), and one absmax per block. With double quantization (bitsandbytes'
// bnb_4bit_use_double_quant, QLoRA's default) the absmax values are
// themselves stored as uint8 codes of the signed dynamic map plus one fp32
// absmax2 per 256 blocks and one fp32 offset: 4 + 8/64 + 32/(64*256) =
// 4.127 bits per parameter for blocksize 64.
//
// Forward: x W^T with W dequantized into a scratch tensor for this call only
// (CPU: kernels/nf4.h; CUDA: kernels/nf4_cuda.h on the current stream, bf16
// straight from the nested statistics), then one matmul. Like bitsandbytes'
// MatMul4Bit, the autograd node saves no dense weight: backward dequantizes
// again and computes grad_x = grad_y W. Only x gets a gradient (the weight
// is frozen); so across a whole forward only the 4-bit bytes stay resident,
// which is what makes QLoRA fit.
//
// Exception: inside a KeepDequantizedWeights scope (a checkpointed layer's
// recompute, whose backward follows at once) the forward keeps its dense
// weight for its backward, so a recomputed weight is dequantized twice per
// step instead of three times, at the cost of one layer's dense weights
// while that layer's backward runs.
//
// Numerics: the dequantized weight is exactly what
// bitsandbytes.functional.dequantize_4bit gives (fp32: code * absmax, one
// rounding; bf16: that rounded once more), so the layer equals a dense layer
// holding the dequantized weight, bit for bit on the same device and dtype.
//
// FSDP (fsdp.h): a layer may be built without its bytes (Unmaterialized)
// and have them set before each use and dropped after it (SetWeight /
// ReleaseWeight), so that only the gathered unit is resident; the bytes are
// then views into the unit's gathered flat buffer.
//
// Thread-safety: immutable after construction except for SetWeight /
// ReleaseWeight, which need exclusive access (the FSDP engine calls them
// between layers, on the training thread); Forward may run on any number of
// threads at once (each call has its own scratch).
#ifndef FTUNE_WORKER_TRAINER_NF4_LINEAR_H_
#define FTUNE_WORKER_TRAINER_NF4_LINEAR_H_

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <memory>

#include "kernels/nf4.h"
#include "worker/trainer/lora.h"

namespace ftune::trainer {

struct Nf4Options {
  int64_t blocksize = kernels::kNf4DefaultBlocksize;  // 64 .. 4096, power of two
  bool double_quant = true;                           // bnb_4bit_use_double_quant
};

// The quantized form of one weight, in bitsandbytes' terms. All tensors on
// one device, contiguous, 1-D.
struct Nf4Weight {
  int64_t out_features = 0;
  int64_t in_features = 0;
  int64_t blocksize = kernels::kNf4DefaultBlocksize;
  at::Tensor packed;  // uint8 (ceil(out*in / 2))            bnb `weight`
  // Not nested: fp32 (num_blocks). Nested: uint8 (num_blocks) codes of
  // absmax - offset.                                           bnb `absmax`
  at::Tensor absmax;
  at::Tensor nested_absmax;  // fp32 (ceil(num_blocks / 256)); nested only
  at::Tensor offset;         // fp32 (1); nested only      bnb `nested_offset`

  bool nested() const { return nested_absmax.defined(); }
  int64_t numel() const { return out_features * in_features; }
  int64_t num_blocks() const { return kernels::Nf4NumBlocks(numel(), blocksize); }
  c10::Device device() const { return packed.device(); }
  // Bytes of the four tensors: what this weight costs in memory.
  int64_t StorageBytes() const;
  // Checks dtypes, sizes and devices; TORCH_CHECK with the shapes.
  void Validate() const;
  Nf4Weight To(c10::Device device) const;
};

// Quantizes a dense (out, in) weight (fp32, bf16 or fp16; CPU, or CUDA when
// built with the CUDA kernels) on its own device. bf16 is quantized from its
// bf16 values and fp16 from its exact fp32 widening, as bitsandbytes does
// for a weight of that dtype.
Nf4Weight QuantizeNf4Weight(const at::Tensor& weight, const Nf4Options& options);

// The dequantized weight (out, in) in fp32 or bf16 on the weight's device.
at::Tensor DequantizeNf4Weight(const Nf4Weight& w, c10::ScalarType dtype);
// The same into `out`: a contiguous fp32 or bf16 tensor of w.numel() values
// on the weight's device (e.g. rows of a buffer several weights share).
void DequantizeNf4WeightInto(const Nf4Weight& w, const at::Tensor& out);

// Double quantization of a whole tensor's fp32 block absmax (num_blocks),
// on its device: the uint8 codes (num_blocks), the fp32 absmax2
// (ceil(num_blocks / 256)) and the fp32 offset (1), exactly as
// QuantizeNf4Weight computes them. FSDP loading calls it on the gathered
// absmax of a tensor whose blocks were quantized on several ranks.
struct Nf4NestedStats {
  at::Tensor qabsmax;
  at::Tensor absmax2;
  at::Tensor offset;
};
Nf4NestedStats DoubleQuantizeNf4Absmax(const at::Tensor& absmax);

// While alive, NF4 forwards on this thread save their dequantized weight
// for their backward (see the file comment). Scopes nest.
class KeepDequantizedWeights {
 public:
  KeepDequantizedWeights();
  ~KeepDequantizedWeights();
  KeepDequantizedWeights(const KeepDequantizedWeights&) = delete;
  KeepDequantizedWeights& operator=(const KeepDequantizedWeights&) = delete;
  static bool active();

 private:
  bool previous_;
};

class Nf4Linear final : public BaseLinear {
 public:
  explicit Nf4Linear(Nf4Weight weight);  // pre-quantized (e.g. a bnb checkpoint)
  static std::unique_ptr<Nf4Linear> Quantize(const at::Tensor& weight, const Nf4Options& options);
  // A layer of this shape whose bytes are not resident yet (FSDP): Forward
  // fails until SetWeight.
  static std::unique_ptr<Nf4Linear> Unmaterialized(int64_t out_features, int64_t in_features,
                                                   const Nf4Options& options);

  // Makes `weight` (validated; same shape, blocksize and nesting as this
  // layer) the resident bytes; ReleaseWeight drops them again.
  void SetWeight(Nf4Weight weight);
  void ReleaseWeight();
  bool resident() const { return weight_.packed.defined(); }

  int64_t in_features() const override { return weight_.in_features; }
  int64_t out_features() const override { return weight_.out_features; }
  // x (..., in) fp32 or bf16 on the weight's device -> (..., out).
  at::Tensor Forward(const at::Tensor& x) const override;
  at::Tensor DenseWeight(c10::ScalarType dtype) const override;

  const Nf4Weight& weight() const { return weight_; }
  bool nested() const { return nested_; }

 private:
  Nf4Linear() = default;

  Nf4Weight weight_;
  bool nested_ = true;  // double quantization (fixed at construction)
};

}  // namespace ftune::trainer

#endif  // FTUNE_WORKER_TRAINER_NF4_LINEAR_H_
