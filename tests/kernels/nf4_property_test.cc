// Properties of the CPU NF4 reference that the golden files do not pin
// down: degenerate blocks, extremes, partial blocks, other block sizes,
// error bounds on random data, and the torch reduction schedule behind the
// double quantization's offset.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <random>
#include <vector>

#include "kernels/nf4.h"
#include "kernels/nf4_math.h"

namespace ftune::kernels {
namespace {

uint8_t CodeAt(const std::vector<uint8_t>& packed, int64_t i) {
  return i % 2 == 0 ? packed[i / 2] >> 4 : packed[i / 2] & 0x0f;
}

struct Quantized {
  std::vector<uint8_t> packed;
  std::vector<float> absmax;
  std::vector<float> dequantized;
};

Quantized RoundTrip(const std::vector<float>& x, int64_t blocksize) {
  const int64_t n = static_cast<int64_t>(x.size());
  Quantized q;
  q.packed.resize(Nf4PackedBytes(n));
  q.absmax.resize(Nf4NumBlocks(n, blocksize));
  q.dequantized.resize(n);
  Status s = QuantizeNf4(x.data(), n, blocksize, q.packed.data(), q.absmax.data());
  EXPECT_TRUE(s.ok()) << s.message();
  s = DequantizeNf4(q.packed.data(), q.absmax.data(), n, blocksize, q.dequantized.data());
  EXPECT_TRUE(s.ok()) << s.message();
  return q;
}

std::vector<float> Normal(int64_t n, uint32_t seed, float stddev = 0.02f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> x(n);
  for (float& v : x) v = dist(gen);
  return x;
}

TEST(Nf4Tables, CodeValuesAreSortedAndSymmetricAtTheEnds) {
  const auto& v = Nf4CodeValues();
  EXPECT_EQ(v[0], -1.0f);
  EXPECT_EQ(v[7], 0.0f);
  EXPECT_EQ(v[15], 1.0f);
  EXPECT_TRUE(std::is_sorted(v.begin(), v.end()));
}

TEST(Nf4Tables, DynamicMapHasBitsandbytesShape) {
  const auto& m = DynamicMapSigned();
  EXPECT_TRUE(std::is_sorted(m.begin(), m.end()));
  // 127 negative values, one zero, 127 positive means and 1.0.
  EXPECT_EQ(m[127], 0.0f);
  EXPECT_EQ(std::count(m.begin(), m.end(), 0.0f), 1);
  EXPECT_EQ(m[255], 1.0f);
  EXPECT_FLOAT_EQ(m[0], -0.99296875f);
  EXPECT_EQ(m[0], -m[254]);
  // Smallest magnitude level: 1e-6 * mean(0.1, 1) = 5.5e-7.
  EXPECT_FLOAT_EQ(m[128], 5.5e-7f);
}

TEST(Nf4Tables, EveryDynamicCodeQuantizesToItself) {
  const auto& m = DynamicMapSigned();
  for (int k = 0; k < 256; ++k) {
    if (k == 127 || m[k] != 0.0f) {
      EXPECT_EQ(QuantizeDynamicValue(m.data(), m[k]), k) << "value " << m[k];
    }
  }
  EXPECT_EQ(QuantizeDynamicValue(m.data(), 2.0f), 255);
  EXPECT_EQ(QuantizeDynamicValue(m.data(), -2.0f), 0);
}

TEST(Nf4Tables, Nf4CodeIsTheNearestValue) {
  const auto& v = Nf4CodeValues();
  for (int i = -1100; i <= 1100; ++i) {
    const float x = i / 1000.0f;
    const uint8_t c = QuantizeNf4Value(x);
    for (int k = 0; k < 16; ++k) {
      // Thresholds are fp32 midpoints, so allow a rounding's worth of slack.
      EXPECT_LE(std::fabs(x - v[c]), std::fabs(x - v[k]) + 1e-6f) << "x=" << x << " code " << +c;
    }
  }
  EXPECT_EQ(QuantizeNf4Value(std::numeric_limits<float>::quiet_NaN()), 0);
  EXPECT_EQ(QuantizeNf4Value(0.0f), 7);
}

// bitsandbytes' dQuantizeNF4 (csrc/kernels.cu), transcribed branch for
// branch, to check the branch-free search in nf4_math.h against.
uint8_t BitsandbytesNf4Tree(float x) {
  if (x > 0.03979014977812767f)
    if (x > 0.3893125355243683f)
      if (x > 0.6427869200706482f)
        if (x > 0.8614784181118011f) return 0b1111;
        else return 0b1110;
      else if (x > 0.5016634166240692f) return 0b1101;
      else return 0b1100;
    else if (x > 0.2035212516784668f)
      if (x > 0.2920137718319893f) return 0b1011;
      else return 0b1010;
    else if (x > 0.1202552504837513f) return 0b1001;
    else return 0b1000;
  else if (x > -0.33967943489551544f)
    if (x > -0.13791173323988914f)
      if (x > -0.045525018125772476f) return 0b0111;
      else return 0b0110;
    else if (x > -0.23460740596055984f) return 0b0101;
    else return 0b0100;
  else if (x > -0.6106329262256622f)
    if (x > -0.4599952697753906f) return 0b0011;
    else return 0b0010;
  else if (x > -0.8480964004993439f) return 0b0001;
  else return 0b0000;
}

TEST(Nf4Tables, BranchFreeSearchEqualsBitsandbytesTree) {
  std::vector<float> xs = {0.0f, -0.0f, std::numeric_limits<float>::quiet_NaN(),
                           std::numeric_limits<float>::infinity(),
                           -std::numeric_limits<float>::infinity()};
  // Every bf16 value with several low-bit fillings covers all exponents.
  for (uint32_t h = 0; h < 0x10000; ++h) {
    for (uint32_t low : {0x0000u, 0x0001u, 0x7fffu, 0x8000u, 0xffffu}) {
      uint32_t u = (h << 16) | low;
      float x;
      std::memcpy(&x, &u, 4);
      xs.push_back(x);
    }
  }
  // And the neighbourhood of every threshold.
  for (float t : {FTUNE_NF4_THRESHOLDS}) {
    float lo = t, hi = t;
    for (int k = 0; k < 16; ++k) {
      xs.push_back(lo);
      xs.push_back(hi);
      lo = std::nextafter(lo, -2.0f);
      hi = std::nextafter(hi, 2.0f);
    }
  }
  for (float x : xs) {
    const uint8_t want = BitsandbytesNf4Tree(x);
    ASSERT_EQ(math::Nf4CodeSearch(math::kNf4Thresholds, x), want) << "x=" << x;
    ASSERT_EQ(QuantizeNf4Value(x), want) << "x=" << x;
  }
}

TEST(Nf4Tables, DecisionTreeUsesStrictGreaterThan) {
  // On a threshold the lower code wins (bitsandbytes compares with `>`).
  EXPECT_EQ(QuantizeNf4Value(0.8614784181118011f), 14);
  EXPECT_EQ(QuantizeNf4Value(std::nextafter(0.8614784181118011f, 2.0f)), 15);
  EXPECT_EQ(QuantizeNf4Value(0.03979014977812767f), 7);
  EXPECT_EQ(QuantizeNf4Value(-0.8480964004993439f), 0);
}

TEST(Nf4Bf16, ConversionRoundsToNearestEven) {
  EXPECT_EQ(FloatToBf16Bits(1.0f), 0x3f80);
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0).
  EXPECT_EQ(FloatToBf16Bits(1.0f + std::ldexp(1.0f, -8)), 0x3f80);
  // 1 + 3 * 2^-8 is halfway between odd 1 + 2^-7 and even 1 + 2^-6.
  EXPECT_EQ(FloatToBf16Bits(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);
  EXPECT_EQ(FloatToBf16Bits(-std::numeric_limits<float>::infinity()), 0xff80);
  EXPECT_EQ(FloatToBf16Bits(std::numeric_limits<float>::quiet_NaN()), 0x7fff);
  EXPECT_EQ(FloatToBf16Bits(std::numeric_limits<float>::max()), 0x7f80);  // rounds to inf
  for (uint32_t b = 0; b < 0x10000; b += 7) {
    const uint16_t h = static_cast<uint16_t>(b);
    if ((h & 0x7f80) == 0x7f80 && (h & 0x7f) != 0) continue;  // NaN payloads collapse
    EXPECT_EQ(FloatToBf16Bits(Bf16BitsToFloat(h)), h);
  }
}

TEST(Nf4Quantize, AllZeroBlockEncodesAsCodeZeroAndDecodesToZero) {
  // absmax 0 makes 1/absmax infinite and 0 * inf NaN, which bitsandbytes'
  // tree sends to code 0; -1 * 0 is still zero.
  std::vector<float> x = Normal(192, 1);
  std::fill(x.begin() + 64, x.begin() + 128, 0.0f);
  const Quantized q = RoundTrip(x, 64);
  EXPECT_EQ(q.absmax[1], 0.0f);
  for (int64_t i = 64; i < 128; ++i) {
    EXPECT_EQ(CodeAt(q.packed, i), 0);
    EXPECT_EQ(q.dequantized[i], 0.0f);
  }
  EXPECT_GT(q.absmax[0], 0.0f);
  EXPECT_GT(q.absmax[2], 0.0f);
}

TEST(Nf4Quantize, BlockExtremesAreExact) {
  std::vector<float> x = Normal(128, 2);
  x[5] = 3.5f;    // block 0 max
  x[9] = -3.5f;   // its negative
  x[100] = -7.25f;  // block 1 max is negative
  const Quantized q = RoundTrip(x, 64);
  EXPECT_EQ(q.absmax[0], 3.5f);
  EXPECT_EQ(q.absmax[1], 7.25f);
  EXPECT_EQ(CodeAt(q.packed, 5), 15);
  EXPECT_EQ(CodeAt(q.packed, 9), 0);
  EXPECT_EQ(CodeAt(q.packed, 100), 0);
  EXPECT_EQ(q.dequantized[5], 3.5f);
  EXPECT_EQ(q.dequantized[9], -3.5f);
  EXPECT_EQ(q.dequantized[100], -7.25f);
}

TEST(Nf4Quantize, PartialLastBlockUsesOnlyItsOwnElements) {
  std::vector<float> x = Normal(64 + 37, 3);
  x[10] = 100.0f;  // must not leak into block 1
  x[64 + 36] = 0.5f;
  for (int64_t i = 64; i < 64 + 36; ++i) x[i] = 0.25f * static_cast<float>(i % 3) - 0.25f;
  const Quantized q = RoundTrip(x, 64);
  ASSERT_EQ(q.absmax.size(), 2u);
  EXPECT_EQ(q.absmax[1], 0.5f);
  ASSERT_EQ(q.packed.size(), 51u);
  EXPECT_EQ(CodeAt(q.packed, 64 + 36), 15);
  // Odd count: the missing element's nibble holds the code of 0.
  EXPECT_EQ(q.packed[50] & 0x0f, 7);
}

TEST(Nf4Quantize, OddCountWithZeroLastBlockPadsWithCodeZero) {
  std::vector<float> x(64 + 3, 0.0f);
  x[0] = 1.0f;
  const Quantized q = RoundTrip(x, 64);
  // 0 * (1 / 0) is NaN: code 0, as bitsandbytes' zero-filled load gives.
  EXPECT_EQ(q.packed.back(), 0x00);
}

TEST(Nf4Quantize, NanResultsAreTheGpuCanonicalNan) {
  // An infinite weight makes its block's absmax infinite; the code of 0 then
  // decodes to 0 * inf = NaN, which the GPU writes as 0x7fffffff.
  std::vector<float> x(64, 0.0f);
  x[0] = std::numeric_limits<float>::infinity();
  const Quantized q = RoundTrip(x, 64);
  EXPECT_EQ(CodeAt(q.packed, 1), 7);
  uint32_t bits;
  std::memcpy(&bits, &q.dequantized[1], 4);
  EXPECT_EQ(bits, 0x7fffffffu);
  // inf * (1 / inf) = inf * 0 is NaN as well: code 0, decoded as -inf.
  EXPECT_EQ(CodeAt(q.packed, 0), 0);
  EXPECT_EQ(q.dequantized[0], -std::numeric_limits<float>::infinity());
}

TEST(Nf4Quantize, EmptyInputIsFine) {
  const Quantized q = RoundTrip({}, 64);
  EXPECT_TRUE(q.packed.empty());
  EXPECT_TRUE(q.absmax.empty());
}

TEST(Nf4Quantize, RejectsBadBlocksizeAndNullPointers) {
  float x[4] = {1, 2, 3, 4};
  uint8_t packed[2];
  float absmax[1];
  for (int64_t b : {0, 32, 96, 100, 8192}) {
    const Status s = QuantizeNf4(x, 4, b, packed, absmax);
    EXPECT_FALSE(s.ok());
    EXPECT_NE(s.message().find(std::to_string(b)), std::string::npos) << s.message();
  }
  EXPECT_FALSE(QuantizeNf4(nullptr, 4, 64, packed, absmax).ok());
  EXPECT_FALSE(QuantizeNf4(x, -1, 64, packed, absmax).ok());
  EXPECT_FALSE(DequantizeNf4(packed, absmax, 4, 48, x).ok());
}

class Nf4Blocksizes : public ::testing::TestWithParam<int64_t> {};

TEST_P(Nf4Blocksizes, RandomRoundTripIsWithinHalfTheLargestGap) {
  const int64_t blocksize = GetParam();
  const std::vector<float> x = Normal(3 * blocksize + 17, 4 + static_cast<uint32_t>(blocksize));
  const Quantized q = RoundTrip(x, blocksize);
  const auto& v = Nf4CodeValues();
  float max_half_gap = 0;
  for (int k = 0; k < 15; ++k) max_half_gap = std::max(max_half_gap, (v[k + 1] - v[k]) / 2);
  double err2 = 0, ref2 = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const float a = q.absmax[i / blocksize];
    EXPECT_LE(std::fabs(x[i] - q.dequantized[i]), max_half_gap * a * 1.0001f) << "element " << i;
    // The chosen code is the nearest one to x / absmax.
    const float scaled = x[i] / a;
    const uint8_t c = CodeAt(q.packed, i);
    for (int k = 0; k < 16; ++k) {
      EXPECT_LE(std::fabs(scaled - v[c]), std::fabs(scaled - v[k]) + 1e-6f);
    }
    err2 += double(x[i] - q.dequantized[i]) * (x[i] - q.dequantized[i]);
    ref2 += double(x[i]) * x[i];
  }
  // NF4 on Gaussian data: relative RMS error about 0.1 for small blocks,
  // growing slowly with block size (larger absmax per block).
  EXPECT_LT(std::sqrt(err2 / ref2), blocksize <= 256 ? 0.12 : 0.16);
}

TEST_P(Nf4Blocksizes, Bf16InputMatchesFp32Input) {
  const int64_t blocksize = GetParam();
  const int64_t n = 2 * blocksize + 5;
  std::vector<float> x = Normal(n, 7);
  std::vector<uint16_t> h(n);
  for (int64_t i = 0; i < n; ++i) {
    h[i] = FloatToBf16Bits(x[i]);
    x[i] = Bf16BitsToFloat(h[i]);
  }
  std::vector<uint8_t> p1(Nf4PackedBytes(n)), p2(Nf4PackedBytes(n));
  std::vector<float> a1(Nf4NumBlocks(n, blocksize)), a2(a1.size());
  ASSERT_TRUE(QuantizeNf4(x.data(), n, blocksize, p1.data(), a1.data()).ok());
  ASSERT_TRUE(QuantizeNf4Bf16(h.data(), n, blocksize, p2.data(), a2.data()).ok());
  EXPECT_EQ(p1, p2);
  EXPECT_EQ(a1, a2);
  // bf16 dequantization is the fp32 result rounded once.
  std::vector<float> d32(n);
  std::vector<uint16_t> d16(n);
  ASSERT_TRUE(DequantizeNf4(p1.data(), a1.data(), n, blocksize, d32.data()).ok());
  ASSERT_TRUE(DequantizeNf4Bf16(p1.data(), a1.data(), n, blocksize, d16.data()).ok());
  for (int64_t i = 0; i < n; ++i) EXPECT_EQ(d16[i], FloatToBf16Bits(d32[i]));
}

INSTANTIATE_TEST_SUITE_P(All, Nf4Blocksizes,
                         ::testing::Values(64, 128, 256, 512, 1024, 2048, 4096));

TEST(Nf4DoubleQuant, RoundTripIsWithinTheDynamicMapResolution) {
  // absmax values as a real weight gives them: many blocks, a spread around
  // the mean, one block of zeros.
  const int64_t num_blocks = 1000;
  std::vector<float> absmax(num_blocks);
  std::mt19937 gen(11);
  std::uniform_real_distribution<float> dist(0.02f, 0.09f);
  for (float& a : absmax) a = dist(gen);
  absmax[17] = 0.0f;
  std::vector<uint8_t> q(num_blocks);
  std::vector<float> absmax2(Nf4NumNestedBlocks(num_blocks));
  float offset = 0;
  ASSERT_TRUE(DoubleQuantizeAbsmax(absmax.data(), num_blocks, q.data(), absmax2.data(), &offset).ok());
  ASSERT_EQ(absmax2.size(), 4u);
  double sum = 0;
  for (float a : absmax) sum += a;
  EXPECT_NEAR(offset, sum / num_blocks, 1e-6);
  std::vector<float> back(num_blocks);
  ASSERT_TRUE(DequantizeAbsmax(q.data(), absmax2.data(), offset, num_blocks, back.data()).ok());
  for (int64_t i = 0; i < num_blocks; ++i) {
    // The dynamic map's largest step near 1 is 1/64; half of it, scaled.
    EXPECT_LE(std::fabs(back[i] - absmax[i]), absmax2[i / 256] / 128 * 1.001f) << i;
  }
  // The block maxima are hit exactly up to the map's top code 1.0.
  for (int64_t b = 0; b < 4; ++b) {
    float m = 0;
    for (int64_t i = b * 256; i < std::min<int64_t>(num_blocks, (b + 1) * 256); ++i) {
      m = std::max(m, std::fabs(absmax[i] - offset));
    }
    EXPECT_EQ(absmax2[b], m);
  }
}

TEST(Nf4DoubleQuant, ConstantAbsmaxDecodesToTheOffset) {
  std::vector<float> absmax(300, 0.03125f);
  std::vector<uint8_t> q(300);
  std::vector<float> absmax2(2);
  float offset = 0;
  ASSERT_TRUE(DoubleQuantizeAbsmax(absmax.data(), 300, q.data(), absmax2.data(), &offset).ok());
  EXPECT_EQ(offset, 0.03125f);
  EXPECT_EQ(absmax2[0], 0.0f);
  std::vector<float> back(300);
  ASSERT_TRUE(DequantizeAbsmax(q.data(), absmax2.data(), offset, 300, back.data()).ok());
  for (float b : back) EXPECT_EQ(b, 0.03125f);
}

TEST(Nf4DoubleQuant, RejectsEmptyInput) {
  uint8_t q;
  float a2, off;
  const Status s = DoubleQuantizeAbsmax(&a2, 0, &q, &a2, &off);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("num_blocks (0)"), std::string::npos) << s.message();
}

TEST(Nf4TorchMean, PlanFollowsTorchReduceConfig) {
  // Hand-derived from Reduce.cuh's setReduceConfig for a 1-D fp32 mean on a
  // 132-SM, 2048-thread/SM GPU.
  TorchMeanPlan p = PlanTorchMean(100, {});
  EXPECT_FALSE(p.vectorized);
  EXPECT_EQ(p.block_width, 64);
  EXPECT_EQ(p.ctas, 1);
  p = PlanTorchMean(128, {});  // newer torch vectorizes from 128 elements on
  EXPECT_TRUE(p.vectorized);
  EXPECT_EQ(p.block_width, 32);
  TorchReduceDevice older;
  older.min_vectorized_inputs = 129;
  older.warp_offsets_descending = false;
  p = PlanTorchMean(128, older);
  EXPECT_FALSE(p.vectorized);
  EXPECT_EQ(p.block_width, 128);
  EXPECT_FALSE(p.warp_offsets_descending);
  p = PlanTorchMean(8450, {});  // 4160 x 130 weight
  EXPECT_TRUE(p.vectorized);
  EXPECT_EQ(p.block_width, 512);  // 8450 / 4 = 2112 vectors, capped at 512 threads
  EXPECT_EQ(p.ctas, 1);           // 17 values a thread: below the 256 needed to split
  p = PlanTorchMean(8192LL * 28672 / 64, {});  // 70B MLP weight: 3670016 blocks
  EXPECT_EQ(p.block_width, 512);
  // values/thread 7168: min(target 132 * 4 = 528, ceil(7168 / 16) = 448) = 448.
  EXPECT_EQ(p.ctas, 448);
  EXPECT_EQ(p.step, 512 * 448);
  TorchReduceDevice a100;
  a100.num_sms = 108;
  p = PlanTorchMean(8192LL * 28672 / 64, a100);  // an A100 splits differently
  EXPECT_EQ(p.ctas, 432);
  EXPECT_EQ(PlanTorchMean(11, {}).factor, 1.0f / 11.0f);
}

TEST(Nf4TorchMean, MultipliesByTheFp32ReciprocalOfN) {
  // torch's MeanOps computes sum * (1.0f / n), not sum / n. These are the
  // absmax values of golden case 4 (bf16, so every summation order is
  // exact), where the two differ in the last bit.
  const std::vector<float> x = {0.058349609375f, 0.044677734375f, 0.058349609375f,
                                0.03759765625f,  0.06982421875f,  0.061279296875f,
                                0.05908203125f,  0.061767578125f, 0.04052734375f,
                                0.050048828125f, 0.05419921875f};
  float sum = 0;
  for (float v : x) sum += v;
  ASSERT_NE(sum * (1.0f / 11.0f), sum / 11.0f);
  EXPECT_EQ(TorchMeanF32(x.data(), 11), sum * (1.0f / 11.0f));
  EXPECT_EQ(TorchMeanF32(x.data(), 11), 0.054154831916093826f);
}

// torch.mean results recorded on an H200 with torch 2.11 by
// torch_mean_reference.py (see its docstring): fp32 vectors of 1..2049
// elements, across every change of torch's launch configuration in that
// range (scalar vs 4-wide loads, 1 to 512 threads, shared-memory halving).
// Longer vectors, where torch splits across CTAs, are checked on the GPU
// host by nf4_cuda_test against freshly recorded results.
TEST(Nf4TorchMean, MatchesTorchRecordedOnH200) {
  const std::string path = std::string(FTUNE_KERNELS_TESTDATA_DIR) + "/torch_mean_h200.bin";
  std::ifstream in(path, std::ios::binary);
  ASSERT_TRUE(in) << "cannot open " << path;
  TorchReduceDevice older;  // the schedule of older torch releases
  older.warp_offsets_descending = false;
  older.min_vectorized_inputs = 129;
  int records = 0, older_mismatches = 0;
  int64_t n;
  while (in.read(reinterpret_cast<char*>(&n), sizeof(n))) {
    float want;
    in.read(reinterpret_cast<char*>(&want), sizeof(want));
    std::vector<float> x(n);
    in.read(reinterpret_cast<char*>(x.data()), n * sizeof(float));
    ASSERT_TRUE(in) << "truncated record " << records << " in " << path;
    ++records;
    const float got = TorchMeanF32(x.data(), n);
    EXPECT_EQ(std::memcmp(&got, &want, 4), 0) << "n=" << n << ": " << got << " vs torch " << want;
    const float old = TorchMeanF32(x.data(), n, older);
    older_mismatches += std::memcmp(&old, &want, 4) != 0;
  }
  EXPECT_EQ(records, 66);
  // The data tells the schedules apart, so the check above means something.
  EXPECT_GT(older_mismatches, 10);
}

TEST(Nf4TorchMean, SmallIntegersSumExactlyInAnyOrder) {
  for (int64_t n : {1, 3, 64, 129, 1000, 70000, 300000, 1 << 20}) {
    std::vector<float> x(n);
    double sum = 0;
    for (int64_t i = 0; i < n; ++i) {
      x[i] = static_cast<float>(i % 7);
      sum += x[i];
    }
    // All partial sums stay below 2^24, so every order gives the same sum.
    EXPECT_EQ(TorchMeanF32(x.data(), n), static_cast<float>(sum) * (1.0f / n)) << n;
  }
}

TEST(Nf4TorchMean, OrderMattersForLargeInputs) {
  // Not a property of torch, a guard on the emulation: with fp32 values of
  // mixed magnitude the schedule changes the result, so a plain serial sum
  // would not be a faithful stand-in (and the per-device split shows).
  const int64_t n = 1 << 21;
  std::vector<float> x = Normal(n, 5, 1.0f);
  for (float& v : x) v = std::fabs(v) * 1000.0f + 0.001f;
  float serial = 0;
  for (float v : x) serial += v;
  TorchReduceDevice a100;
  a100.num_sms = 108;
  const float torch_h100 = TorchMeanF32(x.data(), n);
  const float torch_a100 = TorchMeanF32(x.data(), n, a100);
  EXPECT_NE(torch_h100, serial * (1.0f / n));
  double exact = 0;
  for (float v : x) exact += v;
  EXPECT_NEAR(torch_h100, exact / n, 1e-5 * exact / n);
  EXPECT_NEAR(torch_a100, exact / n, 1e-5 * exact / n);
}

}  // namespace
}  // namespace ftune::kernels
