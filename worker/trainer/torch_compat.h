// The few differences between the LibTorch versions ftune builds against:
// Debian's 1.13 (CPU, development machines and CI) and 2.11 (CUDA 13, GPU
// hosts). Everything version-dependent lives here so the model code reads the
// same on both; include this header only from .cc files of the trainer.
//
//   * scaled_dot_product_attention is public from 2.0 and takes `scale` from
//     2.1. On older LibTorch the model uses its exact math path (HF's eager
//     attention), which is also what the fp32 parity tests compare.
//   * Flash attention's variable-length entry point (aten's
//     _flash_attention_forward, differentiable) is used directly on CUDA:
//     packed documents without an (s x s) mask, GQA without K/V copies.
//   * c10::optional became an alias of std::optional in 2.x and may be gone
//     later; Optional<T> names whichever this LibTorch's signatures take.
//   * Not a header difference but a link-time one: the pip LibTorch of the GPU
//     hosts exports std::filesystem symbols of its own toolchain, and the
//     dynamic linker binds our calls to them; std::filesystem::remove_all
//     then jumps to address 0 (seen with 2.11 + gcc 13). Trainer code and its
//     tests use POSIX calls (mkdir, nftw) instead of std::filesystem.
//
// Thread-safety: stateless.
#ifndef FTUNE_WORKER_TRAINER_TORCH_COMPAT_H_
#define FTUNE_WORKER_TRAINER_TORCH_COMPAT_H_

#include <ATen/ATen.h>
#include <torch/version.h>

#include <tuple>

#if TORCH_VERSION_MAJOR >= 3 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 1)
#define FTUNE_TORCH_HAS_SDPA 1
#else
#define FTUNE_TORCH_HAS_SDPA 0
#endif

#if TORCH_VERSION_MAJOR >= 2
#include <optional>
#else
#include <c10/util/Optional.h>
#endif

namespace ftune::trainer::compat {

#if TORCH_VERSION_MAJOR >= 2
template <typename T>
using Optional = std::optional<T>;
#else
template <typename T>
using Optional = c10::optional<T>;
#endif

inline constexpr bool kHasSdpa = FTUNE_TORCH_HAS_SDPA != 0;

// "1.13.0", "2.11.0": for logs and test messages.
inline const char* TorchVersion() { return TORCH_VERSION; }

// q (batch, heads, q_len, head_dim), k/v (batch, heads, k_len, head_dim) with
// the kv heads already repeated; mask: bool (batch, 1, q_len, k_len), true =
// may attend, or undefined together with is_causal. Only callable when
// kHasSdpa; callers take the math path otherwise.
inline at::Tensor ScaledDotProductAttention(const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& v, const at::Tensor& mask,
                                            bool is_causal, double scale) {
#if FTUNE_TORCH_HAS_SDPA
  Optional<at::Tensor> m;
  if (mask.defined()) m = mask;
  return at::scaled_dot_product_attention(q, k, v, m, /*dropout_p=*/0.0, is_causal, scale);
#else
  (void)q;
  (void)k;
  (void)v;
  (void)mask;
  (void)is_causal;
  (void)scale;
  TORCH_CHECK(false, "scaled_dot_product_attention needs LibTorch >= 2.1, this is ",
              TORCH_VERSION, "; use the math attention path");
#endif
}


// Flash attention over packed variable-length sequences, differentiable
// (autograd routes it to the flash backward). q (total, heads, head_dim),
// k/v (total, kv_heads, head_dim) with heads a multiple of kv_heads (GQA is
// native: K/V are not repeated), bf16/fp16 on CUDA, head_dim a multiple of 8
// up to 256; cu_seqlens int32 (num_seqs + 1) on the device, the offsets of
// each sequence in `total`; max_seqlen an upper bound of their lengths.
// Causal within each sequence. Returns (total, heads, head_dim). Only
// callable when kHasFlashVarlen.
#if FTUNE_TORCH_HAS_SDPA
inline constexpr bool kHasFlashVarlen = true;
#else
inline constexpr bool kHasFlashVarlen = false;
#endif
inline at::Tensor FlashAttentionVarlen(const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, const at::Tensor& cu_seqlens,
                                       int64_t max_seqlen, double scale) {
#if FTUNE_TORCH_HAS_SDPA
  auto out = at::_flash_attention_forward(q, k, v, cu_seqlens, cu_seqlens, max_seqlen,
                                          max_seqlen, /*dropout_p=*/0.0, /*is_causal=*/true,
                                          /*return_debug_mask=*/false, scale);
  return std::get<0>(out);
#else
  (void)q;
  (void)k;
  (void)v;
  (void)cu_seqlens;
  (void)max_seqlen;
  (void)scale;
  TORCH_CHECK(false, "flash attention needs LibTorch >= 2.1, this is ", TORCH_VERSION);
#endif
}

}  // namespace ftune::trainer::compat

#endif  // FTUNE_WORKER_TRAINER_TORCH_COMPAT_H_
