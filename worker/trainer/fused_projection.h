// Several LoRA projections of one input as one GEMM: q/k/v of attention and
// gate/up of the MLP read the same normed activation, so their NF4 weights
// are dequantized into one bf16 buffer with every adapter's A rows appended,
// and x [W_1; ...; W_n; A_1; ...; A_n]^T gives all base outputs and all
// x A_i^T at once; each B_i (scaling folded in) is then accumulated into its
// output in place (addmm). The backward is one GEMM too: the output
// gradients and the adapters' input-side gradients side by side, times the
// same buffer, give x's whole gradient, with no per-path gradient adds.
//
// The results are LoraLinear::Forward's for each module (bf16 path, no
// dropout; a frozen bias added before the adapter), up to the order of fp32
// sums. A module without an adapter
// contributes its base only. The adapters' gradients reach their fp32 A and
// B as LoraLinear's do. Inside KeepDequantizedWeights the buffer is kept for
// the backward; otherwise the backward dequantizes again (nf4_linear.h).
#ifndef FTUNE_WORKER_TRAINER_FUSED_PROJECTION_H_
#define FTUNE_WORKER_TRAINER_FUSED_PROJECTION_H_

#include <ATen/core/Tensor.h>

#include <vector>

#include "worker/trainer/lora.h"

namespace ftune::trainer {

// True when FusedLoraProjections computes these modules for x: x bf16, every
// base an NF4 layer with resident bytes on x's device and the same input
// size, adapters (where attached) in the bf16 path and without dropout
// while training.
bool FusedProjectionsApply(const std::vector<const LoraLinear*>& modules, const at::Tensor& x,
                           bool training);

// modules[i]->Forward(x, training) for every i, computed together.
std::vector<at::Tensor> FusedLoraProjections(const std::vector<const LoraLinear*>& modules,
                                             const at::Tensor& x, bool training);

// modules[i]->Forward(x, training) for every i: together when `fuse` is set
// and FusedProjectionsApply, else module by module.
std::vector<at::Tensor> LoraProjections(const std::vector<const LoraLinear*>& modules,
                                        const at::Tensor& x, bool training, bool fuse);

// silu(gate.Forward(x)) * up.Forward(x), the MLP's input to down_proj. With
// `fuse`, when the projections fuse and the fused kernels apply to x, one
// GEMM writes gate and up side by side and SwiGLU reads them there (and its
// backward writes their gradients there): no per-module copies. Otherwise
// the fused SwiGLU kernel over separate projections (`fuse`), or LibTorch's
// silu and mul.
at::Tensor GateUpSwiglu(const LoraLinear& gate, const LoraLinear& up, const at::Tensor& x,
                        bool training, bool fuse);

}  // namespace ftune::trainer

#endif  // FTUNE_WORKER_TRAINER_FUSED_PROJECTION_H_
