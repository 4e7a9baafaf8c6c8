// nf4_bench: throughput of NF4 quantize / dequantize on a bf16 weight of the
// Llama 3 70B MLP shape (8192 x 28672 by default), CPU reference and, when
// built with CUDA, the kernels. GB/s counts bytes read plus bytes written
// once each (bf16 in, packed codes + fp32 absmax out, and the reverse), the
// minimum traffic, so figures compare with the device's copy bandwidth,
// which is printed alongside. The CUDA results are checked against the CPU
// ones before anything is timed.
//
//   nf4_bench [--rows R] [--cols C] [--iters N] [--no-cpu]
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/nf4.h"
#if FTUNE_NF4_BENCH_CUDA
#include <cuda_runtime_api.h>

#include "kernels/nf4_cuda.h"
#endif

namespace {

using ftune::kernels::Status;

void Check(const Status& s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "nf4_bench: %s: %s\n", what, s.message().c_str());
    std::exit(1);
  }
}

// Weight-like bf16 values, fast: Irwin-Hall (sum of 4 uniforms) from a
// xorshift generator; the distribution only needs to exercise all codes.
std::vector<uint16_t> RandomBf16(int64_t n) {
  std::vector<uint16_t> w(n);
  uint64_t s = 0x9e3779b97f4a7c15ull;
  for (int64_t i = 0; i < n; ++i) {
    float sum = 0;
    for (int k = 0; k < 4; ++k) {
      s ^= s << 13;
      s ^= s >> 7;
      s ^= s << 17;
      sum += static_cast<float>(s >> 40) * (1.0f / 16777216.0f);
    }
    w[i] = ftune::kernels::FloatToBf16Bits((sum - 2.0f) * 0.035f);
  }
  return w;
}

double Seconds(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

void Report(const char* side, const char* what, double seconds, double bytes) {
  std::printf("%-5s %-34s %9.3f ms  %8.1f GB/s\n", side, what, seconds * 1e3, bytes / seconds / 1e9);
}

#if FTUNE_NF4_BENCH_CUDA
void CheckCuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "nf4_bench: %s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

template <typename T>
T* DeviceAlloc(int64_t n) {
  void* p = nullptr;
  CheckCuda(cudaMalloc(&p, n * sizeof(T)), "cudaMalloc");
  return static_cast<T*>(p);
}

template <typename T>
void ExpectSame(const T* device, const std::vector<T>& host, const char* what) {
  std::vector<T> got(host.size());
  CheckCuda(cudaMemcpy(got.data(), device, host.size() * sizeof(T), cudaMemcpyDeviceToHost),
            "cudaMemcpy");
  if (std::memcmp(got.data(), host.data(), host.size() * sizeof(T)) != 0) {
    std::fprintf(stderr, "nf4_bench: CUDA %s differs from the CPU reference\n", what);
    std::exit(1);
  }
}

// Mean time of `iters` runs of `body` after two warm-up runs, by CUDA events.
template <typename F>
double TimeCuda(cudaStream_t stream, int iters, F body) {
  body();
  body();
  cudaEvent_t start, stop;
  CheckCuda(cudaEventCreate(&start), "cudaEventCreate");
  CheckCuda(cudaEventCreate(&stop), "cudaEventCreate");
  CheckCuda(cudaEventRecord(start, stream), "cudaEventRecord");
  for (int i = 0; i < iters; ++i) body();
  CheckCuda(cudaEventRecord(stop, stream), "cudaEventRecord");
  CheckCuda(cudaEventSynchronize(stop), "cudaEventSynchronize");
  float ms = 0;
  CheckCuda(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return ms / 1e3 / iters;
}
#endif

}  // namespace

int main(int argc, char** argv) {
  int64_t rows = 8192, cols = 28672;
  int iters = 20;
  bool run_cpu = true;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--rows" && i + 1 < argc) rows = std::atoll(argv[++i]);
    else if (a == "--cols" && i + 1 < argc) cols = std::atoll(argv[++i]);
    else if (a == "--iters" && i + 1 < argc) iters = std::atoi(argv[++i]);
    else if (a == "--no-cpu") run_cpu = false;
    else {
      std::fprintf(stderr, "usage: %s [--rows R] [--cols C] [--iters N] [--no-cpu]\n", argv[0]);
      return 2;
    }
  }
  using namespace ftune::kernels;
  const int64_t n = rows * cols;
  const int64_t nb = Nf4NumBlocks(n, 64);
  const int64_t nn = Nf4NumNestedBlocks(nb);
  const double bf16_bytes = 2.0 * n;
  const double nf4_bytes = Nf4PackedBytes(n) + 4.0 * nb;               // packed + fp32 absmax
  const double nested_bytes = Nf4PackedBytes(n) + 1.0 * nb + 4.0 * nn;  // packed + uint8 + absmax2
  std::printf("NF4 blocksize 64, bf16 weight %lld x %lld (%.1f MiB)\n", static_cast<long long>(rows),
              static_cast<long long>(cols), bf16_bytes / (1 << 20));

  const std::vector<uint16_t> w = RandomBf16(n);
  std::vector<uint8_t> packed(Nf4PackedBytes(n));
  std::vector<float> absmax(nb);
  std::vector<uint8_t> qabsmax(nb);
  std::vector<float> absmax2(nn);
  float offset = 0;
  std::vector<uint16_t> deq(n);
  // The CPU reference is needed to check the CUDA results even with --no-cpu.
  auto t0 = std::chrono::steady_clock::now();
  Check(QuantizeNf4Bf16(w.data(), n, 64, packed.data(), absmax.data()), "QuantizeNf4Bf16");
  auto t1 = std::chrono::steady_clock::now();
  Check(DoubleQuantizeAbsmax(absmax.data(), nb, qabsmax.data(), absmax2.data(), &offset),
        "DoubleQuantizeAbsmax");
  auto t2 = std::chrono::steady_clock::now();
  Check(DequantizeNf4Bf16(packed.data(), absmax.data(), n, 64, deq.data()), "DequantizeNf4Bf16");
  auto t3 = std::chrono::steady_clock::now();
  if (run_cpu) {
    std::printf("CPU: one thread, one run each\n");
    Report("cpu", "quantize bf16 -> nf4", Seconds(t0, t1), bf16_bytes + nf4_bytes);
    Report("cpu", "double-quantize absmax", Seconds(t1, t2), 4.0 * nb + nb + 4.0 * nn);
    Report("cpu", "dequantize nf4 -> bf16", Seconds(t2, t3), nf4_bytes + bf16_bytes);
  }

#if FTUNE_NF4_BENCH_CUDA
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: CUDA figures skipped\n");
    return 0;
  }
  cudaDeviceProp prop;
  CheckCuda(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  std::printf("CUDA: %s, %d SMs, mean of %d runs\n", prop.name, prop.multiProcessorCount, iters);
  cudaStream_t stream;
  CheckCuda(cudaStreamCreate(&stream), "cudaStreamCreate");
  uint16_t* d_w = DeviceAlloc<uint16_t>(n);
  uint16_t* d_out = DeviceAlloc<uint16_t>(n);
  uint8_t* d_packed = DeviceAlloc<uint8_t>(Nf4PackedBytes(n));
  float* d_absmax = DeviceAlloc<float>(nb);
  uint8_t* d_q = DeviceAlloc<uint8_t>(nb);
  float* d_absmax2 = DeviceAlloc<float>(nn);
  float* d_offset = DeviceAlloc<float>(1);
  CheckCuda(cudaMemcpy(d_w, w.data(), n * 2, cudaMemcpyHostToDevice), "cudaMemcpy");

  auto quantize = [&] {
    Check(QuantizeNf4Bf16Cuda(d_w, n, 64, d_packed, d_absmax, stream), "QuantizeNf4Bf16Cuda");
  };
  auto double_quantize = [&] {
    Check(DoubleQuantizeAbsmaxCuda(d_absmax, nb, d_q, d_absmax2, d_offset, stream),
          "DoubleQuantizeAbsmaxCuda");
  };
  auto dequantize = [&] {
    Check(DequantizeNf4Bf16Cuda(d_packed, d_absmax, n, 64, d_out, stream), "DequantizeNf4Bf16Cuda");
  };
  auto dequantize_nested = [&] {
    Check(DequantizeNf4Bf16NestedCuda(d_packed, d_q, d_absmax2, d_offset, n, 64, d_out, stream),
          "DequantizeNf4Bf16NestedCuda");
  };
  quantize();
  double_quantize();
  dequantize();
  CheckCuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  ExpectSame(d_packed, packed, "packed codes");
  ExpectSame(d_absmax, absmax, "absmax");
  ExpectSame(d_q, qabsmax, "double-quantized absmax");
  ExpectSame(d_absmax2, absmax2, "absmax2");
  ExpectSame(d_offset, std::vector<float>{offset}, "offset");
  ExpectSame(d_out, deq, "bf16 dequantization");
  std::printf("CUDA results identical to the CPU reference\n");

  const double copy = TimeCuda(stream, iters, [&] {
    CheckCuda(cudaMemcpyAsync(d_out, d_w, n * 2, cudaMemcpyDeviceToDevice, stream), "cudaMemcpyAsync");
  });
  Report("cuda", "device-to-device copy (reference)", copy, 2 * bf16_bytes);
  Report("cuda", "quantize bf16 -> nf4", TimeCuda(stream, iters, quantize), bf16_bytes + nf4_bytes);
  Report("cuda", "double-quantize absmax", TimeCuda(stream, iters, double_quantize),
         4.0 * nb + nb + 4.0 * nn);
  Report("cuda", "quantize + double-quantize",
         TimeCuda(stream, iters, [&] { quantize(); double_quantize(); }), bf16_bytes + nested_bytes);
  Report("cuda", "dequantize nf4 -> bf16", TimeCuda(stream, iters, dequantize),
         nf4_bytes + bf16_bytes);
  Report("cuda", "dequantize nested nf4 -> bf16", TimeCuda(stream, iters, dequantize_nested),
         nested_bytes + bf16_bytes);
  CheckCuda(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  for (void* p : {static_cast<void*>(d_w), static_cast<void*>(d_out), static_cast<void*>(d_packed),
                  static_cast<void*>(d_absmax), static_cast<void*>(d_q),
                  static_cast<void*>(d_absmax2), static_cast<void*>(d_offset)}) {
    cudaFree(p);
  }
  cudaStreamDestroy(stream);
#endif
  return 0;
}
