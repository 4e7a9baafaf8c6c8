#include "worker/trainer/checkpoint_manifest.h"

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include <nlohmann/json.hpp>

namespace ftune::trainer {
namespace {

using json = nlohmann::json;

// The integer at j[key], which must be an integer JSON number in [lo, hi]
// (hi >= 0). nlohmann's get<int64_t>() converts any number: 1e300 is
// undefined behaviour, and 2^32 + 1 read as an int wraps to 1. Throws
// json::exception when the key is missing, std::runtime_error naming the key
// and the value otherwise.
int64_t Field(const json& j, const char* key, int64_t lo, int64_t hi) {
  const json& v = j.at(key);
  bool is_int = false;
  int64_t x = 0;
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    is_int = u <= static_cast<uint64_t>(hi);
    if (is_int) x = static_cast<int64_t>(u);
  } else if (v.is_number_integer()) {
    is_int = true;
    x = v.get<int64_t>();
  }
  if (is_int && x >= lo && x <= hi) return x;
  throw std::runtime_error(std::string("'") + key + "' (" + v.dump() +
                           ") must be an integer in [" + std::to_string(lo) + ", " +
                           std::to_string(hi) + "]");
}

constexpr int64_t kMax = INT64_MAX;

}  // namespace

Result<TrainerState> ParseCheckpointManifest(std::string_view text, const std::string& path) {
  const json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object() || !j.contains("format") || j.at("format") != "ftune-checkpoint") {
    return DataLossError(path + ": not an ftune checkpoint manifest");
  }
  try {
    const int64_t version = Field(j, "version", INT64_MIN, kMax);
    if (version != kCheckpointFormatVersion) {
      return DataLossError(path + ": checkpoint format version " + std::to_string(version) +
                           ", this ftune reads " + std::to_string(kCheckpointFormatVersion));
    }
    TrainerState s;
    s.step = Field(j, "step", 0, kMax);
    s.micro_batches = Field(j, "micro_batches", 0, kMax);
    s.tokens_total = Field(j, "tokens_total", 0, kMax);
    s.loss = j.at("loss").get<double>();
    s.world_size = static_cast<int>(Field(j, "world_size", 1, INT32_MAX));
    s.total_numel = Field(j, "total_numel", 0, kMax);
    const json& seed = j.at("seed");
    if (!seed.is_number_unsigned()) {
      throw std::runtime_error("'seed' (" + seed.dump() + ") must be an integer >= 0");
    }
    s.seed = seed.get<uint64_t>();
    for (const json& e : j.at("layout")) {
      FlatEntry entry{e.at("name").get<std::string>(), Field(e, "offset", 0, kMax),
                      Field(e, "numel", 0, kMax), {}};
      for (const json& d : e.at("shape")) {
        if (!d.is_number_unsigned()) {
          throw std::runtime_error("layout shape dimension " + d.dump() + " of '" + entry.name +
                                   "' must be an integer >= 0");
        }
        entry.shape.push_back(static_cast<int64_t>(std::min<uint64_t>(d.get<uint64_t>(), kMax)));
      }
      s.layout.push_back(std::move(entry));
    }
    const json& shards = j.at("shards");
    if (!shards.is_array() || shards.size() != static_cast<size_t>(s.world_size)) {
      return DataLossError(path + ": world_size is " + std::to_string(s.world_size) +
                           " but 'shards' is not an array of as many entries");
    }
    for (const json& shard : shards) s.shard_bytes.push_back(Field(shard, "bytes", 0, kMax));
    return s;
  } catch (const json::exception& e) {
    return DataLossError(path + ": " + e.what());
  } catch (const std::runtime_error& e) {
    return DataLossError(path + ": " + e.what());
  }
}

}  // namespace ftune::trainer
