// Helpers of the CUDA kernel tests: assertions on CUDA and kernel results,
// and a device array with optional slack in front.
#ifndef FTUNE_TESTS_KERNELS_CUDA_TEST_UTIL_H_
#define FTUNE_TESTS_KERNELS_CUDA_TEST_UTIL_H_

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cstddef>
#include <vector>

#define ASSERT_CUDA(call)                                                  \
  do {                                                                     \
    const cudaError_t e_ = (call);                                         \
    ASSERT_EQ(e_, cudaSuccess) << #call << ": " << cudaGetErrorString(e_); \
  } while (0)

// For a ftune::kernels::Status.
#define ASSERT_OK(expr)                                    \
  do {                                                     \
    const auto s_ = (expr);                                \
    ASSERT_TRUE(s_.ok()) << #expr << ": " << s_.message(); \
  } while (0)

namespace ftune::kernels {

// Owns a device allocation; `shift` elements of slack in front let a test
// hand the kernels a pointer that defeats their vectorized path.
template <typename T>
class DeviceArray {
 public:
  explicit DeviceArray(size_t n, size_t shift = 0) : n_(n), shift_(shift) {
    void* p = nullptr;
    if (cudaMalloc(&p, (n + shift + 1) * sizeof(T)) == cudaSuccess) base_ = static_cast<T*>(p);
  }
  // A copy of `host` on the device; ok() is false when the copy failed.
  explicit DeviceArray(const std::vector<T>& host, size_t shift = 0)
      : DeviceArray(host.size(), shift) {
    if (ok() && Upload(host) != cudaSuccess) {
      cudaFree(base_);
      base_ = nullptr;
    }
  }
  ~DeviceArray() { cudaFree(base_); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;

  T* get() const { return base_ == nullptr ? nullptr : base_ + shift_; }
  bool ok() const { return base_ != nullptr; }
  cudaError_t Upload(const std::vector<T>& host) const {
    return cudaMemcpy(get(), host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
  }
  // Empty when the copy failed.
  std::vector<T> Download() const {
    std::vector<T> host(n_);
    if (cudaMemcpy(host.data(), get(), n_ * sizeof(T), cudaMemcpyDeviceToHost) != cudaSuccess) {
      host.clear();
    }
    return host;
  }

 private:
  T* base_ = nullptr;
  size_t n_;
  size_t shift_;
};

}  // namespace ftune::kernels

#endif  // FTUNE_TESTS_KERNELS_CUDA_TEST_UTIL_H_
