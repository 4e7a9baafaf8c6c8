// CUDA kernels of the fused decoder-layer ops (see fused_cuda.h).
//
// All of them are memory-bound: each reads its inputs and writes its
// outputs once (RMSNorm reads a row twice; the second read hits L2).
// Elementwise kernels move 8 bf16 values per thread with 16-byte accesses
// when the pointers allow it; RMSNorm runs one CTA per row with a block
// reduction of the row's fp32 sum. Per-element math is fused_math.h's,
// shared with the CPU reference.
#include "kernels/fused_cuda.h"

#include <cuda_runtime.h>

#include <string>

#include "kernels/fused_math.h"

namespace ftune::kernels {
namespace {

using math::Bf16ToFloat;
using math::FloatToBf16;

constexpr int kVec = 8;  // bf16 values per 16-byte access

Status LaunchStatus(const char* kernel) {
  const cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) return Status::Ok();
  return Status::Error(std::string("launch of ") + kernel + " failed: " + cudaGetErrorName(e) +
                       " (" + cudaGetErrorString(e) + ")");
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

__device__ __forceinline__ void Load8(const uint16_t* p, float v[kVec]) {
  const uint4 a = *reinterpret_cast<const uint4*>(p);
  const uint32_t w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[2 * i] = math::BitsToFloat(w[i] << 16);
    v[2 * i + 1] = math::BitsToFloat(w[i] & 0xffff0000u);
  }
}

__device__ __forceinline__ void Store8(uint16_t* p, const float v[kVec]) {
  uint4 a;
  a.x = FloatToBf16(v[0]) | (static_cast<uint32_t>(FloatToBf16(v[1])) << 16);
  a.y = FloatToBf16(v[2]) | (static_cast<uint32_t>(FloatToBf16(v[3])) << 16);
  a.z = FloatToBf16(v[4]) | (static_cast<uint32_t>(FloatToBf16(v[5])) << 16);
  a.w = FloatToBf16(v[6]) | (static_cast<uint32_t>(FloatToBf16(v[7])) << 16);
  *reinterpret_cast<uint4*>(p) = a;
}

// Sum over the CTA; every thread gets the result. `shared` has 32 floats.
__device__ float BlockSum(float v, float* shared) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warps = (blockDim.x + 31) / 32;
  __syncthreads();  // shared may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < warps ? shared[lane] : 0.0f;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Max over the CTA; every thread gets the result. `shared` has 32 floats.
// NaN wins, as in LibTorch's amax.
__device__ __forceinline__ float MaxNan(float a, float b) { return (a != a || a > b) ? a : b; }
__device__ float BlockMax(float v, float* shared) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = MaxNan(v, __shfl_xor_sync(0xffffffffu, v, off));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warps = (blockDim.x + 31) / 32;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < warps ? shared[lane] : -INFINITY;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = MaxNan(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// ------------------------------------------------------------- RMSNorm

template <bool kVector>
__global__ void __launch_bounds__(256)
    RmsNormForwardKernel(const uint16_t* __restrict__ x, const uint16_t* __restrict__ residual,
                         const uint16_t* __restrict__ w, int64_t h, float eps,
                         uint16_t* __restrict__ sum, uint16_t* __restrict__ y,
                         float* __restrict__ rstd) {
  __shared__ float shared[32];
  const int64_t row = blockIdx.x;
  const uint16_t* xr = x + row * h;
  const uint16_t* rr = residual != nullptr ? residual + row * h : nullptr;
  uint16_t* sr = residual != nullptr ? sum + row * h : nullptr;
  const uint16_t* in = residual != nullptr ? sr : xr;  // what pass 2 normalizes
  float ss = 0.0f;
  if constexpr (kVector) {
    for (int64_t i = threadIdx.x * kVec; i < h; i += blockDim.x * kVec) {
      float v[kVec];
      Load8(xr + i, v);
      if (rr != nullptr) {
        float r[kVec];
        Load8(rr + i, r);
#pragma unroll
        for (int k = 0; k < kVec; ++k) v[k] = math::Bf(math::AddRn(v[k], r[k]));
        Store8(sr + i, v);
      }
#pragma unroll
      for (int k = 0; k < kVec; ++k) ss = math::AddRn(ss, math::MulRn(v[k], v[k]));
    }
  } else {
    for (int64_t i = threadIdx.x; i < h; i += blockDim.x) {
      float v = Bf16ToFloat(xr[i]);
      if (rr != nullptr) {
        v = math::Bf(math::AddRn(v, Bf16ToFloat(rr[i])));
        sr[i] = FloatToBf16(v);
      }
      ss = math::AddRn(ss, math::MulRn(v, v));
    }
  }
  const float rs = math::RmsNormRstd(BlockSum(ss, shared), h, eps);
  if (threadIdx.x == 0) rstd[row] = rs;
  uint16_t* yr = y + row * h;
  if constexpr (kVector) {
    for (int64_t i = threadIdx.x * kVec; i < h; i += blockDim.x * kVec) {
      float v[kVec], wv[kVec];
      Load8(in + i, v);
      Load8(w + i, wv);
#pragma unroll
      for (int k = 0; k < kVec; ++k) v[k] = math::RmsNormOutput(v[k], rs, wv[k]);
      Store8(yr + i, v);
    }
  } else {
    for (int64_t i = threadIdx.x; i < h; i += blockDim.x) {
      yr[i] = FloatToBf16(math::RmsNormOutput(Bf16ToFloat(in[i]), rs, Bf16ToFloat(w[i])));
    }
  }
}

template <bool kVector>
__global__ void __launch_bounds__(256)
    RmsNormBackwardKernel(const uint16_t* __restrict__ dy, const uint16_t* __restrict__ s,
                          const uint16_t* __restrict__ w, const float* __restrict__ rstd,
                          const uint16_t* __restrict__ dres, int64_t h,
                          uint16_t* __restrict__ ds) {
  __shared__ float shared[32];
  const int64_t row = blockIdx.x;
  const uint16_t* dyr = dy + row * h;
  const uint16_t* srow = s + row * h;
  float dot = 0.0f;
  if constexpr (kVector) {
    for (int64_t i = threadIdx.x * kVec; i < h; i += blockDim.x * kVec) {
      float g[kVec], x[kVec], wv[kVec];
      Load8(dyr + i, g);
      Load8(srow + i, x);
      Load8(w + i, wv);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        dot = math::AddRn(dot, math::MulRn(math::RmsNormGradIn(g[k], wv[k]), x[k]));
      }
    }
  } else {
    for (int64_t i = threadIdx.x; i < h; i += blockDim.x) {
      const float dn = math::RmsNormGradIn(Bf16ToFloat(dyr[i]), Bf16ToFloat(w[i]));
      dot = math::AddRn(dot, math::MulRn(dn, Bf16ToFloat(srow[i])));
    }
  }
  dot = BlockSum(dot, shared);
  const float rs = rstd[row];
  const float coef = math::MulRn(math::MulRn(math::MulRn(rs, rs), rs),
                                 math::MulRn(dot, 1.0f / static_cast<float>(h)));
  uint16_t* out = ds + row * h;
  const uint16_t* dr = dres != nullptr ? dres + row * h : nullptr;
  if constexpr (kVector) {
    for (int64_t i = threadIdx.x * kVec; i < h; i += blockDim.x * kVec) {
      float g[kVec], x[kVec], wv[kVec], r[kVec];
      Load8(dyr + i, g);
      Load8(srow + i, x);
      Load8(w + i, wv);
      if (dr != nullptr) Load8(dr + i, r);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        float v = math::Bf(math::RmsNormBackward(math::RmsNormGradIn(g[k], wv[k]), x[k], rs, coef));
        if (dr != nullptr) v = math::AddRn(v, r[k]);
        g[k] = v;
      }
      Store8(out + i, g);
    }
  } else {
    for (int64_t i = threadIdx.x; i < h; i += blockDim.x) {
      const float dn = math::RmsNormGradIn(Bf16ToFloat(dyr[i]), Bf16ToFloat(w[i]));
      float v = math::Bf(math::RmsNormBackward(dn, Bf16ToFloat(srow[i]), rs, coef));
      if (dr != nullptr) v = math::AddRn(v, Bf16ToFloat(dr[i]));
      out[i] = FloatToBf16(v);
    }
  }
}

int NormThreads(int64_t h) {
  // One 16-byte access per thread per pass where the row allows it.
  int64_t t = (h + kVec - 1) / kVec;
  if (t < 32) t = 32;
  if (t > 256) t = 256;
  return static_cast<int>((t + 31) / 32 * 32);
}

// ------------------------------------------------------- elementwise

// Rows of `cols` values with row strides (SwigluRows); contiguous operands
// are one row. With kVector, cols and every stride are multiples of kVec
// and the pointers 16-byte aligned, so each access stays within a row.
template <bool kVector>
__global__ void __launch_bounds__(256)
    SwigluForwardKernel(const uint16_t* __restrict__ g, const uint16_t* __restrict__ u,
                        SwigluRows r, uint16_t* __restrict__ y) {
  constexpr int kStep = kVector ? kVec : 1;
  const int64_t n = r.rows * r.cols;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * kStep;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kStep; i < n;
       i += stride) {
    const int64_t row = i / r.cols, col = i - row * r.cols;
    const int64_t in = row * r.ld_gu + col, out = row * r.ld_y + col;
    if constexpr (kVector) {
      float a[kVec], b[kVec];
      Load8(g + in, a);
      Load8(u + in, b);
#pragma unroll
      for (int k = 0; k < kVec; ++k) a[k] = math::SwigluForward(a[k], b[k]);
      Store8(y + out, a);
    } else {
      y[out] = FloatToBf16(math::SwigluForward(Bf16ToFloat(g[in]), Bf16ToFloat(u[in])));
    }
  }
}

template <bool kVector>
__global__ void __launch_bounds__(256)
    SwigluBackwardKernel(const uint16_t* __restrict__ dy, const uint16_t* __restrict__ g,
                         const uint16_t* __restrict__ u, SwigluRows r, uint16_t* __restrict__ dg,
                         uint16_t* __restrict__ du) {
  constexpr int kStep = kVector ? kVec : 1;
  const int64_t n = r.rows * r.cols;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * kStep;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kStep; i < n;
       i += stride) {
    const int64_t row = i / r.cols, col = i - row * r.cols;
    const int64_t in = row * r.ld_gu + col, d = row * r.ld_y + col, out = row * r.ld_d + col;
    if constexpr (kVector) {
      float dd[kVec], a[kVec], b[kVec], oa[kVec], ob[kVec];
      Load8(dy + d, dd);
      Load8(g + in, a);
      Load8(u + in, b);
#pragma unroll
      for (int k = 0; k < kVec; ++k) math::SwigluBackward(dd[k], a[k], b[k], &oa[k], &ob[k]);
      Store8(dg + out, oa);
      Store8(du + out, ob);
    } else {
      float a, b;
      math::SwigluBackward(Bf16ToFloat(dy[d]), Bf16ToFloat(g[in]), Bf16ToFloat(u[in]), &a, &b);
      dg[out] = FloatToBf16(a);
      du[out] = FloatToBf16(b);
    }
  }
}

bool RowsVectorize(const SwigluRows& r) {
  return r.cols % kVec == 0 && r.ld_gu % kVec == 0 && r.ld_y % kVec == 0 && r.ld_d % kVec == 0;
}

unsigned ElementwiseCtas(int64_t work_items) {
  int64_t ctas = (work_items + 255) / 256;
  // Grid-stride beyond this: enough CTAs to fill any current GPU.
  if (ctas > 65536) ctas = 65536;
  return static_cast<unsigned>(ctas < 1 ? 1 : ctas);
}

// One thread per (token, head, i < hd/2): both elements of the pair.
__global__ void __launch_bounds__(256)
    RopeKernel(const uint16_t* __restrict__ x, const uint16_t* __restrict__ cos,
               const uint16_t* __restrict__ sin, int64_t tokens, int64_t heads, int64_t hd,
               bool backward, uint16_t* __restrict__ y) {
  const int64_t half = hd / 2;
  const int64_t total = tokens * heads * half;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += stride) {
    const int64_t i = idx % half;
    const int64_t row = idx / half;  // token * heads + head
    const int64_t t = row / heads;
    const uint16_t* xr = x + row * hd;
    const float a = Bf16ToFloat(xr[i]), b = Bf16ToFloat(xr[i + half]);
    const float c1 = Bf16ToFloat(cos[t * hd + i]), c2 = Bf16ToFloat(cos[t * hd + i + half]);
    const float s1 = Bf16ToFloat(sin[t * hd + i]), s2 = Bf16ToFloat(sin[t * hd + i + half]);
    float ya, yb;
    if (backward) {
      ya = math::RopeBackward(a, b, c1, s2, true);
      yb = math::RopeBackward(b, a, c2, s1, false);
    } else {
      ya = math::RopeForward(a, b, c1, s1, true);
      yb = math::RopeForward(b, a, c2, s2, false);
    }
    y[row * hd + i] = FloatToBf16(ya);
    y[row * hd + i + half] = FloatToBf16(yb);
  }
}

// The same with 8 pairs per thread and 16-byte accesses (hd / 2 a
// multiple of 8 and aligned pointers).
__global__ void __launch_bounds__(256)
    RopeVectorKernel(const uint16_t* __restrict__ x, const uint16_t* __restrict__ cos,
                     const uint16_t* __restrict__ sin, int64_t tokens, int64_t heads, int64_t hd,
                     bool backward, uint16_t* __restrict__ y) {
  const int64_t half = hd / 2, groups = half / kVec;
  const int64_t total = tokens * heads * groups;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += stride) {
    const int64_t i = idx % groups * kVec;
    const int64_t row = idx / groups;  // token * heads + head
    const int64_t t = row / heads;
    float a[kVec], b[kVec], c1[kVec], c2[kVec], s1[kVec], s2[kVec];
    Load8(x + row * hd + i, a);
    Load8(x + row * hd + i + half, b);
    Load8(cos + t * hd + i, c1);
    Load8(cos + t * hd + i + half, c2);
    Load8(sin + t * hd + i, s1);
    Load8(sin + t * hd + i + half, s2);
    float ya[kVec], yb[kVec];
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      if (backward) {
        ya[k] = math::RopeBackward(a[k], b[k], c1[k], s2[k], true);
        yb[k] = math::RopeBackward(b[k], a[k], c2[k], s1[k], false);
      } else {
        ya[k] = math::RopeForward(a[k], b[k], c1[k], s1[k], true);
        yb[k] = math::RopeForward(b[k], a[k], c2[k], s2[k], false);
      }
    }
    Store8(y + row * hd + i, ya);
    Store8(y + row * hd + i + half, yb);
  }
}

// ------------------------------------------------------- cross-entropy

// One CTA per row of `vocab` logits: three passes over the row (max, sum of
// exps, gradient); the later ones mostly hit L2.
template <bool kVector>
__global__ void __launch_bounds__(512)
    CrossEntropyKernel(const uint16_t* __restrict__ logits, const int64_t* __restrict__ targets,
                       int64_t vocab, float* __restrict__ loss, uint16_t* grad) {
  __shared__ float shared[32];
  const int64_t row = blockIdx.x;
  const uint16_t* x = logits + row * vocab;
  const int64_t t = targets[row];
  const bool valid = t >= 0 && t < vocab;
  // Read before any thread may overwrite the row with its gradient (the
  // reductions below synchronize the CTA first).
  const float xt = threadIdx.x == 0 && valid ? Bf16ToFloat(x[t]) : 0.0f;
  float m = -INFINITY;
  if constexpr (kVector) {
    for (int64_t i = threadIdx.x * kVec; i < vocab; i += blockDim.x * kVec) {
      float v[kVec];
      Load8(x + i, v);
#pragma unroll
      for (int k = 0; k < kVec; ++k) m = MaxNan(m, v[k]);
    }
  } else {
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) m = MaxNan(m, Bf16ToFloat(x[i]));
  }
  const float shift = math::CrossEntropyShift(BlockMax(m, shared));
  float sum = 0.0f;
  if constexpr (kVector) {
    for (int64_t i = threadIdx.x * kVec; i < vocab; i += blockDim.x * kVec) {
      float v[kVec];
      Load8(x + i, v);
#pragma unroll
      for (int k = 0; k < kVec; ++k) sum = math::AddRn(sum, math::ExpF(math::SubRn(v[k], shift)));
    }
  } else {
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
      sum = math::AddRn(sum, math::ExpF(math::SubRn(Bf16ToFloat(x[i]), shift)));
    }
  }
  const float lse = math::CrossEntropyLse(shift, BlockSum(sum, shared));
  if (threadIdx.x == 0) loss[row] = valid ? math::SubRn(lse, xt) : NAN;
  if (grad == nullptr) return;
  uint16_t* g = grad + row * vocab;
  if constexpr (kVector) {
    for (int64_t i = threadIdx.x * kVec; i < vocab; i += blockDim.x * kVec) {
      float v[kVec];
      Load8(x + i, v);
#pragma unroll
      for (int k = 0; k < kVec; ++k) v[k] = math::CrossEntropyGrad(v[k], lse, i + k == t);
      Store8(g + i, v);
    }
  } else {
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
      g[i] = FloatToBf16(math::CrossEntropyGrad(Bf16ToFloat(x[i]), lse, i == t));
    }
  }
}

}  // namespace

Status RmsNormForwardCuda(const uint16_t* x, const uint16_t* residual, const uint16_t* w,
                          int64_t rows, int64_t h, float eps, uint16_t* sum, uint16_t* y,
                          float* rstd, cudaStream_t stream) {
  if (Status s = CheckRmsNormArgs("RmsNormForwardCuda", rows, h, eps); !s.ok()) return s;
  if (residual != nullptr && sum == nullptr) {
    return Status::Error("RmsNormForwardCuda: a residual needs a sum output");
  }
  if (rows == 0) return Status::Ok();
  if (rows >= (int64_t{1} << 31)) return Status::Error("RmsNormForwardCuda: too many rows");
  const bool vec = h % kVec == 0 && Aligned16(x) && Aligned16(w) && Aligned16(y) &&
                   (residual == nullptr || (Aligned16(residual) && Aligned16(sum)));
  const int threads = NormThreads(h);
  if (vec) {
    RmsNormForwardKernel<true><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
        x, residual, w, h, eps, sum, y, rstd);
  } else {
    RmsNormForwardKernel<false><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
        x, residual, w, h, eps, sum, y, rstd);
  }
  return LaunchStatus("RmsNormForwardKernel");
}

Status RmsNormBackwardCuda(const uint16_t* dy, const uint16_t* s, const uint16_t* w,
                           const float* rstd, const uint16_t* dres, int64_t rows, int64_t h,
                           uint16_t* ds, cudaStream_t stream) {
  if (Status st = CheckRmsNormArgs("RmsNormBackwardCuda", rows, h, 1.0f); !st.ok()) return st;
  if (rows == 0) return Status::Ok();
  if (rows >= (int64_t{1} << 31)) return Status::Error("RmsNormBackwardCuda: too many rows");
  const bool vec = h % kVec == 0 && Aligned16(dy) && Aligned16(s) && Aligned16(w) &&
                   Aligned16(ds) && (dres == nullptr || Aligned16(dres));
  const int threads = NormThreads(h);
  if (vec) {
    RmsNormBackwardKernel<true><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
        dy, s, w, rstd, dres, h, ds);
  } else {
    RmsNormBackwardKernel<false><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
        dy, s, w, rstd, dres, h, ds);
  }
  return LaunchStatus("RmsNormBackwardKernel");
}

Status SwigluForwardRowsCuda(const uint16_t* g, const uint16_t* u, const SwigluRows& r,
                             uint16_t* y, cudaStream_t stream) {
  if (Status st = CheckSwigluRows("SwigluForwardRowsCuda", r, false); !st.ok()) return st;
  const int64_t n = r.rows * r.cols;
  if (n == 0) return Status::Ok();
  if (RowsVectorize(r) && Aligned16(g) && Aligned16(u) && Aligned16(y)) {
    SwigluForwardKernel<true><<<ElementwiseCtas(n / kVec), 256, 0, stream>>>(g, u, r, y);
  } else {
    SwigluForwardKernel<false><<<ElementwiseCtas(n), 256, 0, stream>>>(g, u, r, y);
  }
  return LaunchStatus("SwigluForwardKernel");
}

Status SwigluBackwardRowsCuda(const uint16_t* dy, const uint16_t* g, const uint16_t* u,
                              const SwigluRows& r, uint16_t* dg, uint16_t* du,
                              cudaStream_t stream) {
  if (Status st = CheckSwigluRows("SwigluBackwardRowsCuda", r, true); !st.ok()) return st;
  const int64_t n = r.rows * r.cols;
  if (n == 0) return Status::Ok();
  if (RowsVectorize(r) && Aligned16(dy) && Aligned16(g) && Aligned16(u) && Aligned16(dg) &&
      Aligned16(du)) {
    SwigluBackwardKernel<true><<<ElementwiseCtas(n / kVec), 256, 0, stream>>>(dy, g, u, r, dg, du);
  } else {
    SwigluBackwardKernel<false><<<ElementwiseCtas(n), 256, 0, stream>>>(dy, g, u, r, dg, du);
  }
  return LaunchStatus("SwigluBackwardKernel");
}

Status SwigluForwardCuda(const uint16_t* g, const uint16_t* u, int64_t n, uint16_t* y,
                         cudaStream_t stream) {
  if (n < 0) return Status::Error("SwigluForwardCuda: n must be >= 0");
  return SwigluForwardRowsCuda(g, u, SwigluRows{1, n, n, n, n}, y, stream);
}

Status SwigluBackwardCuda(const uint16_t* dy, const uint16_t* g, const uint16_t* u, int64_t n,
                          uint16_t* dg, uint16_t* du, cudaStream_t stream) {
  if (n < 0) return Status::Error("SwigluBackwardCuda: n must be >= 0");
  return SwigluBackwardRowsCuda(dy, g, u, SwigluRows{1, n, n, n, n}, dg, du, stream);
}

Status RopeCuda(const uint16_t* x, const uint16_t* cos, const uint16_t* sin, int64_t tokens,
                int64_t heads, int64_t hd, bool backward, uint16_t* y, cudaStream_t stream) {
  if (Status s = CheckRopeArgs("RopeCuda", tokens, heads, hd); !s.ok()) return s;
  if (tokens == 0) return Status::Ok();
  if ((hd / 2) % kVec == 0 && Aligned16(x) && Aligned16(cos) && Aligned16(sin) && Aligned16(y)) {
    RopeVectorKernel<<<ElementwiseCtas(tokens * heads * (hd / 2 / kVec)), 256, 0, stream>>>(
        x, cos, sin, tokens, heads, hd, backward, y);
    return LaunchStatus("RopeVectorKernel");
  }
  RopeKernel<<<ElementwiseCtas(tokens * heads * (hd / 2)), 256, 0, stream>>>(
      x, cos, sin, tokens, heads, hd, backward, y);
  return LaunchStatus("RopeKernel");
}

Status CrossEntropyRowsCuda(const uint16_t* logits, const int64_t* targets, int64_t rows,
                            int64_t vocab, float* loss, uint16_t* grad, cudaStream_t stream) {
  if (Status s = CheckCrossEntropyArgs("CrossEntropyRowsCuda", rows, vocab); !s.ok()) return s;
  if (rows == 0) return Status::Ok();
  if (rows > 0x7fffffff) return Status::Error("CrossEntropyRowsCuda: more than 2^31 - 1 rows");
  const unsigned grid = static_cast<unsigned>(rows);
  if (vocab % kVec == 0 && Aligned16(logits) && (grad == nullptr || Aligned16(grad))) {
    CrossEntropyKernel<true><<<grid, 512, 0, stream>>>(logits, targets, vocab, loss, grad);
  } else {
    CrossEntropyKernel<false><<<grid, 512, 0, stream>>>(logits, targets, vocab, loss, grad);
  }
  return LaunchStatus("CrossEntropyKernel");
}

}  // namespace ftune::kernels
