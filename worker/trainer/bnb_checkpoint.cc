// bitsandbytes 4-bit checkpoints; see bnb_checkpoint.h for the layout.
#include "worker/trainer/bnb_checkpoint.h"

#include <ATen/ATen.h>
#include <sys/types.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>
#include <regex>

#include "kernels/nf4.h"
#include "ftune/file_util.h"
#include "worker/modelio/llama_config.h"
#include "worker/trainer/weights.h"

namespace ftune::trainer {
namespace {

using json = nlohmann::json;

constexpr uint64_t kMaxConfigBytes = 16ull << 20;
// Tokenizer files of large vocabularies run to tens of MB; a GB is a mistake.
constexpr uint64_t kMaxCopiedFileBytes = 1ull << 30;
constexpr char kQuantStateSuffix[] = ".quant_state.bitsandbytes__nf4";

// str(torch.dtype) without "torch.", as bitsandbytes writes it.
Result<std::string> TorchDtypeName(c10::ScalarType t) {
  switch (t) {
    case at::kFloat: return std::string("float32");
    case at::kBFloat16: return std::string("bfloat16");
    case at::kHalf: return std::string("float16");
    default: break;
  }
  return InvalidArgumentError(std::string("NF4 weights must be float32, bfloat16 or float16, not ") +
                              c10::toString(t));
}

bool EndsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

at::Tensor FloatTable(const float* values, int64_t n) {
  return at::from_blob(const_cast<float*>(values), {n}, at::TensorOptions().dtype(at::kFloat))
      .clone();
}

bool SameBits(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == b.scalar_type() && a.numel() == b.numel() &&
         std::memcmp(a.contiguous().data_ptr(), b.contiguous().data_ptr(),
                     a.numel() * a.element_size()) == 0;
}

// A stored tensor, CPU, in its stored dtype.
Result<at::Tensor> ReadStored(const SafetensorsModel& model, const std::string& name) {
  FTUNE_ASSIGN_OR_RETURN(SafetensorsModel::TensorRef ref, model.Find(name));
  return ReadTensorAsStored(*ref.file, name);
}

// Regular files of dir that are not the weights or config.json: tokenizer
// files, generation_config.json, README, ... (sorted, for a stable order).

// transformers' BitsAndBytesConfig.to_dict() for load_in_4bit (keys sorted,
// as save_pretrained writes config.json).
json QuantizationConfig(const QuantizeModelOptions& o) {
  json q;
  q["_load_in_4bit"] = true;
  q["_load_in_8bit"] = false;
  q["bnb_4bit_compute_dtype"] = o.compute_dtype;
  q["bnb_4bit_quant_storage"] = "uint8";
  q["bnb_4bit_quant_type"] = "nf4";
  q["bnb_4bit_use_double_quant"] = o.nf4.double_quant;
  q["llm_int8_enable_fp32_cpu_offload"] = false;
  q["llm_int8_has_fp16_weight"] = false;
  q["llm_int8_skip_modules"] = nullptr;
  q["llm_int8_threshold"] = 6.0;
  q["load_in_4bit"] = true;
  q["load_in_8bit"] = false;
  q["quant_method"] = "bitsandbytes";
  return q;
}

}  // namespace

Result<std::vector<std::string>> ModelSideFiles(const std::string& dir) {
  FTUNE_ASSIGN_OR_RETURN(std::vector<std::string> all, ListDirectory(dir));
  std::vector<std::string> names;  // sorted, as ListDirectory returns them
  for (const std::string& name : all) {
    if (!IsRegularFile(dir + "/" + name)) continue;
    if (name == "config.json" || name == kSafetensorsIndexName || EndsWith(name, ".safetensors") ||
        EndsWith(name, ".bin") || EndsWith(name, ".pt") || EndsWith(name, ".pth")) {
      continue;
    }
    names.push_back(name);
  }
  return names;
}

Status CopyModelSideFiles(const std::string& in_dir, const std::string& out_dir) {
  FTUNE_ASSIGN_OR_RETURN(std::vector<std::string> extra, ModelSideFiles(in_dir));
  for (const std::string& f : extra) {
    FTUNE_ASSIGN_OR_RETURN(std::string bytes,
                                   ReadFileToString(in_dir + "/" + f, kMaxCopiedFileBytes));
    FTUNE_RETURN_IF_ERROR(WriteFileAtomically(out_dir + "/" + f, bytes));
  }
  return OkStatus();
}

bool IsQuantizedProjection(const std::string& name) {
  static const std::regex kProjection(
      R"(model\.layers\.[0-9]+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight)");
  return std::regex_match(name, kProjection);
}

std::string PythonFloatRepr(double v) {
  if (std::isnan(v)) return "NaN";  // json.dumps' spelling
  if (std::isinf(v)) return v > 0 ? "Infinity" : "-Infinity";
  if (v == 0) return std::signbit(v) ? "-0.0" : "0.0";
  // Shortest round-trip digits, like Python's repr (David Gay's mode 0).
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof(buf), v, std::chars_format::scientific);
  std::string sci(buf, res.ptr);  // "-1.2345e-05"
  std::string sign;
  if (sci[0] == '-') sign = "-", sci.erase(0, 1);
  const size_t e = sci.find('e');
  std::string digits = sci.substr(0, e);
  digits.erase(std::remove(digits.begin(), digits.end(), '.'), digits.end());
  const int exp10 = std::stoi(sci.substr(e + 1));
  const int k = static_cast<int>(digits.size());
  std::string out;
  if (exp10 >= -4 && exp10 < 16) {  // float_repr_style 'short': fixed notation
    if (exp10 >= 0) {
      std::string ip = digits.substr(0, std::min(k, exp10 + 1));
      ip.append(std::max(0, exp10 + 1 - k), '0');
      std::string fp = k > exp10 + 1 ? digits.substr(exp10 + 1) : "0";
      out = ip + "." + fp;
    } else {
      out = "0." + std::string(-exp10 - 1, '0') + digits;
    }
  } else {
    out = digits.substr(0, 1);
    if (k > 1) out += "." + digits.substr(1);
    const int a = std::abs(exp10);
    out += std::string("e") + (exp10 < 0 ? "-" : "+") + (a < 10 ? "0" : "") + std::to_string(a);
  }
  return sign + out;
}

std::string Nf4QuantStateJson(const Nf4Weight& w, c10::ScalarType dtype) {
  Result<std::string> dt = TorchDtypeName(dtype);
  TORCH_CHECK(dt.ok(), dt.status().message());
  // json.dumps of bitsandbytes' non-tensor dict, in its insertion order.
  std::string s = "{\"quant_type\": \"nf4\", \"blocksize\": " + std::to_string(w.blocksize) +
                  ", \"dtype\": \"" + *dt + "\", \"shape\": [" + std::to_string(w.out_features) +
                  ", " + std::to_string(w.in_features) + "]";
  if (w.nested()) {
    const float offset = w.offset.to(at::kCPU).item<float>();
    s += ", \"nested_blocksize\": " + std::to_string(kernels::kNf4NestedBlocksize) +
         ", \"nested_dtype\": \"float32\", \"nested_offset\": " +
         PythonFloatRepr(static_cast<double>(offset));
  }
  return s + "}";
}

std::vector<NamedCpuTensor> Nf4StateDict(const std::string& name, const Nf4Weight& weight,
                                         c10::ScalarType dtype) {
  const Nf4Weight w = weight.To(c10::kCPU);
  std::vector<NamedCpuTensor> out;
  // Params4bit data: (ceil(n / 2), 1) in quant_storage (uint8).
  out.emplace_back(name, w.packed.view({-1, 1}));
  out.emplace_back(name + ".absmax", w.absmax);
  const auto& nf4 = kernels::Nf4CodeValues();
  out.emplace_back(name + ".quant_map", FloatTable(nf4.data(), 16));
  if (w.nested()) {
    out.emplace_back(name + ".nested_absmax", w.nested_absmax);
    const auto& map8 = kernels::DynamicMapSigned();
    out.emplace_back(name + ".nested_quant_map", FloatTable(map8.data(), 256));
  }
  const std::string js = Nf4QuantStateJson(w, dtype);
  at::Tensor bytes = at::empty({static_cast<int64_t>(js.size())}, at::kByte);
  std::memcpy(bytes.data_ptr(), js.data(), js.size());
  out.emplace_back(name + kQuantStateSuffix, bytes);
  return out;
}

Result<Nf4Weight> Nf4WeightFromStateDict(const std::string& name, const RawTensorLookup& lookup,
                                         const std::string& source) {
  auto bad = [&](const std::string& m) {
    return DataLossError(source + ": NF4 weight '" + name + "': " + m);
  };
  Result<at::Tensor> qs = lookup(name + kQuantStateSuffix);
  if (!qs.ok()) {
    // A quant state of another type (fp4) says more than "missing".
    Result<at::Tensor> fp4 = lookup(name + ".quant_state.bitsandbytes__fp4");
    if (fp4.ok()) return InvalidArgumentError(source + ": '" + name + "' is fp4; ftune reads nf4 only");
    return qs.status();
  }
  at::Tensor qsb = qs->contiguous();
  if (qsb.scalar_type() != at::kByte || qsb.dim() != 1) return bad("quant_state is not a 1-D uint8 tensor");
  const std::string text(static_cast<const char*>(qsb.data_ptr()), qsb.numel());
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) return bad("quant_state is not a JSON object: " + text);
  Nf4Weight w;
  try {
    if (j.at("quant_type").get<std::string>() != "nf4") return bad("quant_type is not nf4: " + text);
    w.blocksize = j.at("blocksize").get<int64_t>();
    const auto shape = j.at("shape").get<std::vector<int64_t>>();
    if (shape.size() != 2) return bad("shape is not 2-D: " + text);
    w.out_features = shape[0];
    w.in_features = shape[1];
    const std::string dtype = j.at("dtype").get<std::string>();
    if (dtype != "float32" && dtype != "bfloat16" && dtype != "float16") {
      return bad("unsupported dtype '" + dtype + "'");
    }
    if (j.contains("nested_offset")) {
      if (j.at("nested_blocksize").get<int64_t>() != kernels::kNf4NestedBlocksize ||
          j.at("nested_dtype").get<std::string>() != "float32") {
        return bad("nested quantization must be blocks of 256 fp32 absmax: " + text);
      }
      w.offset = at::full({1}, static_cast<float>(j.at("nested_offset").get<double>()),
                          at::TensorOptions().dtype(at::kFloat));
    }
  } catch (const json::exception& e) {
    return bad(std::string("quant_state ") + e.what() + ": " + text);
  }
  if (w.blocksize <= 0 || w.out_features <= 0 || w.in_features <= 0) {
    return bad("non-positive blocksize or shape: " + text);
  }
  if (!kernels::ValidateNf4Blocksize(w.blocksize).ok()) return bad("bad blocksize: " + text);
  // The packed bytes, whatever quant_storage dtype they are viewed as.
  FTUNE_ASSIGN_OR_RETURN(at::Tensor packed, lookup(name));
  packed = packed.contiguous();
  const int64_t nbytes = packed.numel() * static_cast<int64_t>(packed.element_size());
  if (nbytes != kernels::Nf4PackedBytes(w.numel())) {
    return bad("packed weight has " + std::to_string(nbytes) + " bytes but shape [" +
               std::to_string(w.out_features) + ", " + std::to_string(w.in_features) + "] needs " +
               std::to_string(kernels::Nf4PackedBytes(w.numel())));
  }
  w.packed = at::empty({nbytes}, at::kByte);
  std::memcpy(w.packed.data_ptr(), packed.data_ptr(), nbytes);

  FTUNE_ASSIGN_OR_RETURN(at::Tensor quant_map, lookup(name + ".quant_map"));
  const auto& nf4 = kernels::Nf4CodeValues();
  if (!SameBits(quant_map, FloatTable(nf4.data(), 16))) {
    return bad("quant_map is not bitsandbytes' NF4 map (a custom map cannot be reproduced)");
  }
  FTUNE_ASSIGN_OR_RETURN(w.absmax, lookup(name + ".absmax"));
  w.absmax = w.absmax.contiguous().view({-1});
  if (w.offset.defined()) {
    FTUNE_ASSIGN_OR_RETURN(w.nested_absmax, lookup(name + ".nested_absmax"));
    w.nested_absmax = w.nested_absmax.contiguous().view({-1});
    FTUNE_ASSIGN_OR_RETURN(at::Tensor map8, lookup(name + ".nested_quant_map"));
    const auto& dyn = kernels::DynamicMapSigned();
    if (!SameBits(map8, FloatTable(dyn.data(), 256))) {
      return bad("nested_quant_map is not bitsandbytes' signed dynamic map");
    }
  }
  const int64_t nb = w.num_blocks();
  const at::ScalarType want = w.nested() ? at::kByte : at::kFloat;
  if (w.absmax.scalar_type() != want || w.absmax.numel() != nb) {
    return bad("absmax must be " + std::string(c10::toString(want)) + " [" + std::to_string(nb) +
               "], got " + c10::toString(w.absmax.scalar_type()) + " [" +
               std::to_string(w.absmax.numel()) + "]");
  }
  if (w.nested() && (w.nested_absmax.scalar_type() != at::kFloat ||
                     w.nested_absmax.numel() != kernels::Nf4NumNestedBlocks(nb))) {
    return bad("nested_absmax must be F32 [" + std::to_string(kernels::Nf4NumNestedBlocks(nb)) +
               "], got " + std::to_string(w.nested_absmax.numel()) + " elements");
  }
  return w;
}

Status QuantizeModelDirectory(const std::string& in_dir, const std::string& out_dir,
                              const QuantizeModelOptions& options) {
  if (!kernels::ValidateNf4Blocksize(options.nf4.blocksize).ok()) {
    return InvalidArgumentError("nf4 blocksize (" + std::to_string(options.nf4.blocksize) +
                                ") must be a power of two in [64, 4096]");
  }
  if (options.compute_dtype != "bfloat16" && options.compute_dtype != "float16" &&
      options.compute_dtype != "float32") {
    return InvalidArgumentError("bnb_4bit_compute_dtype '" + options.compute_dtype +
                                "' must be bfloat16, float16 or float32");
  }
  const std::string config_path = in_dir + "/config.json";
  FTUNE_ASSIGN_OR_RETURN(std::string config_text,
                                 ReadFileToString(config_path, kMaxConfigBytes));
  // Validates that this is a Llama ftune can run, before writing anything.
  FTUNE_RETURN_IF_ERROR(ParseLlamaConfig(config_text, config_path).status());
  json config = json::parse(config_text, nullptr, /*allow_exceptions=*/false);
  if (!config.is_object()) return DataLossError(config_path + ": not a JSON object");
  if (config.contains("quantization_config")) {
    return InvalidArgumentError(config_path + " already has a quantization_config");
  }
  FTUNE_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsModel> st,
                                 SafetensorsModel::OpenDirectory(in_dir));
  FTUNE_RETURN_IF_ERROR(MakeDirectory(out_dir));

  std::vector<at::Tensor> keep;  // owns the bytes TensorToWrite points at
  std::vector<TensorToWrite> out;
  for (const std::string& name : st->TensorNames()) {
    FTUNE_ASSIGN_OR_RETURN(SafetensorsModel::TensorRef ref, st->Find(name));
    if (!IsQuantizedProjection(name)) {
      // Copied as stored, straight from the mapping.
      FTUNE_ASSIGN_OR_RETURN(ByteSpan bytes, st->Data(name));
      out.push_back({name, ref.info->dtype, ref.info->shape, bytes.data, bytes.size});
      continue;
    }
    FTUNE_ASSIGN_OR_RETURN(at::Tensor w, ReadTensorAsStored(*ref.file, name));
    if (w.dim() != 2) {
      return InvalidArgumentError(st->source() + ": projection '" + name + "' has shape " +
                                  ShapeToString(ref.info->shape) + ", not (out, in)");
    }
    FTUNE_RETURN_IF_ERROR(TorchDtypeName(w.scalar_type()).status());
    const Nf4Weight q = QuantizeNf4Weight(w.to(options.device), options.nf4);
    for (auto& [qname, t] : Nf4StateDict(name, q, w.scalar_type())) {
      keep.push_back(t.contiguous());
      const at::Tensor& k = keep.back();
      Dtype dtype = k.scalar_type() == at::kByte ? Dtype::kU8 : Dtype::kF32;
      std::vector<uint64_t> shape(k.sizes().begin(), k.sizes().end());
      out.push_back({qname, dtype, shape, k.data_ptr(),
                     static_cast<uint64_t>(k.numel() * k.element_size())});
    }
  }
  FTUNE_RETURN_IF_ERROR(
      WriteSafetensors(out_dir + "/" + kSafetensorsSingleName, out, {{"format", "pt"}}));

  config["quantization_config"] = QuantizationConfig(options);
  FTUNE_RETURN_IF_ERROR(
      WriteFileAtomically(out_dir + "/config.json", config.dump(2) + "\n"));

  return CopyModelSideFiles(in_dir, out_dir);
}

Result<bool> IsBnb4bitDirectory(const std::string& dir) {
  const std::string path = dir + "/config.json";
  FTUNE_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path, kMaxConfigBytes));
  json config = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!config.is_object()) return DataLossError(path + ": not a JSON object");
  if (!config.contains("quantization_config")) return false;
  const json& q = config["quantization_config"];
  auto str = [&](const char* key) {
    return q.contains(key) && q[key].is_string() ? q[key].get<std::string>() : std::string();
  };
  auto flag = [&](const char* key) {
    return q.contains(key) && q[key].is_boolean() && q[key].get<bool>();
  };
  if (!q.is_object() || str("quant_method") != "bitsandbytes") {
    return InvalidArgumentError(path + ": quantization_config quant_method '" + str("quant_method") +
                                "' is not supported (ftune reads bitsandbytes nf4)");
  }
  if (!flag("load_in_4bit") || flag("load_in_8bit")) {
    return InvalidArgumentError(path + ": only bitsandbytes load_in_4bit checkpoints are supported");
  }
  if (str("bnb_4bit_quant_type") != "nf4") {
    return InvalidArgumentError(path + ": bnb_4bit_quant_type '" + str("bnb_4bit_quant_type") +
                                "' is not supported (nf4 only)");
  }
  return true;
}

Result<std::unique_ptr<LlamaModel>> LoadModelDirectory(const std::string& dir,
                                                       const ModelOptions& options) {
  FTUNE_ASSIGN_OR_RETURN(bool bnb, IsBnb4bitDirectory(dir));
  if (!bnb) return LlamaModel::Load(dir, options);
  FTUNE_ASSIGN_OR_RETURN(LlamaConfig config, LoadLlamaConfig(dir));
  FTUNE_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsModel> st,
                                 SafetensorsModel::OpenDirectory(dir));
  const SafetensorsModel* stp = st.get();
  LlamaModel::TensorSource tensors = [stp, &options](const std::string& name) {
    return ReadTensor(*stp, name, options.dtype, options.device);
  };
  RawTensorLookup raw = [stp](const std::string& name) { return ReadStored(*stp, name); };
  LlamaModel::BaseLinearSource bases =
      [stp, &raw, &options](const std::string& name, int64_t out_features,
                            int64_t in_features) -> Result<std::unique_ptr<BaseLinear>> {
    FTUNE_ASSIGN_OR_RETURN(Nf4Weight w, Nf4WeightFromStateDict(name, raw, stp->source()));
    if (w.out_features != out_features || w.in_features != in_features) {
      return InvalidArgumentError(stp->source() + ": NF4 weight '" + name + "' has shape [" +
                                  std::to_string(w.out_features) + ", " +
                                  std::to_string(w.in_features) + "] but the config implies [" +
                                  std::to_string(out_features) + ", " +
                                  std::to_string(in_features) + "]");
    }
    return std::unique_ptr<BaseLinear>(std::make_unique<Nf4Linear>(w.To(options.device)));
  };
  return LlamaModel::Build(config, tensors, options, stp->source(), bases);
}

Result<std::unique_ptr<LlamaModel>> LoadModelAndAdapter(const std::string& model_dir,
                                                        const std::string& adapter_dir,
                                                        const ModelOptions& options) {
  try {
    Result<std::unique_ptr<LlamaModel>> loaded = LoadModelDirectory(model_dir, options);
    if (!loaded.ok()) return Status(loaded.status().code(), "--model " + loaded.status().message());
    std::unique_ptr<LlamaModel> model = std::move(loaded).value();
    if (!adapter_dir.empty()) {
      const Status s = model->LoadAdapter(adapter_dir);
      if (!s.ok()) return Status(s.code(), "--adapter " + adapter_dir + ": " + s.message());
    }
    return model;
  } catch (const c10::Error& e) {
    return InternalError("loading " + model_dir + ": " + e.what_without_backtrace());
  }
}

}  // namespace ftune::trainer
