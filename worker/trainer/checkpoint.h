// Sharded training checkpoints: what a gang restart, a cancel or a crash
// resumes from, with any number of ranks.
//
// Layout of <output_dir>/checkpoints/checkpoint-<step>/ (HF Trainer's
// directory naming):
//   shard-<r>-of-<W>.safetensors   one per rank, written by that rank:
//       "lora"        F32 [n]   this rank's slice [begin, begin + n) of the
//                               flat LoRA vector (ShardedLora's layout,
//                               padding excluded)
//       "exp_avg"     F32 [n]   AdamW first moment of the same slice
//       "exp_avg_sq"  F32 [n]   AdamW second moment
//       "rng_state"   U8  [k]   the rank's CPU generator (LoRA dropout)
//     metadata: begin, numel, adam_step, rank, world_size (decimal strings)
//   adapter/                      the consolidated PEFT adapter at this step
//                                 (rank 0), loadable by PEFT as is
//   ftune_checkpoint.json          the manifest, written LAST by rank 0 once
//                                  every shard is on disk (all ranks passed a
//                                  barrier after writing): step, data
//                                  position, world size, flat layout, shards
//                                  with their byte sizes. A directory without
//                                  it is incomplete and never resumed from.
// Every file is written atomically (temporary + fsync + rename).
//
// Resuming reads the manifest and, for each rank's new slice, the byte
// ranges of whichever old shards cover it, so a checkpoint written by W
// ranks resumes on W' ranks (re-sharding on load). With the same world size
// the RNG state is restored too, and the resumed run continues bit for bit.
//
// A damaged checkpoint must not burn every restart: ChooseResumePoint checks
// the one asked for (VerifyCheckpoint: manifest, every shard's size, header,
// metadata and coverage) and otherwise falls back to the newest earlier one
// that passes, saying why. Every rank makes the same choice from the same
// files, without talking to the others. Bytes flipped inside tensor data are
// not detected (there are no checksums).
//
// Thread-safety: free functions; one thread per rank.
#ifndef FTUNE_WORKER_TRAINER_CHECKPOINT_H_
#define FTUNE_WORKER_TRAINER_CHECKPOINT_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include <ATen/core/Generator.h>

#include <functional>

#include "ftune/status.h"
#include "worker/trainer/checkpoint_manifest.h"

namespace ftune::trainer {

// One rank's part.
struct ShardState {
  int64_t begin = 0;   // into the flat vector
  at::Tensor lora;     // F32 [n] CPU
  at::Tensor exp_avg;  // F32 [n], undefined before the first step
  at::Tensor exp_avg_sq;
  int64_t adam_step = 0;
  at::Tensor rng_state;  // U8, undefined when not saved
};

std::string CheckpointDirName(int64_t step);  // "checkpoint-<step>"
std::string ShardFileName(int rank, int world_size);

// Writes this rank's shard file into dir (created if missing). Returns the
// bytes written.
Result<int64_t> WriteCheckpointShard(const std::string& dir, int rank, int world_size,
                                     const ShardState& shard);
// Rank 0, after every rank's WriteCheckpointShard returned: checks every
// shard file is there with the sizes it claims, then writes the manifest.
// Returns the total bytes of the checkpoint (shards + manifest + adapter).
Result<int64_t> WriteCheckpointManifest(const std::string& dir, const TrainerState& state);

// The manifest of a complete checkpoint; FAILED_PRECONDITION naming dir when
// it has none (incomplete), DATA_LOSS when it is malformed.
Result<TrainerState> ReadCheckpointManifest(const std::string& dir);
// Elements [begin, begin + numel) of the flat state, from whichever shards
// hold them (any world size). Positions past total_numel (padding) are zero.
// The RNG state is filled in only when `rank` wrote a shard of exactly this
// range (same world size).
Result<ShardState> ReadCheckpointSlice(const std::string& dir, const TrainerState& state,
                                       int64_t begin, int64_t numel, int rank);

// Checks that dir is a checkpoint a resume can read: the manifest parses,
// and each shard is there with the size the manifest gives, a readable
// header, its metadata, its tensors, and the shards together cover the flat
// vector once. DATA_LOSS naming the problem (FAILED_PRECONDITION without a
// manifest, NOT_FOUND without the directory).
Status VerifyCheckpoint(const std::string& dir);

// Where a resumed run starts.
struct ResumePoint {
  std::string dir;       // "" : from the start
  TrainerState state;    // of dir
  std::string fallback;  // why `requested` was not used; empty when it was
};
// `requested` when it verifies; otherwise the newest complete checkpoint
// with a lower step in the same checkpoints/ directory that does, or "" (the
// start) when none does. With set_aside (rank 0 only), a damaged directory
// is renamed to damaged-checkpoint-<step>, so that a later save of that
// step, LatestCompleteCheckpoint and PruneCheckpoints never take it for a
// checkpoint; the other ranks then find it missing and choose the same.
Result<ResumePoint> ChooseResumePoint(const std::string& requested, bool set_aside);

// The complete checkpoint with the highest step under
// <output_dir>/checkpoints, or "" when there is none.
Result<std::string> LatestCompleteCheckpoint(const std::string& output_dir);
// Deletes the oldest complete checkpoints beyond `keep` (0 = keep all), and
// incomplete ones older than the newest complete one (leftovers of a crash).
Status PruneCheckpoints(const std::string& output_dir, int keep);

class LlamaModel;
class ShardedLora;
class AdamW;
class EventSink;

// Where the training loop is when it saves.
struct TrainProgress {
  int64_t step = 0;          // optimizer steps completed
  int64_t micro = 0;         // global micro-batches consumed
  int64_t tokens_total = 0;  // loss tokens of the whole job
  int resumed_world_size = 0;  // ranks that wrote the checkpoint resumed from; 0 fresh
};

// Saves the training state every rank holds into
// <output_dir>/checkpoints/checkpoint-<step>: each rank its shard (LoRA
// values, AdamW moments, RNG state), then, after a barrier, rank 0 the PEFT
// adapter and the manifest (last, so a checkpoint without one is
// incomplete), prunes to save_total_limit and reports a checkpoint event;
// a final barrier keeps anyone from resuming from, or pruning, a checkpoint
// before rank 0 finished it.
class Checkpointer {
 public:
  struct Options {
    int rank = 0;
    int world_size = 1;
    std::string output_dir;
    std::string model_dir;     // recorded in the adapter's config
    int save_total_limit = 0;  // 0 keeps all
    uint64_t seed = 0;
  };
  // Not owned; all outlive the Checkpointer. `barrier` synchronizes ranks.
  Checkpointer(Options options, LlamaModel* model, ShardedLora* lora, AdamW* optimizer,
               at::Generator cpu_generator, std::function<Status()> barrier, EventSink* events);

  // Returns the checkpoint directory.
  Result<std::string> Save(const TrainProgress& progress, double loss);
  int64_t last_saved_step() const { return last_saved_step_; }

 private:
  Options options_;
  LlamaModel* model_;
  ShardedLora* lora_;
  AdamW* optimizer_;
  at::Generator cpu_generator_;
  std::function<Status()> barrier_;
  EventSink* events_;
  std::vector<FlatEntry> layout_;
  int64_t last_saved_step_ = -1;
};

// Restores a checkpoint into this rank's state: its slice of the LoRA
// values and AdamW moments (re-sliced when the checkpoint was written by
// another number of ranks), the adapters gathered from the shards, and the
// dropout RNG when the rank count is the same. FAILED_PRECONDITION when the
// checkpoint was written for other adapters.
Result<TrainProgress> ResumeFromCheckpoint(const std::string& dir, int rank, int world_size,
                                           ShardedLora* lora, AdamW* optimizer,
                                           at::Generator cpu_generator);

}  // namespace ftune::trainer

#endif  // FTUNE_WORKER_TRAINER_CHECKPOINT_H_
