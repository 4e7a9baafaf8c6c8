// CUDA side of kernels/random_init_cuda.h.
#include "kernels/random_init_cuda.h"

#include <string>

#include "kernels/random_init_math.h"

namespace ftune::kernels {
namespace {

__global__ void FillNormalBf16Kernel(uint64_t key, double stddev, uint64_t begin,
                                     uint64_t count, uint16_t* out) {
  const uint64_t stride = static_cast<uint64_t>(gridDim.x) * blockDim.x;
  for (uint64_t j = static_cast<uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < count;
       j += stride) {
    out[j] = random_init::NormalBf16(key, stddev, begin + j);
  }
}

}  // namespace

Status FillNormalBf16Cuda(uint64_t key, double stddev, uint64_t begin, uint64_t count,
                          uint16_t* out, cudaStream_t stream) {
  if (count == 0) return Status::Ok();
  if (out == nullptr) return Status::Error("FillNormalBf16Cuda: null output pointer");
  constexpr unsigned kThreads = 256;
  const uint64_t wanted = (count + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(wanted < 65536 ? wanted : 65536);
  FillNormalBf16Kernel<<<blocks, kThreads, 0, stream>>>(key, stddev, begin, count, out);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {
    return Status::Error(std::string("launch of FillNormalBf16Kernel failed: ") +
                         cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")");
  }
  return Status::Ok();
}

}  // namespace ftune::kernels
