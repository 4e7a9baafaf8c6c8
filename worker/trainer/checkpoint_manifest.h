// The manifest of a sharded checkpoint (ftune_checkpoint.json, see
// checkpoint.h for the directory layout): the state every rank agrees on, and
// its JSON parser. Kept free of LibTorch so that the parser of these
// untrusted bytes is fuzzed on its own (tests/fuzz/checkpoint_manifest_fuzzer).
//
// Thread-safety: pure functions of their arguments.
#ifndef FTUNE_WORKER_TRAINER_CHECKPOINT_MANIFEST_H_
#define FTUNE_WORKER_TRAINER_CHECKPOINT_MANIFEST_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "ftune/status.h"

namespace ftune::trainer {

inline constexpr const char kCheckpointManifestName[] = "ftune_checkpoint.json";
inline constexpr int kCheckpointFormatVersion = 1;

struct FlatEntry {
  std::string name;  // PEFT tensor name
  int64_t offset = 0;
  int64_t numel = 0;
  std::vector<int64_t> shape;
};

// What every rank agrees on at a checkpoint.
struct TrainerState {
  int64_t step = 0;           // optimizer steps completed
  int64_t micro_batches = 0;  // global micro-batches consumed (data position)
  int64_t tokens_total = 0;   // loss tokens seen by the whole job
  double loss = 0;            // loss of the last step
  int world_size = 1;
  int64_t total_numel = 0;    // flat LoRA elements (no padding)
  std::vector<FlatEntry> layout;
  uint64_t seed = 0;
  std::vector<int64_t> shard_bytes;  // per rank, as the manifest records them
};

// Parses the manifest's text; `path` names the file in errors. DATA_LOSS
// naming the problem when it is not a manifest of this format version, a
// field is missing or of the wrong type, or the numbers are inconsistent.
// The shards' files and the layout's coverage are checked by
// VerifyCheckpoint, not here.
Result<TrainerState> ParseCheckpointManifest(std::string_view text, const std::string& path);

}  // namespace ftune::trainer

#endif  // FTUNE_WORKER_TRAINER_CHECKPOINT_MANIFEST_H_
