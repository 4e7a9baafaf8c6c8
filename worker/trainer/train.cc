#include "worker/trainer/train.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/autograd.h>
#if defined(FTUNE_TRAIN_CUDA)
#include <c10/cuda/CUDACachingAllocator.h>
#include <cuda_runtime_api.h>
#include <torch/version.h>
#include <stdlib.h>
#endif
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <iomanip>
#include <memory>
#include <mutex>
#include <sstream>
#include <type_traits>

#include "jobspec.h"
#include "worker/comm/communicator.h"
#include "worker/data/from_spec.h"
#include "worker/data/prepare.h"
#include "worker/data/token_file.h"
#include "worker/trainer/batch.h"
#include "worker/trainer/bnb_checkpoint.h"
#include "worker/trainer/checkpoint.h"
#include "worker/trainer/file_util.h"
#include "worker/trainer/fsdp.h"
#include "worker/trainer/model.h"
#include "worker/trainer/optim.h"

namespace ftune::trainer {
namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point since) {
  return std::chrono::duration<double>(Clock::now() - since).count();
}

Result<c10::Device> ParseDevice(const std::string& name) {
  if (name == "cpu") return c10::Device(c10::DeviceType::CPU);
  if (name == "cuda" || name.rfind("cuda:", 0) == 0) {
    try {
      return c10::Device(name == "cuda" ? std::string("cuda:0") : name);
    } catch (const c10::Error&) {
    }
  }
  return InvalidArgumentError("device '" + name + "' must be cpu, cuda or cuda:N");
}

// Collectives over plain numbers; identities on one rank. The values travel
// in one-element tensors on the rank's device: NCCL reads and writes device
// memory only.
class Reducer {
 public:
  Reducer(comm::Communicator* comm, c10::Device device) : comm_(comm), device_(device) {}

  Result<int64_t> SumInt(int64_t v) { return Reduce<int64_t>(v, comm::ReduceOp::kSum); }
  Result<int64_t> MaxInt(int64_t v) { return Reduce<int64_t>(v, comm::ReduceOp::kMax); }
  // Sums in fp32 across ranks (the values are per-rank fp64 partial sums).
  Result<double> SumDouble(double v) {
    FTUNE_TRAINER_ASSIGN_OR_RETURN(float f,
                                   Reduce<float>(static_cast<float>(v), comm::ReduceOp::kSum));
    return comm_ == nullptr ? v : static_cast<double>(f);
  }
  Status Barrier() { return comm_ == nullptr ? OkStatus() : comm_->Barrier(nullptr); }

 private:
  template <typename T>
  Result<T> Reduce(T v, comm::ReduceOp op) {
    if (comm_ == nullptr) return v;
    constexpr bool kInt = std::is_same_v<T, int64_t>;
    at::Tensor t = at::full({1}, v, at::TensorOptions()
                                        .dtype(kInt ? at::kLong : at::kFloat)
                                        .device(device_));
    FTUNE_TRAINER_RETURN_IF_ERROR(comm_->AllReduce(
        t.data_ptr(), t.data_ptr(), 1, kInt ? comm::DataType::kInt64 : comm::DataType::kFloat32,
        op, nullptr));
    FTUNE_TRAINER_RETURN_IF_ERROR(comm_->Synchronize(nullptr));
    return t.item<T>();
  }

  comm::Communicator* comm_;
  c10::Device device_;
};

// Time in collectives (fsdp.h, "Timing"), cumulative.
struct CommTotals {
  bool taken = false;
  double gather = 0, gather_exposed = 0, reduce_scatter = 0, reduce_exposed = 0, seconds = 0;
  int64_t gathered_bytes = 0;
};

CommTotals CommTotalsNow(LlamaModel* model, ShardedLora* lora, double train_seconds) {
  CommTotals c;
  c.taken = true;
  if (FsdpUnits* units = FsdpUnitsOf(*model)) {
    c.gather = units->gather_busy_seconds();
    c.gather_exposed = units->gather_exposed_seconds();
    c.gathered_bytes = units->gathered_bytes_total();
  }
  c.reduce_scatter = lora->reduce_scatter_seconds();
  c.reduce_exposed = lora->reduce_scatter_exposed_seconds();
  c.seconds = train_seconds;
  return c;
}

// "collectives after the first step (52.1 s of training): all-gather ..."
std::string DescribeComm(const CommTotals& base, const CommTotals& now) {
  const double wall = now.seconds - base.seconds;
  const double gather = now.gather - base.gather;
  const double exposed = now.gather_exposed - base.gather_exposed;
  const double reduce = now.reduce_scatter - base.reduce_scatter;
  const double reduce_exposed = now.reduce_exposed - base.reduce_exposed;
  const double gib = static_cast<double>(now.gathered_bytes - base.gathered_bytes) / (1LL << 30);
  std::ostringstream s;
  s << std::fixed << std::setprecision(2) << "collectives after the first step (" << wall
    << " s of training, rank 0): all-gather " << gather << " s (" << gib << " GiB received), "
    << gather - exposed << " s of it hidden behind compute ("
    << std::setprecision(0) << (gather > 0 ? 100 * (gather - exposed) / gather : 0)
    << "%), " << std::setprecision(2) << exposed << " s exposed; gradient reduce-scatter "
    << reduce << " s, " << reduce_exposed << " s exposed; communication exposed "
    << std::setprecision(1) << (wall > 0 ? 100 * (exposed + reduce_exposed) / wall : 0)
    << "% of the time";
  return s.str();
}

LoraConfig LoraConfigFromSpec(const v1::JobSpec& spec) {
  LoraConfig c;
  c.r = spec.lora().r();
  c.lora_alpha = spec.lora().lora_alpha();
  c.lora_dropout = spec.lora().lora_dropout();
  c.use_rslora = spec.lora().use_rslora();
  c.target_modules.assign(spec.lora().target_modules().begin(),
                          spec.lora().target_modules().end());
  c.seed = static_cast<uint64_t>(spec.training().seed());
  return c;
}

// What the trainer cannot do yet is refused up front, naming the key.
Status CheckSupported(const v1::JobSpec& spec) {
  const auto& q = spec.quantization();
  if (q.load_in_4bit() && q.bnb_4bit_quant_type() != "nf4") {
    return InvalidArgumentError("quantization.bnb_4bit_quant_type '" + q.bnb_4bit_quant_type() +
                                "' is not supported: ftune implements nf4");
  }
  return OkStatus();
}

struct MemoryNow {
  int64_t allocated = 0, reserved = 0, peak = 0;
  int64_t reserved_peak = 0, device_used = 0;  // CUDA only
};

// Device memory of the rank: the CUDA caching allocator's counters, or the
// host process itself for CPU ranks (where the "device" is host RAM).
MemoryNow DeviceMemory(const c10::Device& device) {
  MemoryNow m;
  if (device.is_cuda()) {
#if defined(FTUNE_TRAIN_CUDA)
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
    // StatType::AGGREGATE is 0; the enum moved namespaces across LibTorch
    // versions, the index did not.
    const size_t aggregate = 0;
    m.allocated = stats.allocated_bytes[aggregate].current;
    m.reserved = stats.reserved_bytes[aggregate].current;
    m.peak = stats.allocated_bytes[aggregate].peak;
    m.reserved_peak = stats.reserved_bytes[aggregate].peak;
    size_t free_bytes = 0, total_bytes = 0;
    if (cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess) {
      m.device_used = static_cast<int64_t>(total_bytes - free_bytes);
    }
#endif
    return m;
  }
  m.allocated = CurrentRssBytes();
  m.reserved = m.allocated;
  m.peak = PeakRssBytes();
  return m;
}

void EmitMemory(EventSink& events, const c10::Device& device, const std::string& device_name,
                const std::string& phase) {
  const MemoryNow now = DeviceMemory(device);
  v1::RankMessage m;
  auto* mem = m.mutable_memory();
  mem->set_allocated_bytes(now.allocated);
  mem->set_reserved_bytes(now.reserved);
  mem->set_peak_bytes(now.peak);
  if (device.is_cuda()) {
    mem->set_reserved_peak_bytes(now.reserved_peak);
    mem->set_device_used_bytes(now.device_used);
    mem->set_device_peak_total_bytes(now.reserved_peak +
                                     std::max<int64_t>(0, now.device_used - now.reserved));
  }
  // A CPU rank's device memory is its RSS, already read.
  mem->set_host_rss_bytes(device.is_cuda() ? CurrentRssBytes() : now.allocated);
  mem->set_host_peak_rss_bytes(device.is_cuda() ? PeakRssBytes() : now.peak);
  mem->set_device(device_name);
  mem->set_phase(phase);
  events.Emit(m);
}

std::string Join(const std::vector<std::string>& v, const std::string& sep) {
  std::string out;
  for (size_t i = 0; i < v.size(); ++i) out += (i ? sep : "") + v[i];
  return out;
}

}  // namespace

static Result<TrainResult> TrainOrThrow(const v1::JobSpec& spec_in, const TrainContext& ctx) {
#if defined(FTUNE_TRAIN_CUDA) && TORCH_VERSION_MAJOR >= 2
  // Before the caching allocator's first use: segments that grow in place
  // instead of many fixed ones, so the units gathered and freed on two
  // streams do not fragment the device (on 70B's 2-GPU run the reserved
  // peak was 7.5 GiB above the allocated one without it). A user's own
  // setting wins.
  setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True", /*overwrite=*/0);
#endif
  if (ctx.events == nullptr) return InvalidArgumentError("Train needs an event sink");
  if (ctx.output_dir.empty()) return InvalidArgumentError("Train needs an output directory");
  if (ctx.world_size < 1 || ctx.rank < 0 || ctx.rank >= ctx.world_size) {
    return InvalidArgumentError("rank " + std::to_string(ctx.rank) + " of world size " +
                                std::to_string(ctx.world_size) + " is not a valid rank");
  }
  if (ctx.world_size > 1 && (ctx.comm == nullptr || ctx.comm->size() != ctx.world_size)) {
    return InvalidArgumentError("world size " + std::to_string(ctx.world_size) +
                                " needs a communicator of that size");
  }
  v1::JobSpec spec = spec_in;
  ApplyJobSpecDefaults(&spec);
  if (std::vector<std::string> problems = ValidateJobSpec(spec); !problems.empty()) {
    return InvalidArgumentError("invalid job spec: " + Join(problems, "; "));
  }
  FTUNE_TRAINER_RETURN_IF_ERROR(CheckSupported(spec));
  FTUNE_TRAINER_ASSIGN_OR_RETURN(c10::Device device, ParseDevice(ctx.device));
  EventSink& events = *ctx.events;
  Reducer reduce(ctx.world_size > 1 ? ctx.comm : nullptr, device);
  comm::Communicator* comm = ctx.world_size > 1 ? ctx.comm : nullptr;
  const v1::TrainingSpec& t = spec.training();
  FTUNE_TRAINER_RETURN_IF_ERROR(MakeDirectories(ctx.output_dir));

  // 1. Data.
  FTUNE_TRAINER_ASSIGN_OR_RETURN(data::DatasetOptions data_options,
                                 data::DatasetOptionsFromSpec(spec));
  const std::string cache_dir =
      ctx.data_cache_dir.empty() ? ctx.output_dir + "/data-cache" : ctx.data_cache_dir;
  FTUNE_TRAINER_RETURN_IF_ERROR(MakeDirectories(cache_dir));
  Clock::time_point phase_start = Clock::now();
  FTUNE_TRAINER_ASSIGN_OR_RETURN(
      data::PreparedDataset prepared,
      data::PrepareDataset(data_options, cache_dir, [&](const data::PrepareProgress& p) {
        if (ctx.rank == 0 && (p.done == p.total || p.done % 1000 == 0)) {
          events.Info("preparing data: " + p.phase + " " + std::to_string(p.done) + "/" +
                      std::to_string(p.total));
        }
      }));
  FTUNE_TRAINER_ASSIGN_OR_RETURN(std::unique_ptr<data::TokenFile> train_file,
                                 data::TokenFile::Open(prepared.train_path));
  std::unique_ptr<data::TokenFile> eval_file;
  if (!prepared.eval_path.empty()) {
    FTUNE_TRAINER_ASSIGN_OR_RETURN(eval_file, data::TokenFile::Open(prepared.eval_path));
  }
  if (ctx.rank == 0) {
    std::ostringstream s;
    s << "data: " << prepared.train_rows << " training rows (" << prepared.train_tokens
      << " tokens), " << prepared.eval_rows << " eval rows"
      << (prepared.cache_hit ? ", from cache " : ", prepared into ") << prepared.train_path
      << (prepared.skipped_records > 0
              ? ", skipped " + std::to_string(prepared.skipped_records) + " invalid records"
              : "");
    events.Info(s.str());
  }
  if (train_file->num_rows() == 0) {
    return InvalidArgumentError("the dataset " + Join(data_options.data_files, ", ") +
                                " produced no training rows");
  }

  // 2. Model: load -> quantize -> attach LoRA -> shard -> optimizer.
  ModelOptions model_options = DefaultModelOptions(device);
  model_options.activation_checkpointing = t.gradient_checkpointing();
  model_options.quantize_base = spec.quantization().load_in_4bit();
  model_options.nf4.blocksize = spec.quantization().blocksize();
  model_options.nf4.double_quant = spec.quantization().bnb_4bit_use_double_quant();
  FsdpOptions fsdp;
  fsdp.reshard_after_forward = spec.fsdp().reshard_after_forward();
  fsdp.offload_params = spec.fsdp().offload_params();
  fsdp.prefetch = spec.fsdp().has_prefetch() ? spec.fsdp().prefetch() : device.is_cuda();
  phase_start = Clock::now();
  LoadStats load_stats;
  const std::string& model_dir = spec.model().model_name_or_path();
  model_options.random_weights = spec.model().random_weights();
  model_options.random_seed = spec.model().random_weights_seed();
  bool pre_quantized = false;
  if (!model_options.random_weights) {
    FTUNE_TRAINER_ASSIGN_OR_RETURN(pre_quantized, IsBnb4bitDirectory(model_dir));
  }
  std::unique_ptr<LlamaModel> model;
  if (pre_quantized) {
    // A bitsandbytes 4-bit directory (`ftune-rank quantize`, or a 4-bit
    // model saved by transformers): its NF4 bytes are used as stored. They
    // are not sliced across ranks: every rank holds the whole frozen model
    // (adapters and optimizer state are still sharded).
    FTUNE_TRAINER_ASSIGN_OR_RETURN(model, LoadModelDirectory(model_dir, model_options));
    if (ctx.rank == 0 && ctx.world_size > 1) {
      events.Log("WARNING", model_dir +
                                " is pre-quantized: its frozen weights are replicated on every rank, "
                                "not sharded; train from the dense model to shard them");
    }
  } else {
    FTUNE_TRAINER_ASSIGN_OR_RETURN(
        model, LoadShardedModel(model_dir, model_options, fsdp, comm, &load_stats));
  }
#if defined(FTUNE_TRAIN_CUDA)
  // Loading's temporaries (one tensor's share at a time) stay cached; hand
  // them back so training starts from the model's own footprint.
  if (device.is_cuda()) c10::cuda::CUDACachingAllocator::emptyCache();
#endif
  EmitMemory(events, device, ctx.device, "load");
  if (ctx.rank == 0) {
    std::ostringstream s;
    s << "model " << model_dir << " loaded in " << std::fixed << std::setprecision(1)
      << Seconds(phase_start) << " s (";
    if (pre_quantized) {
      s << "pre-quantized NF4, replicated on " << ctx.world_size << " ranks)";
    } else {
      s << (model_options.quantize_base ? "NF4" : "dense") << ", " << load_stats.unit_count
        << " FSDP units over " << ctx.world_size << " ranks)";
    }
    events.Info(s.str());
  }
  FTUNE_TRAINER_RETURN_IF_ERROR(model->AttachLora(LoraConfigFromSpec(spec)));
  FTUNE_TRAINER_ASSIGN_OR_RETURN(std::unique_ptr<ShardedLora> lora,
                                 ShardedLora::Create(model.get(), comm));
  AdamWOptions adam;
  adam.lr = t.learning_rate();
  adam.beta1 = t.adam_beta1();
  adam.beta2 = t.adam_beta2();
  adam.eps = t.adam_epsilon();
  adam.weight_decay = t.weight_decay();
  FTUNE_TRAINER_RETURN_IF_ERROR(adam.Validate());
  AdamW optimizer({lora->shard()}, adam);
  // LoRA dropout draws from the CPU generator; each rank its own stream.
  at::Generator cpu_generator = at::detail::getDefaultCPUGenerator();  // a handle
  {
    std::lock_guard<std::mutex> lock(cpu_generator.mutex());
    cpu_generator.set_current_seed(static_cast<uint64_t>(t.seed()) +
                                   static_cast<uint64_t>(ctx.rank));
  }

  // 3. Resume.
  int64_t step = 0, micro = 0, tokens_total = 0;
  CommTotals comm_base;  // after this run's first (warm-up) step
  std::vector<FlatEntry> layout;
  for (const ShardedLora::Entry& e : lora->layout()) {
    layout.push_back({e.name, e.offset, e.numel, e.shape});
  }
  if (!ctx.resume_from.empty()) {
    FTUNE_TRAINER_ASSIGN_OR_RETURN(TrainerState state, ReadCheckpointManifest(ctx.resume_from));
    if (state.total_numel != lora->total_numel() || state.layout.size() != layout.size()) {
      return FailedPreconditionError("checkpoint " + ctx.resume_from + " holds " +
                                     std::to_string(state.total_numel) +
                                     " LoRA values, this job's adapters have " +
                                     std::to_string(lora->total_numel()) +
                                     ": it was written for another model or lora config");
    }
    for (size_t i = 0; i < layout.size(); ++i) {
      if (state.layout[i].name != layout[i].name || state.layout[i].offset != layout[i].offset) {
        return FailedPreconditionError("checkpoint " + ctx.resume_from + " has '" +
                                       state.layout[i].name + "' where this job has '" +
                                       layout[i].name + "'");
      }
    }
    FTUNE_TRAINER_ASSIGN_OR_RETURN(
        ShardState slice, ReadCheckpointSlice(ctx.resume_from, state, lora->shard_begin(),
                                              lora->shard_numel(), ctx.rank));
    {
      c10::NoGradGuard no_grad;
      lora->shard().copy_(slice.lora.to(lora->shard().device()));
    }
    FTUNE_TRAINER_RETURN_IF_ERROR(
        optimizer.RestoreState(0, slice.adam_step, slice.exp_avg, slice.exp_avg_sq));
    FTUNE_TRAINER_RETURN_IF_ERROR(lora->GatherParams());
    if (slice.rng_state.defined() && state.world_size == ctx.world_size) {
      std::lock_guard<std::mutex> lock(cpu_generator.mutex());
      cpu_generator.set_state(slice.rng_state);
    }
    step = state.step;
    micro = state.micro_batches;
    tokens_total = state.tokens_total;
    if (ctx.rank == 0) {
      events.Info("resumed from " + ctx.resume_from + " at step " + std::to_string(step) +
                  " (written by " + std::to_string(state.world_size) + " ranks)");
    }
  }

  // 4. Schedule.
  const int64_t batch = t.per_device_train_batch_size();
  const int64_t accumulation = t.gradient_accumulation_steps();
  DataOrder order(train_file->num_rows(), batch, ctx.world_size, data_options.seed);
  const int64_t steps_per_epoch =
      std::max<int64_t>(1, order.micro_batches_per_epoch() / accumulation);
  const int64_t total_steps =
      t.max_steps() > 0
          ? t.max_steps()
          : static_cast<int64_t>(std::ceil(t.num_train_epochs() * steps_per_epoch));
  FTUNE_TRAINER_ASSIGN_OR_RETURN(LrSchedulerType schedule_type,
                                 ParseLrSchedulerType(t.lr_scheduler_type()));
  FTUNE_TRAINER_ASSIGN_OR_RETURN(
      LrSchedule schedule, LrSchedule::Make(schedule_type, t.learning_rate(), total_steps,
                                            t.warmup_steps(), t.warmup_ratio()));

  if (ctx.emit_hello) {
    v1::RankMessage m;
    auto* h = m.mutable_hello();
    h->set_rank(ctx.rank);
    h->set_world_size(ctx.world_size);
    h->set_pid(::getpid());
    h->set_device(ctx.device);
    h->set_start_step(step);
    events.Emit(m);
  }
  if (ctx.rank == 0) {
    events.Info("training " + std::to_string(total_steps) + " steps: " +
                std::to_string(batch * ctx.world_size * accumulation) + " rows per step (" +
                std::to_string(batch) + " per rank x " + std::to_string(ctx.world_size) +
                " ranks x " + std::to_string(accumulation) + " accumulation), " +
                std::to_string(lora->total_numel()) + " trainable LoRA parameters");
  }

  TrainResult result;
  int64_t last_saved_step = -1;
  const std::string checkpoints_root = ctx.output_dir + "/checkpoints";

  auto save_checkpoint = [&](double loss) -> Status {
    const Clock::time_point start = Clock::now();
    const std::string dir = checkpoints_root + "/" + CheckpointDirName(step);
    ShardState shard;
    shard.begin = lora->shard_begin();
    const int64_t real = std::max<int64_t>(
        0, std::min(lora->shard_numel(), lora->total_numel() - lora->shard_begin()));
    shard.lora = lora->shard().detach().narrow(0, 0, real);
    if (optimizer.exp_avg(0).defined()) {
      shard.exp_avg = optimizer.exp_avg(0).narrow(0, 0, real);
      shard.exp_avg_sq = optimizer.exp_avg_sq(0).narrow(0, 0, real);
    }
    shard.adam_step = optimizer.step_count(0);
    {
      std::lock_guard<std::mutex> lock(cpu_generator.mutex());
      shard.rng_state = cpu_generator.get_state();
    }
    FTUNE_TRAINER_RETURN_IF_ERROR(
        WriteCheckpointShard(dir, ctx.rank, ctx.world_size, shard).status());
    FTUNE_TRAINER_RETURN_IF_ERROR(reduce.Barrier());
    if (ctx.rank == 0) {
      FTUNE_TRAINER_RETURN_IF_ERROR(
          model->SaveAdapter(dir + "/adapter", spec.model().model_name_or_path()));
      TrainerState state;
      state.step = step;
      state.micro_batches = micro;
      state.tokens_total = tokens_total;
      state.loss = loss;
      state.world_size = ctx.world_size;
      state.total_numel = lora->total_numel();
      state.layout = layout;
      state.seed = static_cast<uint64_t>(t.seed());
      FTUNE_TRAINER_ASSIGN_OR_RETURN(int64_t bytes, WriteCheckpointManifest(dir, state));
      FTUNE_TRAINER_RETURN_IF_ERROR(PruneCheckpoints(ctx.output_dir, t.save_total_limit()));
      v1::RankMessage m;
      auto* c = m.mutable_checkpoint();
      c->set_step(step);
      c->set_path(dir);
      c->set_bytes(bytes);
      c->set_complete(true);
      c->set_duration_seconds(Seconds(start));
      events.Emit(m);
    }
    result.last_checkpoint = dir;
    last_saved_step = step;
    // Nobody resumes from, or prunes, a checkpoint before rank 0 finished it.
    return reduce.Barrier();
  };

  auto evaluate = [&]() -> Result<std::pair<double, int64_t>> {
    c10::NoGradGuard no_grad;
    const int64_t rows = eval_file->num_rows();
    const int64_t per_rank = (rows + ctx.world_size - 1) / ctx.world_size;
    double loss_sum = 0;
    int64_t tokens = 0;
    for (int64_t i = 0; i < per_rank; ++i) {
      // Every rank runs the same number of forwards (FSDP gathers are
      // collective); a rank past the end repeats a row and ignores it.
      const int64_t row = i * ctx.world_size + ctx.rank;
      Batch b = MakeBatch(*eval_file, {std::min(row, rows - 1)}, device);
      LossOutput out = model->Loss(b.input_ids, b.position_ids, b.labels, /*training=*/false);
      if (row < rows) {
        loss_sum += out.loss_sum.item<double>();
        tokens += out.num_tokens;
      }
    }
    FTUNE_TRAINER_ASSIGN_OR_RETURN(double total, reduce.SumDouble(loss_sum));
    FTUNE_TRAINER_ASSIGN_OR_RETURN(int64_t count, reduce.SumInt(tokens));
    return std::make_pair(count > 0 ? total / static_cast<double>(count) : 0.0, count);
  };
  auto emit_eval = [&]() -> Status {
    FTUNE_TRAINER_ASSIGN_OR_RETURN(auto eval, evaluate());
    if (ctx.rank == 0) {
      v1::RankMessage m;
      m.mutable_eval()->set_step(step);
      m.mutable_eval()->set_eval_loss(eval.first);
      m.mutable_eval()->set_eval_tokens(eval.second);
      events.Emit(m);
    }
    return OkStatus();
  };

  // 5. The loop.
  const Clock::time_point train_start = Clock::now();
  int64_t my_input_tokens = 0;
  double loss = result.final_loss;
  while (step < total_steps) {
    // Everyone stops after the same step, whichever rank heard the request.
    const int64_t local_stop =
        ctx.stop != nullptr && ctx.stop->requested() ? (ctx.stop->save_checkpoint() ? 2 : 1) : 0;
    FTUNE_TRAINER_ASSIGN_OR_RETURN(int64_t stop, reduce.MaxInt(local_stop));
    if (stop > 0) {
      if (stop == 2) FTUNE_TRAINER_RETURN_IF_ERROR(save_checkpoint(loss));
      result.stopped = true;
      if (ctx.rank == 0) events.Info("stopped at step " + std::to_string(step) + " on request");
      break;
    }

    const Clock::time_point step_start = Clock::now();
    std::vector<Batch> micro_batches;
    int64_t local_loss_tokens = 0, step_input_tokens = 0;
    for (int64_t a = 0; a < accumulation; ++a) {
      micro_batches.push_back(MakeBatch(*train_file, order.RowsFor(micro + a, ctx.rank), device));
      local_loss_tokens += LlamaModel::CountLossTokens(micro_batches.back().labels,
                                                       micro_batches.back().position_ids);
      step_input_tokens += micro_batches.back().num_input_tokens;
    }
    FTUNE_TRAINER_ASSIGN_OR_RETURN(int64_t step_tokens, reduce.SumInt(local_loss_tokens));
    const double scale = 1.0 / static_cast<double>(std::max<int64_t>(step_tokens, 1));

    double local_loss_sum = 0;
    for (const Batch& b : micro_batches) {
      LossOutput out = model->Loss(b.input_ids, b.position_ids, b.labels, /*training=*/true);
      out.loss_sum.mul(scale).backward();
      local_loss_sum += out.loss_sum.item<double>();
    }
    FTUNE_TRAINER_RETURN_IF_ERROR(lora->ReduceGradients());
    double grad_norm = 0;
    if (t.max_grad_norm() > 0) {
      FTUNE_TRAINER_ASSIGN_OR_RETURN(grad_norm, lora->ClipGradNorm(t.max_grad_norm()));
    } else {
      FTUNE_TRAINER_ASSIGN_OR_RETURN(grad_norm, lora->GradNorm());
    }
    const double lr = schedule.LrAt(step);
    optimizer.Step(lr);
    optimizer.ZeroGrad();
    FTUNE_TRAINER_RETURN_IF_ERROR(lora->GatherParams());

    FTUNE_TRAINER_ASSIGN_OR_RETURN(double loss_sum, reduce.SumDouble(local_loss_sum));
    loss = loss_sum * scale;
    micro += accumulation;
    tokens_total += step_tokens;
    my_input_tokens += step_input_tokens;
    ++step;
    result.losses.push_back(loss);
    const double step_seconds = Seconds(step_start);
    if (!comm_base.taken) comm_base = CommTotalsNow(model.get(), lora.get(), Seconds(train_start));

    if (step % t.logging_steps() == 0 || step == total_steps || step == 1) {
      v1::RankMessage m;
      auto* s = m.mutable_step();
      s->set_step(step);
      s->set_loss(loss);
      s->set_learning_rate(lr);
      s->set_grad_norm(grad_norm);
      s->set_tokens(step_input_tokens);
      s->set_tokens_total(my_input_tokens);
      s->set_tokens_per_second(step_seconds > 0 ? step_input_tokens / step_seconds : 0);
      s->set_epoch(order.EpochAt(micro));
      events.Emit(m);
    }
    if (step == 1 || step % std::max<int64_t>(t.logging_steps(), 10) == 0) {
      EmitMemory(events, device, ctx.device, "train");
    }
    if (eval_file != nullptr && t.eval_steps() > 0 && step % t.eval_steps() == 0) {
      FTUNE_TRAINER_RETURN_IF_ERROR(emit_eval());
    }
    if (t.save_steps() > 0 && step % t.save_steps() == 0 && step < total_steps) {
      FTUNE_TRAINER_RETURN_IF_ERROR(save_checkpoint(loss));
    }
  }

  const double train_seconds = Seconds(train_start);
  if (ctx.rank == 0 && ctx.world_size > 1 && comm_base.taken) {
    const CommTotals now = CommTotalsNow(model.get(), lora.get(), train_seconds);
    if (now.seconds > comm_base.seconds) events.Info(DescribeComm(comm_base, now));
  }
  result.final_step = step;
  result.final_loss = loss;
  result.tokens_total = tokens_total;
  result.tokens_per_second = train_seconds > 0 ? my_input_tokens / train_seconds : 0;
  if (!result.stopped) {
    if (eval_file != nullptr && t.eval_steps() > 0 && step % t.eval_steps() != 0) {
      FTUNE_TRAINER_RETURN_IF_ERROR(emit_eval());
    }
    // The final state is a checkpoint too, so a restart after this point
    // (a rank that dies before exiting) does not train again.
    if (t.save_steps() > 0 && last_saved_step != step) {
      FTUNE_TRAINER_RETURN_IF_ERROR(save_checkpoint(loss));
    }
    if (ctx.rank == 0) {
      result.adapter_dir = ctx.output_dir + "/adapter";
      FTUNE_TRAINER_RETURN_IF_ERROR(
          model->SaveAdapter(result.adapter_dir, spec.model().model_name_or_path()));
    }
  }
  result.peak_rss_bytes = PeakRssBytes();
  result.peak_device_bytes = DeviceMemory(device).peak;
  EmitMemory(events, device, ctx.device, "end");
  {
    v1::RankMessage m;
    m.mutable_done()->set_final_step(step);
    m.mutable_done()->set_final_loss(loss);
    m.mutable_done()->set_adapter_path(result.adapter_dir);
    events.Emit(m);
  }
  return result;
}

Result<TrainResult> Train(const v1::JobSpec& spec, const TrainContext& ctx) {
  // Tensor code and FSDP's gathers inside autograd report failures by
  // throwing (c10::Error carries the collective's status text, e.g. a peer
  // that died mid-gather); the rank turns them into a Status so it sends a
  // RankError and exits 1 instead of aborting.
  try {
    return TrainOrThrow(spec, ctx);
  } catch (const c10::Error& e) {
    return InternalError("rank " + std::to_string(ctx.rank) + " of " +
                         std::to_string(ctx.world_size) + ": " + e.what_without_backtrace());
  } catch (const std::exception& e) {
    return InternalError("rank " + std::to_string(ctx.rank) + " of " +
                         std::to_string(ctx.world_size) + ": " + e.what());
  }
}

}  // namespace ftune::trainer
