// Checkpoint bytes -> LibTorch tensors; PEFT adapter directories.
#include "worker/trainer/weights.h"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <sys/stat.h>

#include <cerrno>
#include <sstream>
#include <utility>

#include "ftune/file_util.h"

namespace ftune::trainer {
namespace {

std::string SizesToString(at::IntArrayRef sizes) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < sizes.size(); ++i) s << (i ? ", " : "") << sizes[i];
  s << "]";
  return s.str();
}

Result<at::Tensor> ReadFromFile(const SafetensorsFile& file, const TensorInfo& info) {
  FTUNE_ASSIGN_OR_RETURN(c10::ScalarType stored, TorchDtypeOf(info.dtype));
  std::vector<int64_t> shape(info.shape.begin(), info.shape.end());
  at::Tensor t = at::empty(shape, at::TensorOptions().dtype(stored));
  // Same byte count by construction: the header was validated against
  // dtype x shape, and LibTorch's element sizes are the format's.
  if (static_cast<uint64_t>(t.nbytes()) != info.num_bytes()) {
    return InternalError(file.path() + ": tensor '" + info.name + "': " +
                         std::to_string(info.num_bytes()) + " bytes in the file but " +
                         std::to_string(t.nbytes()) + " in a LibTorch tensor");
  }
  if (t.nbytes() > 0) FTUNE_RETURN_IF_ERROR(file.Read(info.name, t.data_ptr()));
  return t;
}

}  // namespace

Result<c10::ScalarType> TorchDtypeOf(Dtype dtype) {
  switch (dtype) {
    case Dtype::kBool: return c10::ScalarType::Bool;
    case Dtype::kU8: return c10::ScalarType::Byte;
    case Dtype::kI8: return c10::ScalarType::Char;
    case Dtype::kI16: return c10::ScalarType::Short;
    case Dtype::kI32: return c10::ScalarType::Int;
    case Dtype::kI64: return c10::ScalarType::Long;
    case Dtype::kF16: return c10::ScalarType::Half;
    case Dtype::kBF16: return c10::ScalarType::BFloat16;
    case Dtype::kF32: return c10::ScalarType::Float;
    case Dtype::kF64: return c10::ScalarType::Double;
    case Dtype::kC64: return c10::ScalarType::ComplexFloat;
    default:
      return InvalidArgumentError("safetensors dtype " + std::string(DtypeName(dtype)) +
                                  " has no LibTorch tensor type here");
  }
}

Result<at::Tensor> ReadTensorAsStored(const SafetensorsFile& file, std::string_view name) {
  FTUNE_ASSIGN_OR_RETURN(const TensorInfo* info, file.Info(name));
  return ReadFromFile(file, *info);
}

Result<at::Tensor> ReadTensor(const SafetensorsFile& file, std::string_view name,
                              c10::ScalarType dtype, c10::Device device) {
  FTUNE_ASSIGN_OR_RETURN(at::Tensor t, ReadTensorAsStored(file, name));
  return t.to(at::TensorOptions().dtype(dtype).device(device));
}

Result<at::Tensor> ReadTensor(const SafetensorsModel& model, std::string_view name,
                              c10::ScalarType dtype, c10::Device device) {
  FTUNE_ASSIGN_OR_RETURN(SafetensorsModel::TensorRef ref, model.Find(name));
  FTUNE_ASSIGN_OR_RETURN(at::Tensor t, ReadFromFile(*ref.file, *ref.info));
  return t.to(at::TensorOptions().dtype(dtype).device(device));
}

Status CheckShape(const at::Tensor& t, const std::vector<int64_t>& shape, std::string_view source,
                  std::string_view name) {
  if (t.sizes() == at::IntArrayRef(shape)) return OkStatus();
  return InvalidArgumentError(std::string(source) + ": tensor '" + std::string(name) +
                              "' has shape " + SizesToString(t.sizes()) +
                              " but the config implies " + SizesToString(shape));
}

std::string PeftLoraName(int64_t layer, const std::string& module, const std::string& kind) {
  const bool mlp = module == "gate_proj" || module == "up_proj" || module == "down_proj";
  return "base_model.model.model.layers." + std::to_string(layer) + (mlp ? ".mlp." : ".self_attn.") +
         module + "." + kind + ".weight";
}

Result<PeftAdapter> ReadPeftAdapter(const std::string& dir) {
  const std::string config_path = dir + "/adapter_config.json";
  FTUNE_ASSIGN_OR_RETURN(std::string text, ReadFileToString(config_path, 1 << 20));
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return DataLossError(config_path + ": not a JSON object");
  }
  auto bad = [&](const std::string& m) { return InvalidArgumentError(config_path + ": " + m); };
  auto is_set = [&](const char* key) {
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) return false;
    if (it->is_boolean()) return it->get<bool>();
    if (it->is_object() || it->is_array()) return !it->empty();
    return true;
  };

  PeftAdapter out;
  const std::string peft_type = j.value("peft_type", std::string("LORA"));
  if (peft_type != "LORA") return bad("peft_type '" + peft_type + "' is not LORA");
  if (is_set("use_dora")) return bad("use_dora is not supported");
  if (is_set("fan_in_fan_out")) return bad("fan_in_fan_out is not supported (Llama uses nn.Linear)");
  if (is_set("rank_pattern") || is_set("alpha_pattern")) {
    return bad("rank_pattern/alpha_pattern (per-module ranks) are not supported");
  }
  if (is_set("modules_to_save")) return bad("modules_to_save is not supported");
  if (is_set("layers_to_transform")) return bad("layers_to_transform is not supported");
  const std::string bias = j.value("bias", std::string("none"));
  if (bias != "none") return bad("bias '" + bias + "' is not supported (only \"none\")");

  if (!j.contains("r") || !j["r"].is_number_integer()) return bad("'r' must be an integer");
  out.config.r = j["r"].get<int64_t>();
  if (j.contains("lora_alpha")) {
    if (!j["lora_alpha"].is_number()) return bad("'lora_alpha' must be a number");
    out.config.lora_alpha = j["lora_alpha"].get<double>();
  }
  if (j.contains("lora_dropout") && !j["lora_dropout"].is_null()) {
    if (!j["lora_dropout"].is_number()) return bad("'lora_dropout' must be a number");
    out.config.lora_dropout = j["lora_dropout"].get<double>();
  }
  out.config.use_rslora = j.value("use_rslora", false);
  const auto& tm = j["target_modules"];
  if (tm.is_string() && tm.get<std::string>() == "all-linear") {
    out.config.target_modules = LoraConfig::DefaultTargetModules();
  } else if (tm.is_array()) {
    out.config.target_modules.clear();
    for (const auto& m : tm) {
      if (!m.is_string()) return bad("target_modules entries must be strings");
      out.config.target_modules.push_back(m.get<std::string>());
    }
  } else {
    return bad("target_modules must be a list of module names or \"all-linear\"");
  }
  if (j.contains("base_model_name_or_path") && j["base_model_name_or_path"].is_string()) {
    out.base_model_name_or_path = j["base_model_name_or_path"].get<std::string>();
  }
  FTUNE_RETURN_IF_ERROR(out.config.Validate());

  const std::string weights_path = dir + "/adapter_model.safetensors";
  FTUNE_ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(weights_path));
  for (const TensorInfo& info : file->tensors()) {
    FTUNE_ASSIGN_OR_RETURN(at::Tensor t, ReadFromFile(*file, info));
    out.tensors[info.name] = t.to(at::kFloat);
  }
  return out;
}

Status WritePeftAdapter(const std::string& dir, const LoraConfig& config,
                        const std::map<std::string, at::Tensor>& tensors,
                        const std::string& base_model_name_or_path) {
  FTUNE_RETURN_IF_ERROR(config.Validate());
  FTUNE_RETURN_IF_ERROR(MakeDirectories(dir));

  nlohmann::json j;
  j["peft_type"] = "LORA";
  j["task_type"] = "CAUSAL_LM";
  j["base_model_name_or_path"] = base_model_name_or_path;
  j["r"] = config.r;
  j["lora_alpha"] = config.lora_alpha;
  j["lora_dropout"] = config.lora_dropout;
  j["target_modules"] = config.target_modules;
  j["use_rslora"] = config.use_rslora;
  j["bias"] = "none";
  j["fan_in_fan_out"] = false;
  j["use_dora"] = false;
  j["init_lora_weights"] = true;
  j["inference_mode"] = true;
  j["modules_to_save"] = nullptr;
  j["layers_to_transform"] = nullptr;
  j["layers_pattern"] = nullptr;
  j["rank_pattern"] = nlohmann::json::object();
  j["alpha_pattern"] = nlohmann::json::object();
  j["revision"] = nullptr;

  std::vector<at::Tensor> keep;  // contiguous fp32 CPU copies backing `out`
  std::vector<TensorToWrite> out;
  for (const auto& [name, t] : tensors) {
    keep.push_back(t.detach().to(at::TensorOptions().dtype(at::kFloat).device(at::kCPU)).contiguous());
    TensorToWrite w;
    w.name = name;
    w.dtype = Dtype::kF32;
    for (int64_t s : keep.back().sizes()) w.shape.push_back(static_cast<uint64_t>(s));
    w.data = keep.back().data_ptr();
    w.num_bytes = keep.back().nbytes();
    out.push_back(std::move(w));
  }
  FTUNE_RETURN_IF_ERROR(
      WriteSafetensors(dir + "/adapter_model.safetensors", out, {{"format", "pt"}}));
  return WriteFileAtomically(dir + "/adapter_config.json", j.dump(2) + "\n");
}

}  // namespace ftune::trainer
