// CUDA kernels for NF4 quantization (see nf4_cuda.h for the contract).
//
// Design: these kernels are memory-bound, so each thread moves 8 elements
// with 16-byte loads of bf16 (two for fp32) and one 4-byte store of packed
// codes. A quantization block of B elements is B/8 consecutive threads: its
// absmax is a max over a lane group (xor shuffles, plus shared memory when
// B > 256). Max is exact in any order and every per-element step comes from
// nf4_math.h, so the result is bit-identical to the CPU reference without
// mirroring bitsandbytes' thread layout. The one order-sensitive step, the
// fp32 mean behind the double quantization's offset, does mirror torch's
// reduction schedule (PlanTorchMean) lane for lane.
#include "kernels/nf4_cuda.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "kernels/nf4_math.h"

namespace ftune::kernels {
namespace {

constexpr int kPerThread = 8;  // elements a thread quantizes / dequantizes

__constant__ float kNf4ValuesDevice[16] = {FTUNE_NF4_CODE_VALUES};
__constant__ float kNf4ThresholdsDevice[15] = {FTUNE_NF4_THRESHOLDS};

// Passed by value: the 256-entry map travels in the kernel's parameters, so
// no per-device symbol has to be initialized first.
struct DynamicMap {
  float v[256];
};

Status CudaError(const char* what, cudaError_t e) {
  return Status::Error(std::string(what) + " failed: " + cudaGetErrorName(e) + " (" +
                       cudaGetErrorString(e) + ")");
}

#define FTUNE_CUDA_RETURN_IF_ERROR(call)                   \
  do {                                                     \
    const cudaError_t ftune_err_ = (call);                 \
    if (ftune_err_ != cudaSuccess) return CudaError(#call, ftune_err_); \
  } while (0)

// Launch errors (bad configuration, no device, ...) are reported by
// cudaGetLastError right after the launch; name the kernel in the message.
#define FTUNE_CUDA_RETURN_IF_LAUNCH_ERROR(kernel_name)      \
  do {                                                     \
    const cudaError_t ftune_err_ = cudaGetLastError();      \
    if (ftune_err_ != cudaSuccess) return CudaError("launch of " kernel_name, ftune_err_); \
  } while (0)

bool Aligned(const void* p, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

int Log2(int64_t power_of_two) {
  int s = 0;
  while ((int64_t{1} << s) < power_of_two) ++s;
  return s;
}

// ---------------------------------------------------------------- loads

__device__ __forceinline__ void LoadEight(const float* x, int64_t base, int64_t n,
                                          bool vector_ok, float v[kPerThread]) {
  if (vector_ok && base + kPerThread <= n) {
    const float4 a = *reinterpret_cast<const float4*>(x + base);
    const float4 b = *reinterpret_cast<const float4*>(x + base + 4);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  } else {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) v[i] = base + i < n ? x[base + i] : 0.0f;
  }
}

__device__ __forceinline__ void LoadEight(const uint16_t* x, int64_t base, int64_t n,
                                          bool vector_ok, float v[kPerThread]) {
  if (vector_ok && base + kPerThread <= n) {
    const uint4 a = *reinterpret_cast<const uint4*>(x + base);
    const uint32_t w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      // Little endian: the lower half-word is the earlier element.
      v[2 * i] = math::BitsToFloat(w[i] << 16);
      v[2 * i + 1] = math::BitsToFloat(w[i] & 0xffff0000u);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      v[i] = base + i < n ? math::Bf16ToFloat(x[base + i]) : 0.0f;
    }
  }
}

// ------------------------------------------------------------- quantize

// kBlock: quantization block size; kThreads: CTA size (a multiple of the
// kBlock / 8 threads that share one block, so blocks never straddle CTAs).
template <typename T, int kBlock, int kThreads>
__global__ void __launch_bounds__(kThreads)
    QuantizeNf4Kernel(const T* __restrict__ x, int64_t n, uint8_t* __restrict__ packed,
                      float* __restrict__ absmax, bool vector_ok) {
  constexpr int kGroup = kBlock / kPerThread;
  constexpr int kWarpGroup = kGroup < 32 ? kGroup : 32;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t base = thread * kPerThread;
  // Shared copy of the thresholds: the code search indexes them per lane,
  // which constant memory would serialize.
  __shared__ float thresholds[15];
  if (threadIdx.x < 15) thresholds[threadIdx.x] = kNf4ThresholdsDevice[threadIdx.x];
  __syncthreads();

  float v[kPerThread];
  LoadEight(x, base, n, vector_ok, v);
  // Elements past n were loaded as 0, which leaves a max of |x| unchanged.
  float m = 0.0f;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) m = math::MaxAbs(m, v[i]);
#pragma unroll
  for (int off = 1; off < kWarpGroup; off <<= 1) {
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  }
  if constexpr (kGroup > 32) {
    __shared__ float warp_max[kThreads / 32];
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) warp_max[warp] = m;
    __syncthreads();
    constexpr int kWarpsPerGroup = kGroup / 32;
    const int first = warp / kWarpsPerGroup * kWarpsPerGroup;
#pragma unroll
    for (int w = 0; w < kWarpsPerGroup; ++w) m = fmaxf(m, warp_max[first + w]);
  }
  if (base >= n) return;  // after the collective steps above
  if (threadIdx.x % kGroup == 0) absmax[base / kBlock] = m;

  const float r = math::RcpRn(m);
  uint32_t word = 0;
#pragma unroll
  for (int i = 0; i < kPerThread / 2; ++i) {
    const uint32_t hi = math::Nf4CodeSearch(thresholds, math::MulRn(v[2 * i], r));
    const uint32_t lo = math::Nf4CodeSearch(thresholds, math::MulRn(v[2 * i + 1], r));
    word |= ((hi << 4) | lo) << (8 * i);
  }
  uint8_t* out = packed + base / 2;
  if (vector_ok && base + kPerThread <= n) {
    *reinterpret_cast<uint32_t*>(out) = word;
  } else {
    const int64_t bytes = ((n - base < kPerThread ? n - base : kPerThread) + 1) / 2;
    for (int64_t i = 0; i < bytes; ++i) out[i] = static_cast<uint8_t>(word >> (8 * i));
  }
}

template <typename T, int kBlock>
Status LaunchQuantize(const T* x, int64_t n, uint8_t* packed, float* absmax,
                      cudaStream_t stream) {
  constexpr int kGroup = kBlock / kPerThread;
  constexpr int kThreads = kGroup > 256 ? kGroup : 256;
  const int64_t threads = (n + kPerThread - 1) / kPerThread;
  const int64_t ctas = (threads + kThreads - 1) / kThreads;
  const bool vector_ok = Aligned(x, 16) && Aligned(packed, 4);
  QuantizeNf4Kernel<T, kBlock, kThreads>
      <<<static_cast<unsigned>(ctas), kThreads, 0, stream>>>(x, n, packed, absmax, vector_ok);
  FTUNE_CUDA_RETURN_IF_LAUNCH_ERROR("QuantizeNf4Kernel");
  return Status::Ok();
}

template <typename T>
Status QuantizeDispatch(const char* name, const T* x, int64_t n, int64_t blocksize,
                        uint8_t* packed, float* absmax, cudaStream_t stream) {
  if (Status s = ValidateNf4Blocksize(blocksize); !s.ok()) return s;
  if (n < 0) return Status::Error(std::string(name) + ": n (" + std::to_string(n) + ") must be >= 0");
  if (n == 0) return Status::Ok();
  if (x == nullptr || packed == nullptr || absmax == nullptr) {
    return Status::Error(std::string(name) + ": null pointer");
  }
  if ((n + kPerThread - 1) / kPerThread / 256 >= (int64_t{1} << 31)) {
    return Status::Error(std::string(name) + ": n (" + std::to_string(n) + ") too large for one launch");
  }
  switch (blocksize) {
    case 64: return LaunchQuantize<T, 64>(x, n, packed, absmax, stream);
    case 128: return LaunchQuantize<T, 128>(x, n, packed, absmax, stream);
    case 256: return LaunchQuantize<T, 256>(x, n, packed, absmax, stream);
    case 512: return LaunchQuantize<T, 512>(x, n, packed, absmax, stream);
    case 1024: return LaunchQuantize<T, 1024>(x, n, packed, absmax, stream);
    case 2048: return LaunchQuantize<T, 2048>(x, n, packed, absmax, stream);
    default: return LaunchQuantize<T, 4096>(x, n, packed, absmax, stream);
  }
}

// ----------------------------------------------------------- dequantize

template <typename Out>
__device__ __forceinline__ void StoreEight(Out* out, int64_t base, int64_t n, bool vector_ok,
                                           const float v[kPerThread]);

template <>
__device__ __forceinline__ void StoreEight<float>(float* out, int64_t base, int64_t n,
                                                  bool vector_ok, const float v[kPerThread]) {
  if (vector_ok && base + kPerThread <= n) {
    *reinterpret_cast<float4*>(out + base) = make_float4(v[0], v[1], v[2], v[3]);
    *reinterpret_cast<float4*>(out + base + 4) = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    for (int i = 0; i < kPerThread && base + i < n; ++i) out[base + i] = v[i];
  }
}

template <>
__device__ __forceinline__ void StoreEight<uint16_t>(uint16_t* out, int64_t base, int64_t n,
                                                     bool vector_ok, const float v[kPerThread]) {
  uint16_t h[kPerThread];
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) h[i] = math::FloatToBf16(v[i]);
  if (vector_ok && base + kPerThread <= n) {
    uint4 w;
    w.x = h[0] | (static_cast<uint32_t>(h[1]) << 16);
    w.y = h[2] | (static_cast<uint32_t>(h[3]) << 16);
    w.z = h[4] | (static_cast<uint32_t>(h[5]) << 16);
    w.w = h[6] | (static_cast<uint32_t>(h[7]) << 16);
    *reinterpret_cast<uint4*>(out + base) = w;
  } else {
    for (int i = 0; i < kPerThread && base + i < n; ++i) out[base + i] = h[i];
  }
}

// Where a block's absmax comes from: a plain fp32 array, or rebuilt from the
// double-quantized statistics with bitsandbytes' two roundings.
struct PlainAbsmax {
  const float* absmax;
  __device__ __forceinline__ float operator()(int64_t block) const { return absmax[block]; }
};

struct NestedAbsmax {
  const uint8_t* qabsmax;
  const float* absmax2;
  const float* offset;
  const float* code;  // shared-memory copy of the dynamic map
  __device__ __forceinline__ float operator()(int64_t block) const {
    return math::AddRn(math::MulRn(code[qabsmax[block]], absmax2[block / kNf4NestedBlocksize]),
                       *offset);
  }
};

template <typename Out, typename Absmax>
__device__ __forceinline__ void DequantizeEight(const uint8_t* __restrict__ packed,
                                                const Absmax& absmax_of, int64_t n,
                                                int block_shift, Out* __restrict__ out,
                                                bool vector_ok, const float* nf4) {
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t base = thread * kPerThread;
  if (base >= n) return;
  uint32_t word;
  if (vector_ok && base + kPerThread <= n) {
    word = *reinterpret_cast<const uint32_t*>(packed + base / 2);
  } else {
    word = 0;
    const int64_t bytes = ((n - base < kPerThread ? n - base : kPerThread) + 1) / 2;
    for (int64_t i = 0; i < bytes; ++i) word |= static_cast<uint32_t>(packed[base / 2 + i]) << (8 * i);
  }
  // A thread's 8 elements share one block: blocksize is a multiple of 8.
  const float a = absmax_of(base >> block_shift);
  float v[kPerThread];
#pragma unroll
  for (int i = 0; i < kPerThread / 2; ++i) {
    const uint32_t byte = (word >> (8 * i)) & 0xffu;
    v[2 * i] = math::MulRn(nf4[byte >> 4], a);
    v[2 * i + 1] = math::MulRn(nf4[byte & 0x0fu], a);
  }
  StoreEight(out, base, n, vector_ok, v);
}

template <typename Out>
__global__ void __launch_bounds__(256)
    DequantizeNf4Kernel(const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                        int64_t n, int block_shift, Out* __restrict__ out, bool vector_ok) {
  // Shared copy of the 16 values: the codes of a warp index it divergently,
  // which constant memory would serialize.
  __shared__ float nf4[16];
  if (threadIdx.x < 16) nf4[threadIdx.x] = kNf4ValuesDevice[threadIdx.x];
  __syncthreads();
  DequantizeEight(packed, PlainAbsmax{absmax}, n, block_shift, out, vector_ok, nf4);
}

__global__ void __launch_bounds__(256)
    DequantizeNf4NestedKernel(const uint8_t* __restrict__ packed,
                              const uint8_t* __restrict__ qabsmax,
                              const float* __restrict__ absmax2, const float* __restrict__ offset,
                              DynamicMap map, int64_t n, int block_shift,
                              uint16_t* __restrict__ out, bool vector_ok) {
  __shared__ float nf4[16];
  __shared__ float code[256];
  if (threadIdx.x < 16) nf4[threadIdx.x] = kNf4ValuesDevice[threadIdx.x];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) code[i] = map.v[i];
  __syncthreads();
  DequantizeEight(packed, NestedAbsmax{qabsmax, absmax2, offset, code}, n, block_shift, out,
                  vector_ok, nf4);
}

// The training path's kernel, for whole CTA tiles: each thread dequantizes
// kWideUnroll groups of 8 elements 256 * 8 apart, so every load and store of a warp stays coalesced; all loads are
// issued before the first store, and the 256-entry map is copied to shared
// memory once per 8192 elements instead of once per 2048.
constexpr int kWideUnroll = 4;
constexpr int64_t kWideTile = int64_t{256} * kWideUnroll * kPerThread;  // elements per CTA

__global__ void __launch_bounds__(256)
    DequantizeNf4NestedWideKernel(const uint8_t* __restrict__ packed,
                                  const uint8_t* __restrict__ qabsmax,
                                  const float* __restrict__ absmax2,
                                  const float* __restrict__ offset, DynamicMap map,
                                  int block_shift, uint16_t* __restrict__ out) {
  __shared__ float nf4[16];
  __shared__ float code[256];
  if (threadIdx.x < 16) nf4[threadIdx.x] = kNf4ValuesDevice[threadIdx.x];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) code[i] = map.v[i];
  __syncthreads();
  const NestedAbsmax absmax_of{qabsmax, absmax2, offset, code};
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * kWideTile;
  uint32_t words[kWideUnroll];
  float a[kWideUnroll];
#pragma unroll
  for (int k = 0; k < kWideUnroll; ++k) {
    const int64_t base = tile + (static_cast<int64_t>(k) * 256 + threadIdx.x) * kPerThread;
    words[k] = *reinterpret_cast<const uint32_t*>(packed + base / 2);
  }
#pragma unroll
  for (int k = 0; k < kWideUnroll; ++k) {
    const int64_t base = tile + (static_cast<int64_t>(k) * 256 + threadIdx.x) * kPerThread;
    a[k] = absmax_of(base >> block_shift);
  }
#pragma unroll
  for (int k = 0; k < kWideUnroll; ++k) {
    const int64_t base = tile + (static_cast<int64_t>(k) * 256 + threadIdx.x) * kPerThread;
    float v[kPerThread];
#pragma unroll
    for (int i = 0; i < kPerThread / 2; ++i) {
      const uint32_t byte = (words[k] >> (8 * i)) & 0xffu;
      v[2 * i] = math::MulRn(nf4[byte >> 4], a[k]);
      v[2 * i + 1] = math::MulRn(nf4[byte & 0x0fu], a[k]);
    }
    StoreEight(out, base, base + kPerThread, /*vector_ok=*/true, v);
  }
}

Status CheckDequantArgs(const char* name, const uint8_t* packed, const void* stats, int64_t n,
                        int64_t blocksize, const void* out) {
  if (Status s = ValidateNf4Blocksize(blocksize); !s.ok()) return s;
  if (n < 0) return Status::Error(std::string(name) + ": n (" + std::to_string(n) + ") must be >= 0");
  if (n > 0 && (packed == nullptr || stats == nullptr || out == nullptr)) {
    return Status::Error(std::string(name) + ": null pointer");
  }
  if ((n + kPerThread - 1) / kPerThread / 256 >= (int64_t{1} << 31)) {
    return Status::Error(std::string(name) + ": n (" + std::to_string(n) + ") too large for one launch");
  }
  return Status::Ok();
}

unsigned DequantCtas(int64_t n) {
  return static_cast<unsigned>(((n + kPerThread - 1) / kPerThread + 255) / 256);
}

template <typename Out>
Status LaunchDequantize(const char* name, const uint8_t* packed, const float* absmax, int64_t n,
                        int64_t blocksize, Out* out, cudaStream_t stream) {
  if (Status s = CheckDequantArgs(name, packed, absmax, n, blocksize, out); !s.ok()) return s;
  if (n == 0) return Status::Ok();
  const bool vector_ok = Aligned(packed, 4) && Aligned(out, 16);
  DequantizeNf4Kernel<Out><<<DequantCtas(n), 256, 0, stream>>>(packed, absmax, n,
                                                               Log2(blocksize), out, vector_ok);
  FTUNE_CUDA_RETURN_IF_LAUNCH_ERROR("DequantizeNf4Kernel");
  return Status::Ok();
}

// ------------------------------------------------- double quantization

// torch's block_x_reduce for a 1-D block of blockDim.x (a power of two)
// threads: halving through shared memory down to 32 lanes, then shfl_down
// within the warp (offsets 16..1 or 1..16, as TorchReduceDevice says); lane
// 0 holds the sum. `shared` has blockDim.x floats.
__device__ float TorchBlockSum(float value, float* shared, bool descending) {
  int dim = blockDim.x;
  const int t = threadIdx.x;
  if (dim > 32) {
    shared[t] = value;
    for (int off = dim / 2; off >= 32; off >>= 1) {
      __syncthreads();
      if (t < off) {
        value = value + shared[t + off];
        shared[t] = value;
      }
    }
    dim = 32;
  }
  __syncthreads();
  const unsigned mask = dim >= 32 ? 0xffffffffu : (1u << dim) - 1u;
  if (t < 32) {
    if (descending) {
      for (int off = dim / 2; off > 0; off >>= 1) value = value + __shfl_down_sync(mask, value, off, dim);
    } else {
      for (int off = 1; off < dim; off <<= 1) value = value + __shfl_down_sync(mask, value, off, dim);
    }
  }
  return value;
}

// First pass of torch.mean: CTA `blockIdx.x` of plan.ctas, same per-thread
// order as TorchThreadSum in nf4_cpu.cc. With one CTA it writes the mean
// itself; otherwise its partial sum.
__global__ void TorchMeanPartialKernel(const float* __restrict__ x, int64_t n, TorchMeanPlan plan,
                                       float* __restrict__ out) {
  extern __shared__ float shared[];
  const int lane = threadIdx.x;
  const int cta = blockIdx.x;
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  const int64_t first = lane + static_cast<int64_t>(cta) * plan.block_width;
  if (first < n) {
    if (plan.vectorized) {
      for (int64_t v = first; v * 4 + 3 < n; v += plan.step) {
        // Four scalar loads: the order of the adds, not the load width, is
        // what must match torch, and x need not be 16-byte aligned here.
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[i] = acc[i] + x[v * 4 + i];
      }
      if (cta == 0) {
        const int64_t j = n - n % 4 + lane;
        if (j < n) acc[0] = acc[0] + x[j];
      }
    } else {
      int64_t idx = first;
      const int64_t stride = plan.step;
      while (idx + 3 * stride < n) {
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[i] = acc[i] + x[idx + i * stride];
        idx += 4 * stride;
      }
      for (int i = 0; i < 4 && idx < n; ++i, idx += stride) acc[i] = acc[i] + x[idx];
    }
  }
  const float sum =
      TorchBlockSum(((acc[0] + acc[1]) + acc[2]) + acc[3], shared, plan.warp_offsets_descending);
  if (lane == 0) out[cta] = plan.ctas == 1 ? math::MulRn(sum, plan.factor) : sum;
}

// torch's global_reduce in the CTA that finishes last: thread t folds
// partials t, t + width, ... then the block tree.
__global__ void TorchMeanFinalKernel(const float* __restrict__ partials, TorchMeanPlan plan,
                                     float* __restrict__ mean) {
  extern __shared__ float shared[];
  float v = 0.0f;
  for (int c = threadIdx.x; c < plan.ctas; c += plan.block_width) v = v + partials[c];
  const float sum = TorchBlockSum(v, shared, plan.warp_offsets_descending);
  if (threadIdx.x == 0) *mean = math::MulRn(sum, plan.factor);
}

// One CTA of 256 threads per nested block: absmax2 = max |absmax - offset|,
// then each centered value to its 8-bit code.
__global__ void __launch_bounds__(256)
    DoubleQuantizeKernel(const float* __restrict__ absmax, int64_t num_blocks,
                         const float* __restrict__ offset, DynamicMap map,
                         uint8_t* __restrict__ qabsmax, float* __restrict__ absmax2) {
  __shared__ float code[256];
  __shared__ float warp_max[8];
  code[threadIdx.x] = map.v[threadIdx.x];
  const int64_t i = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  const float centered = i < num_blocks ? math::SubRn(absmax[i], *offset) : 0.0f;
  float m = math::MaxAbs(0.0f, centered);
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = m;
  __syncthreads();  // also publishes `code`
#pragma unroll
  for (int w = 0; w < 8; ++w) m = fmaxf(m, warp_max[w]);
  if (threadIdx.x == 0) absmax2[blockIdx.x] = m;
  if (i < num_blocks) {
    qabsmax[i] = math::DynamicCode(code, math::MulRn(centered, math::RcpRn(m)));
  }
}

__global__ void __launch_bounds__(256)
    DequantizeAbsmaxKernel(const uint8_t* __restrict__ qabsmax, const float* __restrict__ absmax2,
                           const float* __restrict__ offset, DynamicMap map, int64_t num_blocks,
                           float* __restrict__ absmax) {
  __shared__ float code[256];
  code[threadIdx.x] = map.v[threadIdx.x];
  __syncthreads();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  if (i < num_blocks) {
    absmax[i] = math::AddRn(math::MulRn(code[qabsmax[i]], absmax2[i / kNf4NestedBlocksize]),
                            *offset);
  }
}

DynamicMap DeviceMap() {
  DynamicMap map;
  const std::array<float, 256>& m = DynamicMapSigned();
  std::copy(m.begin(), m.end(), map.v);
  return map;
}

}  // namespace

Status QuantizeNf4Cuda(const float* x, int64_t n, int64_t blocksize, uint8_t* packed,
                       float* absmax, cudaStream_t stream) {
  return QuantizeDispatch("QuantizeNf4Cuda", x, n, blocksize, packed, absmax, stream);
}

Status QuantizeNf4Bf16Cuda(const uint16_t* x, int64_t n, int64_t blocksize, uint8_t* packed,
                           float* absmax, cudaStream_t stream) {
  return QuantizeDispatch("QuantizeNf4Bf16Cuda", x, n, blocksize, packed, absmax, stream);
}

Status DoubleQuantizeAbsmaxCuda(const float* absmax, int64_t num_blocks, uint8_t* qabsmax,
                                float* absmax2, float* offset, cudaStream_t stream,
                                const TorchReduceDevice& device) {
  if (num_blocks <= 0) {
    return Status::Error("DoubleQuantizeAbsmaxCuda: num_blocks (" + std::to_string(num_blocks) +
                         ") must be >= 1");
  }
  if (absmax == nullptr || qabsmax == nullptr || absmax2 == nullptr || offset == nullptr) {
    return Status::Error("DoubleQuantizeAbsmaxCuda: null pointer");
  }
  if (device.num_sms < 1 || device.max_threads_per_sm < 1) {
    return Status::Error("DoubleQuantizeAbsmaxCuda: TorchReduceDevice needs num_sms (" +
                         std::to_string(device.num_sms) + ") and max_threads_per_sm (" +
                         std::to_string(device.max_threads_per_sm) + ") >= 1");
  }
  const int64_t num_nested = Nf4NumNestedBlocks(num_blocks);
  if (num_nested >= (int64_t{1} << 31)) {
    return Status::Error("DoubleQuantizeAbsmaxCuda: num_blocks (" + std::to_string(num_blocks) +
                         ") too large for one launch");
  }
  const TorchMeanPlan plan = PlanTorchMean(num_blocks, device);
  // The partial sums borrow absmax2: a split needs >= 256 values a thread
  // at width 512, so ctas <= num_blocks / 8192 + 1 <= num_nested. Checked
  // anyway, since a custom TorchReduceDevice changes the split.
  if (plan.ctas > num_nested) {
    return Status::Error("DoubleQuantizeAbsmaxCuda: torch's reduction would use " +
                         std::to_string(plan.ctas) + " CTAs, more than the " +
                         std::to_string(num_nested) + " absmax2 entries it borrows as scratch");
  }
  const size_t shared = sizeof(float) * plan.block_width;
  float* first_out = plan.ctas == 1 ? offset : absmax2;
  TorchMeanPartialKernel<<<plan.ctas, plan.block_width, shared, stream>>>(absmax, num_blocks, plan,
                                                                           first_out);
  FTUNE_CUDA_RETURN_IF_LAUNCH_ERROR("TorchMeanPartialKernel");
  if (plan.ctas > 1) {
    TorchMeanFinalKernel<<<1, plan.block_width, shared, stream>>>(absmax2, plan, offset);
    FTUNE_CUDA_RETURN_IF_LAUNCH_ERROR("TorchMeanFinalKernel");
  }
  DoubleQuantizeKernel<<<static_cast<unsigned>(num_nested), 256, 0, stream>>>(
      absmax, num_blocks, offset, DeviceMap(), qabsmax, absmax2);
  FTUNE_CUDA_RETURN_IF_LAUNCH_ERROR("DoubleQuantizeKernel");
  return Status::Ok();
}

Status DequantizeAbsmaxCuda(const uint8_t* qabsmax, const float* absmax2, const float* offset,
                            int64_t num_blocks, float* absmax, cudaStream_t stream) {
  if (num_blocks < 0) {
    return Status::Error("DequantizeAbsmaxCuda: num_blocks (" + std::to_string(num_blocks) +
                         ") must be >= 0");
  }
  if (num_blocks == 0) return Status::Ok();
  if (qabsmax == nullptr || absmax2 == nullptr || offset == nullptr || absmax == nullptr) {
    return Status::Error("DequantizeAbsmaxCuda: null pointer");
  }
  const int64_t ctas = (num_blocks + 255) / 256;
  if (ctas >= (int64_t{1} << 31)) {
    return Status::Error("DequantizeAbsmaxCuda: num_blocks (" + std::to_string(num_blocks) +
                         ") too large for one launch");
  }
  DequantizeAbsmaxKernel<<<static_cast<unsigned>(ctas), 256, 0, stream>>>(
      qabsmax, absmax2, offset, DeviceMap(), num_blocks, absmax);
  FTUNE_CUDA_RETURN_IF_LAUNCH_ERROR("DequantizeAbsmaxKernel");
  return Status::Ok();
}

Status DequantizeNf4Cuda(const uint8_t* packed, const float* absmax, int64_t n,
                         int64_t blocksize, float* out, cudaStream_t stream) {
  return LaunchDequantize("DequantizeNf4Cuda", packed, absmax, n, blocksize, out, stream);
}

Status DequantizeNf4Bf16Cuda(const uint8_t* packed, const float* absmax, int64_t n,
                             int64_t blocksize, uint16_t* out, cudaStream_t stream) {
  return LaunchDequantize("DequantizeNf4Bf16Cuda", packed, absmax, n, blocksize, out, stream);
}

Status DequantizeNf4Bf16NestedCuda(const uint8_t* packed, const uint8_t* qabsmax,
                                   const float* absmax2, const float* offset, int64_t n,
                                   int64_t blocksize, uint16_t* out, cudaStream_t stream) {
  const char* name = "DequantizeNf4Bf16NestedCuda";
  if (Status s = CheckDequantArgs(name, packed, qabsmax, n, blocksize, out); !s.ok()) return s;
  if (n == 0) return Status::Ok();
  if (absmax2 == nullptr || offset == nullptr) {
    return Status::Error(std::string(name) + ": null pointer");
  }
  const bool vector_ok = Aligned(packed, 4) && Aligned(out, 16);
  // Whole spans of 256 blocks (one absmax2 each) that are also whole wide
  // tiles go to the wide kernel; the rest, with its pointers moved past
  // them, to the general one.
  const int64_t span = std::max<int64_t>(kWideTile, kNf4NestedBlocksize * blocksize);
  const int64_t wide = vector_ok ? n / span * span : 0;
  if (wide > 0) {
    DequantizeNf4NestedWideKernel<<<static_cast<unsigned>(wide / kWideTile), 256, 0, stream>>>(
        packed, qabsmax, absmax2, offset, DeviceMap(), Log2(blocksize), out);
    FTUNE_CUDA_RETURN_IF_LAUNCH_ERROR("DequantizeNf4NestedWideKernel");
  }
  if (wide == n) return Status::Ok();
  const int64_t blocks = wide / blocksize;
  DequantizeNf4NestedKernel<<<DequantCtas(n - wide), 256, 0, stream>>>(
      packed + wide / 2, qabsmax + blocks, absmax2 + blocks / kNf4NestedBlocksize, offset,
      DeviceMap(), n - wide, Log2(blocksize), out + wide, vector_ok);
  FTUNE_CUDA_RETURN_IF_LAUNCH_ERROR("DequantizeNf4NestedKernel");
  return Status::Ok();
}

}  // namespace ftune::kernels
