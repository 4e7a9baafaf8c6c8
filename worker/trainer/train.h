// One rank's fine-tune: `ftune-rank train` (standalone) and `ftune-rank run`
// (launched by an agent) both end up in Train().
//
// The loop, in the order STYLE.md asks for (load -> quantize -> attach LoRA
// -> shard -> optimizer, then per step: gather, forward, loss, backward,
// reduce, step, log, checkpoint):
//   1. prepare the dataset (worker/data: template, mask, pack, token file,
//      cached by content hash) and open its token file;
//   2. load the model for this rank (LoadShardedModel: this rank's slices of
//      the safetensors files, quantized to NF4), attach fresh LoRA adapters
//      (PEFT's init, seeded by training.seed), shard them with their AdamW
//      state (ShardedLora);
//   3. resume from a checkpoint when given one (checkpoint.h);
//   4. per optimizer step: the step's loss-token count is summed over every
//      micro-batch of every rank first, so each micro-batch's loss is
//      scaled by 1 / (that count) before backward: the gradient is the
//      gradient of the mean loss over the whole global batch, exactly what
//      transformers' Trainer computes with num_items_in_batch and
//      average_tokens_across_devices; then reduce-scatter, global-norm
//      clipping, AdamW on the shard, all-gather of the updated shard;
//   5. events (step, memory, checkpoint, eval, done) to the EventSink;
//      checkpoints every save_steps, on a stop request with save, and the
//      consolidated PEFT adapter in <output_dir>/adapter at the end.
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
#include "worker/trainer/status.h"

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

// The spec is taken as given plus ApplyJobSpecDefaults; ValidateJobSpec's
// problems come back as INVALID_ARGUMENT listing all of them.
Result<TrainResult> Train(const v1::JobSpec& spec, const TrainContext& context);

}  // namespace ftune::trainer

#endif  // FTUNE_WORKER_TRAINER_TRAIN_H_
