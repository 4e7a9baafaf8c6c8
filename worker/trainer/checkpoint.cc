#include "worker/trainer/checkpoint.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <mutex>
#include <map>
#include <nlohmann/json.hpp>
#include <utility>

#include "ftune/file_util.h"
#include "worker/trainer/events.h"
#include "worker/trainer/fsdp.h"
#include "worker/trainer/model.h"
#include "worker/trainer/optim.h"
#include "worker/modelio/safetensors.h"

namespace ftune::trainer {
namespace {

using json = nlohmann::json;

constexpr uint64_t kMaxManifestBytes = 256ull << 20;
constexpr char kCheckpointsDir[] = "checkpoints";
constexpr char kCheckpointPrefix[] = "checkpoint-";

Result<int64_t> FileSize(const std::string& path) {
  FTUNE_ASSIGN_OR_RETURN(OpenedFile f, OpenRegularFile(path));
  ::close(f.fd);
  return static_cast<int64_t>(f.size);
}

int64_t TreeBytes(const std::string& path) {
  if (IsRegularFile(path)) {
    Result<int64_t> s = FileSize(path);
    return s.ok() ? *s : 0;
  }
  int64_t total = 0;
  Result<std::vector<std::string>> names = ListDirectory(path);
  if (!names.ok()) return 0;
  for (const std::string& n : *names) total += TreeBytes(path + "/" + n);
  return total;
}

// Step of "checkpoint-<step>", or -1.
int64_t StepOfDirName(const std::string& name) {
  const std::string prefix = kCheckpointPrefix;
  if (name.rfind(prefix, 0) != 0 || name.size() == prefix.size()) return -1;
  const std::string digits = name.substr(prefix.size());
  if (digits.find_first_not_of("0123456789") != std::string::npos || digits.size() > 18) return -1;
  return std::stoll(digits);
}

Result<int64_t> MetaInt(const SafetensorsFile& f, const std::string& key) {
  auto it = f.metadata().find(key);
  if (it == f.metadata().end()) {
    return DataLossError(f.path() + ": checkpoint shard has no '" + key + "' metadata");
  }
  try {
    size_t used = 0;
    const long long v = std::stoll(it->second, &used);
    if (used != it->second.size()) throw std::invalid_argument(it->second);
    return static_cast<int64_t>(v);
  } catch (const std::exception&) {
    return DataLossError(f.path() + ": metadata '" + key + "' is '" + it->second +
                         "', not an integer");
  }
}

TensorToWrite F32(const std::string& name, const at::Tensor& t) {
  return {name, Dtype::kF32, {static_cast<uint64_t>(t.numel())}, t.data_ptr(),
          static_cast<uint64_t>(t.numel()) * 4};
}

}  // namespace

std::string CheckpointDirName(int64_t step) { return kCheckpointPrefix + std::to_string(step); }

std::string ShardFileName(int rank, int world_size) {
  return "shard-" + std::to_string(rank) + "-of-" + std::to_string(world_size) + ".safetensors";
}

Result<int64_t> WriteCheckpointShard(const std::string& dir, int rank, int world_size,
                                     const ShardState& shard) {
  FTUNE_RETURN_IF_ERROR(MakeDirectories(dir));
  const at::Tensor lora = shard.lora.detach().to(at::kCPU, at::kFloat).contiguous();
  std::vector<TensorToWrite> tensors = {F32("lora", lora)};
  at::Tensor m, v, rng;
  if (shard.exp_avg.defined()) {
    m = shard.exp_avg.detach().to(at::kCPU, at::kFloat).contiguous();
    v = shard.exp_avg_sq.detach().to(at::kCPU, at::kFloat).contiguous();
    if (m.numel() != lora.numel() || v.numel() != lora.numel()) {
      return InvalidArgumentError("checkpoint shard of rank " + std::to_string(rank) +
                                  ": optimizer state has " + std::to_string(m.numel()) +
                                  " elements, the parameters " + std::to_string(lora.numel()));
    }
    tensors.push_back(F32("exp_avg", m));
    tensors.push_back(F32("exp_avg_sq", v));
  }
  if (shard.rng_state.defined()) {
    rng = shard.rng_state.to(at::kCPU, at::kByte).contiguous();
    tensors.push_back({"rng_state", Dtype::kU8, {static_cast<uint64_t>(rng.numel())},
                       rng.data_ptr(), static_cast<uint64_t>(rng.numel())});
  }
  const std::map<std::string, std::string> metadata = {
      {"format", "ftune-checkpoint-shard"},
      {"begin", std::to_string(shard.begin)},
      {"numel", std::to_string(lora.numel())},
      {"adam_step", std::to_string(shard.adam_step)},
      {"rank", std::to_string(rank)},
      {"world_size", std::to_string(world_size)}};
  const std::string path = dir + "/" + ShardFileName(rank, world_size);
  FTUNE_RETURN_IF_ERROR(WriteSafetensors(path, tensors, metadata));
  return FileSize(path);
}

Result<int64_t> WriteCheckpointManifest(const std::string& dir, const TrainerState& state) {
  json shards = json::array();
  for (int r = 0; r < state.world_size; ++r) {
    const std::string name = ShardFileName(r, state.world_size);
    Result<int64_t> size = FileSize(dir + "/" + name);
    if (!size.ok()) {
      return FailedPreconditionError("checkpoint " + dir + " is missing rank " +
                                     std::to_string(r) + "'s shard " + name + ": " +
                                     size.status().message());
    }
    shards.push_back({{"file", name}, {"bytes", *size}});
  }
  json layout = json::array();
  for (const FlatEntry& e : state.layout) {
    layout.push_back({{"name", e.name}, {"offset", e.offset}, {"numel", e.numel},
                      {"shape", e.shape}});
  }
  const json manifest = {{"format", "ftune-checkpoint"},
                         {"version", kCheckpointFormatVersion},
                         {"step", state.step},
                         {"micro_batches", state.micro_batches},
                         {"tokens_total", state.tokens_total},
                         {"loss", state.loss},
                         {"world_size", state.world_size},
                         {"total_numel", state.total_numel},
                         {"seed", state.seed},
                         {"shards", shards},
                         {"layout", layout}};
  FTUNE_RETURN_IF_ERROR(
      WriteFileAtomically(dir + "/" + kCheckpointManifestName, manifest.dump(1) + "\n"));
  return TreeBytes(dir);
}

Result<TrainerState> ReadCheckpointManifest(const std::string& dir) {
  const std::string path = dir + "/" + kCheckpointManifestName;
  if (!IsRegularFile(path)) {
    return FailedPreconditionError(dir + " is not a complete ftune checkpoint (no " +
                                   kCheckpointManifestName + ")");
  }
  FTUNE_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path, kMaxManifestBytes));
  return ParseCheckpointManifest(text, path);
}

Result<ShardState> ReadCheckpointSlice(const std::string& dir, const TrainerState& state,
                                       int64_t begin, int64_t numel, int rank) {
  ShardState out;
  out.begin = begin;
  out.lora = at::zeros({numel}, at::kFloat);
  at::Tensor m = at::zeros({numel}, at::kFloat);
  at::Tensor v = at::zeros({numel}, at::kFloat);
  bool have_moments = false;
  int64_t adam_step = -1;
  const int64_t end = begin + numel;
  for (int r = 0; r < state.world_size; ++r) {
    const std::string path = dir + "/" + ShardFileName(r, state.world_size);
    FTUNE_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> f,
                                   SafetensorsFile::Open(path));
    FTUNE_ASSIGN_OR_RETURN(int64_t sb, MetaInt(*f, "begin"));
    FTUNE_ASSIGN_OR_RETURN(int64_t sn, MetaInt(*f, "numel"));
    FTUNE_ASSIGN_OR_RETURN(int64_t step, MetaInt(*f, "adam_step"));
    if (adam_step >= 0 && step != adam_step) {
      return DataLossError(path + ": adam_step " + std::to_string(step) +
                           " differs from the other shards' " + std::to_string(adam_step));
    }
    adam_step = step;
    const bool has_m = f->Find("exp_avg") != nullptr && f->Find("exp_avg_sq") != nullptr;
    if (r > 0 && has_m != have_moments && sn > 0) {
      return DataLossError(path + ": some shards have optimizer state and some do not");
    }
    have_moments = has_m;
    const int64_t lo = std::max(begin, sb), hi = std::min(end, sb + sn);
    if (rank == r && sb == begin && sn == std::min(numel, state.total_numel - begin) &&
        f->Find("rng_state") != nullptr) {
      const TensorInfo* info = f->Find("rng_state");
      out.rng_state = at::empty({static_cast<int64_t>(info->num_bytes())}, at::kByte);
      FTUNE_RETURN_IF_ERROR(f->Read("rng_state", out.rng_state.data_ptr()));
    }
    if (lo >= hi) continue;
    const uint64_t from = static_cast<uint64_t>(lo - sb), to = static_cast<uint64_t>(hi - sb);
    float* dst = out.lora.data_ptr<float>() + (lo - begin);
    FTUNE_RETURN_IF_ERROR(f->ReadElements("lora", from, to, dst));
    if (has_m) {
      FTUNE_RETURN_IF_ERROR(
          f->ReadElements("exp_avg", from, to, m.data_ptr<float>() + (lo - begin)));
      FTUNE_RETURN_IF_ERROR(
          f->ReadElements("exp_avg_sq", from, to, v.data_ptr<float>() + (lo - begin)));
    }
  }
  out.adam_step = std::max<int64_t>(adam_step, 0);
  if (have_moments) {
    out.exp_avg = m;
    out.exp_avg_sq = v;
  }
  return out;
}

Status VerifyCheckpoint(const std::string& dir) {
  if (!IsDirectory(dir)) return NotFoundError("checkpoint " + dir + " does not exist");
  FTUNE_ASSIGN_OR_RETURN(TrainerState state, ReadCheckpointManifest(dir));
  int64_t covered = 0;  // shards hold consecutive ranges, in rank order
  for (int r = 0; r < state.world_size; ++r) {
    const std::string path = dir + "/" + ShardFileName(r, state.world_size);
    Result<int64_t> size = FileSize(path);
    if (!size.ok()) return DataLossError(path + ": " + size.status().message());
    if (*size != state.shard_bytes[r]) {
      return DataLossError(path + " is " + std::to_string(*size) + " bytes, the manifest says " +
                           std::to_string(state.shard_bytes[r]));
    }
    Result<std::unique_ptr<SafetensorsFile>> f = SafetensorsFile::Open(path);
    if (!f.ok()) return DataLossError(f.status().message());
    FTUNE_ASSIGN_OR_RETURN(int64_t begin, MetaInt(**f, "begin"));
    FTUNE_ASSIGN_OR_RETURN(int64_t numel, MetaInt(**f, "numel"));
    FTUNE_RETURN_IF_ERROR(MetaInt(**f, "adam_step").status());
    if (begin != covered || numel < 0) {
      return DataLossError(path + ": holds [" + std::to_string(begin) + ", +" +
                           std::to_string(numel) + "), expected to start at " +
                           std::to_string(covered));
    }
    for (const char* name : {"lora", "exp_avg", "exp_avg_sq"}) {
      const TensorInfo* t = (*f)->Find(name);
      if (t == nullptr && std::string(name) != "lora") continue;
      if (t == nullptr || t->dtype != Dtype::kF32 ||
          t->num_elements() != static_cast<uint64_t>(numel)) {
        return DataLossError(path + ": tensor '" + name + "' is missing or not F32 [" +
                             std::to_string(numel) + "]");
      }
    }
    covered += numel;
  }
  if (covered != state.total_numel) {
    return DataLossError(dir + ": shards hold " + std::to_string(covered) +
                         " values, the manifest says " + std::to_string(state.total_numel));
  }
  return OkStatus();
}

Result<ResumePoint> ChooseResumePoint(const std::string& requested, bool set_aside) {
  ResumePoint point;
  Status st = VerifyCheckpoint(requested);
  if (st.ok()) {
    point.dir = requested;
    FTUNE_ASSIGN_OR_RETURN(point.state, ReadCheckpointManifest(requested));
    return point;
  }
  point.fallback = "checkpoint " + requested + " cannot be resumed from (" + st.message() + ")";
  const size_t slash = requested.rfind('/');
  const std::string root = slash == std::string::npos ? "." : requested.substr(0, slash);
  const std::string name = requested.substr(slash == std::string::npos ? 0 : slash + 1);
  const int64_t step = StepOfDirName(name);
  if (set_aside && step >= 0 && st.code() != StatusCode::kNotFound) {
    const std::string aside = root + "/damaged-" + name;
    if (::rename(requested.c_str(), aside.c_str()) == 0) {
      point.fallback += "; moved to " + aside;
    }
  }
  // Earlier complete checkpoints, newest first.
  std::vector<std::pair<int64_t, std::string>> earlier;
  if (Result<std::vector<std::string>> names = ListDirectory(root); names.ok()) {
    for (const std::string& n : *names) {
      const int64_t s = StepOfDirName(n);
      if (s >= 0 && (step < 0 || s < step)) earlier.push_back({s, root + "/" + n});
    }
  }
  std::sort(earlier.rbegin(), earlier.rend());
  for (const auto& [s, dir] : earlier) {
    if (!VerifyCheckpoint(dir).ok()) continue;
    point.dir = dir;
    FTUNE_ASSIGN_OR_RETURN(point.state, ReadCheckpointManifest(dir));
    point.fallback += "; resuming from the previous complete checkpoint " + dir;
    return point;
  }
  point.fallback += "; no earlier complete checkpoint: starting from the beginning";
  return point;
}

Result<std::string> LatestCompleteCheckpoint(const std::string& output_dir) {
  const std::string root = output_dir + "/" + kCheckpointsDir;
  if (!IsDirectory(root)) return std::string();
  FTUNE_ASSIGN_OR_RETURN(std::vector<std::string> names, ListDirectory(root));
  int64_t best = -1;
  std::string best_dir;
  for (const std::string& n : names) {
    const int64_t step = StepOfDirName(n);
    const std::string dir = root + "/" + n;
    if (step > best && IsRegularFile(dir + "/" + kCheckpointManifestName)) {
      best = step;
      best_dir = dir;
    }
  }
  return best_dir;
}

Status PruneCheckpoints(const std::string& output_dir, int keep) {
  const std::string root = output_dir + "/" + kCheckpointsDir;
  if (!IsDirectory(root)) return OkStatus();
  FTUNE_ASSIGN_OR_RETURN(std::vector<std::string> names, ListDirectory(root));
  std::vector<std::pair<int64_t, std::string>> complete, incomplete;
  for (const std::string& n : names) {
    const int64_t step = StepOfDirName(n);
    if (step < 0) continue;
    const std::string dir = root + "/" + n;
    (IsRegularFile(dir + "/" + kCheckpointManifestName) ? complete : incomplete)
        .push_back({step, dir});
  }
  std::sort(complete.begin(), complete.end());
  const int64_t newest = complete.empty() ? -1 : complete.back().first;
  for (const auto& [step, dir] : incomplete) {
    if (step < newest) FTUNE_RETURN_IF_ERROR(RemoveTree(dir));
  }
  if (keep > 0 && static_cast<int>(complete.size()) > keep) {
    for (size_t i = 0; i + keep < complete.size(); ++i) {
      FTUNE_RETURN_IF_ERROR(RemoveTree(complete[i].second));
    }
  }
  return OkStatus();
}


namespace {

std::vector<FlatEntry> LayoutOf(const ShardedLora& lora) {
  std::vector<FlatEntry> layout;
  for (const ShardedLora::Entry& e : lora.layout()) {
    layout.push_back({e.name, e.offset, e.numel, e.shape});
  }
  return layout;
}

}  // namespace

Checkpointer::Checkpointer(Options options, LlamaModel* model, ShardedLora* lora,
                           AdamW* optimizer, at::Generator cpu_generator,
                           std::function<Status()> barrier, EventSink* events)
    : options_(std::move(options)),
      model_(model),
      lora_(lora),
      optimizer_(optimizer),
      cpu_generator_(std::move(cpu_generator)),
      barrier_(std::move(barrier)),
      events_(events),
      layout_(LayoutOf(*lora)) {}

Result<std::string> Checkpointer::Save(const TrainProgress& progress, double loss) {
  const auto start = std::chrono::steady_clock::now();
  const std::string dir =
      options_.output_dir + "/checkpoints/" + CheckpointDirName(progress.step);
  ShardState shard;
  shard.begin = lora_->shard_begin();
  // The last rank's shard is padded past the end of the flat vector.
  const int64_t real = std::max<int64_t>(
      0, std::min(lora_->shard_numel(), lora_->total_numel() - lora_->shard_begin()));
  shard.lora = lora_->shard().detach().narrow(0, 0, real);
  if (optimizer_->exp_avg(0).defined()) {
    shard.exp_avg = optimizer_->exp_avg(0).narrow(0, 0, real);
    shard.exp_avg_sq = optimizer_->exp_avg_sq(0).narrow(0, 0, real);
  }
  shard.adam_step = optimizer_->step_count(0);
  {
    std::lock_guard<std::mutex> lock(cpu_generator_.mutex());
    shard.rng_state = cpu_generator_.get_state();
  }
  FTUNE_RETURN_IF_ERROR(
      WriteCheckpointShard(dir, options_.rank, options_.world_size, shard).status());
  FTUNE_RETURN_IF_ERROR(barrier_());
  if (options_.rank == 0) {
    FTUNE_RETURN_IF_ERROR(model_->SaveAdapter(dir + "/adapter", options_.model_dir));
    TrainerState state;
    state.step = progress.step;
    state.micro_batches = progress.micro;
    state.tokens_total = progress.tokens_total;
    state.loss = loss;
    state.world_size = options_.world_size;
    state.total_numel = lora_->total_numel();
    state.layout = layout_;
    state.seed = options_.seed;
    FTUNE_ASSIGN_OR_RETURN(int64_t bytes, WriteCheckpointManifest(dir, state));
    FTUNE_RETURN_IF_ERROR(PruneCheckpoints(options_.output_dir, options_.save_total_limit));
    v1::RankMessage m;
    auto* c = m.mutable_checkpoint();
    c->set_step(progress.step);
    c->set_path(dir);
    c->set_bytes(bytes);
    c->set_complete(true);
    c->set_duration_seconds(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    events_->Emit(m);
  }
  last_saved_step_ = progress.step;
  FTUNE_RETURN_IF_ERROR(barrier_());
  return dir;
}

Result<TrainProgress> ResumeFromCheckpoint(const std::string& dir, int rank, int world_size,
                                           ShardedLora* lora, AdamW* optimizer,
                                           at::Generator cpu_generator) {
  FTUNE_ASSIGN_OR_RETURN(TrainerState state, ReadCheckpointManifest(dir));
  const std::vector<FlatEntry> layout = LayoutOf(*lora);
  if (state.total_numel != lora->total_numel() || state.layout.size() != layout.size()) {
    return FailedPreconditionError("checkpoint " + dir + " holds " +
                                   std::to_string(state.total_numel) +
                                   " LoRA values, this job's adapters have " +
                                   std::to_string(lora->total_numel()) +
                                   ": it was written for another model or lora config");
  }
  for (size_t i = 0; i < layout.size(); ++i) {
    if (state.layout[i].name != layout[i].name || state.layout[i].offset != layout[i].offset) {
      return FailedPreconditionError("checkpoint " + dir + " has '" + state.layout[i].name +
                                     "' where this job has '" + layout[i].name + "'");
    }
  }
  FTUNE_ASSIGN_OR_RETURN(ShardState slice, ReadCheckpointSlice(dir, state, lora->shard_begin(),
                                                               lora->shard_numel(), rank));
  {
    c10::NoGradGuard no_grad;
    lora->shard().copy_(slice.lora.to(lora->shard().device()));
  }
  FTUNE_RETURN_IF_ERROR(optimizer->RestoreState(0, slice.adam_step, slice.exp_avg, slice.exp_avg_sq));
  FTUNE_RETURN_IF_ERROR(lora->GatherParams());
  if (slice.rng_state.defined() && state.world_size == world_size) {
    std::lock_guard<std::mutex> lock(cpu_generator.mutex());
    cpu_generator.set_state(slice.rng_state);
  }
  TrainProgress progress;
  progress.step = state.step;
  progress.micro = state.micro_batches;
  progress.tokens_total = state.tokens_total;
  progress.resumed_world_size = state.world_size;
  return progress;
}

}  // namespace ftune::trainer
