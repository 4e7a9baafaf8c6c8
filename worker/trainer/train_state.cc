#include "worker/trainer/train_state.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/GradMode.h>
#if defined(FTUNE_TRAIN_CUDA)
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <iomanip>
#include <mutex>
#include <sstream>
#include <type_traits>

#include "worker/comm/communicator.h"
#include "worker/modelio/llama_config.h"
#include "worker/modelio/memory_plan.h"
#include "worker/trainer/bnb_checkpoint.h"

namespace ftune::trainer {
namespace {

std::string Join(const std::vector<std::string>& v, const std::string& sep) {
  std::string out;
  for (size_t i = 0; i < v.size(); ++i) out += (i ? sep : "") + v[i];
  return out;
}

template <typename T>
Result<T> ReduceOne(comm::Communicator* comm, c10::Device device, T v, comm::ReduceOp op) {
  if (comm == nullptr) return v;
  constexpr bool kInt = std::is_same_v<T, int64_t>;
  at::Tensor t =
      at::full({1}, v, at::TensorOptions().dtype(kInt ? at::kLong : at::kFloat).device(device));
  FTUNE_RETURN_IF_ERROR(comm->AllReduce(t.data_ptr(), t.data_ptr(), 1,
                                        kInt ? comm::DataType::kInt64 : comm::DataType::kFloat32,
                                        op, nullptr));
  FTUNE_RETURN_IF_ERROR(comm->Synchronize(nullptr));
  return t.item<T>();
}

c10::ScalarType ComputeDtype(const std::string& name) {
  if (name == "float16") return c10::ScalarType::Half;
  if (name == "float32") return c10::ScalarType::Float;
  return c10::ScalarType::BFloat16;
}

}  // namespace

Result<int64_t> Reducer::SumInt(int64_t v) {
  return ReduceOne<int64_t>(comm_, device_, v, comm::ReduceOp::kSum);
}
Result<int64_t> Reducer::MaxInt(int64_t v) {
  return ReduceOne<int64_t>(comm_, device_, v, comm::ReduceOp::kMax);
}
Result<double> Reducer::SumDouble(double v) {
  FTUNE_ASSIGN_OR_RETURN(float f, ReduceOne<float>(comm_, device_, static_cast<float>(v),
                                                   comm::ReduceOp::kSum));
  return comm_ == nullptr ? v : static_cast<double>(f);
}
Status Reducer::Barrier() { return comm_ == nullptr ? OkStatus() : comm_->Barrier(nullptr); }

Result<RankData> PrepareRankData(const data::DatasetOptions& options, const std::string& cache_dir,
                                 const RankEnv& env) {
  FTUNE_RETURN_IF_ERROR(MakeDirectories(cache_dir));
  FTUNE_ASSIGN_OR_RETURN(
      data::PreparedDataset prepared,
      data::PrepareDataset(options, cache_dir, [&](const data::PrepareProgress& p) {
        if (env.rank == 0 && (p.done == p.total || p.done % 1000 == 0)) {
          env.events->Info("preparing data: " + p.phase + " " + std::to_string(p.done) + "/" +
                           std::to_string(p.total));
        }
      }));
  RankData data;
  FTUNE_ASSIGN_OR_RETURN(data.train, data::TokenFile::Open(prepared.train_path));
  if (!prepared.eval_path.empty()) {
    FTUNE_ASSIGN_OR_RETURN(data.eval, data::TokenFile::Open(prepared.eval_path));
  }
  if (env.rank == 0) {
    std::ostringstream s;
    s << "data: " << prepared.train_rows << " training rows (" << prepared.train_tokens
      << " tokens), " << prepared.eval_rows << " eval rows"
      << (prepared.cache_hit ? ", from cache " : ", prepared into ") << prepared.train_path
      << (prepared.skipped_records > 0
              ? ", skipped " + std::to_string(prepared.skipped_records) + " invalid records"
              : "");
    env.events->Info(s.str());
    for (const std::string& w : prepared.warnings) env.events->Log("WARNING", "data: " + w);
  }
  if (data.train->num_rows() == 0) {
    return InvalidArgumentError("the dataset " + Join(options.data_files, ", ") +
                                " produced no training rows");
  }
  data.prepared = std::move(prepared);
  return data;
}

ModelOptions ModelOptionsFor(const RunConfig& config, c10::Device device) {
  ModelOptions o = DefaultModelOptions(device);
  if (device.is_cuda()) o.dtype = ComputeDtype(config.model.compute_dtype);
  o.activation_checkpointing = config.model.activation_checkpointing;
  o.checkpoint_layers = config.model.checkpoint_layers;
  o.quantize_base = config.model.quantize_base;
  o.nf4.blocksize = config.model.nf4_blocksize;
  o.nf4.double_quant = config.model.double_quant;
  o.random_weights = config.model.random_weights;
  o.random_seed = config.model.random_seed;
  // A diagnostic switch for A/B measurements (docs/performance.md): the
  // LibTorch op chains instead of the fused kernels.
  if (const char* v = std::getenv("FTUNE_FUSED_KERNELS"); v != nullptr && std::string(v) == "0") {
    o.fused_kernels = false;
  }
  // The fused loss kernel on GPU ranks: off until its CUDA kernel has run
  // against its reference on a GPU host (fused_cuda_test); the CPU
  // reference is tested against the fp32 chain.
  if (const char* v = std::getenv("FTUNE_FUSED_LOSS"); v != nullptr && std::string(v) == "1") {
    o.fused_loss = true;
  }
  // And LoRA in fp32 as PEFT computes it (with the op chains: the path
  // before the speed work, for the loss-curve comparison).
  if (const char* v = std::getenv("FTUNE_LORA_FP32"); v != nullptr && std::string(v) == "1") {
    o.lora_fp32_compute = true;
  }
  return o;
}

namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

// fsdp.device_memory_limit caps the caching allocator of a GPU rank (as
// torch.cuda.set_per_process_memory_fraction does), and gradient
// checkpointing "auto" picks from the memory plan how many layers to
// checkpoint within that budget (or the device's memory). Every rank must
// recompute the same layers (the backward's gathers follow them), so the
// ranks agree on the largest count any of them needs.
Status PlanDeviceMemory(const RunConfig& config, const RankEnv& env, ModelOptions* options) {
  if (!env.device.is_cuda()) return OkStatus();
  // The caching allocator is set up by the device's first allocation; its
  // counters and its cap are not there before.
  (void)at::empty({1}, at::TensorOptions().device(env.device));
  const int64_t total = DeviceMemory(env.device).device_total;
  const int64_t limit = config.model.device_memory_limit_bytes;
  std::ostringstream report;
  report << std::fixed << std::setprecision(2);
  if (limit > 0) {
    if (total > 0 && limit > total) {
      return InvalidArgumentError("fsdp.device_memory_limit (" + std::to_string(limit) +
                                  " bytes) is more than " + env.device_name + " has (" +
                                  std::to_string(total) + " bytes)");
    }
#if defined(FTUNE_TRAIN_CUDA)
    if (total > 0) {
      c10::cuda::CUDACachingAllocator::setMemoryFraction(
          static_cast<double>(limit) / static_cast<double>(total), env.device.index());
    }
#endif
    report << "device memory capped at " << limit / kGiB << " GiB of " << total / kGiB
           << " GiB; ";
  }
  // A diagnostic switch for A/B measurements (docs/performance.md): what
  // each checkpointed layer keeps for its recompute, whatever the plan picks.
  RecomputeKeep forced_keep = RecomputeKeep::kNothing;
  const char* keep_env = std::getenv("FTUNE_RECOMPUTE_KEEP");
  if (keep_env != nullptr && !ParseRecomputeKeep(keep_env, &forced_keep)) {
    return InvalidArgumentError(std::string("FTUNE_RECOMPUTE_KEEP=") + keep_env +
                                " is not one of nothing, down_proj, projections");
  }
  // Likewise how many layers not checkpointed keep their dequantized weights.
  int64_t forced_dense = 0;
  const char* dense_env = std::getenv("FTUNE_DEQUANTIZED_KEPT_LAYERS");
  if (dense_env != nullptr) {
    char* end = nullptr;
    forced_dense = std::strtoll(dense_env, &end, 10);
    if (*dense_env == '\0' || *end != '\0' || forced_dense < 0) {
      return InvalidArgumentError(std::string("FTUNE_DEQUANTIZED_KEPT_LAYERS=") + dense_env +
                                  " is not a layer count (an integer >= 0)");
    }
  }
  if (!config.model.checkpointing_auto) {
    if (keep_env != nullptr) options->recompute_keep = forced_keep;
    if (dense_env != nullptr) options->dequantized_kept_layers = forced_dense;
    if ((limit > 0 || keep_env != nullptr || dense_env != nullptr) && env.rank == 0) {
      env.events->Info(report.str() + "checkpointing as the spec says" +
                       (keep_env != nullptr ? std::string(", keeping ") +
                                                  RecomputeKeepName(forced_keep) +
                                                  " for the recompute (FTUNE_RECOMPUTE_KEEP)"
                                            : std::string()) +
                       (dense_env != nullptr
                            ? ", " + std::to_string(forced_dense) +
                                  " layers not checkpointed keeping their dequantized weights "
                                  "(FTUNE_DEQUANTIZED_KEPT_LAYERS)"
                            : std::string()));
    }
    return OkStatus();
  }
  const int64_t budget = limit > 0 ? limit : total;
  FTUNE_ASSIGN_OR_RETURN(LlamaConfig shape, LoadLlamaConfig(config.model.dir));
  int64_t layers = shape.num_hidden_layers;
  CheckpointChoice choice;
  choice.checkpoint_layers = layers;
  if (budget > 0) {
    MemoryPlanOptions plan_options = config.plan;
    plan_options.fused_kernels = options->fused_kernels;
    FTUNE_ASSIGN_OR_RETURN(choice, ChooseCheckpointLayers(shape, plan_options, budget,
                                                          /*allocator_budget=*/limit > 0));
    layers = choice.checkpoint_layers;
  }
  if (env.reduce != nullptr && env.world_size > 1) {
    FTUNE_ASSIGN_OR_RETURN(layers, env.reduce->MaxInt(layers));
  }
  // What the checkpointed layers keep was planned for this rank's count; a
  // larger count agreed with the other ranks keeps nothing.
  const bool as_planned = layers == choice.checkpoint_layers;
  RecomputeKeep keep = as_planned ? choice.recompute_keep : RecomputeKeep::kNothing;
  if (keep_env != nullptr) keep = forced_keep;
  int64_t dense = as_planned ? choice.dequantized_kept_layers : 0;
  if (dense_env != nullptr) dense = forced_dense;
  options->activation_checkpointing = layers > 0;
  options->checkpoint_layers = layers;
  options->recompute_keep = keep;
  options->dequantized_kept_layers = dense;
  if (env.rank == 0) {
    report << "gradient_checkpointing auto: " << layers << " of " << shape.num_hidden_layers
           << " layers checkpointed";
    if (layers > 0) report << ", each keeping " << RecomputeKeepName(keep) << " for its recompute";
    if (keep_env != nullptr) report << " (FTUNE_RECOMPUTE_KEEP)";
    const int64_t dense_layers = std::min(dense, shape.num_hidden_layers - layers);
    if (dense_layers > 0) {
      report << "; " << dense_layers << " of the "
             << (layers > 0 ? "others" : "layers")
             << " keeping their dequantized weights for backward";
      if (dense_env != nullptr) report << " (FTUNE_DEQUANTIZED_KEPT_LAYERS)";
    }
    report << " (plan " << choice.plan.device_peak_bytes / kGiB
           << " GiB for a budget of " << budget / kGiB << " GiB"
           << (budget > 0 && !choice.fits ? "; it does not fit even with every layer checkpointed"
                                          : "")
           << ")";
    env.events->Info(report.str());
  }
  return OkStatus();
}

}  // namespace

Result<TrainingState> BuildTrainingState(const RunConfig& config, const RankEnv& env) {
  const auto start = std::chrono::steady_clock::now();
  ModelOptions model_options = ModelOptionsFor(config, env.device);
  FTUNE_RETURN_IF_ERROR(PlanDeviceMemory(config, env, &model_options));
  const std::string& model_dir = config.model.dir;
  {
    // Refused before any loading: rows longer than a Mistral sliding window
    // would need windowed attention, which the model does not implement.
    FTUNE_ASSIGN_OR_RETURN(LlamaConfig shape, LoadLlamaConfig(model_dir));
    if (shape.sliding_window && config.data.max_seq_len > *shape.sliding_window) {
      return InvalidArgumentError(
          "training.max_seq_len (" + std::to_string(config.data.max_seq_len) + ") exceeds " +
          model_dir + "'s sliding_window (" + std::to_string(*shape.sliding_window) +
          "): ftune attends over whole sequences, without a sliding window; use max_seq_len <= " +
          std::to_string(*shape.sliding_window));
    }
  }
  TrainingState state;
  // Load and quantize.
  if (!model_options.random_weights) {
    FTUNE_ASSIGN_OR_RETURN(state.pre_quantized, IsBnb4bitDirectory(model_dir));
  }
  LoadStats load_stats;
  if (state.pre_quantized) {
    // A bitsandbytes 4-bit directory (`ftune-rank quantize`, or a 4-bit
    // model saved by transformers): its NF4 bytes are used as stored. They
    // are not sliced across ranks: every rank holds the whole frozen model
    // (adapters and optimizer state are still sharded).
    FTUNE_ASSIGN_OR_RETURN(state.model, LoadModelDirectory(model_dir, model_options));
    if (env.rank == 0 && env.world_size > 1) {
      env.events->Log("WARNING",
                      model_dir +
                          " is pre-quantized: its frozen weights are replicated on every rank, "
                          "not sharded; train from the dense model to shard them");
    }
  } else {
    FTUNE_ASSIGN_OR_RETURN(state.model, LoadShardedModel(model_dir, model_options, config.fsdp,
                                                         env.comm, &load_stats));
  }
#if defined(FTUNE_TRAIN_CUDA)
  // Loading's temporaries (one tensor's share at a time) stay cached; hand
  // them back so training starts from the model's own footprint.
  if (env.device.is_cuda()) c10::cuda::CUDACachingAllocator::emptyCache();
#endif
  EmitMemory(*env.events, env.device, env.device_name, "load");
  if (env.rank == 0) {
    std::ostringstream s;
    s << "model " << model_dir << " loaded in " << std::fixed << std::setprecision(1)
      << std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count()
      << " s (";
    if (state.pre_quantized) {
      s << "pre-quantized NF4, replicated on " << env.world_size << " ranks)";
    } else {
      s << (model_options.quantize_base ? "NF4" : "dense") << ", " << load_stats.unit_count
        << " FSDP units over " << env.world_size << " ranks)";
    }
    env.events->Info(s.str());
  }
  // Attach LoRA, shard it with its optimizer state.
  FTUNE_RETURN_IF_ERROR(state.model->AttachLora(config.lora));
  FTUNE_ASSIGN_OR_RETURN(state.lora, ShardedLora::Create(state.model.get(), env.comm));
  state.optimizer = std::make_unique<AdamW>(std::vector<at::Tensor>{state.lora->shard()},
                                            config.adam);
  // LoRA dropout draws from the CPU generator; each rank its own stream.
  state.cpu_generator = at::detail::getDefaultCPUGenerator();  // a handle
  {
    std::lock_guard<std::mutex> lock(state.cpu_generator.mutex());
    state.cpu_generator.set_current_seed(config.training.seed + static_cast<uint64_t>(env.rank));
  }
  return state;
}

Result<Schedule> MakeSchedule(const TrainingSettings& t, const data::TokenFile& train,
                              uint64_t data_seed, int world_size) {
  DataOrder order(train.num_rows(), t.per_device_train_batch_size, world_size, data_seed);
  const int64_t steps_per_epoch =
      std::max<int64_t>(1, order.micro_batches_per_epoch() / t.gradient_accumulation_steps);
  const int64_t total_steps =
      t.max_steps > 0 ? t.max_steps
                      : static_cast<int64_t>(std::ceil(t.num_train_epochs * steps_per_epoch));
  FTUNE_ASSIGN_OR_RETURN(LrSchedulerType type, ParseLrSchedulerType(t.lr_scheduler_type));
  FTUNE_ASSIGN_OR_RETURN(LrSchedule lr, LrSchedule::Make(type, t.learning_rate, total_steps,
                                                         t.warmup_steps, t.warmup_ratio));
  return Schedule{std::move(order), total_steps, std::move(lr)};
}

Result<std::pair<double, int64_t>> Evaluator::Run() {
  c10::NoGradGuard no_grad;
  const int64_t rows = eval_->num_rows();
  const int64_t per_rank = (rows + env_.world_size - 1) / env_.world_size;
  double loss_sum = 0;
  int64_t tokens = 0;
  for (int64_t i = 0; i < per_rank; ++i) {
    // A rank past the end repeats a row and ignores it.
    const int64_t row = i * env_.world_size + env_.rank;
    Batch b = MakeBatch(*eval_, {std::min(row, rows - 1)}, env_.device);
    LossOutput out = model_->Loss(b.input_ids, b.position_ids, b.labels, /*training=*/false);
    if (row < rows) {
      loss_sum += out.loss_sum.item<double>();
      tokens += out.num_tokens;
    }
  }
  FTUNE_ASSIGN_OR_RETURN(double total, env_.reduce->SumDouble(loss_sum));
  FTUNE_ASSIGN_OR_RETURN(int64_t count, env_.reduce->SumInt(tokens));
  return std::make_pair(count > 0 ? total / static_cast<double>(count) : 0.0, count);
}

Status Evaluator::RunAndReport(int64_t step) {
  FTUNE_ASSIGN_OR_RETURN(auto eval, Run());
  if (env_.rank == 0) {
    v1::RankMessage m;
    m.mutable_eval()->set_step(step);
    m.mutable_eval()->set_eval_loss(eval.first);
    m.mutable_eval()->set_eval_tokens(eval.second);
    env_.events->Emit(m);
  }
  return OkStatus();
}

}  // namespace ftune::trainer
