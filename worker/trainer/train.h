// One rank's fine-tune: `ftune-rank train` (standalone) and `ftune-rank run`
// (launched by an agent) both end up in Train().
//
// The algorithm (train.cc reads as this list; each phase is one function of
// train_state.h, checkpoint.h or events.h):
//   1. the job's RunConfig, derived once from the resolved spec for this
//      rank's device (worker/config/run_config.h);
//   2. the dataset as token files (worker/data: template, mask, pack,
//      cached by content hash);
//   3. load -> quantize -> attach LoRA -> shard -> optimizer
//      (BuildTrainingState: this rank's slices of the safetensors files,
//      quantized to NF4; PEFT's LoRA init seeded by training.seed; the flat
//      LoRA shard with its AdamW state);
//   4. resume from a checkpoint when given one;
//   5. per optimizer step: micro-batches forward and backward with the loss
//      scaled by the global batch's loss-token count (transformers'
//      num_items_in_batch), reduce-scatter, clip, AdamW on the shard,
//      all-gather of the updated shard; then log, eval, checkpoint;
//   6. the end: the final eval, checkpoint and the consolidated PEFT adapter
//      in <output_dir>/adapter.
//
// Stopping: ranks poll their StopFlag between steps and agree through an
// all-reduce (max), so every rank stops after the same step.
//
// Thread-safety: one call per process; the model and communicator are used
// by the calling thread only.
#ifndef FTUNE_WORKER_TRAINER_TRAIN_H_
#define FTUNE_WORKER_TRAINER_TRAIN_H_

#include <cstdint>
#include <string>
#include <vector>

#include "ftune/v1/job.pb.h"
#include "worker/trainer/events.h"
#include "ftune/status.h"

namespace ftune::comm {
class Communicator;
}

namespace ftune::trainer {

struct TrainContext {
  int rank = 0;
  int world_size = 1;
  // "cpu" (fp32) or "cuda" / "cuda:N" (bf16 compute, fp32 adapters).
  std::string device = "cpu";
  // Checkpoints go to <output_dir>/checkpoints, the adapter to
  // <output_dir>/adapter. Required.
  std::string output_dir;
  // A checkpoint directory to resume from; "" starts fresh.
  std::string resume_from;
  // Prepared token files; "" = <output_dir>/data-cache.
  std::string data_cache_dir;
  // Required when world_size > 1; not owned.
  comm::Communicator* comm = nullptr;
  EventSink* events = nullptr;  // required; not owned
  StopFlag* stop = nullptr;     // optional; not owned
  // Send RankHello once loaded. `run` says hello itself as soon as it starts
  // (the agent counts a rank as started from its hello), so it turns this off.
  bool emit_hello = true;
};

struct TrainResult {
  int64_t final_step = 0;
  double final_loss = 0;
  std::vector<double> losses;  // per optimizer step run by this call
  std::string adapter_dir;     // rank 0 at the end; "" when stopped early
  std::string last_checkpoint;
  bool stopped = false;        // ended by a stop request
  int64_t tokens_total = 0;    // loss tokens of the whole job
  double tokens_per_second = 0;  // this rank's input tokens / training time
  int64_t peak_rss_bytes = 0;
  int64_t peak_device_bytes = 0;
};

// `spec` must be resolved (LoadJobSpec / ResolveJobSpec, proto/jobspec.h);
// an invalid one comes back as INVALID_ARGUMENT listing its problems.
Result<TrainResult> Train(const v1::JobSpec& spec, const TrainContext& context);

}  // namespace ftune::trainer

#endif  // FTUNE_WORKER_TRAINER_TRAIN_H_
