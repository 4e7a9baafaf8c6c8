// The CUDA NF4 kernels against the CPU reference, byte for byte, on random
// data of awkward sizes and alignments, on the golden files, and (when
// torch_mean_reference.py has been run on the GPU host) against torch.mean
// itself. Skipped with a message where no CUDA device is present.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels/nf4.h"
#include "kernels/nf4_cuda.h"
#include "tests/kernels/cuda_test_util.h"
#include "tests/kernels/golden_file.h"

namespace ftune::kernels {
namespace {

template <typename T>
std::string FirstMismatch(const std::vector<T>& got, const std::vector<T>& want) {
  if (got.size() != want.size()) {
    return "size " + std::to_string(got.size()) + " != " + std::to_string(want.size());
  }
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(T)) != 0) {
      return "first difference at " + std::to_string(i) + ": got " + std::to_string(+got[i]) +
             ", want " + std::to_string(+want[i]);
    }
  }
  return "";
}

std::vector<float> WeightLike(int64_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, 0.02f);
  std::vector<float> x(n);
  for (float& v : x) v = dist(gen);
  // An all-zero block and exact extremes, when there is room.
  if (n >= 256) std::fill(x.begin() + 128, x.begin() + 192, 0.0f);
  if (n >= 10) {
    x[3] = 0.5f;
    x[4] = -0.5f;
  }
  return x;
}

class Nf4Cuda : public ::testing::Test {
 protected:
  void SetUp() override {
    int count = 0;
    const cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) {
      GTEST_SKIP() << "no CUDA device present (cudaGetDeviceCount: "
                   << (e == cudaSuccess ? "0 devices" : cudaGetErrorString(e))
                   << "); this gpu-label test runs on a GPU host";
    }
    ASSERT_CUDA(cudaStreamCreate(&stream_));
  }
  void TearDown() override {
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  // Quantizes x (fp32, or bf16 when `bf16`) on both sides and compares.
  void CheckQuantize(const std::vector<float>& x, int64_t blocksize, bool bf16, size_t shift) {
    SCOPED_TRACE("n=" + std::to_string(x.size()) + " blocksize=" + std::to_string(blocksize) +
                 (bf16 ? " bf16" : " fp32") + " shift=" + std::to_string(shift));
    const int64_t n = static_cast<int64_t>(x.size());
    const int64_t nb = Nf4NumBlocks(n, blocksize);
    std::vector<uint8_t> packed(Nf4PackedBytes(n));
    std::vector<float> absmax(nb);
    DeviceArray<uint8_t> d_packed(packed.size(), shift);
    DeviceArray<float> d_absmax(nb);
    ASSERT_TRUE(d_packed.ok() && d_absmax.ok());
    if (bf16) {
      std::vector<uint16_t> h(n);
      for (int64_t i = 0; i < n; ++i) h[i] = FloatToBf16Bits(x[i]);
      ASSERT_OK(QuantizeNf4Bf16(h.data(), n, blocksize, packed.data(), absmax.data()));
      DeviceArray<uint16_t> d_x(n, shift);
      ASSERT_CUDA(d_x.Upload(h));
      ASSERT_OK(QuantizeNf4Bf16Cuda(d_x.get(), n, blocksize, d_packed.get(), d_absmax.get(), stream_));
      ASSERT_CUDA(cudaStreamSynchronize(stream_));
    } else {
      ASSERT_OK(QuantizeNf4(x.data(), n, blocksize, packed.data(), absmax.data()));
      DeviceArray<float> d_x(n, shift);
      ASSERT_CUDA(d_x.Upload(x));
      ASSERT_OK(QuantizeNf4Cuda(d_x.get(), n, blocksize, d_packed.get(), d_absmax.get(), stream_));
      ASSERT_CUDA(cudaStreamSynchronize(stream_));
    }
    EXPECT_EQ(FirstMismatch(d_packed.Download(), packed), "");
    EXPECT_EQ(FirstMismatch(d_absmax.Download(), absmax), "");

    // Dequantize on the device from the device's own output.
    std::vector<float> deq(n);
    std::vector<uint16_t> deq16(n);
    ASSERT_OK(DequantizeNf4(packed.data(), absmax.data(), n, blocksize, deq.data()));
    ASSERT_OK(DequantizeNf4Bf16(packed.data(), absmax.data(), n, blocksize, deq16.data()));
    DeviceArray<float> d_deq(n, shift);
    DeviceArray<uint16_t> d_deq16(n, shift);
    ASSERT_OK(DequantizeNf4Cuda(d_packed.get(), d_absmax.get(), n, blocksize, d_deq.get(), stream_));
    ASSERT_OK(DequantizeNf4Bf16Cuda(d_packed.get(), d_absmax.get(), n, blocksize, d_deq16.get(),
                                    stream_));
    ASSERT_CUDA(cudaStreamSynchronize(stream_));
    EXPECT_EQ(FirstMismatch(d_deq.Download(), deq), "");
    EXPECT_EQ(FirstMismatch(d_deq16.Download(), deq16), "");
  }

  // Double-quantizes absmax on both sides, then dequantizes (absmax alone
  // and fused into the bf16 weight dequantization).
  void CheckDoubleQuant(const std::vector<float>& absmax, const TorchReduceDevice& device) {
    const int64_t nb = static_cast<int64_t>(absmax.size());
    SCOPED_TRACE("num_blocks=" + std::to_string(nb) + " sms=" + std::to_string(device.num_sms));
    const int64_t nn = Nf4NumNestedBlocks(nb);
    std::vector<uint8_t> q(nb);
    std::vector<float> absmax2(nn);
    float offset = 0;
    ASSERT_OK(DoubleQuantizeAbsmax(absmax.data(), nb, q.data(), absmax2.data(), &offset, device));
    DeviceArray<float> d_absmax(nb), d_absmax2(nn), d_offset(1), d_back(nb);
    DeviceArray<uint8_t> d_q(nb);
    ASSERT_CUDA(d_absmax.Upload(absmax));
    ASSERT_OK(DoubleQuantizeAbsmaxCuda(d_absmax.get(), nb, d_q.get(), d_absmax2.get(),
                                       d_offset.get(), stream_, device));
    ASSERT_OK(DequantizeAbsmaxCuda(d_q.get(), d_absmax2.get(), d_offset.get(), nb, d_back.get(),
                                   stream_));
    ASSERT_CUDA(cudaStreamSynchronize(stream_));
    EXPECT_EQ(FirstMismatch(d_offset.Download(), std::vector<float>{offset}), "");
    EXPECT_EQ(FirstMismatch(d_q.Download(), q), "");
    EXPECT_EQ(FirstMismatch(d_absmax2.Download(), absmax2), "");
    std::vector<float> back(nb);
    ASSERT_OK(DequantizeAbsmax(q.data(), absmax2.data(), offset, nb, back.data()));
    EXPECT_EQ(FirstMismatch(d_back.Download(), back), "");

    // Fused nested dequantization of a weight whose codes are arbitrary.
    const int64_t n = nb * 64 - 3;  // odd, partial last block
    std::mt19937 gen(static_cast<uint32_t>(nb));
    std::vector<uint8_t> packed(Nf4PackedBytes(n));
    for (uint8_t& p : packed) p = static_cast<uint8_t>(gen());
    std::vector<uint16_t> want(n);
    ASSERT_OK(DequantizeNf4Bf16(packed.data(), back.data(), n, 64, want.data()));
    DeviceArray<uint8_t> d_packed(packed.size());
    DeviceArray<uint16_t> d_out(n);
    ASSERT_CUDA(d_packed.Upload(packed));
    ASSERT_OK(DequantizeNf4Bf16NestedCuda(d_packed.get(), d_q.get(), d_absmax2.get(),
                                          d_offset.get(), n, 64, d_out.get(), stream_));
    ASSERT_CUDA(cudaStreamSynchronize(stream_));
    EXPECT_EQ(FirstMismatch(d_out.Download(), want), "");
  }

  cudaStream_t stream_ = nullptr;
};

TEST_F(Nf4Cuda, QuantizeAndDequantizeMatchCpuForEveryBlocksize) {
  for (int64_t blocksize : {64, 128, 256, 512, 1024, 2048, 4096}) {
    for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{64}, 3 * blocksize + 5, int64_t{100003}}) {
      const std::vector<float> x = WeightLike(n, static_cast<uint32_t>(n + blocksize));
      for (bool bf16 : {true, false}) CheckQuantize(x, blocksize, bf16, 0);
    }
  }
}

TEST_F(Nf4Cuda, MisalignedPointersTakeTheScalarPathWithTheSameResult) {
  const std::vector<float> x = WeightLike(10000 + 6, 3);
  for (size_t shift : {1, 2, 3}) {
    CheckQuantize(x, 64, true, shift);
    CheckQuantize(x, 64, false, shift);
  }
}

TEST_F(Nf4Cuda, LargeWeightMatchesCpu) {
  // 4 Mi elements: many CTAs, so grid indexing is exercised.
  const std::vector<float> x = WeightLike(int64_t{1} << 22, 9);
  CheckQuantize(x, 64, true, 0);
}

TEST_F(Nf4Cuda, SpecialValuesMatchCpu) {
  std::vector<float> x = WeightLike(4096, 4);
  x[70] = std::numeric_limits<float>::quiet_NaN();
  x[200] = std::numeric_limits<float>::infinity();
  x[300] = -std::numeric_limits<float>::infinity();
  x[400] = std::numeric_limits<float>::denorm_min();
  x[520] = 1e-40f;  // a block whose absmax is subnormal
  for (int i = 513; i < 576; ++i) {
    if (i != 520) x[i] = 0.0f;
  }
  CheckQuantize(x, 64, false, 0);
  CheckQuantize(x, 64, true, 0);
}

TEST_F(Nf4Cuda, DoubleQuantizationMatchesCpu) {
  // Small (one CTA, scalar loads), vectorized single-CTA, and sizes where
  // torch splits the mean across CTAs, up to the 70B MLP weight.
  for (int64_t nb : {int64_t{1}, int64_t{11}, int64_t{128}, int64_t{129}, int64_t{8450},
                     int64_t{131072}, int64_t{300001}, int64_t{3670016}}) {
    std::mt19937 gen(static_cast<uint32_t>(nb));
    std::uniform_real_distribution<float> dist(0.01f, 0.2f);
    std::vector<float> absmax(nb);
    // Arbitrary fp32 values: the summation order shows in the last bits.
    for (float& a : absmax) a = dist(gen);
    CheckDoubleQuant(absmax, {});
    if (nb >= 131072) CheckDoubleQuant(absmax, {108, 2048});
  }
}

TEST_F(Nf4Cuda, RejectsBadArgumentsWithoutLaunching) {
  DeviceArray<float> x(64), absmax(1);
  DeviceArray<uint8_t> packed(32);
  const Status s = QuantizeNf4Cuda(x.get(), 64, 96, packed.get(), absmax.get(), stream_);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("96"), std::string::npos) << s.message();
  EXPECT_FALSE(QuantizeNf4Cuda(nullptr, 64, 64, packed.get(), absmax.get(), stream_).ok());
  EXPECT_FALSE(DoubleQuantizeAbsmaxCuda(absmax.get(), 0, packed.get(), x.get(), x.get(), stream_).ok());
}

TEST_F(Nf4Cuda, GoldenFilesReproducedOnTheDevice) {
  const std::string dir = testing::GoldenNf4Dir();
  ASSERT_TRUE(std::filesystem::is_directory(dir)) << "golden directory " << dir << " is missing";
  int cases = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    if (entry.path().extension() != ".safetensors") continue;
    ++cases;
    SCOPED_TRACE(entry.path().string());
    testing::GoldenFile f;
    std::string error;
    ASSERT_TRUE(f.Load(entry.path().string(), &error)) << error;
    const std::vector<uint16_t> w = f.Find("weight")->As<uint16_t>();
    const int64_t n = static_cast<int64_t>(w.size());
    const int64_t nb = Nf4NumBlocks(n, 64);
    const int64_t nn = Nf4NumNestedBlocks(nb);
    DeviceArray<uint16_t> d_w(n), d_deq(n);
    DeviceArray<uint8_t> d_packed(Nf4PackedBytes(n)), d_q(nb);
    DeviceArray<float> d_absmax(nb), d_absmax2(nn), d_offset(1);
    ASSERT_CUDA(d_w.Upload(w));
    ASSERT_OK(QuantizeNf4Bf16Cuda(d_w.get(), n, 64, d_packed.get(), d_absmax.get(), stream_));
    ASSERT_OK(DoubleQuantizeAbsmaxCuda(d_absmax.get(), nb, d_q.get(), d_absmax2.get(),
                                       d_offset.get(), stream_));
    ASSERT_OK(DequantizeNf4Bf16NestedCuda(d_packed.get(), d_q.get(), d_absmax2.get(),
                                          d_offset.get(), n, 64, d_deq.get(), stream_));
    ASSERT_CUDA(cudaStreamSynchronize(stream_));
    EXPECT_EQ(FirstMismatch(d_packed.Download(), f.Find("packed")->As<uint8_t>()), "");
    EXPECT_EQ(FirstMismatch(d_absmax.Download(), f.Find("absmax_plain")->As<float>()), "");
    EXPECT_EQ(FirstMismatch(d_q.Download(), f.Find("absmax")->As<uint8_t>()), "");
    EXPECT_EQ(FirstMismatch(d_absmax2.Download(), f.Find("nested_absmax")->As<float>()), "");
    EXPECT_EQ(FirstMismatch(d_offset.Download(), f.Find("offset")->As<float>()), "");
    std::vector<uint16_t> want;
    for (float v : f.Find("dequantized")->As<float>()) want.push_back(FloatToBf16Bits(v));
    EXPECT_EQ(FirstMismatch(d_deq.Download(), want), "");
  }
  EXPECT_GT(cases, 0);
}

// The file written by tests/kernels/torch_mean_reference.py: records of
// (int64 n, float32 torch_mean, float32 data[n]).
TEST_F(Nf4Cuda, TorchMeanEmulationMatchesTorchOnThisDevice) {
  const char* path = std::getenv("FTUNE_TORCH_MEAN_REFERENCE");
  if (path == nullptr) {
    GTEST_SKIP() << "FTUNE_TORCH_MEAN_REFERENCE not set: run tests/kernels/torch_mean_reference.py "
                    "on this GPU host and point the variable at its output";
  }
  std::ifstream in(path, std::ios::binary);
  ASSERT_TRUE(in) << "cannot open " << path;
  cudaDeviceProp prop;
  ASSERT_CUDA(cudaGetDeviceProperties(&prop, 0));
  TorchReduceDevice device;
  device.num_sms = prop.multiProcessorCount;
  device.max_threads_per_sm = prop.maxThreadsPerMultiProcessor;
  // Which of the schedules torch has used agree with this torch, per record:
  // a diagnostic for when torch changes its reduction again.
  int variant_hits[2][2] = {{0, 0}, {0, 0}};
  int records = 0;
  int64_t n;
  while (in.read(reinterpret_cast<char*>(&n), sizeof(n))) {
    float want;
    in.read(reinterpret_cast<char*>(&want), sizeof(want));
    std::vector<float> x(n);
    in.read(reinterpret_cast<char*>(x.data()), n * sizeof(float));
    ASSERT_TRUE(in) << "truncated record " << records << " in " << path;
    ++records;
    for (int descending = 0; descending < 2; ++descending) {
      for (int min_vec = 0; min_vec < 2; ++min_vec) {
        TorchReduceDevice v = device;
        v.warp_offsets_descending = descending == 1;
        v.min_vectorized_inputs = min_vec == 0 ? 128 : 129;
        const float got = TorchMeanF32(x.data(), n, v);
        variant_hits[descending][min_vec] += std::memcmp(&got, &want, 4) == 0;
      }
    }
    const float cpu = TorchMeanF32(x.data(), n, device);
    EXPECT_EQ(std::memcmp(&cpu, &want, 4), 0)
        << "n=" << n << ": emulation " << cpu << " vs torch " << want << " (serial/n "
        << [&] { double s = 0; for (float v : x) s += v; return s / n; }() << ")";
    // The device path computes the offset with the same schedule.
    const int64_t nn = Nf4NumNestedBlocks(n);
    DeviceArray<float> d_x(n), d_absmax2(nn), d_offset(1);
    DeviceArray<uint8_t> d_q(n);
    ASSERT_CUDA(d_x.Upload(x));
    ASSERT_OK(DoubleQuantizeAbsmaxCuda(d_x.get(), n, d_q.get(), d_absmax2.get(), d_offset.get(),
                                       stream_, device));
    ASSERT_CUDA(cudaStreamSynchronize(stream_));
    EXPECT_EQ(FirstMismatch(d_offset.Download(), std::vector<float>{want}), "") << "n=" << n;
  }
  std::printf("torch.mean schedule variants matching (of %d): descending+128 %d, descending+129 %d, "
              "ascending+128 %d, ascending+129 %d\n",
              records, variant_hits[1][0], variant_hits[1][1], variant_hits[0][0],
              variant_hits[0][1]);
  EXPECT_GT(records, 0) << path << " holds no records";
  std::printf("compared %d torch.mean results on %s (%d SMs)\n", records, prop.name,
              prop.multiProcessorCount);
}

}  // namespace
}  // namespace ftune::kernels
