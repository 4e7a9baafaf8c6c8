// NF4 quantization as bitsandbytes does it, on the CPU (reference) side.
//
// Design: every rounding decision follows bitsandbytes' CUDA kernels and
// torch's own arithmetic, so a weight quantized here is byte for byte what
// `bitsandbytes.functional.quantize_4bit(w, quant_type="nf4")` stores
// (bitsandbytes' CUDA kernel `kQuantizeBlockwise` and its `dQuantizeNF4`):
//   - blocks of `blocksize` consecutive elements of the row-major flattened
//     weight (a partial last block is allowed); absmax = max |x| per block;
//   - v = x * (1.0f / absmax) in fp32, then a decision tree with strict `>`
//     on fp32 thresholds picks one of 16 codes; two codes per byte, element
//     2j in the HIGH nibble; an odd element count pads the last low nibble
//     with the code of 0 (what bitsandbytes' zero-filled load produces);
//   - double quantization: offset = torch.mean(absmax) as torch's CUDA
//     reduction computes it (summation order included, see TorchMeanF32),
//     then (absmax - offset) quantized in blocks of 256 to uint8 with the
//     signed dynamic map, one fp32 absmax2 per block.
// The per-element arithmetic is shared with the CUDA kernels
// (kernels/nf4_math.h), which is what makes the two bit-identical.
//
// Degenerate input, as bitsandbytes treats it: an all-zero block has absmax
// 0, so v = 0 * inf = NaN, which the tree sends to code 0 (decoding to 0);
// NaN elements are ignored by absmax and get code 0; an infinite element
// makes its block's absmax infinite. NaN results are stored as 0x7fffffff,
// the GPU's canonical NaN. (Only a block of nothing but NaN may differ:
// absmax 0 here, while bitsandbytes' running max starts at -FLT_MAX.)
//
// All functions are pure (no global state besides two immutable tables built
// on first use, thread-safely) and may be called from any thread.
#ifndef FTUNE_KERNELS_NF4_H_
#define FTUNE_KERNELS_NF4_H_

#include <array>
#include <cstdint>
#include <string>
#include <utility>

namespace ftune::kernels {

// Result of a kernels/ call: empty message means success. kernels/ links no
// abseil (the trainer must build without it), hence this small type.
class [[nodiscard]] Status {
 public:
  Status() = default;
  static Status Ok() { return Status(); }
  static Status Error(std::string message) { return Status(std::move(message)); }
  bool ok() const { return message_.empty(); }
  const std::string& message() const { return message_; }

 private:
  explicit Status(std::string message) : message_(std::move(message)) {}
  std::string message_;
};

inline constexpr int64_t kNf4DefaultBlocksize = 64;
// bitsandbytes' double quantization always uses blocks of 256 absmax values.
inline constexpr int64_t kNf4NestedBlocksize = 256;

// The 16 NF4 values, index = code (bitsandbytes' `quant_map`).
const std::array<float, 16>& Nf4CodeValues();

// The signed 8-bit dynamic map (`create_dynamic_map(signed=True)`), built in
// fp32 exactly as torch builds it; bitsandbytes' `nested_quant_map`.
const std::array<float, 256>& DynamicMapSigned();

// Sizes. `n` is the weight's element count, `blocksize` the NF4 block size.
inline int64_t Nf4NumBlocks(int64_t n, int64_t blocksize) {
  return (n + blocksize - 1) / blocksize;
}
inline int64_t Nf4PackedBytes(int64_t n) { return (n + 1) / 2; }
inline int64_t Nf4NumNestedBlocks(int64_t num_blocks) {
  return (num_blocks + kNf4NestedBlocksize - 1) / kNf4NestedBlocksize;
}

// OK for 64, 128, ..., 4096 (bitsandbytes' 4-bit block sizes); otherwise an
// error naming the value.
Status ValidateNf4Blocksize(int64_t blocksize);

// The GPU and torch build whose torch.mean summation order the double
// quantization's offset reproduces. torch splits a long reduction across
// CTAs according to the device's SM count and threads per SM, so
// bitsandbytes' offset of a large tensor differs in its last bits between
// GPU models; the default is the H100 SXM / H200 (132 SMs, 2048 threads
// each). torch has also changed its reduction over time; the two knobs
// below select between the schedules seen (defaults: torch 2.11, checked
// against torch.mean on an H200, see tests/kernels/torch_mean_reference.py).
// For tensors of at most a few tens of thousands of blocks from bf16
// weights every order gives the same sum, so this only matters for larger
// tensors or fp32 weights.
struct TorchReduceDevice {
  int num_sms = 132;
  int max_threads_per_sm = 2048;
  // Intra-warp tree with shuffle offsets 16, 8, ..., 1 (newer torch) rather
  // than 1, 2, ..., 16 (older torch, and ROCm builds).
  bool warp_offsets_descending = true;
  // Fewest elements for which torch switches to 4-wide vector loads (128 in
  // newer torch; older: 129, i.e. "more than 128").
  int64_t min_vectorized_inputs = 128;
};

// How torch's CUDA reduction (`Reduce.cuh`, setReduceConfig) lays out a
// contiguous 1-D fp32 mean of n elements. Exposed so the CUDA kernel
// follows the same order as the CPU emulation.
struct TorchMeanPlan {
  bool vectorized = false;  // 4-wide loads, 4 accumulators by lane
  int block_width = 1;      // threads per CTA (a power of two, <= 512)
  int ctas = 1;             // CTAs splitting the input (global reduction)
  int64_t step = 1;         // input stride between a thread's iterations
  bool warp_offsets_descending = true;
  float factor = 1.0f;      // fp32 1/n; mean = sum * factor
};
TorchMeanPlan PlanTorchMean(int64_t n, const TorchReduceDevice& device);

// torch.mean(x) of a contiguous fp32 CUDA tensor of n > 0 elements, to the
// bit: the same partial sums in the same order as torch's kernel.
float TorchMeanF32(const float* x, int64_t n, const TorchReduceDevice& device = {});

// --- Per-element quantization, for tests and tools.

// NF4 code of v (already scaled by 1/absmax). NaN gives 0.
uint8_t QuantizeNf4Value(float v);
// 8-bit code of v (already scaled) in `code` (256 ascending values), by
// bitsandbytes' binary search from pivot 127.
uint8_t QuantizeDynamicValue(const float* code, float v);
// bf16 <-> fp32 as uint16 bits; round to nearest even, NaN -> 0x7FFF (what
// CUDA's conversion, and so bitsandbytes, produces).
float Bf16BitsToFloat(uint16_t bits);
uint16_t FloatToBf16Bits(float x);

// --- Quantization. `packed` holds Nf4PackedBytes(n) bytes, `absmax`
// Nf4NumBlocks(n, blocksize) floats. n >= 0.
Status QuantizeNf4(const float* x, int64_t n, int64_t blocksize, uint8_t* packed,
                   float* absmax);
// bf16 input given as raw uint16 bits.
Status QuantizeNf4Bf16(const uint16_t* x, int64_t n, int64_t blocksize, uint8_t* packed,
                       float* absmax);

// Double quantization of num_blocks absmax values: `qabsmax` gets
// num_blocks codes, `absmax2` Nf4NumNestedBlocks(num_blocks) floats,
// `offset` one float.
Status DoubleQuantizeAbsmax(const float* absmax, int64_t num_blocks, uint8_t* qabsmax,
                            float* absmax2, float* offset,
                            const TorchReduceDevice& device = {});
// absmax[i] = code8[qabsmax[i]] * absmax2[i / 256] + offset, as two fp32
// roundings (bitsandbytes' dequantize_blockwise, then `absmax += offset`).
Status DequantizeAbsmax(const uint8_t* qabsmax, const float* absmax2, float offset,
                        int64_t num_blocks, float* absmax);

// --- Dequantization: out[i] = nf4[code_i] * absmax[i / blocksize], one fp32
// rounding (then one bf16 rounding for the bf16 variant).
Status DequantizeNf4(const uint8_t* packed, const float* absmax, int64_t n,
                     int64_t blocksize, float* out);
Status DequantizeNf4Bf16(const uint8_t* packed, const float* absmax, int64_t n,
                         int64_t blocksize, uint16_t* out);

}  // namespace ftune::kernels

#endif  // FTUNE_KERNELS_NF4_H_
