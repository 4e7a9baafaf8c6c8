// Reading checkpoint tensors into LibTorch tensors, and PEFT adapters.
//
// The safetensors reader (safetensors.h) hands out bytes; this module turns
// them into tensors of the dtype and device the engine computes in (a BF16
// checkpoint becomes fp32 on the CPU, stays bf16 on CUDA), and reads PEFT's
// adapter directory (adapter_config.json + adapter_model.safetensors) into a
// LoraConfig and named fp32 tensors.
//
// Errors are Status values naming the file and tensor (a missing tensor, an
// unsupported dtype, a shape that is not what the config implies); tensor
// code further in uses TORCH_CHECK.
//
// Thread-safety: free functions over immutable readers; any thread.
#ifndef FTUNE_WORKER_TRAINER_WEIGHTS_H_
#define FTUNE_WORKER_TRAINER_WEIGHTS_H_

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "worker/trainer/lora.h"
#include "worker/modelio/safetensors.h"
#include "ftune/status.h"

namespace ftune::trainer {

// The LibTorch dtype of a safetensors dtype; INVALID_ARGUMENT for the ones
// LibTorch has no type for here (sub-byte floats, fp8, unsigned > 8 bits).
Result<c10::ScalarType> TorchDtypeOf(Dtype dtype);

// The tensor `name` of one file or of a (sharded) model, converted to
// `dtype` on `device`. NOT_FOUND names the source and the tensor.
Result<at::Tensor> ReadTensor(const SafetensorsFile& file, std::string_view name,
                              c10::ScalarType dtype, c10::Device device);
Result<at::Tensor> ReadTensor(const SafetensorsModel& model, std::string_view name,
                              c10::ScalarType dtype, c10::Device device);
// Same, in the dtype stored in the file, on the CPU.
Result<at::Tensor> ReadTensorAsStored(const SafetensorsFile& file, std::string_view name);

// Checks that `t` has `shape`; INVALID_ARGUMENT "<source>: tensor '<name>'
// has shape [..] but the config implies [..]" otherwise.
Status CheckShape(const at::Tensor& t, const std::vector<int64_t>& shape,
                  std::string_view source, std::string_view name);

// A PEFT LoRA adapter directory.
struct PeftAdapter {
  LoraConfig config;
  std::string base_model_name_or_path;
  // Keys as saved by PEFT, e.g.
  // "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
  // values fp32 on the CPU.
  std::map<std::string, at::Tensor> tensors;
};

// Reads <dir>/adapter_config.json and <dir>/adapter_model.safetensors.
// Refuses what ftune does not implement instead of silently ignoring it:
// peft_type other than LORA, use_dora, bias other than "none",
// fan_in_fan_out, per-module rank_pattern/alpha_pattern, modules_to_save.
Result<PeftAdapter> ReadPeftAdapter(const std::string& dir);

// Writes a PEFT adapter directory (created if missing): adapter_config.json
// with the fields PEFT's LoraConfig reads, and adapter_model.safetensors with
// the fp32 tensors under their PEFT names and PEFT's {"format": "pt"}
// metadata, so the file is byte-identical to what peft's save_pretrained
// writes for the same tensors. Files are replaced atomically.
Status WritePeftAdapter(const std::string& dir, const LoraConfig& config,
                        const std::map<std::string, at::Tensor>& tensors,
                        const std::string& base_model_name_or_path);

// The PEFT tensor name of one LoRA matrix: kind is "lora_A" or "lora_B",
// module one of LoraConfig::DefaultTargetModules().
std::string PeftLoraName(int64_t layer, const std::string& module, const std::string& kind);

}  // namespace ftune::trainer

#endif  // FTUNE_WORKER_TRAINER_WEIGHTS_H_
