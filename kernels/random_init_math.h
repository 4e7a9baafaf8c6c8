// The random weights of `ftune-rank init-model` (worker/modelio/init_model.h
// specifies them), one element at a time, shared by the CPU writer and the
// CUDA generator (kernels/random_init_cuda.h) so both produce the same bf16
// bits: integer SplitMix64 draws, a double-precision Box-Muller transform,
// then float and bf16 rounding (nearest even).
//
// Internal to kernels/ and init_model.cc.
#ifndef FTUNE_KERNELS_RANDOM_INIT_MATH_H_
#define FTUNE_KERNELS_RANDOM_INIT_MATH_H_

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FTUNE_RI_HD __host__ __device__ __forceinline__
#else
#define FTUNE_RI_HD inline
#endif

namespace ftune::kernels::random_init {

FTUNE_RI_HD uint64_t SplitMix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// x_n of init_model.h's file comment.
FTUNE_RI_HD uint64_t Draw(uint64_t key, uint64_t n) {
  return SplitMix64(key + (n + 1) * 0x9E3779B97F4A7C15ull);
}

// Both normals of pair p, times the std.
FTUNE_RI_HD void NormalPair(uint64_t key, uint64_t p, double stddev, float* a, float* b) {
  const double u1 = static_cast<double>((Draw(key, 2 * p) >> 11) + 1) * 0x1.0p-53;
  const double u2 = static_cast<double>(Draw(key, 2 * p + 1) >> 11) * 0x1.0p-53;
  const double r = sqrt(-2.0 * log(u1));
  const double t = 2.0 * 3.14159265358979323846 * u2;
  *a = static_cast<float>(stddev * r * cos(t));
  *b = static_cast<float>(stddev * r * sin(t));
}

FTUNE_RI_HD uint16_t FloatToBf16(float f) {
  uint32_t bits;
  memcpy(&bits, &f, sizeof(bits));
  // Round to nearest even; the values here are finite and small.
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// Element i of the tensor whose key is `key`, as bf16 bits.
FTUNE_RI_HD uint16_t NormalBf16(uint64_t key, double stddev, uint64_t i) {
  float a, b;
  NormalPair(key, i / 2, stddev, &a, &b);
  return FloatToBf16((i & 1) ? b : a);
}

}  // namespace ftune::kernels::random_init

#endif  // FTUNE_KERNELS_RANDOM_INIT_MATH_H_
