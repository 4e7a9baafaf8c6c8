// Per-element NF4 arithmetic shared by the CPU reference (nf4_cpu.cc) and
// the CUDA kernels (nf4_cuda.cu): one definition of every rounding step is
// what makes the two bit-identical.
//
// Why the explicit *_rn helpers: nvcc contracts `a * b + c` into one fused
// multiply-add by default, which rounds once where bitsandbytes (two separate
// kernels / torch ops) rounds twice. On the device the __f*_rn intrinsics are
// never contracted; on the host the library is compiled with
// -ffp-contract=off for the same reason.
//
// Internal to kernels/: include nf4.h (CPU) or nf4_cuda.h (CUDA) instead.
#ifndef FTUNE_KERNELS_NF4_MATH_H_
#define FTUNE_KERNELS_NF4_MATH_H_

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FTUNE_HD __host__ __device__ __forceinline__
#else
#define FTUNE_HD inline
#endif

// bitsandbytes' NF4 values (its `get_4bit_type('nf4')` table), index = code.
// A macro so that the host table and the device __constant__ table are
// written from one list.
#define FTUNE_NF4_CODE_VALUES                                                     \
  -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,       \
      -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,  \
      0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f,           \
      0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,            \
      0.7229568362236023f, 1.0f

namespace ftune::kernels::math {

FTUNE_HD float MulRn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

FTUNE_HD float AddRn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

FTUNE_HD float SubRn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

// IEEE 1.0f / x (bitsandbytes: `local_abs_max = 1.0f/local_abs_max`).
FTUNE_HD float RcpRn(float x) {
#if defined(__CUDA_ARCH__)
  return __frcp_rn(x);
#else
  return 1.0f / x;
#endif
}

// max(m, |x|) for m that is never NaN (it starts at 0): a NaN x is ignored,
// as by the kernels' fmaxf(m, fabsf(x)). Written as a select on the host,
// where std::fmax is a library call.
FTUNE_HD float MaxAbs(float m, float x) {
#if defined(__CUDA_ARCH__)
  return fmaxf(m, fabsf(x));
#else
  const float a = std::fabs(x);
  return a > m ? a : m;
#endif
}

FTUNE_HD uint32_t FloatBits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

FTUNE_HD float BitsToFloat(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// NVIDIA GPUs return one canonical NaN, 0x7fffffff, from fp32 arithmetic;
// x86 returns 0xffc00000 ("-nan") or an input's payload. The host applies
// this to the fp32 values it stores (dequantized weights and absmax, the
// mean) so that NaN results, from inf or NaN weights, match bit for bit too.
FTUNE_HD float CanonicalNan(float x) {
#if defined(__CUDA_ARCH__)
  return x;
#else
  return x != x ? BitsToFloat(0x7fffffffu) : x;
#endif
}

FTUNE_HD float Bf16ToFloat(uint16_t bits) { return BitsToFloat(static_cast<uint32_t>(bits) << 16); }

// Round to nearest even; NaN -> 0x7FFF like CUDA's __float2bfloat16_rn
// (which bitsandbytes' bf16 dequantization uses). Written out rather than
// calling the intrinsic so host and device share it.
FTUNE_HD uint16_t FloatToBf16(float x) {
  uint32_t u = FloatBits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// bitsandbytes' dQuantizeNF4 is a 4-level decision tree of strict `>`
// tests on these ascending fp32 thresholds (threshold k separates code k
// from k + 1): a binary search for the number of thresholds x exceeds. A NaN
// exceeds none and gets code 0, like the tree's all-`else` path.
#define FTUNE_NF4_THRESHOLDS                                                       \
  -0.8480964004993439f, -0.6106329262256622f, -0.4599952697753906f,                \
      -0.33967943489551544f, -0.23460740596055984f, -0.13791173323988914f,         \
      -0.045525018125772476f, 0.03979014977812767f, 0.1202552504837513f,           \
      0.2035212516784668f, 0.2920137718319893f, 0.3893125355243683f,               \
      0.5016634166240692f, 0.6427869200706482f, 0.8614784181118011f

// The same four comparisons as the tree, with the threshold picked by
// indexing `t` (the 15 thresholds) instead of by branching: NF4 codes are
// unpredictable, so branches cost mispredictions on the host and divergence
// on the device. The device passes a shared-memory copy of the table.
// nf4_property_test checks this against the tree transcribed literally.
FTUNE_HD uint8_t Nf4CodeSearch(const float* t, float x) {
  int c = (x > t[7]) ? 8 : 0;
  c += (x > t[c + 3]) ? 4 : 0;
  c += (x > t[c + 1]) ? 2 : 0;
  c += (x > t[c]) ? 1 : 0;
  return static_cast<uint8_t>(c);
}

#if !defined(__CUDA_ARCH__)
inline constexpr float kNf4Thresholds[15] = {FTUNE_NF4_THRESHOLDS};
inline uint8_t Nf4Code(float x) { return Nf4CodeSearch(kNf4Thresholds, x); }
#endif

// bitsandbytes' dQuantize<0> (8-bit, no stochastic rounding): binary search
// from pivot 127 with steps 64..1, then the nearer of the final pivot and
// its bracketing neighbour by the fp32 midpoint, ties to the pivot.
FTUNE_HD uint8_t DynamicCode(const float* code, float x) {
  int pivot = 127;
  int upper_pivot = 255;
  int lower_pivot = 0;
  float lower = -1.0f;
  float upper = 1.0f;
  float val = code[pivot];
  for (int i = 64; i > 0; i >>= 1) {
    if (x > val) {
      lower_pivot = pivot;
      lower = val;
      pivot += i;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= i;
    }
    val = code[pivot];
  }
  if (upper_pivot == 255) upper = code[upper_pivot];
  if (lower_pivot == 0) lower = code[lower_pivot];
  if (x > val) {
    float midpoint = MulRn(AddRn(upper, val), 0.5f);
    return static_cast<uint8_t>(x > midpoint ? upper_pivot : pivot);
  }
  float midpoint = MulRn(AddRn(lower, val), 0.5f);
  return static_cast<uint8_t>(x < midpoint ? lower_pivot : pivot);
}

}  // namespace ftune::kernels::math

#endif  // FTUNE_KERNELS_NF4_MATH_H_
