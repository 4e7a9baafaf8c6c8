// The fused CUDA kernels (decoder layer and loss) against their CPU references
// (kernels/fused.h) on random bf16 data, with row widths and pointers that
// take the vectorized path and ones that do not. RoPE must agree bit for
// bit; SwiGLU (exp may differ in its last fp32 bit) to one bf16 step on a
// small share of values; RMSNorm (its row sums add in another order) on a
// small share, by little.
// Skipped with a message where no CUDA device is present.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "kernels/fused.h"
#include "kernels/fused_cuda.h"
#include "kernels/nf4_math.h"
#include "tests/kernels/cuda_test_util.h"

namespace ftune::kernels {
namespace {

std::vector<uint16_t> RandomBf16(size_t n, float scale, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = math::FloatToBf16(d(gen));
  return v;
}

// Values differing at all, and by more than one bf16 step (adjacent bit
// patterns of the same sign).
struct Diff {
  int64_t differ = 0, beyond_one_step = 0;
};
Diff Compare(const std::vector<uint16_t>& a, const std::vector<uint16_t>& b) {
  Diff d;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i] == b[i]) continue;
    ++d.differ;
    const int step = std::abs(static_cast<int>(a[i]) - static_cast<int>(b[i]));
    if (step > 1 || ((a[i] ^ b[i]) & 0x8000u)) ++d.beyond_one_step;
  }
  return d;
}

class FusedCudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
      GTEST_SKIP() << "no CUDA device: fused kernel tests skipped (run them on the GPU host)";
    }
  }
};

TEST_F(FusedCudaTest, RopeIsBitIdentical) {
  for (const auto& [tokens, heads, hd] : {std::tuple{257, 8, 128}, {64, 3, 64}, {5, 1, 6}}) {
    const size_t n = static_cast<size_t>(tokens) * heads * hd;
    const auto x = RandomBf16(n, 1.0f, 1);
    std::vector<uint16_t> cos(tokens * hd), sin(tokens * hd);
    for (int t = 0; t < tokens; ++t) {
      for (int i = 0; i < hd; ++i) {
        const float a = t * std::pow(10000.0f, -2.0f * (i % (hd / 2)) / hd);
        cos[t * hd + i] = math::FloatToBf16(std::cos(a));
        sin[t * hd + i] = math::FloatToBf16(std::sin(a));
      }
    }
    for (bool backward : {false, true}) {
      std::vector<uint16_t> want(n);
      ASSERT_OK(Rope(x.data(), cos.data(), sin.data(), tokens, heads, hd, backward, want.data()));
      DeviceArray<uint16_t> dx(x), dc(cos), ds(sin), dy(n);
      ASSERT_TRUE(dx.ok() && dc.ok() && ds.ok() && dy.ok());
      ASSERT_OK(RopeCuda(dx.get(), dc.get(), ds.get(), tokens, heads, hd, backward, dy.get(), nullptr));
      ASSERT_CUDA(cudaDeviceSynchronize());
      const Diff d = Compare(dy.Download(), want);
      EXPECT_EQ(d.differ, 0) << tokens << "x" << heads << "x" << hd << " backward=" << backward;
    }
  }
}

TEST_F(FusedCudaTest, SwigluAgreesWithTheReference) {
  for (const auto& [n, shift] : {std::pair{size_t{1} << 20, 0}, {size_t{100003}, 1}}) {
    const auto g = RandomBf16(n, 3.0f, 2), u = RandomBf16(n, 1.0f, 3), dy = RandomBf16(n, 0.1f, 4);
    std::vector<uint16_t> y(n), dg(n), du(n);
    ASSERT_OK(SwigluForward(g.data(), u.data(), n, y.data()));
    ASSERT_OK(SwigluBackward(dy.data(), g.data(), u.data(), n, dg.data(), du.data()));
    DeviceArray<uint16_t> G(g, shift), U(u, shift), DY(dy, shift), Y(n, shift), DG(n, shift),
        DU(n, shift);
    ASSERT_OK(SwigluForwardCuda(G.get(), U.get(), n, Y.get(), nullptr));
    ASSERT_OK(SwigluBackwardCuda(DY.get(), G.get(), U.get(), n, DG.get(), DU.get(), nullptr));
    ASSERT_CUDA(cudaDeviceSynchronize());
    for (const auto& [name, got, want] : {std::tuple{"y", Y.Download(), y}, {"dg", DG.Download(), dg},
                                          {"du", DU.Download(), du}}) {
      const Diff d = Compare(got, want);
      std::printf("FUSED-CUDA swiglu n=%zu %s: %lld of %zu differ, %lld by more than one step\n", n,
                  name, static_cast<long long>(d.differ), n, static_cast<long long>(d.beyond_one_step));
      EXPECT_EQ(d.beyond_one_step, 0) << name;
      EXPECT_LT(d.differ, static_cast<int64_t>(n / 1000) + 1) << name;
    }
  }
}

// Gate and up as column ranges of one packed buffer (a fused GEMM's
// output), the gradients written into another: the vector path (columns
// and strides multiples of 8) and the scalar one.
TEST_F(FusedCudaTest, SwigluRowsAgreesWithTheReference) {
  for (const auto& [rows, cols, extra] : {std::tuple{int64_t{300}, int64_t{1024}, int64_t{16}},
                                          {int64_t{37}, int64_t{100}, int64_t{3}}}) {
    const int64_t ld = 2 * cols + extra;
    const size_t n = static_cast<size_t>(rows * ld), m = static_cast<size_t>(rows * cols);
    const auto gu = RandomBf16(n, 3.0f, 12), dy = RandomBf16(m, 0.1f, 13);
    const auto fill = RandomBf16(n, 1.0f, 14);  // what the gradient buffer held before
    const SwigluRows r{rows, cols, ld, cols, ld};
    std::vector<uint16_t> y(m), d = fill;
    ASSERT_OK(SwigluForwardRows(gu.data(), gu.data() + cols, r, y.data()));
    ASSERT_OK(SwigluBackwardRows(dy.data(), gu.data(), gu.data() + cols, r, d.data(),
                                 d.data() + cols));
    DeviceArray<uint16_t> GU(gu, 0), DY(dy, 0), Y(m, 0), D(fill, 0);
    ASSERT_OK(SwigluForwardRowsCuda(GU.get(), GU.get() + cols, r, Y.get(), nullptr));
    ASSERT_OK(SwigluBackwardRowsCuda(DY.get(), GU.get(), GU.get() + cols, r, D.get(),
                                     D.get() + cols, nullptr));
    ASSERT_CUDA(cudaDeviceSynchronize());
    for (const auto& [name, got, want] : {std::tuple{"y", Y.Download(), y}, {"d", D.Download(), d}}) {
      const Diff diff = Compare(got, want);
      std::printf("FUSED-CUDA swiglu rows %lldx%lld ld %lld %s: %lld differ, %lld by more than one "
                  "step\n", static_cast<long long>(rows), static_cast<long long>(cols),
                  static_cast<long long>(ld), name, static_cast<long long>(diff.differ),
                  static_cast<long long>(diff.beyond_one_step));
      EXPECT_EQ(diff.beyond_one_step, 0) << name;
      EXPECT_LT(diff.differ, static_cast<int64_t>(got.size() / 1000) + 1) << name;
    }
    // The columns past gate and up keep what they held.
    const auto got = D.Download();
    for (int64_t row = 0; row < rows; ++row) {
      for (int64_t c = 2 * cols; c < ld; ++c) ASSERT_EQ(got[row * ld + c], fill[row * ld + c]);
    }
  }
}

TEST_F(FusedCudaTest, RmsNormAgreesWithTheReference) {
  for (const auto& [rows, h, shift] : {std::tuple{64, 4096, 0}, {33, 8192, 0}, {7, 100, 1}, {3, 4104, 0}}) {
    const size_t n = static_cast<size_t>(rows) * h;
    const auto x = RandomBf16(n, 1.0f, 5), res = RandomBf16(n, 0.5f, 6), w = RandomBf16(h, 0.2f, 7);
    const auto dy = RandomBf16(n, 0.01f, 8), dres = RandomBf16(n, 0.01f, 9);
    for (bool with_residual : {false, true}) {
      std::vector<uint16_t> sum(n), y(n), ds(n);
      std::vector<float> rstd(rows);
      ASSERT_OK(RmsNormForward(x.data(), with_residual ? res.data() : nullptr, w.data(), rows, h,
                               1e-5f, sum.data(), y.data(), rstd.data()));
      const uint16_t* s = with_residual ? sum.data() : x.data();
      ASSERT_OK(RmsNormBackward(dy.data(), s, w.data(), rstd.data(),
                                with_residual ? dres.data() : nullptr, rows, h, ds.data()));
      DeviceArray<uint16_t> X(x, shift), R(res, shift), W(w, shift), S(n, shift), Y(n, shift),
          DY(dy, shift), DR(dres, shift), DS(n, shift);
      DeviceArray<float> RS(rows);
      ASSERT_OK(RmsNormForwardCuda(X.get(), with_residual ? R.get() : nullptr, W.get(), rows, h,
                                   1e-5f, S.get(), Y.get(), RS.get(), nullptr));
      ASSERT_OK(RmsNormBackwardCuda(DY.get(), with_residual ? S.get() : X.get(), W.get(), RS.get(),
                                    with_residual ? DR.get() : nullptr, rows, h, DS.get(), nullptr));
      ASSERT_CUDA(cudaDeviceSynchronize());
      if (with_residual) EXPECT_EQ(Compare(S.Download(), sum).differ, 0) << "sum is one rounded add";
      const std::vector<float> got_rstd = RS.Download();
      for (int r = 0; r < rows; ++r) EXPECT_NEAR(got_rstd[r], rstd[r], 1e-5 * rstd[r]) << r;
      for (const auto& [name, got, want] : {std::tuple{"y", Y.Download(), y}, {"ds", DS.Download(), ds}}) {
        // A row's rstd may differ in its last fp32 bit, which flips a rare
        // rounding of x * rstd by one bf16 step; w * that may then move by
        // two, and the backward's subtraction may cancel. So: few values
        // differ, and none by more than 1% of the tensor's largest.
        const Diff d = Compare(got, want);
        std::printf("FUSED-CUDA rmsnorm %dx%d residual=%d %s: %lld of %zu differ, %lld by more than one step\n",
                    rows, h, with_residual, name, static_cast<long long>(d.differ), n,
                    static_cast<long long>(d.beyond_one_step));
        EXPECT_LT(d.differ, static_cast<int64_t>(n / 100) + 1) << name;
        float largest = 0, worst = 0;
        for (size_t i = 0; i < n; ++i) {
          largest = std::max(largest, std::abs(math::Bf16ToFloat(want[i])));
          worst = std::max(worst, std::abs(math::Bf16ToFloat(got[i]) - math::Bf16ToFloat(want[i])));
        }
        EXPECT_LE(worst, 0.01f * largest) << name;
      }
    }
  }
}

// The loss rows: Llama 3's vocabulary (vectorized) and an odd one (not),
// with the gradient written apart and over the logits. The rows' sums add
// in another order, so the loss may move by a few fp32 ulps and a rare
// gradient by one bf16 step.
TEST_F(FusedCudaTest, CrossEntropyAgreesWithTheReference) {
  for (const auto& [rows, vocab, shift] : {std::tuple{9, 128256, 0}, {5, 1001, 1}}) {
    const size_t n = static_cast<size_t>(rows) * vocab;
    const auto logits = RandomBf16(n, 3.0f, 11);
    std::vector<int64_t> targets(rows);
    for (int r = 0; r < rows; ++r) targets[r] = (r * 7919 + 13) % vocab;
    std::vector<float> loss(rows);
    std::vector<uint16_t> grad(n);
    ASSERT_OK(CrossEntropyRows(logits.data(), targets.data(), rows, vocab, loss.data(), grad.data()));
    for (bool in_place : {false, true}) {
      DeviceArray<uint16_t> X(logits, shift), G(n, shift);
      DeviceArray<int64_t> T(targets);
      DeviceArray<float> L(rows);
      ASSERT_OK(CrossEntropyRowsCuda(X.get(), T.get(), rows, vocab, L.get(),
                                     in_place ? X.get() : G.get(), nullptr));
      ASSERT_CUDA(cudaDeviceSynchronize());
      const std::vector<float> got_loss = L.Download();
      for (int r = 0; r < rows; ++r) EXPECT_NEAR(got_loss[r], loss[r], 1e-5 * std::abs(loss[r])) << r;
      const Diff d = Compare(in_place ? X.Download() : G.Download(), grad);
      std::printf("FUSED-CUDA cross-entropy %dx%d in_place=%d: %lld of %zu gradients differ, "
                  "%lld by more than one step\n",
                  rows, vocab, in_place, static_cast<long long>(d.differ), n,
                  static_cast<long long>(d.beyond_one_step));
      EXPECT_LT(d.differ, static_cast<int64_t>(n / 100) + 1);
      EXPECT_EQ(d.beyond_one_step, 0);
    }
    // Loss only: no gradient written, the logits untouched.
    DeviceArray<uint16_t> X(logits, shift);
    DeviceArray<int64_t> T(targets);
    DeviceArray<float> L(rows);
    ASSERT_OK(CrossEntropyRowsCuda(X.get(), T.get(), rows, vocab, L.get(), nullptr, nullptr));
    ASSERT_CUDA(cudaDeviceSynchronize());
    EXPECT_EQ(Compare(X.Download(), logits).differ, 0);
    EXPECT_NEAR(L.Download()[0], loss[0], 1e-5 * std::abs(loss[0]));
  }
}

TEST_F(FusedCudaTest, BadArgumentsAreNamed) {
  EXPECT_NE(RmsNormForwardCuda(nullptr, nullptr, nullptr, 1, 0, 1e-5f, nullptr, nullptr, nullptr, nullptr)
                .message()
                .find("h (0)"),
            std::string::npos);
  EXPECT_NE(RopeCuda(nullptr, nullptr, nullptr, 1, 1, 7, false, nullptr, nullptr).message().find("even"),
            std::string::npos);
  EXPECT_NE(CrossEntropyRowsCuda(nullptr, nullptr, 1, 0, nullptr, nullptr, nullptr)
                .message()
                .find("vocab must be >= 1"),
            std::string::npos);
}

}  // namespace
}  // namespace ftune::kernels
