// The sharded LoRA state of FSDP; see fsdp_lora.h.
#include "worker/trainer/fsdp_lora.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <utility>

#if FTUNE_FSDP_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "worker/trainer/fsdp_common.h"
#include "worker/trainer/fsdp_streams.h"

namespace ftune::trainer {
namespace {

using comm::DataType;
using internal::CeilDiv;
using internal::CheckSameOnEveryRank;
using internal::CommDevice;
using internal::kCudaStreams;
using internal::Prefixed;
using internal::Where;
#if FTUNE_FSDP_CUDA
using internal::CommLane;
using internal::ComputeAfterLane;
using internal::LaneAfterCompute;
using internal::LaneFor;
using internal::LaneMarkTail;
#endif

}  // namespace

Result<std::unique_ptr<ShardedLora>> ShardedLora::Create(LlamaModel* model,
                                                        comm::Communicator* comm) {
  if (model == nullptr || !model->has_lora()) {
    return FailedPreconditionError("ShardedLora: the model has no LoRA adapters attached "
                                   "(AttachLora or LoadAdapter first)");
  }
  std::unique_ptr<ShardedLora> s(new ShardedLora());
  s->model_ = model;
  s->comm_ = comm;
  s->world_ = comm == nullptr ? 1 : comm->size();
  s->rank_ = comm == nullptr ? 0 : comm->rank();
  s->comm_device_ = CommDevice(comm, model->options().device);
  // The option the units were given (LoadShardedModel's FsdpOptions).
  const FsdpUnits* units = FsdpUnitsOf(*model);
  s->offload_ = units != nullptr && units->options().offload_params;
  s->pin_ = s->offload_ && model->options().device.is_cuda();
  s->clock_ = std::make_shared<internal::CollectiveClock>();
  for (const NamedTensor& p : model->LoraParameters()) {
    Entry e;
    e.name = p.name;
    e.offset = s->total_numel_;
    e.numel = p.tensor.numel();
    e.shape = p.tensor.sizes().vec();
    s->total_numel_ += e.numel;
    s->layout_.push_back(std::move(e));
    s->params_.push_back(p.tensor);
  }
  s->shard_numel_ = CeilDiv(s->total_numel_, s->world_);
  FTUNE_RETURN_IF_ERROR(CheckSameOnEveryRank(
      comm, model->options().device, {s->total_numel_, static_cast<int64_t>(s->layout_.size())},
      "ShardedLora: the LoRA layout (elements, tensors)"));
  FTUNE_ASSIGN_OR_RETURN(at::Tensor flat, s->FullFlat(/*grads=*/false));
  if (s->world_ > 1) {
    const Status st = comm->Broadcast(flat.data_ptr(), static_cast<size_t>(flat.numel()),
                                      DataType::kFloat32, 0, nullptr);
    if (!st.ok()) return Prefixed(st, "ShardedLora: broadcasting the adapters from rank 0");
    // Every rank now holds rank 0's adapters.
    at::Tensor dev = flat.to(model->options().device);
    c10::NoGradGuard no_grad;
    for (size_t i = 0; i < s->params_.size(); ++i) {
      const Entry& e = s->layout_[i];
      s->params_[i].view(-1).copy_(dev.narrow(0, e.offset, e.numel));
    }
  }
  const at::Tensor mine = flat.narrow(0, s->shard_begin(), s->shard_numel_);
  s->shard_ = (s->offload_ ? s->HostCopy(mine) : mine.to(model->options().device).clone()).detach();
  s->shard_.set_requires_grad(true);
  if (s->world_ > 1) {
    // Spans: consecutive entries of the same decoder layer (PEFT names
    // "...layers.<i>...."); every rank builds the same ones.
    auto layer_of = [](const std::string& name) -> std::string {
      const size_t at = name.find(".layers.");
      if (at == std::string::npos) return name;
      const size_t end = name.find('.', at + 8);
      return name.substr(at + 8, end == std::string::npos ? std::string::npos : end - at - 8);
    };
    std::string current;
    for (size_t i = 0; i < s->layout_.size(); ++i) {
      const std::string layer = layer_of(s->layout_[i].name);
      if (s->spans_.empty() || layer != current) {
        Span sp;
        sp.begin = s->layout_[i].offset;
        sp.first = i;
        s->spans_.push_back(std::move(sp));
        current = layer;
      }
      Span& sp = s->spans_.back();
      sp.end = s->layout_[i].offset + s->layout_[i].numel;
      ++sp.count;
      s->span_of_.push_back(s->spans_.size() - 1);
    }
    for (Span& sp : s->spans_) {
      sp.seen.assign(sp.count, false);
      sp.remaining = sp.count;
    }
    s->acc_ = at::zeros({s->shard_numel_}, at::TensorOptions().dtype(at::kFloat).device(s->comm_device_));
    s->units_ = FsdpUnitsOf(*model);
    ShardedLora* self = s.get();
    for (size_t i = 0; i < s->params_.size(); ++i) {
      s->hooks_.push_back(
          s->params_[i].register_hook([self, i](const at::Tensor& grad) { self->OnGrad(i, grad); }));
    }
    s->per_span_ = true;
  }
  return s;
}

ShardedLora::~ShardedLora() {
  for (size_t i = 0; i < hooks_.size(); ++i) params_[i].remove_hook(hooks_[i]);
}

void ShardedLora::OnGrad(size_t entry, const at::Tensor& grad) {
  if (!grad.defined()) return;
  c10::NoGradGuard no_grad;
  Span& sp = spans_[span_of_[entry]];
  if (!sp.staged.defined()) {
    sp.staged = at::zeros({sp.end - sp.begin},
                          at::TensorOptions().dtype(at::kFloat).device(comm_device_));
  }
  const Entry& e = layout_[entry];
  sp.staged.narrow(0, e.offset - sp.begin, e.numel)
      .add_(grad.detach().reshape(-1).to(comm_device_, at::kFloat));
  if (!sp.seen[entry - sp.first]) {
    sp.seen[entry - sp.first] = true;
    --sp.remaining;
  }
  if (sp.remaining == 0) {
    const Status st = ReduceSpan(span_of_[entry]);
    TORCH_CHECK(st.ok(), st.ToString());
  }
}

// Reduces one span onto its owners and adds this rank's part to acc_; the
// span starts over. Every rank reduces the same spans in the same order
// (same graph, same hooks).
Status ShardedLora::ReduceSpan(size_t index) {
  Span& sp = spans_[index];
  at::Tensor staged = std::move(sp.staged);
  sp.staged = at::Tensor();
  sp.seen.assign(sp.count, false);
  sp.remaining = sp.count;
  if (!staged.defined()) return OkStatus();
  auto reduce = [&](comm::StreamHandle stream) -> Status {
    for (int r = 0; r < world_; ++r) {
      const int64_t lo = std::max(sp.begin, r * shard_numel_);
      const int64_t hi = std::min(sp.end, (r + 1) * shard_numel_);
      if (lo >= hi) continue;
      at::Tensor mine = r == rank_ ? at::empty({hi - lo}, staged.options()) : at::Tensor();
      const Status st = comm_->Reduce(staged.data_ptr<float>() + (lo - sp.begin),
                                      r == rank_ ? mine.data_ptr() : nullptr,
                                      static_cast<size_t>(hi - lo), DataType::kFloat32,
                                      comm::ReduceOp::kSum, r, stream);
      if (!st.ok()) {
        return Prefixed(st, "ShardedLora: reducing the gradients of '" +
                                layout_[sp.first].name + "'... onto rank " + std::to_string(r) +
                                " on " + Where(rank_, world_));
      }
      if (r == rank_) acc_.narrow(0, lo - r * shard_numel_, hi - lo).add_(mine);
    }
    return OkStatus();
  };
  if (kCudaStreams && comm_device_.is_cuda()) {
#if FTUNE_FSDP_CUDA
    CommLane& lane = LaneFor(comm_, comm_device_);
    LaneAfterCompute(lane, c10::cuda::getCurrentCUDAStream(comm_device_.index()).stream());
    staged.record_stream(c10::Stream(lane.stream));  // written on compute, read on the lane
    Status st;
    {
      c10::cuda::CUDAStreamGuard guard(lane.stream);
      const int64_t mark = clock_->Begin(lane.stream.stream(), /*background=*/true);
      st = reduce(lane.stream.stream());
      clock_->End(mark, lane.stream.stream());
      marks_.push_back(mark);
    }
    LaneMarkTail(lane);
    return st;
#endif
  }
  // Gloo: here, on this thread, once a prefetch thread's gather is done.
  if (units_ != nullptr) units_->WaitForPrefetch();
  const auto t0 = std::chrono::steady_clock::now();
  const Status st = reduce(nullptr);
  const double host = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  clock_->Add(host, host);
  return st;
}

at::Tensor ShardedLora::HostCopy(const at::Tensor& t) const {
  // Allocated here, not by t.cpu() or clone(): those give pageable memory.
  at::Tensor host = at::empty(
      t.sizes(), at::TensorOptions().dtype(at::kFloat).device(c10::kCPU).pinned_memory(pin_));
  host.copy_(t);  // blocking: from a GPU it returns once the bytes are here
  return host;
}

// The full flat vector (padded) of the adapters or of their gradients
// (zeros where a gradient is undefined), on the communicator's device.
Result<at::Tensor> ShardedLora::FullFlat(bool grads) const {
  c10::NoGradGuard no_grad;
  at::Tensor flat = at::zeros({shard_numel_ * world_},
                              at::TensorOptions().dtype(at::kFloat).device(comm_device_));
  for (size_t i = 0; i < params_.size(); ++i) {
    const Entry& e = layout_[i];
    const at::Tensor src = grads ? params_[i].grad() : params_[i];
    if (!src.defined()) continue;
    flat.narrow(0, e.offset, e.numel).copy_(src.detach().reshape(-1));
  }
  return flat;
}

Status ShardedLora::ReduceGradients() {
  at::Tensor mine;
  if (per_span_) {
    // Spans with tensors that got no gradient are still open: reduce them
    // now, in span order (the same on every rank).
    for (size_t i = 0; i < spans_.size(); ++i) {
      FTUNE_RETURN_IF_ERROR(ReduceSpan(i));
    }
#if FTUNE_FSDP_CUDA
    if (comm_device_.is_cuda()) {
      const cudaStream_t compute = c10::cuda::getCurrentCUDAStream(comm_device_.index()).stream();
      for (int64_t mark : marks_) clock_->Need(mark, compute);
      marks_.clear();
      ComputeAfterLane(LaneFor(comm_, comm_device_), compute);
    }
#endif
    mine = offload_ ? HostCopy(acc_) : acc_.to(shard_.device());
    acc_ = at::zeros_like(acc_);
  } else {
    // One rank: the shard is the whole flat gradient.
    FTUNE_ASSIGN_OR_RETURN(at::Tensor flat, FullFlat(/*grads=*/true));
    mine = flat.narrow(0, 0, shard_numel_);
    mine = offload_ ? HostCopy(mine) : mine.to(shard_.device());
  }
  c10::NoGradGuard no_grad;
  if (shard_.grad().defined()) {
    shard_.mutable_grad().add_(mine);
  } else {
    shard_.mutable_grad() = mine;
  }
  for (at::Tensor& p : params_) p.mutable_grad().reset();
  return OkStatus();
}

double ShardedLora::reduce_scatter_seconds() { return clock_->busy(); }
double ShardedLora::reduce_scatter_exposed_seconds() { return clock_->exposed(); }

Result<double> ShardedLora::GradNorm() {
  c10::NoGradGuard no_grad;
  double local = 0;
  if (shard_.grad().defined()) {
    local = shard_.grad().to(at::kDouble).pow(2).sum().item<double>();
  }
  if (world_ == 1) return std::sqrt(local);
  // Gathered as bytes and summed in rank order, so every rank computes the
  // same double (an fp32 all-reduce would round, and differently per rank
  // order). The buffers live where the communicator reads (device for NCCL).
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  at::Tensor send = at::full({1}, local, f64).to(comm_device_);
  at::Tensor all = at::empty({world_}, f64.device(comm_device_));
  const Status st = comm_->AllGather(send.data_ptr(), all.data_ptr(), sizeof(double),
                                     DataType::kUInt8, nullptr);
  if (!st.ok()) return Prefixed(st, "ShardedLora::GradNorm on " + Where(rank_, world_));
  all = all.cpu();
  double sum = 0;
  for (int r = 0; r < world_; ++r) sum += all.data_ptr<double>()[r];
  return std::sqrt(sum);
}

Result<double> ShardedLora::ClipGradNorm(double max_norm) {
  if (!(max_norm > 0)) {
    return InvalidArgumentError("max_grad_norm (" + std::to_string(max_norm) + ") must be > 0");
  }
  FTUNE_ASSIGN_OR_RETURN(double total, GradNorm());
  if (shard_.grad().defined()) {
    c10::NoGradGuard no_grad;
    // torch's clip_grad_norm_: an fp32 coefficient, clamped, applied
    // unconditionally.
    at::Tensor t = at::scalar_tensor(total, at::TensorOptions().dtype(at::kFloat));
    at::Tensor coef = at::clamp_max(at::reciprocal(t + 1e-6) * max_norm, 1.0);
    shard_.mutable_grad().mul_(coef.to(shard_.device()));
  }
  return total;
}

Status ShardedLora::GatherParams() {
  c10::NoGradGuard no_grad;
  // Offloaded: the host's updated shard to the communicator's device (a
  // blocking copy, so the host may write the shard again right after).
  at::Tensor send = shard_.detach().to(comm_device_).contiguous();
  at::Tensor full;
  if (world_ == 1) {
    full = send;
  } else {
    full = at::empty({shard_numel_ * world_}, send.options());
    const Status st = comm_->AllGather(send.data_ptr(), full.data_ptr(),
                                       static_cast<size_t>(shard_numel_), DataType::kFloat32,
                                       nullptr);
    if (!st.ok()) return Prefixed(st, "ShardedLora::GatherParams on " + Where(rank_, world_));
  }
  full = full.to(model_->options().device);
  for (size_t i = 0; i < params_.size(); ++i) {
    const Entry& e = layout_[i];
    params_[i].view(-1).copy_(full.narrow(0, e.offset, e.numel));
  }
  return OkStatus();
}

}  // namespace ftune::trainer
