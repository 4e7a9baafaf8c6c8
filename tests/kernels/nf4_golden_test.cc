// The CPU NF4 reference against what bitsandbytes' CUDA kernels produced
// (tests/golden/nf4, made by make_golden.py there; see its README): every stored byte must be
// reproduced exactly, the dequantized weight to fp32 rounding.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include "kernels/nf4.h"
#include "tests/kernels/golden_file.h"

namespace ftune::kernels {
namespace {

using testing::GoldenFile;
using testing::GoldenNf4Dir;
using testing::GoldenTensor;

// The cases this suite covers; GoldenDir.EveryCaseIsCovered fails when the
// generator adds one that is not listed here.
const char* const kCases[] = {"nf4_case0", "nf4_case1", "nf4_case3", "nf4_case4"};

uint32_t Bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

// Index of the first differing element, or -1; with the count of differences.
template <typename T>
std::string FirstMismatch(const std::vector<T>& got, const std::vector<T>& want) {
  if (got.size() != want.size()) {
    return "size " + std::to_string(got.size()) + " != " + std::to_string(want.size());
  }
  int64_t first = -1, count = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(T)) != 0) {
      if (first < 0) first = static_cast<int64_t>(i);
      ++count;
    }
  }
  if (count == 0) return "";
  return std::to_string(count) + " differences, first at " + std::to_string(first) + ": got " +
         std::to_string(+got[first]) + ", want " + std::to_string(+want[first]);
}

class Nf4Golden : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    const std::string path = GoldenNf4Dir() + "/" + GetParam() + ".safetensors";
    // The golden files are part of the repository: a missing one is a
    // broken checkout, not a reason to skip.
    ASSERT_TRUE(std::filesystem::exists(path))
        << "golden file " << path << " is missing (committed under tests/golden/nf4; "
        << "regenerate with tests/golden/nf4/make_golden.py on a GPU host)";
    std::string error;
    ASSERT_TRUE(file_.Load(path, &error)) << error;
    const GoldenTensor* weight = Tensor("weight");
    ASSERT_EQ(weight->dtype, "BF16");
    weight_ = weight->As<uint16_t>();
    ASSERT_EQ(file_.metadata().at("blocksize"), "64");
    ASSERT_EQ(file_.metadata().at("nested_blocksize"), "256");
    n_ = static_cast<int64_t>(weight_.size());
    num_blocks_ = Nf4NumBlocks(n_, kNf4DefaultBlocksize);
  }

  const GoldenTensor* Tensor(const std::string& name) {
    const GoldenTensor* t = file_.Find(name);
    EXPECT_NE(t, nullptr) << file_.path() << " has no tensor " << name;
    static const GoldenTensor kEmpty;
    return t == nullptr ? &kEmpty : t;
  }

  GoldenFile file_;
  std::vector<uint16_t> weight_;
  int64_t n_ = 0;
  int64_t num_blocks_ = 0;
};

TEST_P(Nf4Golden, QuantMapsAreBitsandbytesMaps) {
  const std::vector<float> quant_map = Tensor("quant_map")->As<float>();
  const std::vector<float> nf4(Nf4CodeValues().begin(), Nf4CodeValues().end());
  EXPECT_EQ(FirstMismatch(nf4, quant_map), "");
  const std::vector<float> nested_map = Tensor("nested_quant_map")->As<float>();
  const std::vector<float> dynamic(DynamicMapSigned().begin(), DynamicMapSigned().end());
  EXPECT_EQ(FirstMismatch(dynamic, nested_map), "");
}

TEST_P(Nf4Golden, PlainQuantizationMatchesByteForByte) {
  std::vector<uint8_t> packed(Nf4PackedBytes(n_));
  std::vector<float> absmax(num_blocks_);
  ASSERT_TRUE(QuantizeNf4Bf16(weight_.data(), n_, 64, packed.data(), absmax.data()).ok());
  EXPECT_EQ(FirstMismatch(packed, Tensor("packed_plain")->As<uint8_t>()), "");
  EXPECT_EQ(FirstMismatch(absmax, Tensor("absmax_plain")->As<float>()), "");
  // Compressed statistics do not change the codes.
  EXPECT_EQ(FirstMismatch(packed, Tensor("packed")->As<uint8_t>()), "");
}

TEST_P(Nf4Golden, Fp32InputGivesTheSameBytes) {
  std::vector<float> x(n_);
  for (int64_t i = 0; i < n_; ++i) x[i] = Bf16BitsToFloat(weight_[i]);
  std::vector<uint8_t> packed(Nf4PackedBytes(n_));
  std::vector<float> absmax(num_blocks_);
  ASSERT_TRUE(QuantizeNf4(x.data(), n_, 64, packed.data(), absmax.data()).ok());
  EXPECT_EQ(FirstMismatch(packed, Tensor("packed_plain")->As<uint8_t>()), "");
  EXPECT_EQ(FirstMismatch(absmax, Tensor("absmax_plain")->As<float>()), "");
}

TEST_P(Nf4Golden, DoubleQuantizationMatchesByteForByte) {
  const std::vector<float> absmax = Tensor("absmax_plain")->As<float>();
  ASSERT_EQ(static_cast<int64_t>(absmax.size()), num_blocks_);
  std::vector<uint8_t> qabsmax(num_blocks_);
  std::vector<float> absmax2(Nf4NumNestedBlocks(num_blocks_));
  float offset = 0;
  ASSERT_TRUE(DoubleQuantizeAbsmax(absmax.data(), num_blocks_, qabsmax.data(), absmax2.data(),
                                   &offset)
                  .ok());
  const std::vector<float> want_offset = Tensor("offset")->As<float>();
  ASSERT_EQ(want_offset.size(), 1u);
  EXPECT_EQ(Bits(offset), Bits(want_offset[0])) << offset << " vs " << want_offset[0];
  EXPECT_EQ(FirstMismatch(qabsmax, Tensor("absmax")->As<uint8_t>()), "");
  EXPECT_EQ(FirstMismatch(absmax2, Tensor("nested_absmax")->As<float>()), "");
}

TEST_P(Nf4Golden, DequantizedMatchesToFp32Rounding) {
  // From the stored (double-quantized) state, as bitsandbytes dequantizes.
  const std::vector<uint8_t> packed = Tensor("packed")->As<uint8_t>();
  const std::vector<uint8_t> qabsmax = Tensor("absmax")->As<uint8_t>();
  const std::vector<float> absmax2 = Tensor("nested_absmax")->As<float>();
  const float offset = Tensor("offset")->As<float>().at(0);
  const std::vector<float> want = Tensor("dequantized")->As<float>();
  ASSERT_EQ(static_cast<int64_t>(want.size()), n_);

  std::vector<float> absmax(num_blocks_);
  ASSERT_TRUE(
      DequantizeAbsmax(qabsmax.data(), absmax2.data(), offset, num_blocks_, absmax.data()).ok());
  std::vector<float> fp32(n_);
  ASSERT_TRUE(DequantizeNf4(packed.data(), absmax.data(), n_, 64, fp32.data()).ok());
  std::vector<uint16_t> bf16(n_);
  ASSERT_TRUE(DequantizeNf4Bf16(packed.data(), absmax.data(), n_, 64, bf16.data()).ok());

  // bitsandbytes dequantizes to the weight's dtype (bf16) and the golden
  // file holds that widened to fp32: the bf16 path must match bit for bit,
  // and the fp32 path must be within its one bf16 rounding of it.
  int64_t bf16_mismatch = 0, fp32_mismatch = 0;
  for (int64_t i = 0; i < n_; ++i) {
    if (Bf16BitsToFloat(bf16[i]) != want[i] || (Bits(want[i]) & 0xffffu) != 0) ++bf16_mismatch;
    if (FloatToBf16Bits(fp32[i]) != static_cast<uint16_t>(Bits(want[i]) >> 16)) ++fp32_mismatch;
  }
  EXPECT_EQ(bf16_mismatch, 0);
  EXPECT_EQ(fp32_mismatch, 0);
}

INSTANTIATE_TEST_SUITE_P(Cases, Nf4Golden, ::testing::ValuesIn(kCases),
                         [](const ::testing::TestParamInfo<const char*>& info) {
                           return std::string(info.param);
                         });

TEST(Nf4GoldenDir, EveryCaseIsCovered) {
  const std::string dir = GoldenNf4Dir();
  ASSERT_TRUE(std::filesystem::is_directory(dir)) << "golden directory " << dir << " is missing";
  const std::set<std::string> covered(std::begin(kCases), std::end(kCases));
  int found = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    if (entry.path().extension() != ".safetensors") continue;
    ++found;
    EXPECT_EQ(covered.count(entry.path().stem().string()), 1u)
        << entry.path() << " is not in kCases of " << __FILE__;
  }
  EXPECT_GT(found, 0) << "no .safetensors files in " << dir;
}

}  // namespace
}  // namespace ftune::kernels
