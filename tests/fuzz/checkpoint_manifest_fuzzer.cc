// libFuzzer target: a checkpoint's manifest (ftune_checkpoint.json), which a
// resume reads from shared storage. Parsing must return a state or DATA_LOSS
// naming the file, never crash or throw; a state that parses is consistent
// (world size >= 1, one byte size per shard, step and total_numel >= 0).
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "worker/trainer/checkpoint_manifest.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  const std::string path = "ckpt/ftune_checkpoint.json";
  auto state = ftune::trainer::ParseCheckpointManifest(text, path);
  if (!state.ok()) {
    if (state.status().code() != ftune::StatusCode::kDataLoss ||
        state.status().message().find(path) == std::string::npos) {
      __builtin_trap();
    }
    return 0;
  }
  if (state->world_size < 1 || state->step < 0 || state->total_numel < 0 ||
      state->shard_bytes.size() != static_cast<size_t>(state->world_size)) {
    __builtin_trap();
  }
  return 0;
}
