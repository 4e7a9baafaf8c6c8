// init-model's random weights generated on a GPU (kernels/random_init_math.h):
// the same bf16 bits as the CPU writer, so a model built in device memory
// ("model.random_weights" in a job spec) equals one read from the files
// `ftune-rank init-model` writes.
#ifndef FTUNE_KERNELS_RANDOM_INIT_CUDA_H_
#define FTUNE_KERNELS_RANDOM_INIT_CUDA_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/nf4.h"

namespace ftune::kernels {

// out[j] = bf16 bits of element begin + j (j < count) of the tensor with
// this key and std (init_model.h: key = InitTensorKey(seed, name)).
// Enqueues on `stream` and returns; out is a device pointer.
Status FillNormalBf16Cuda(uint64_t key, double stddev, uint64_t begin, uint64_t count,
                          uint16_t* out, cudaStream_t stream);

}  // namespace ftune::kernels

#endif  // FTUNE_KERNELS_RANDOM_INIT_CUDA_H_
