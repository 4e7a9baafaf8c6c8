// libFuzzer target: the JSON files of a model directory, config.json
// (ParseLlamaConfig, then the RoPE table) and model.safetensors.index.json
// (ParseSafetensorsIndex), on the same input.
//
// Accepted configs must satisfy the invariants the engine relies on (abort()
// otherwise): heads divisible by kv heads, even head_dim, a positive
// parameter count (no overflow), and head_dim / 2 RoPE frequencies.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "worker/modelio/llama_config.h"
#include "worker/modelio/safetensors.h"

namespace {

void Check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "invariant violated: %s\n", what);
    std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  ftune::Result<ftune::trainer::LlamaConfig> config =
      ftune::trainer::ParseLlamaConfig(text, "fuzz/config.json");
  if (config.ok()) {
    const ftune::trainer::LlamaConfig& c = *config;
    Check(c.num_key_value_heads > 0 && c.num_attention_heads % c.num_key_value_heads == 0,
          "kv heads do not divide heads");
    Check(c.head_dim > 0 && c.head_dim % 2 == 0, "head_dim not positive and even");
    Check(c.NumParameters() > 0, "parameter count not positive");
    const std::vector<float> inv = ftune::trainer::RopeInverseFrequencies(c);
    Check(inv.size() == static_cast<size_t>(c.head_dim / 2), "RoPE table size");
  } else {
    Check(!config.status().message().empty(), "error without a message");
  }

  ftune::Result<ftune::trainer::SafetensorsIndex> index =
      ftune::trainer::ParseSafetensorsIndex(text, "fuzz/model.safetensors.index.json");
  if (index.ok()) {
    for (const auto& [name, shard] : index->weight_map) {
      Check(!shard.empty() && shard[0] != '/', "absolute or empty shard path");
      const std::string padded = "/" + shard + "/";
      Check(padded.find("/../") == std::string::npos, "shard path leaves the directory");
    }
  }
  return 0;
}
