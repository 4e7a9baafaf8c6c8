#include "worker/trainer/train.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>
#if defined(FTUNE_TRAIN_CUDA)
#include <torch/version.h>
#include <stdlib.h>
#endif

#include <algorithm>
#include <chrono>
#include <memory>
#include <vector>

#include "jobspec.h"
#include "worker/comm/communicator.h"
#include "worker/config/run_config.h"
#include "worker/trainer/checkpoint.h"
#include "worker/trainer/profiler.h"
#include "worker/trainer/train_state.h"

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

Status CheckContext(const TrainContext& ctx) {
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
  return OkStatus();
}

CollectiveTotals CollectivesNow(const TrainingState& state, double train_seconds) {
  CollectiveTotals c;
  c.taken = true;
  if (FsdpUnits* units = FsdpUnitsOf(*state.model)) {
    c.gather = units->gather_busy_seconds();
    c.gather_exposed = units->gather_exposed_seconds();
    c.gathered_bytes = units->gathered_bytes_total();
  }
  c.reduce_scatter = state.lora->reduce_scatter_seconds();
  c.reduce_exposed = state.lora->reduce_scatter_exposed_seconds();
  c.seconds = train_seconds;
  return c;
}

struct StepOutcome {
  double loss = 0;
  double grad_norm = 0;
  double lr = 0;
  int64_t loss_tokens = 0;   // every rank's
  int64_t input_tokens = 0;  // this rank's
};

// One optimizer step: the step's loss tokens are counted over every
// micro-batch of every rank first, so each micro-batch's summed loss is
// scaled by 1 / (that count) before backward: the gradient of the mean loss
// over the whole global batch (transformers' num_items_in_batch with
// average_tokens_across_devices). Then reduce-scatter, clip, AdamW on the
// shard, all-gather of the updated shard.
Result<StepOutcome> TrainStep(const RunConfig& config, const RankEnv& env, TrainingState& state,
                              Schedule& schedule, const data::TokenFile& train,
                              const TrainProgress& progress) {
  FTUNE_RANGE("ftune::step");
  const int64_t accumulation = config.training.gradient_accumulation_steps;
  StepOutcome out;
  std::vector<Batch> micro_batches;
  int64_t local_loss_tokens = 0;
  for (int64_t a = 0; a < accumulation; ++a) {
    micro_batches.push_back(
        MakeBatch(train, schedule.order.RowsFor(progress.micro + a, env.rank), env.device));
    local_loss_tokens += LlamaModel::CountLossTokens(micro_batches.back().labels,
                                                     micro_batches.back().position_ids);
    out.input_tokens += micro_batches.back().num_input_tokens;
  }
  FTUNE_ASSIGN_OR_RETURN(out.loss_tokens, env.reduce->SumInt(local_loss_tokens));
  const double scale = 1.0 / static_cast<double>(std::max<int64_t>(out.loss_tokens, 1));

  double local_loss_sum = 0;
  for (const Batch& b : micro_batches) {
    LossOutput loss = state.model->Loss(b.input_ids, b.position_ids, b.labels, /*training=*/true);
    loss.loss_sum.mul(scale).backward();
    local_loss_sum += loss.loss_sum.item<double>();
  }
  {
    FTUNE_RANGE("ftune::reduce_gradients");
    FTUNE_RETURN_IF_ERROR(state.lora->ReduceGradients());
  }
  {
    FTUNE_RANGE("ftune::optimizer");
    if (config.training.max_grad_norm > 0) {
      FTUNE_ASSIGN_OR_RETURN(out.grad_norm,
                             state.lora->ClipGradNorm(config.training.max_grad_norm));
    } else {
      FTUNE_ASSIGN_OR_RETURN(out.grad_norm, state.lora->GradNorm());
    }
    out.lr = schedule.lr.LrAt(progress.step);
    state.optimizer->Step(out.lr);
    state.optimizer->ZeroGrad();
  }
  {
    FTUNE_RANGE("ftune::gather_lora");
    FTUNE_RETURN_IF_ERROR(state.lora->GatherParams());
  }
  FTUNE_ASSIGN_OR_RETURN(double loss_sum, env.reduce->SumDouble(local_loss_sum));
  out.loss = loss_sum * scale;
  return out;
}

void EmitStep(const RankEnv& env, const TrainProgress& progress, const StepOutcome& s,
              int64_t my_input_tokens, double step_seconds, double epoch) {
  v1::RankMessage m;
  auto* e = m.mutable_step();
  e->set_step(progress.step);
  e->set_loss(s.loss);
  e->set_learning_rate(s.lr);
  e->set_grad_norm(s.grad_norm);
  e->set_tokens(s.input_tokens);
  e->set_tokens_total(my_input_tokens);
  e->set_tokens_per_second(step_seconds > 0 ? s.input_tokens / step_seconds : 0);
  e->set_epoch(epoch);
  env.events->Emit(m);
}

// Ranks poll their StopFlag between steps and agree through an all-reduce
// (max), so every rank stops after the same step. 0: go on, 1: stop,
// 2: checkpoint, then stop.
Result<int64_t> AgreeOnStop(const RankEnv& env, const StopFlag* stop) {
  const int64_t local =
      stop != nullptr && stop->requested() ? (stop->save_checkpoint() ? 2 : 1) : 0;
  return env.reduce->MaxInt(local);
}

// The algorithm, top to bottom; the mechanics are in train_state.h,
// checkpoint.h and events.h.
Result<TrainResult> TrainOrThrow(const v1::JobSpec& spec, const TrainContext& ctx) {
#if defined(FTUNE_TRAIN_CUDA) && TORCH_VERSION_MAJOR >= 2
  // Before the caching allocator's first use: segments that grow in place
  // instead of many fixed ones, so the units gathered and freed on two
  // streams do not fragment the device (on 70B's 2-GPU run the reserved
  // peak was 7.5 GiB above the allocated one without it). A user's own
  // setting wins.
  setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True", /*overwrite=*/0);
#endif
  FTUNE_RETURN_IF_ERROR(CheckContext(ctx));
  FTUNE_ASSIGN_OR_RETURN(c10::Device device, ParseDevice(ctx.device));
  FTUNE_ASSIGN_OR_RETURN(
      const RunConfig config,
      MakeRunConfig(spec, device.is_cuda() ? DeviceKind::kCuda : DeviceKind::kCpu, ctx.world_size));
  comm::Communicator* comm = ctx.world_size > 1 ? ctx.comm : nullptr;
  Reducer reduce(comm, device);
  const RankEnv env{ctx.rank, ctx.world_size, device, ctx.device, comm, &reduce, ctx.events};
  const TrainingSettings& t = config.training;
  FTUNE_RETURN_IF_ERROR(MakeDirectories(ctx.output_dir));

  // 1. Data. 2. Model: load -> quantize -> attach LoRA -> shard -> optimizer.
  FTUNE_ASSIGN_OR_RETURN(
      RankData data,
      PrepareRankData(config.data,
                      ctx.data_cache_dir.empty() ? ctx.output_dir + "/data-cache"
                                                 : ctx.data_cache_dir,
                      env));
  FTUNE_ASSIGN_OR_RETURN(TrainingState state, BuildTrainingState(config, env));
  // 3. Resume.
  TrainProgress progress;
  if (!ctx.resume_from.empty()) {
    FTUNE_ASSIGN_OR_RETURN(progress, ResumeFromCheckpoint(ctx.resume_from, ctx.rank,
                                                          ctx.world_size, state.lora.get(),
                                                          state.optimizer.get(),
                                                          state.cpu_generator));
    if (ctx.rank == 0) {
      ctx.events->Info("resumed from " + ctx.resume_from + " at step " +
                       std::to_string(progress.step) + " (written by " +
                       std::to_string(progress.resumed_world_size) + " ranks)");
    }
  }
  // 4. Schedule.
  FTUNE_ASSIGN_OR_RETURN(Schedule schedule,
                         MakeSchedule(t, *data.train, config.data.seed, ctx.world_size));
  if (ctx.emit_hello) {
    EmitHello(*ctx.events, ctx.rank, ctx.world_size, ctx.device, progress.step);
  }
  if (ctx.rank == 0) {
    const int64_t batch = t.per_device_train_batch_size;
    ctx.events->Info(
        "training " + std::to_string(schedule.total_steps) + " steps: " +
        std::to_string(batch * ctx.world_size * t.gradient_accumulation_steps) +
        " rows per step (" + std::to_string(batch) + " per rank x " +
        std::to_string(ctx.world_size) + " ranks x " +
        std::to_string(t.gradient_accumulation_steps) + " accumulation), " +
        std::to_string(state.lora->total_numel()) + " trainable LoRA parameters");
  }
  Checkpointer checkpointer({ctx.rank, ctx.world_size, ctx.output_dir, config.model.dir,
                             t.save_total_limit, t.seed},
                            state.model.get(), state.lora.get(), state.optimizer.get(),
                            state.cpu_generator, [&reduce] { return reduce.Barrier(); },
                            ctx.events);
  std::unique_ptr<Evaluator> evaluator;
  if (data.eval != nullptr) {
    evaluator = std::make_unique<Evaluator>(state.model.get(), data.eval.get(), env);
  }
  StepProfiler profiler(t.profile_first, t.profile_last, ctx.output_dir + "/profile", ctx.rank,
                        device.is_cuda());
  const auto report_trace = [&](const std::string& path) {
    if (!path.empty()) ctx.events->Info("profile of rank " + std::to_string(ctx.rank) +
                                        " written to " + path);
  };
  const auto save = [&](double loss) -> Status {
    FTUNE_ASSIGN_OR_RETURN(std::string dir, checkpointer.Save(progress, loss));
    (void)dir;
    return OkStatus();
  };

  // 5. The loop.
  TrainResult result;
  CollectiveTotals collectives_base;  // after this run's first (warm-up) step
  const Clock::time_point train_start = Clock::now();
  int64_t my_input_tokens = 0;
  double loss = 0;
  while (progress.step < schedule.total_steps) {
    FTUNE_ASSIGN_OR_RETURN(int64_t stop, AgreeOnStop(env, ctx.stop));
    if (stop > 0) {
      if (stop == 2) FTUNE_RETURN_IF_ERROR(save(loss));
      result.stopped = true;
      if (ctx.rank == 0) {
        ctx.events->Info("stopped at step " + std::to_string(progress.step) + " on request");
      }
      break;
    }
    const Clock::time_point step_start = Clock::now();
    FTUNE_RETURN_IF_ERROR(profiler.BeginStep(progress.step + 1));
    FTUNE_ASSIGN_OR_RETURN(StepOutcome s,
                           TrainStep(config, env, state, schedule, *data.train, progress));
    loss = s.loss;
    progress.micro += t.gradient_accumulation_steps;
    progress.tokens_total += s.loss_tokens;
    my_input_tokens += s.input_tokens;
    ++progress.step;
    FTUNE_ASSIGN_OR_RETURN(std::string trace, profiler.EndStep(progress.step));
    report_trace(trace);
    result.losses.push_back(loss);
    const double step_seconds = Seconds(step_start);
    if (!collectives_base.taken) {
      collectives_base = CollectivesNow(state, Seconds(train_start));
    }

    const int64_t step = progress.step;
    if (step % t.logging_steps == 0 || step == schedule.total_steps || step == 1) {
      EmitStep(env, progress, s, my_input_tokens, step_seconds,
               schedule.order.EpochAt(progress.micro));
    }
    if (step == 1 || step % std::max<int64_t>(t.logging_steps, 10) == 0) {
      EmitMemory(*ctx.events, device, ctx.device, "train");
    }
    if (evaluator != nullptr && t.eval_steps > 0 && step % t.eval_steps == 0) {
      FTUNE_RETURN_IF_ERROR(evaluator->RunAndReport(step));
    }
    if (t.save_steps > 0 && step % t.save_steps == 0 && step < schedule.total_steps) {
      FTUNE_RETURN_IF_ERROR(save(loss));
    }
  }

  // 6. The end: collective summary, final eval, final checkpoint, adapter.
  const double train_seconds = Seconds(train_start);
  {
    // Stopped (or out of steps) inside the traced range: keep what ran.
    FTUNE_ASSIGN_OR_RETURN(std::string trace, profiler.Finish());
    report_trace(trace);
  }
  if (ctx.rank == 0 && ctx.world_size > 1 && collectives_base.taken) {
    const CollectiveTotals now = CollectivesNow(state, train_seconds);
    if (now.seconds > collectives_base.seconds) {
      ctx.events->Info(DescribeCollectives(collectives_base, now));
    }
  }
  result.final_step = progress.step;
  result.final_loss = loss;
  result.tokens_total = progress.tokens_total;
  result.tokens_per_second = train_seconds > 0 ? my_input_tokens / train_seconds : 0;
  if (!result.stopped) {
    if (evaluator != nullptr && t.eval_steps > 0 && progress.step % t.eval_steps != 0) {
      FTUNE_RETURN_IF_ERROR(evaluator->RunAndReport(progress.step));
    }
    // The final state is a checkpoint too, so a restart after this point
    // (a rank that dies before exiting) does not train again.
    if (t.save_steps > 0 && checkpointer.last_saved_step() != progress.step) {
      FTUNE_RETURN_IF_ERROR(save(loss));
    }
    if (ctx.rank == 0) {
      result.adapter_dir = ctx.output_dir + "/adapter";
      FTUNE_RETURN_IF_ERROR(state.model->SaveAdapter(result.adapter_dir, config.model.dir));
    }
  }
  if (checkpointer.last_saved_step() >= 0) {
    result.last_checkpoint =
        ctx.output_dir + "/checkpoints/" + CheckpointDirName(checkpointer.last_saved_step());
  }
  result.peak_rss_bytes = PeakRssBytes();
  result.peak_device_bytes = DeviceMemory(device).peak;
  EmitMemory(*ctx.events, device, ctx.device, "end");
  v1::RankMessage done;
  done.mutable_done()->set_final_step(progress.step);
  done.mutable_done()->set_final_loss(loss);
  done.mutable_done()->set_adapter_path(result.adapter_dir);
  ctx.events->Emit(done);
  return result;
}

}  // namespace

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
