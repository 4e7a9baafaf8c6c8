#include "worker/trainer/merge.h"

#include <ATen/ATen.h>

#include <map>
#include <set>
#include <utility>
#include <vector>

#include "worker/trainer/bnb_checkpoint.h"
#include "ftune/file_util.h"
#include "worker/modelio/llama_config.h"
#include "worker/modelio/safetensors.h"
#include "worker/trainer/weights.h"

namespace ftune::trainer {
namespace {

constexpr uint64_t kMaxIndexBytes = 64ull << 20;

// "model.layers.3.self_attn.q_proj.weight" -> (3, "q_proj"); false for
// tensors that are not a layer projection.
bool ParseProjectionName(const std::string& name, int64_t* layer, std::string* module) {
  static const std::string kPrefix = "model.layers.";
  if (name.rfind(kPrefix, 0) != 0) return false;
  size_t dot = name.find('.', kPrefix.size());
  if (dot == std::string::npos) return false;
  const std::string index = name.substr(kPrefix.size(), dot - kPrefix.size());
  if (index.empty() || index.find_first_not_of("0123456789") != std::string::npos) return false;
  const std::string rest = name.substr(dot + 1);
  for (const std::string& m : LoraConfig::DefaultTargetModules()) {
    const std::string group = (m == "gate_proj" || m == "up_proj" || m == "down_proj")
                                  ? "mlp."
                                  : "self_attn.";
    if (rest == group + m + ".weight") {
      *layer = std::stoll(index);
      *module = m;
      return true;
    }
  }
  return false;
}

}  // namespace

Result<MergeReport> MergeAdapter(const MergeOptions& options) {
  const auto progress = [&](const std::string& line) {
    if (options.progress) options.progress(line);
  };
  FTUNE_ASSIGN_OR_RETURN(bool is_4bit, IsBnb4bitDirectory(options.model_dir));
  if (is_4bit) {
    return InvalidArgumentError(
        options.model_dir +
        " is a 4-bit (bitsandbytes) checkpoint: merge into the dense model it was quantized "
        "from (the directory given to `ftune-rank quantize`), so NF4 rounding is not baked "
        "into the merged weights");
  }
  // Validates that this is a Llama ftune understands before writing anything.
  FTUNE_RETURN_IF_ERROR(LoadLlamaConfig(options.model_dir + "/config.json").status());
  FTUNE_ASSIGN_OR_RETURN(PeftAdapter adapter, ReadPeftAdapter(options.adapter_dir));
  FTUNE_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsModel> base,
                                 SafetensorsModel::OpenDirectory(options.model_dir));
  const double scaling = adapter.config.Scaling();

  // Check the whole adapter against the base before writing anything: every
  // adapter tensor pairs with a projection of the right shape.
  std::map<std::string, std::pair<const at::Tensor*, const at::Tensor*>> deltas;
  std::set<std::string> used;  // adapter tensors that found their projection
  for (const std::string& name : base->TensorNames()) {
    int64_t layer = 0;
    std::string module;
    if (!ParseProjectionName(name, &layer, &module)) continue;
    auto a = adapter.tensors.find(PeftLoraName(layer, module, "lora_A"));
    auto b = adapter.tensors.find(PeftLoraName(layer, module, "lora_B"));
    if (a == adapter.tensors.end() && b == adapter.tensors.end()) continue;
    if (a == adapter.tensors.end() || b == adapter.tensors.end()) {
      return InvalidArgumentError(options.adapter_dir + ": '" + name +
                                  "' has only one of lora_A / lora_B");
    }
    FTUNE_ASSIGN_OR_RETURN(SafetensorsModel::TensorRef ref, base->Find(name));
    const std::vector<uint64_t>& shape = ref.info->shape;
    const at::Tensor& at_a = a->second;  // (r, in)
    const at::Tensor& at_b = b->second;  // (out, r)
    if (shape.size() != 2 || at_a.dim() != 2 || at_b.dim() != 2 ||
        at_a.size(1) != static_cast<int64_t>(shape[1]) ||
        at_b.size(0) != static_cast<int64_t>(shape[0]) || at_a.size(0) != at_b.size(1)) {
      return InvalidArgumentError(
          options.adapter_dir + ": adapter for '" + name + "' has lora_A " +
          ShapeToString({static_cast<uint64_t>(at_a.size(0)), static_cast<uint64_t>(at_a.size(1))}) +
          " and lora_B " +
          ShapeToString({static_cast<uint64_t>(at_b.size(0)), static_cast<uint64_t>(at_b.size(1))}) +
          " but the base weight is " + ShapeToString(shape) + " in " + options.model_dir);
    }
    deltas[name] = {&at_a, &at_b};
    used.insert(a->first);
    used.insert(b->first);
  }
  for (const auto& [name, t] : adapter.tensors) {
    if (used.count(name) == 0) {
      return InvalidArgumentError(options.adapter_dir + ": adapter tensor '" + name +
                                  "' has no matching projection in " + options.model_dir);
    }
  }

  FTUNE_RETURN_IF_ERROR(MakeDirectory(options.out_dir));
  MergeReport report;
  for (const auto& shard : base->shards()) {
    std::vector<at::Tensor> keep;  // owns the bytes of merged tensors
    std::vector<TensorToWrite> out;
    for (const TensorInfo& info : shard->tensors()) {
      auto delta = deltas.find(info.name);
      if (delta == deltas.end()) {
        FTUNE_ASSIGN_OR_RETURN(ByteSpan bytes, shard->Data(info.name));
        out.push_back({info.name, info.dtype, info.shape, bytes.data, bytes.size});
        ++report.copied_tensors;
        continue;
      }
      FTUNE_ASSIGN_OR_RETURN(at::Tensor w, ReadTensorAsStored(*shard, info.name));
      const at::Tensor& a = *delta->second.first;   // (r, in) fp32
      const at::Tensor& b = *delta->second.second;  // (out, r) fp32
      // (out, in): fp32 delta, one rounding back to the stored dtype.
      at::Tensor merged =
          (w.to(at::kFloat) + at::matmul(b, a).mul(scaling)).to(w.scalar_type()).contiguous();
      keep.push_back(merged);
      out.push_back({info.name, info.dtype, info.shape, keep.back().data_ptr(),
                     static_cast<uint64_t>(merged.numel() * merged.element_size())});
      ++report.merged_projections;
    }
    const std::string file_name = shard->path().substr(shard->path().rfind('/') + 1);
    const std::string out_path = options.out_dir + "/" + file_name;
    FTUNE_RETURN_IF_ERROR(WriteSafetensors(out_path, out, {{"format", "pt"}}));
    ++report.files_written;
    for (const TensorToWrite& t : out) report.bytes_written += static_cast<int64_t>(t.num_bytes);
    progress("wrote " + out_path + " (" + std::to_string(out.size()) + " tensors)");
  }
  const std::string index_path = options.model_dir + "/" + kSafetensorsIndexName;
  if (base->shards().size() > 1 || base->index_total_size().has_value()) {
    FTUNE_ASSIGN_OR_RETURN(std::string index, ReadFileToString(index_path, kMaxIndexBytes));
    FTUNE_RETURN_IF_ERROR(
        WriteFileAtomically(options.out_dir + "/" + kSafetensorsIndexName, index));
  }
  FTUNE_ASSIGN_OR_RETURN(
      std::string config, ReadFileToString(options.model_dir + "/config.json", kMaxIndexBytes));
  FTUNE_RETURN_IF_ERROR(WriteFileAtomically(options.out_dir + "/config.json", config));
  FTUNE_RETURN_IF_ERROR(CopyModelSideFiles(options.model_dir, options.out_dir));
  return report;
}

}  // namespace ftune::trainer
