// bfloat16 and IEEE half <-> float conversions for the CPU side of the
// collectives: the Gloo backend reduces 16-bit floats in fp32 (one rounding
// at the end rather than one per ring step), and the self-test builds its
// expected values with them.
//
// Both directions round to nearest, ties to even, as CUDA's __float2bfloat16
// and __float2half do, so a CPU reduction and an NCCL one agree on the
// rounding rule. NaN stays NaN (quiet); overflow goes to infinity.
//
// Thread-safety: pure functions.
#ifndef FTUNE_WORKER_COMM_HALF_H_
#define FTUNE_WORKER_COMM_HALF_H_

#include <cstdint>
#include <cstring>

namespace ftune::comm {

inline float BitsToFloat(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint32_t FloatToBits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
}

inline float Bf16ToFloat(uint16_t h) {
  return BitsToFloat(static_cast<uint32_t>(h) << 16);
}

inline uint16_t FloatToBf16(float f) {
  uint32_t bits = FloatToBits(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    return static_cast<uint16_t>((bits >> 16) | 0x0040u);  // quiet NaN
  }
  // Adding 0x7fff plus the lowest kept bit rounds to nearest, ties to even;
  // a carry into the exponent correctly rounds up to the next binade or inf.
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return BitsToFloat(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {
    if (mant == 0) return BitsToFloat(sign);
    // Subnormal: value = mant * 2^-24, exact in float.
    const float v = static_cast<float>(mant) * (1.0f / 16777216.0f);
    return sign ? -v : v;
  }
  return BitsToFloat(sign | ((exp + 112u) << 23) | (mant << 13));
}

inline uint16_t FloatToHalf(float f) {
  const uint32_t bits = FloatToBits(f);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7e00u;   // NaN
  if (abs >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to inf
  if (abs < 0x38800000u) {
    // Below the smallest normal half (2^-14): a subnormal or zero. The half
    // subnormal step is 2^-24; scaling by 2^24 makes the rounding the
    // float->int conversion of an exactly representable product.
    const float scaled = BitsToFloat(abs) * 16777216.0f;
    // Round half to even by hand: nearbyint would depend on the FP mode.
    uint32_t q = static_cast<uint32_t>(scaled);
    const float rest = scaled - static_cast<float>(q);
    if (rest > 0.5f || (rest == 0.5f && (q & 1u))) ++q;
    return sign | static_cast<uint16_t>(q);
  }
  // Normal: rebias the exponent and round the 13 dropped mantissa bits.
  uint32_t h = abs - (112u << 23);
  h += 0xfffu + ((h >> 13) & 1u);
  return sign | static_cast<uint16_t>(h >> 13);
}

}  // namespace ftune::comm

#endif  // FTUNE_WORKER_COMM_HALF_H_
