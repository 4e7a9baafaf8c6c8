// Llama checkpoints pre-quantized to NF4 in the layout transformers +
// bitsandbytes save a 4-bit model (`model.save_pretrained` after
// `from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))`),
// written by `ftune-rank quantize` and read back by `train`.
//
// Layout, checked against the sources (bitsandbytes functional.py
// `QuantState.as_dict(packed=True)` + `pack_dict_to_tensor`, nn/modules.py
// `Linear4bit._save_to_state_dict`; transformers `BitsAndBytesConfig.to_dict`,
// as seen in saved configs of 4-bit Llama checkpoints on the Hub): for each
// quantized `P = model.layers.N.{self_attn.{q,k,v,o}_proj,mlp.{gate,up,down}_proj}.weight`
//   P                                  U8  [ceil(n/2), 1]  packed codes (quant_storage uint8)
//   P.absmax                           U8  [num_blocks]  when nested, else F32
//   P.quant_map                        F32 [16]          the NF4 code values
//   P.nested_absmax                    F32 [ceil(num_blocks/256)]   nested only
//   P.nested_quant_map                 F32 [256]         signed dynamic map, nested only
//   P.quant_state.bitsandbytes__nf4    U8  [len]  UTF-8 of json.dumps({"quant_type",
//       "blocksize", "dtype", "shape", ["nested_blocksize", "nested_dtype",
//       "nested_offset"]}) in that key order, Python's default separators and
//       float repr, dtype spelled as str(torch.dtype) without "torch.".
// Every other tensor is copied as stored; safetensors metadata {"format": "pt"};
// config.json gains `quantization_config` with transformers' keys.
//
// Thread-safety: free functions; any thread.
#ifndef FTUNE_WORKER_TRAINER_BNB_CHECKPOINT_H_
#define FTUNE_WORKER_TRAINER_BNB_CHECKPOINT_H_

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "worker/trainer/model.h"
#include "worker/trainer/nf4_linear.h"
#include "worker/modelio/safetensors.h"
#include "ftune/status.h"

namespace ftune::trainer {

struct QuantizeModelOptions {
  Nf4Options nf4;
  // bnb_4bit_compute_dtype recorded in config.json: what transformers will
  // compute in when it loads the directory ("bfloat16", "float16", "float32").
  std::string compute_dtype = "bfloat16";
  // Where the weights are quantized. The bytes are the same on CPU and CUDA
  // (kernels/nf4.h); CUDA is only faster.
  c10::Device device = c10::Device(c10::DeviceType::CPU);
};

// True for the HF names of the 7 linear projections bitsandbytes quantizes
// ("model.layers.3.mlp.down_proj.weight"); embeddings, norms and lm_head stay.
bool IsQuantizedProjection(const std::string& name);

// Python's repr() of a float (shortest round-trip digits; fixed notation for
// decimal exponents -4..15, else "1e-05" style), as json.dumps writes it.
std::string PythonFloatRepr(double v);

// The JSON text bitsandbytes packs into `quant_state.bitsandbytes__nf4`.
// `dtype` is the weight's dtype when it was quantized.
std::string Nf4QuantStateJson(const Nf4Weight& w, c10::ScalarType dtype);

// One state-dict entry: name and a CPU tensor in the dtype it is saved in.
using NamedCpuTensor = std::pair<std::string, at::Tensor>;
// The Linear4bit entries of one weight named `name` ("...q_proj.weight").
std::vector<NamedCpuTensor> Nf4StateDict(const std::string& name, const Nf4Weight& w,
                                         c10::ScalarType dtype);
// The inverse, from any tensor lookup (by full name, e.g. name + ".absmax").
// Refuses what it cannot reproduce exactly: quant_type other than nf4, a
// quant_map or nested_quant_map other than bitsandbytes' maps, shapes that do
// not fit the JSON's. The result is on the CPU.
using RawTensorLookup = std::function<Result<at::Tensor>(const std::string& name)>;
Result<Nf4Weight> Nf4WeightFromStateDict(const std::string& name, const RawTensorLookup& lookup,
                                         const std::string& source);

// The regular files of a model directory other than weights and
// config.json (tokenizer files, generation_config.json, ...), sorted: what a
// derived model directory (quantized, merged) carries over unchanged.
Result<std::vector<std::string>> ModelSideFiles(const std::string& dir);
// Copies ModelSideFiles(in_dir) into out_dir, each atomically.
Status CopyModelSideFiles(const std::string& in_dir, const std::string& out_dir);

// Reads the HF Llama directory in_dir and writes out_dir (created if missing;
// its parent must exist): model.safetensors with the projections quantized,
// config.json with quantization_config, and every other regular file of
// in_dir (tokenizer, generation config) copied. All files are written
// atomically.
Status QuantizeModelDirectory(const std::string& in_dir, const std::string& out_dir,
                              const QuantizeModelOptions& options);

// Whether config.json declares a bitsandbytes 4-bit checkpoint. Other
// quantization methods, 8-bit and fp4 are INVALID_ARGUMENT (not silently
// loaded as dense).
Result<bool> IsBnb4bitDirectory(const std::string& dir);

// Any model directory ftune can train from: a bitsandbytes 4-bit one (the
// projections become Nf4Linear from their saved bytes, moved to
// options.device, whatever options.quantize_base says) or a dense one
// (LlamaModel::Load). Not yet matched: bitsandbytes dequantizes to the quant
// state's "dtype" and then casts to the compute dtype, while Nf4Linear
// dequantizes straight to the compute dtype; the two agree whenever they are
// the same dtype (bf16 on CUDA, fp32 checkpoints on the CPU) but a bf16-
// quantized checkpoint run in fp32 here skips that bf16 rounding.
Result<std::unique_ptr<LlamaModel>> LoadModelDirectory(const std::string& dir,
                                                       const ModelOptions& options);

// LoadModelDirectory(model_dir), then the PEFT adapter in adapter_dir (none
// when empty), as the score and generate commands load them: errors name
// the flag they came from (--model, --adapter), and a LibTorch error while
// loading becomes an INTERNAL status naming the directory.
Result<std::unique_ptr<LlamaModel>> LoadModelAndAdapter(const std::string& model_dir,
                                                        const std::string& adapter_dir,
                                                        const ModelOptions& options);

}  // namespace ftune::trainer

#endif  // FTUNE_WORKER_TRAINER_BNB_CHECKPOINT_H_
