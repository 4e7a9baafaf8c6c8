// The pieces the training loop (train.cc) is made of, one function per
// phase, in the order a rank runs them:
//   PrepareRankData     the dataset as this rank's token files;
//   BuildTrainingState  load -> quantize -> attach LoRA -> shard -> optimizer
//                       (torchtitan's fixed wrapper order; the pre-quantized
//                       bitsandbytes directory path included);
//   MakeSchedule        steps per epoch, total steps, the learning rate;
//   Evaluator           the eval loss over every rank's share of the rows;
// with Reducer, the collectives over plain numbers they share. Checkpoints
// and resume are checkpoint.h's; events and telemetry events.h's.
//
// Thread-safety: one training loop per process, on one thread.
#ifndef FTUNE_WORKER_TRAINER_TRAIN_STATE_H_
#define FTUNE_WORKER_TRAINER_TRAIN_STATE_H_

#include <ATen/core/Generator.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "ftune/status.h"
#include "worker/config/run_config.h"
#include "worker/data/prepare.h"
#include "worker/data/token_file.h"
#include "worker/trainer/batch.h"
#include "worker/trainer/events.h"
#include "worker/trainer/fsdp.h"
#include "worker/trainer/model.h"
#include "worker/trainer/optim.h"

namespace ftune::comm {
class Communicator;
}

namespace ftune::trainer {

// Collectives over plain numbers; identities without a communicator. The
// values travel in one-element tensors on the rank's device: NCCL reads and
// writes device memory only.
class Reducer {
 public:
  Reducer(comm::Communicator* comm, c10::Device device) : comm_(comm), device_(device) {}
  Result<int64_t> SumInt(int64_t v);
  Result<int64_t> MaxInt(int64_t v);
  // Sums in fp32 across ranks (the values are per-rank fp64 partial sums).
  Result<double> SumDouble(double v);
  Status Barrier();

 private:
  comm::Communicator* comm_;
  c10::Device device_;
};

// Who this rank is and what it talks to, for every phase.
struct RankEnv {
  int rank = 0;
  int world_size = 1;
  c10::Device device = c10::Device(c10::DeviceType::CPU);
  std::string device_name;             // as given: "cpu", "cuda:0"
  comm::Communicator* comm = nullptr;  // null with one rank
  Reducer* reduce = nullptr;
  EventSink* events = nullptr;
};

struct RankData {
  data::PreparedDataset prepared;
  std::unique_ptr<data::TokenFile> train;
  std::unique_ptr<data::TokenFile> eval;  // null without an eval split
};

// Prepares (or finds cached in cache_dir) the token files and opens them;
// rank 0 reports progress and a summary. INVALID_ARGUMENT when the dataset
// produced no training rows.
Result<RankData> PrepareRankData(const data::DatasetOptions& options, const std::string& cache_dir,
                                 const RankEnv& env);

// The model and everything trained on it, owned together.
struct TrainingState {
  std::unique_ptr<LlamaModel> model;
  std::unique_ptr<ShardedLora> lora;
  std::unique_ptr<AdamW> optimizer;
  at::Generator cpu_generator;  // LoRA dropout; seeded per rank
  bool pre_quantized = false;   // a bitsandbytes 4-bit directory, replicated on every rank
};

// ModelOptions for the rank's device from the run's model settings.
ModelOptions ModelOptionsFor(const RunConfig& config, c10::Device device);

// load -> quantize -> attach LoRA -> shard -> optimizer, reporting the load.
Result<TrainingState> BuildTrainingState(const RunConfig& config, const RankEnv& env);

struct Schedule {
  DataOrder order;
  int64_t total_steps = 0;
  LrSchedule lr;
};

// HF Trainer's arithmetic: max_steps, or epochs x (micro-batches per epoch /
// accumulation), and the learning-rate schedule over those steps.
Result<Schedule> MakeSchedule(const TrainingSettings& training, const data::TokenFile& train,
                              uint64_t data_seed, int world_size);

// The mean eval loss over all rows of the eval file, every rank a disjoint
// share; every rank runs the same number of forwards (FSDP's gathers are
// collective).
class Evaluator {
 public:
  Evaluator(LlamaModel* model, const data::TokenFile* eval, const RankEnv& env)
      : model_(model), eval_(eval), env_(env) {}
  // (mean loss, loss tokens) on every rank.
  Result<std::pair<double, int64_t>> Run();
  // Runs and reports an eval event from rank 0.
  Status RunAndReport(int64_t step);

 private:
  LlamaModel* model_;
  const data::TokenFile* eval_;
  RankEnv env_;
};

}  // namespace ftune::trainer

#endif  // FTUNE_WORKER_TRAINER_TRAIN_STATE_H_
