#include "worker/trainer/checkpoint_manifest.h"

#include <nlohmann/json.hpp>

namespace ftune::trainer {

using json = nlohmann::json;

Result<TrainerState> ParseCheckpointManifest(std::string_view text, const std::string& path) {
  const json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object() || j.value("format", "") != "ftune-checkpoint") {
    return DataLossError(path + ": not an ftune checkpoint manifest");
  }
  try {
    if (j.at("version").get<int>() != kCheckpointFormatVersion) {
      return DataLossError(path + ": checkpoint format version " +
                           std::to_string(j.at("version").get<int>()) + ", this ftune reads " +
                           std::to_string(kCheckpointFormatVersion));
    }
    TrainerState s;
    s.step = j.at("step").get<int64_t>();
    s.micro_batches = j.at("micro_batches").get<int64_t>();
    s.tokens_total = j.at("tokens_total").get<int64_t>();
    s.loss = j.at("loss").get<double>();
    s.world_size = j.at("world_size").get<int>();
    s.total_numel = j.at("total_numel").get<int64_t>();
    s.seed = j.at("seed").get<uint64_t>();
    for (const json& e : j.at("layout")) {
      s.layout.push_back({e.at("name").get<std::string>(), e.at("offset").get<int64_t>(),
                          e.at("numel").get<int64_t>(),
                          e.at("shape").get<std::vector<int64_t>>()});
    }
    if (s.world_size < 1 || s.step < 0 || s.total_numel < 0 ||
        static_cast<int>(j.at("shards").size()) != s.world_size) {
      return DataLossError(path + ": inconsistent world_size/step/shards");
    }
    for (const json& shard : j.at("shards"))
      s.shard_bytes.push_back(shard.at("bytes").get<int64_t>());
    return s;
  } catch (const json::exception& e) {
    return DataLossError(path + ": " + e.what());
  }
}

}  // namespace ftune::trainer
