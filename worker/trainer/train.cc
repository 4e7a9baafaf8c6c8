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
#include "worker/trainer/tensorboard.h"
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
  std::array<double, kNumStepPhases> phase_seconds{};  // by StepPhase
  double exposed_comm_seconds = 0;
};

// One optimizer step: the step's loss tokens are counted over every
// micro-batch of every rank first, so each micro-batch's summed loss is
// scaled by 1 / (that count) before backward: the gradient of the mean loss
// over the whole global batch (transformers' num_items_in_batch with
// average_tokens_across_devices). Then reduce-scatter, clip, AdamW on the
// shard, all-gather of the updated shard.
Result<StepOutcome> TrainStep(const RunConfig& config, const RankEnv& env, TrainingState& state,
                              Schedule& schedule, const data::TokenFile& train,
                              const TrainProgress& progress, PhaseTimer& phases) {
  FTUNE_RANGE("ftune::step");
  const int64_t accumulation = config.training.gradient_accumulation_steps;
  StepOutcome out;
  const CollectiveTotals comm_before = CollectivesNow(state, 0);
  // What the host must know of each micro-batch (document offsets, the
  // loss's targets and their count) comes from its CPU copy: nothing in the
  // step waits for the device until the loss is read at its end.
  std::vector<Batch> micro_batches;
  std::vector<BatchLayout> layouts;
  int64_t local_loss_tokens = 0;
  for (int64_t a = 0; a < accumulation; ++a) {
    micro_batches.push_back(
        MakeBatch(train, schedule.order.RowsFor(progress.micro + a, env.rank), env.device));
    layouts.push_back(state.model->HostLayout(micro_batches.back().host_position_ids,
                                              micro_batches.back().host_labels));
    local_loss_tokens += layouts.back().num_loss_tokens;
    out.input_tokens += micro_batches.back().num_input_tokens;
  }
  FTUNE_ASSIGN_OR_RETURN(out.loss_tokens, env.reduce->SumInt(local_loss_tokens));
  const double scale = 1.0 / static_cast<double>(std::max<int64_t>(out.loss_tokens, 1));

  at::Tensor local_loss = at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(env.device));
  phases.Start();
  for (size_t i = 0; i < micro_batches.size(); ++i) {
    const Batch& b = micro_batches[i];
    LossOutput loss = state.model->Loss(b.input_ids, b.position_ids, b.labels, /*training=*/true,
                                        &layouts[i]);
    phases.Mark(StepPhase::kForward);
    loss.loss_sum.mul(scale).backward();
    phases.Mark(StepPhase::kBackward);
    local_loss.add_(loss.loss_sum.detach());
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
  phases.Mark(StepPhase::kOptimizer);
  const double local_loss_sum = local_loss.item<double>();
  FTUNE_ASSIGN_OR_RETURN(double loss_sum, env.reduce->SumDouble(local_loss_sum));
  out.loss = loss_sum * scale;
  out.phase_seconds = phases.Seconds();
  const CollectiveTotals comm_after = CollectivesNow(state, 0);
  out.exposed_comm_seconds = (comm_after.gather_exposed - comm_before.gather_exposed) +
                             (comm_after.reduce_exposed - comm_before.reduce_exposed);
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
  e->set_forward_seconds(s.phase_seconds[static_cast<int>(StepPhase::kForward)]);
  e->set_backward_seconds(s.phase_seconds[static_cast<int>(StepPhase::kBackward)]);
  e->set_optimizer_seconds(s.phase_seconds[static_cast<int>(StepPhase::kOptimizer)]);
  e->set_exposed_comm_seconds(s.exposed_comm_seconds);
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

Status Resume(const TrainContext& ctx, TrainingState& state, TrainProgress* progress) {
  if (ctx.resume_from.empty()) return OkStatus();
  FTUNE_ASSIGN_OR_RETURN(*progress, ResumeFromCheckpoint(ctx.resume_from, ctx.rank,
                                                         ctx.world_size, state.lora.get(),
                                                         state.optimizer.get(),
                                                         state.cpu_generator));
  if (ctx.rank == 0) {
    ctx.events->Info("resumed from " + ctx.resume_from + " at step " +
                     std::to_string(progress->step) + " (written by " +
                     std::to_string(progress->resumed_world_size) + " ranks)");
  }
  return OkStatus();
}

void ReportStart(const TrainContext& ctx, const TrainingSettings& t, const Schedule& schedule,
                 const TrainingState& state, int64_t start_step) {
  if (ctx.emit_hello) EmitHello(*ctx.events, ctx.rank, ctx.world_size, ctx.device, start_step);
  if (ctx.rank != 0) return;
  const int64_t batch = t.per_device_train_batch_size;
  ctx.events->Info("training " + std::to_string(schedule.total_steps) + " steps: " +
                   std::to_string(batch * ctx.world_size * t.gradient_accumulation_steps) +
                   " rows per step (" + std::to_string(batch) + " per rank x " +
                   std::to_string(ctx.world_size) + " ranks x " +
                   std::to_string(t.gradient_accumulation_steps) + " accumulation), " +
                   std::to_string(state.lora->total_numel()) + " trainable LoRA parameters");
}

// What the loop keeps across steps besides the progress.
struct RunTotals {
  TrainResult result;
  double loss = 0;
  int64_t my_input_tokens = 0;
  CollectiveTotals collectives_base;  // after this run's first (warm-up) step
  Clock::time_point start = Clock::now();
};

// After a step: the step and memory events, eval and checkpoint when due.
Status AfterStep(const RunConfig& config, const RankEnv& env, const TrainProgress& progress,
                 const StepOutcome& s, const Schedule& schedule, RunTotals& run,
                 double step_seconds, Evaluator* evaluator, Checkpointer& checkpointer) {
  const TrainingSettings& t = config.training;
  const int64_t step = progress.step;
  if (step % t.logging_steps == 0 || step == schedule.total_steps || step == 1) {
    EmitStep(env, progress, s, run.my_input_tokens, step_seconds,
             schedule.order.EpochAt(progress.micro));
  }
  if (step == 1 || step % std::max<int64_t>(t.logging_steps, 10) == 0) {
    EmitMemory(*env.events, env.device, env.device_name, "train");
  }
  if (evaluator != nullptr && t.eval_steps > 0 && step % t.eval_steps == 0) {
    FTUNE_RETURN_IF_ERROR(evaluator->RunAndReport(step));
  }
  if (t.save_steps > 0 && step % t.save_steps == 0 && step < schedule.total_steps) {
    FTUNE_RETURN_IF_ERROR(checkpointer.Save(progress, run.loss).status());
  }
  return OkStatus();
}

// The end of a run that was not stopped: the final eval and checkpoint (a
// restart after this point, say a rank that dies before exiting, does not
// train again) and rank 0's consolidated adapter. Then, for every run, the
// collective summary, the memory event and `done`.
Result<TrainResult> Finish(const RunConfig& config, const TrainContext& ctx, const RankEnv& env,
                           const TrainProgress& progress, TrainingState& state, RunTotals& run,
                           Evaluator* evaluator, Checkpointer& checkpointer) {
  const TrainingSettings& t = config.training;
  TrainResult& result = run.result;
  const double train_seconds = Seconds(run.start);
  if (ctx.rank == 0 && ctx.world_size > 1 && run.collectives_base.taken) {
    const CollectiveTotals now = CollectivesNow(state, train_seconds);
    if (now.seconds > run.collectives_base.seconds) {
      ctx.events->Info(DescribeCollectives(run.collectives_base, now));
    }
  }
  if (!result.stopped) {
    if (evaluator != nullptr && t.eval_steps > 0 && progress.step % t.eval_steps != 0) {
      FTUNE_RETURN_IF_ERROR(evaluator->RunAndReport(progress.step));
    }
    if (t.save_steps > 0 && checkpointer.last_saved_step() != progress.step) {
      FTUNE_RETURN_IF_ERROR(checkpointer.Save(progress, run.loss).status());
    }
    if (ctx.rank == 0) {
      result.adapter_dir = ctx.output_dir + "/adapter";
      FTUNE_RETURN_IF_ERROR(state.model->SaveAdapter(result.adapter_dir, config.model.dir));
    }
  }
  result.final_step = progress.step;
  result.final_loss = run.loss;
  result.tokens_total = progress.tokens_total;
  result.tokens_per_second = train_seconds > 0 ? run.my_input_tokens / train_seconds : 0;
  if (checkpointer.last_saved_step() >= 0) {
    result.last_checkpoint =
        ctx.output_dir + "/checkpoints/" + CheckpointDirName(checkpointer.last_saved_step());
  }
  result.peak_rss_bytes = PeakRssBytes();
  result.peak_device_bytes = DeviceMemory(env.device).peak;
  EmitMemory(*ctx.events, env.device, ctx.device, "end");
  v1::RankMessage done;
  done.mutable_done()->set_final_step(progress.step);
  done.mutable_done()->set_final_loss(run.loss);
  done.mutable_done()->set_adapter_path(result.adapter_dir);
  ctx.events->Emit(done);
  return std::move(result);
}

// The algorithm, top to bottom; the mechanics are in train_state.h,
// checkpoint.h, events.h and the helpers above.
Result<TrainResult> TrainOrThrow(const v1::JobSpec& spec, TrainContext ctx) {
#if defined(FTUNE_TRAIN_CUDA) && TORCH_VERSION_MAJOR >= 2
  // Before the caching allocator's first use: segments that grow in place,
  // so units gathered and freed on two streams do not fragment the device
  // (70B on 2 GPUs reserved 7.5 GiB above its allocations without it). A
  // user's own setting wins.
  setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True", /*overwrite=*/0);
#endif
  FTUNE_RETURN_IF_ERROR(CheckContext(ctx));
  FTUNE_ASSIGN_OR_RETURN(c10::Device device, ParseDevice(ctx.device));
  // 1. The job's options, derived once for this rank's device.
  FTUNE_ASSIGN_OR_RETURN(
      const RunConfig config,
      MakeRunConfig(spec, device.is_cuda() ? DeviceKind::kCuda : DeviceKind::kCpu, ctx.world_size));
  const TrainingSettings& t = config.training;
  // training.report_to: rank 0's events also become TensorBoard scalars.
  std::unique_ptr<EventSink> tensorboard;
  if (ctx.rank == 0 && t.report_to_tensorboard) {
    FTUNE_ASSIGN_OR_RETURN(
        tensorboard,
        OpenTensorBoardSink(ctx.events, TensorBoardLogDir(ctx.output_dir, t.run_name), device));
    ctx.events = tensorboard.get();
  }
  comm::Communicator* comm = ctx.world_size > 1 ? ctx.comm : nullptr;
  Reducer reduce(comm, device);
  const RankEnv env{ctx.rank, ctx.world_size, device, ctx.device, comm, &reduce, ctx.events};
  FTUNE_RETURN_IF_ERROR(MakeDirectories(ctx.output_dir));
  // 2. Data. 3. Model: load -> quantize -> attach LoRA -> shard -> optimizer.
  FTUNE_ASSIGN_OR_RETURN(RankData data,
                         PrepareRankData(config.data,
                                         ctx.data_cache_dir.empty()
                                             ? ctx.output_dir + "/data-cache"
                                             : ctx.data_cache_dir,
                                         env));
  FTUNE_ASSIGN_OR_RETURN(TrainingState state, BuildTrainingState(config, env));
  // 4. Resume; the schedule.
  TrainProgress progress;
  FTUNE_RETURN_IF_ERROR(Resume(ctx, state, &progress));
  FTUNE_ASSIGN_OR_RETURN(Schedule schedule,
                         MakeSchedule(t, *data.train, config.data.seed, ctx.world_size));
  ReportStart(ctx, t, schedule, state, progress.step);
  Checkpointer checkpointer({ctx.rank, ctx.world_size, ctx.output_dir, config.model.dir,
                             t.save_total_limit, t.seed},
                            state.model.get(), state.lora.get(), state.optimizer.get(),
                            state.cpu_generator, [&reduce] { return reduce.Barrier(); },
                            ctx.events);
  std::unique_ptr<Evaluator> evaluator =
      data.eval == nullptr ? nullptr
                           : std::make_unique<Evaluator>(state.model.get(), data.eval.get(), env);
  StepProfiler profiler(t.profile_first, t.profile_last, ctx.output_dir + "/profile", ctx.rank,
                        device.is_cuda(), ctx.events);

  // 5. The loop: agree on stopping, step, report, eval, checkpoint.
  RunTotals run;
  PhaseTimer phases(device.is_cuda());
  while (progress.step < schedule.total_steps) {
    FTUNE_ASSIGN_OR_RETURN(int64_t stop, AgreeOnStop(env, ctx.stop));
    if (stop > 0) {
      if (stop == 2) FTUNE_RETURN_IF_ERROR(checkpointer.Save(progress, run.loss).status());
      run.result.stopped = true;
      if (ctx.rank == 0) {
        ctx.events->Info("stopped at step " + std::to_string(progress.step) + " on request");
      }
      break;
    }
    const Clock::time_point step_start = Clock::now();
    FTUNE_RETURN_IF_ERROR(profiler.BeginStep(progress.step + 1));
    FTUNE_ASSIGN_OR_RETURN(StepOutcome s,
                           TrainStep(config, env, state, schedule, *data.train, progress,
                                     phases));
    run.loss = s.loss;
    progress.micro += t.gradient_accumulation_steps;
    progress.tokens_total += s.loss_tokens;
    run.my_input_tokens += s.input_tokens;
    ++progress.step;
    FTUNE_RETURN_IF_ERROR(profiler.EndStep(progress.step));
    run.result.losses.push_back(run.loss);
    if (!run.collectives_base.taken) {
      run.collectives_base = CollectivesNow(state, Seconds(run.start));
    }
    FTUNE_RETURN_IF_ERROR(AfterStep(config, env, progress, s, schedule, run, Seconds(step_start),
                                    evaluator.get(), checkpointer));
  }
  // 6. The end (a stop inside the profiled range keeps what was traced).
  FTUNE_RETURN_IF_ERROR(profiler.Finish());
  return Finish(config, ctx, env, progress, state, run, evaluator.get(), checkpointer);
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
