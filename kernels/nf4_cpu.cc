// CPU reference of NF4 quantization (see nf4.h for the contract).
//
// Two pieces are emulations rather than plain arithmetic, because
// bitsandbytes' results depend on them:
//   - DynamicMapSigned(): bitsandbytes builds the map with torch.linspace on
//     the GPU, where nvcc fuses `start + step * i` into one FMA; the golden
//     `nested_quant_map` matches only the fused form (std::fma here).
//   - TorchMeanF32(): the double quantization's offset is torch.mean on the
//     GPU, whose fp32 partial sums follow Reduce.cuh's launch configuration
//     (4-wide loads with 4 accumulators per thread, a shared-memory then
//     warp-shuffle tree per CTA, CTAs combined by the last one to finish).
//     The emulation below follows that schedule step by step, so the offset
//     is bit-identical for any length, not only where fp32 sums are exact;
//     it reproduced all 103 torch.mean results (1 to 4.2M elements) recorded
//     with torch 2.11 on an H200 (nf4_cuda_test, torch_mean_reference.py).
#include "kernels/nf4.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/nf4_math.h"

namespace ftune::kernels {
namespace {

constexpr float kNf4Values[16] = {FTUNE_NF4_CODE_VALUES};

// Reduce.cuh's last_pow2: largest power of two <= n (at least 1).
int LastPow2(int n) {
  n |= (n >> 1);
  n |= (n >> 2);
  n |= (n >> 4);
  n |= (n >> 8);
  n |= (n >> 16);
  return std::max(1, n - (n >> 1));
}

int64_t DivUp(int64_t a, int64_t b) { return (a + b - 1) / b; }

// torch.linspace(start, end, steps, dtype=float32) as its CUDA kernel
// computes it: `start + step * i` for the first half, `end - step * (steps -
// i - 1)` for the rest, each contracted to a single FMA by nvcc.
std::vector<float> LinspaceCudaF32(float start, float end, int64_t steps) {
  const float step = (end - start) / static_cast<float>(steps - 1);
  const int64_t halfway = steps / 2;
  std::vector<float> out(steps);
  for (int64_t i = 0; i < steps; ++i) {
    out[i] = i < halfway ? std::fma(step, static_cast<float>(i), start)
                         : std::fma(-step, static_cast<float>(steps - i - 1), end);
  }
  return out;
}

std::array<float, 256> BuildDynamicMapSigned() {
  // create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): 7
  // exponent levels, level i has 2^i fraction points (neighbour means of an
  // fp32 linspace), each scaled by the fp32 value of 10^(i-6) with both
  // signs; then 0 and 1.0; 254 + 2 = 256 entries, so no zero padding.
  std::vector<float> data;
  data.reserve(256);
  for (int i = 0; i < 7; ++i) {
    const int64_t points = (int64_t{1} << i) + 1;
    const std::vector<float> boundaries = LinspaceCudaF32(0.1f, 1.0f, points);
    const float scale = static_cast<float>(std::pow(10.0, i - 6));
    std::vector<float> means(points - 1);
    for (int64_t k = 0; k + 1 < points; ++k) {
      means[k] = (boundaries[k] + boundaries[k + 1]) / 2.0f;
    }
    for (float m : means) data.push_back(scale * m);
    for (float m : means) data.push_back(-scale * m);
  }
  data.push_back(0.0f);
  data.push_back(1.0f);
  std::sort(data.begin(), data.end());
  std::array<float, 256> map{};
  std::copy(data.begin(), data.end(), map.begin());
  return map;
}

// One thread's partial sum in torch's thread_reduce: 4 accumulators, folded
// ((a0 + a1) + a2) + a3.
float TorchThreadSum(const float* x, int64_t n, const TorchMeanPlan& plan, int cta,
                     int lane) {
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  const int64_t first = lane + static_cast<int64_t>(cta) * plan.block_width;
  if (first >= n) return 0.0f;  // torch leaves such threads at the identity
  if (plan.vectorized) {
    // input_vectorized_thread_reduce_impl: `first` counts 4-element vectors.
    for (int64_t v = first; v * 4 + 3 < n; v += plan.step) {
      for (int i = 0; i < 4; ++i) acc[i] += x[v * 4 + i];
    }
    // The n % 4 leftover elements go to lanes 0..2 of the first CTA.
    if (cta == 0) {
      const int64_t j = n - n % 4 + lane;
      if (j < n) acc[0] += x[j];
    }
  } else {
    // thread_reduce_impl with vt0 = 4 for contiguous input.
    int64_t idx = first;
    const int64_t stride = plan.step;
    while (idx + 3 * stride < n) {
      for (int i = 0; i < 4; ++i) acc[i] += x[idx + i * stride];
      idx += 4 * stride;
    }
    for (int i = 0; i < 4 && idx < n; ++i, idx += stride) acc[i] += x[idx];
  }
  return ((acc[0] + acc[1]) + acc[2]) + acc[3];
}

// block_x_reduce: halving through shared memory down to one warp, then
// shfl_down within the warp, with offsets 16, 8, ..., 1 or 1, 2, ..., 16
// (TorchReduceDevice::warp_offsets_descending); returns lane 0's value.
// Lanes are updated in ascending order so each reads its partner's previous
// value, as the simultaneous shuffle does.
float TorchBlockSum(std::vector<float>& v, bool descending) {
  int dim = static_cast<int>(v.size());
  if (dim > 32) {
    for (int off = dim / 2; off >= 32; off >>= 1) {
      for (int t = 0; t < off; ++t) v[t] = v[t] + v[t + off];
    }
    dim = 32;
  }
  if (descending) {
    for (int off = dim / 2; off > 0; off >>= 1) {
      for (int t = 0; t < off; ++t) v[t] = v[t] + v[t + off];
    }
  } else {
    for (int off = 1; off < dim; off <<= 1) {
      for (int t = 0; t + off < dim; ++t) v[t] = v[t] + v[t + off];
    }
  }
  return v[0];
}

template <typename Load>
Status QuantizeNf4Impl(const char* name, Load load, int64_t n, int64_t blocksize,
                       uint8_t* packed, float* absmax) {
  if (Status s = ValidateNf4Blocksize(blocksize); !s.ok()) return s;
  if (n < 0) return Status::Error(std::string(name) + ": n (" + std::to_string(n) + ") must be >= 0");
  if (n > 0 && (packed == nullptr || absmax == nullptr)) {
    return Status::Error(std::string(name) + ": null pointer");
  }
  // One block in fp32, plus the zero bitsandbytes' load puts past the end of
  // an odd-length weight: its code fills the last byte's low nibble.
  std::vector<float> buf(blocksize + 1);
  for (int64_t b = 0; b < Nf4NumBlocks(n, blocksize); ++b) {
    const int64_t begin = b * blocksize;  // even: blocks never split a byte
    const int64_t count = std::min(n - begin, blocksize);
    for (int64_t i = 0; i < count; ++i) buf[i] = load(begin + i);
    buf[count] = 0.0f;
    float m = 0.0f;
    for (int64_t i = 0; i < count; ++i) m = math::MaxAbs(m, buf[i]);
    absmax[b] = m;
    const float r = math::RcpRn(m);
    uint8_t* out = packed + begin / 2;
    for (int64_t j = 0; j < (count + 1) / 2; ++j) {
      const uint8_t hi = math::Nf4Code(math::MulRn(buf[2 * j], r));
      const uint8_t lo = math::Nf4Code(math::MulRn(buf[2 * j + 1], r));
      out[j] = static_cast<uint8_t>((hi << 4) | lo);
    }
  }
  return Status::Ok();
}

// decode: the fp32 product to the output type.
template <typename T, typename Decode>
Status DequantizeNf4Impl(const char* name, const uint8_t* packed, const float* absmax, int64_t n,
                         int64_t blocksize, T* out, Decode decode) {
  if (Status s = ValidateNf4Blocksize(blocksize); !s.ok()) return s;
  if (n < 0) return Status::Error(std::string(name) + ": n (" + std::to_string(n) + ") must be >= 0");
  if (n > 0 && (packed == nullptr || absmax == nullptr || out == nullptr)) {
    return Status::Error(std::string(name) + ": null pointer");
  }
  T table[16];
  for (int64_t b = 0; b < Nf4NumBlocks(n, blocksize); ++b) {
    // The same one rounding per element, done once per code value.
    for (int c = 0; c < 16; ++c) {
      table[c] = decode(math::CanonicalNan(math::MulRn(kNf4Values[c], absmax[b])));
    }
    const int64_t begin = b * blocksize;
    const int64_t end = std::min(n, begin + blocksize);
    for (int64_t i = begin; i < end; i += 2) {
      const uint8_t byte = packed[i / 2];
      out[i] = table[byte >> 4];
      if (i + 1 < end) out[i + 1] = table[byte & 0x0f];
    }
  }
  return Status::Ok();
}

}  // namespace

const std::array<float, 16>& Nf4CodeValues() {
  static const std::array<float, 16> values = {FTUNE_NF4_CODE_VALUES};
  return values;
}

const std::array<float, 256>& DynamicMapSigned() {
  static const std::array<float, 256> map = BuildDynamicMapSigned();
  return map;
}

Status ValidateNf4Blocksize(int64_t blocksize) {
  for (int64_t b = 64; b <= 4096; b *= 2) {
    if (blocksize == b) return Status::Ok();
  }
  return Status::Error("NF4 blocksize (" + std::to_string(blocksize) +
                       ") must be a power of two in [64, 4096]");
}

TorchMeanPlan PlanTorchMean(int64_t n, const TorchReduceDevice& device) {
  // setReduceConfig for one output, input contiguous along the reduced dim,
  // fp32 accumulation, at most 512 threads.
  constexpr int kMaxThreads = 512;
  TorchMeanPlan plan;
  int64_t dim0 = n;
  if (n >= device.min_vectorized_inputs) {  // "vectorize along input"
    plan.vectorized = true;
    dim0 = n / 4;
  }
  plan.block_width = dim0 < kMaxThreads ? LastPow2(static_cast<int>(dim0)) : kMaxThreads;
  int64_t step = plan.block_width;
  const int64_t values_per_thread = DivUp(n, step);
  // block_height is 1, so splitting "across warps" (>= 16 values a thread)
  // changes nothing by itself; it is the precondition for splitting the
  // input across CTAs once a thread would have >= 256 values.
  const bool split_across_warps = values_per_thread >= 16;
  const int64_t target_grid =
      int64_t{device.num_sms} * (device.max_threads_per_sm / plan.block_width);
  if (split_across_warps && values_per_thread >= 256 && target_grid >= 1) {
    const int64_t by_min_work = DivUp(values_per_thread, 16);
    const int64_t by_max_work = DivUp(values_per_thread, 256);
    plan.ctas = static_cast<int>(std::max(std::min(target_grid, by_min_work), by_max_work));
    if (plan.ctas > 1) step *= plan.ctas;
  }
  plan.step = step;
  plan.warp_offsets_descending = device.warp_offsets_descending;
  plan.factor = 1.0f / static_cast<float>(n);
  return plan;
}

float TorchMeanF32(const float* x, int64_t n, const TorchReduceDevice& device) {
  const TorchMeanPlan plan = PlanTorchMean(n, device);
  std::vector<float> lanes(plan.block_width);
  std::vector<float> partials(plan.ctas);
  for (int cta = 0; cta < plan.ctas; ++cta) {
    for (int t = 0; t < plan.block_width; ++t) lanes[t] = TorchThreadSum(x, n, plan, cta, t);
    partials[cta] = TorchBlockSum(lanes, plan.warp_offsets_descending);
  }
  float sum = partials[0];
  if (plan.ctas > 1) {
    // global_reduce: the last CTA's thread t folds partials t, t + width, ...
    // into the identity, then the same block tree.
    for (int t = 0; t < plan.block_width; ++t) {
      float v = 0.0f;
      for (int c = t; c < plan.ctas; c += plan.block_width) v = v + partials[c];
      lanes[t] = v;
    }
    sum = TorchBlockSum(lanes, plan.warp_offsets_descending);
  }
  return math::CanonicalNan(math::MulRn(sum, plan.factor));
}

uint8_t QuantizeNf4Value(float v) { return math::Nf4Code(v); }

uint8_t QuantizeDynamicValue(const float* code, float v) { return math::DynamicCode(code, v); }

float Bf16BitsToFloat(uint16_t bits) { return math::Bf16ToFloat(bits); }

uint16_t FloatToBf16Bits(float x) { return math::FloatToBf16(x); }

Status QuantizeNf4(const float* x, int64_t n, int64_t blocksize, uint8_t* packed,
                   float* absmax) {
  if (n > 0 && x == nullptr) return Status::Error("QuantizeNf4: null input pointer");
  return QuantizeNf4Impl("QuantizeNf4", [x](int64_t i) { return x[i]; }, n, blocksize, packed,
                         absmax);
}

Status QuantizeNf4Bf16(const uint16_t* x, int64_t n, int64_t blocksize, uint8_t* packed,
                       float* absmax) {
  if (n > 0 && x == nullptr) return Status::Error("QuantizeNf4Bf16: null input pointer");
  return QuantizeNf4Impl("QuantizeNf4Bf16", [x](int64_t i) { return math::Bf16ToFloat(x[i]); },
                         n, blocksize, packed, absmax);
}

Status DoubleQuantizeAbsmax(const float* absmax, int64_t num_blocks, uint8_t* qabsmax,
                            float* absmax2, float* offset, const TorchReduceDevice& device) {
  if (num_blocks <= 0) {
    return Status::Error("DoubleQuantizeAbsmax: num_blocks (" + std::to_string(num_blocks) +
                         ") must be >= 1");
  }
  if (absmax == nullptr || qabsmax == nullptr || absmax2 == nullptr || offset == nullptr) {
    return Status::Error("DoubleQuantizeAbsmax: null pointer");
  }
  if (device.num_sms < 1 || device.max_threads_per_sm < 1) {
    return Status::Error("DoubleQuantizeAbsmax: TorchReduceDevice needs num_sms (" +
                         std::to_string(device.num_sms) + ") and max_threads_per_sm (" +
                         std::to_string(device.max_threads_per_sm) + ") >= 1");
  }
  const float mean = TorchMeanF32(absmax, num_blocks, device);
  const float* code = DynamicMapSigned().data();
  std::vector<float> centered(kNf4NestedBlocksize);
  for (int64_t b = 0; b < Nf4NumNestedBlocks(num_blocks); ++b) {
    const int64_t begin = b * kNf4NestedBlocksize;
    const int64_t count = std::min(num_blocks - begin, kNf4NestedBlocksize);
    float m = 0.0f;
    for (int64_t i = 0; i < count; ++i) {
      centered[i] = math::SubRn(absmax[begin + i], mean);  // torch: `_absmax - offset`
      m = math::MaxAbs(m, centered[i]);
    }
    absmax2[b] = m;
    const float r = math::RcpRn(m);
    for (int64_t i = 0; i < count; ++i) {
      qabsmax[begin + i] = math::DynamicCode(code, math::MulRn(centered[i], r));
    }
  }
  *offset = mean;
  return Status::Ok();
}

Status DequantizeAbsmax(const uint8_t* qabsmax, const float* absmax2, float offset,
                        int64_t num_blocks, float* absmax) {
  if (num_blocks < 0) {
    return Status::Error("DequantizeAbsmax: num_blocks (" + std::to_string(num_blocks) +
                         ") must be >= 0");
  }
  if (num_blocks > 0 && (qabsmax == nullptr || absmax2 == nullptr || absmax == nullptr)) {
    return Status::Error("DequantizeAbsmax: null pointer");
  }
  const float* code = DynamicMapSigned().data();
  for (int64_t i = 0; i < num_blocks; ++i) {
    absmax[i] = math::CanonicalNan(
        math::AddRn(math::MulRn(code[qabsmax[i]], absmax2[i / kNf4NestedBlocksize]), offset));
  }
  return Status::Ok();
}

Status DequantizeNf4(const uint8_t* packed, const float* absmax, int64_t n, int64_t blocksize,
                     float* out) {
  return DequantizeNf4Impl("DequantizeNf4", packed, absmax, n, blocksize, out,
                           [](float v) { return v; });
}

Status DequantizeNf4Bf16(const uint8_t* packed, const float* absmax, int64_t n,
                         int64_t blocksize, uint16_t* out) {
  return DequantizeNf4Impl("DequantizeNf4Bf16", packed, absmax, n, blocksize, out,
                           [](float v) { return math::FloatToBf16(v); });
}

}  // namespace ftune::kernels
