// The sharded LoRA state of FSDP (ShardedLora): the adapters' flat fp32
// shard, the per-layer gradient reduction during backward, clipping, and
// the all-gather of the updated shard; AdamW (optim.h) updates the shard.
//
// The adapters stay whole on every rank for the forward (they are small);
// the flat fp32 vector of them in LoraParameters() order, padded to world *
// shard_numel, is split evenly: rank r's shard is what the optimizer
// updates, and GatherParams all-gathers the shards back into the adapters.
// Gradients are summed over ranks (the train loop scales each micro-batch
// loss by 1/global_tokens) layer by layer during backward: a hook on each
// LoRA tensor adds its gradient into its decoder layer's span of the flat
// vector, and once a layer's tensors all have theirs, the span is reduced
// onto the ranks that own it (one Reduce per owner: a reduce-scatter with
// uneven chunks) and added to the rank's accumulated shard gradient. With
// NCCL that runs on the communicator's background stream while backward
// goes on through the layers below; with Gloo it runs in the hook.
// ReduceGradients reduces the spans still open (tensors that got no
// gradient contribute zeros) and hands the shard gradient over. The
// reductions are timed like the unit gathers (fsdp_units.h, "Timing").
//
// Offload (FsdpOptions::offload_params, read from the model's FsdpUnits:
// the struct LoadShardedModel was given) means what torch FSDP's
// CPUOffload(offload_params=True) means: the trainable state lives in host
// memory and the optimizer runs there. Where each buffer lives (D = the
// model's device; C = the communicator's: the host for Gloo, D for NCCL):
//                                          offload off   offload on
//   adapters, whole (fp32) + their grads   D             D
//   a layer's span staged in backward      C             C
//   reduced shard gradient (accumulator)   C             C
//   shard (fp32 master parameters)         D             host, pinned
//   shard().grad()                         D             host, pinned
//   AdamW's exp_avg, exp_avg_sq            D             host
//   GatherParams' send + gathered vector   C             C
// (AdamW allocates its moments where the shard is. With one rank there are
// no spans and no accumulator: ReduceGradients flattens the whole gradients
// on C, then copies the shard's part.) With offload,
// ReduceGradients copies the reduced shard gradient to the host,
// ClipGradNorm / GradNorm and AdamW::Step run on the host, and GatherParams
// copies the updated shard to C for the all-gather. Pinned (when D is a
// GPU) are the buffers that cross to the device each step; the moments
// never do, so they stay pageable. Both copies are blocking: the host reads
// the gradient right away, and the device needs the shard right away, so
// there is nothing to overlap. The accumulator stays on C: the reductions
// land in it on the communicator's stream during backward, which a copy to
// the host per layer would stall. A model without FsdpUnits
// (LlamaModel::Load, a pre-quantized directory) keeps everything on D. On a
// CPU model offload moves nothing (D is the host) but takes the same path.
//
// Thread-safety: one thread at a time (the rank's training thread; the
// communicator's rule). The Communicator must outlive the ShardedLora, and
// the model must outlive it too (its hooks point at the model's adapters).
#ifndef FTUNE_WORKER_TRAINER_FSDP_LORA_H_
#define FTUNE_WORKER_TRAINER_FSDP_LORA_H_

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "worker/comm/communicator.h"
#include "worker/trainer/fsdp_units.h"
#include "worker/trainer/model.h"
#include "ftune/status.h"

namespace ftune::trainer {

namespace internal {
class CollectiveClock;  // fsdp_streams.h
}

// LoRA parameters + their gradients, sharded (ZeRO-style flat fp32 vector in
// LoraParameters() order, padded to world * shard_numel; rank r owns
// [r * shard_numel, (r + 1) * shard_numel)).
class ShardedLora {
 public:
  // The model's adapters must be attached (FAILED_PRECONDITION otherwise);
  // rank 0's values are broadcast so every rank starts from the same ones.
  // comm == nullptr: one rank. Offloads when the model's FsdpUnits have
  // offload_params (see the file comment).
  static Result<std::unique_ptr<ShardedLora>> Create(LlamaModel* model, comm::Communicator* comm);

  at::Tensor shard() const { return shard_; }  // fp32 1-D leaf, what AdamW updates;
                                              // .grad() defined after ReduceGradients
  // True when the shard, its gradient and the optimizer state are kept in
  // host memory (FsdpOptions::offload_params), also on a CPU model.
  bool offloaded() const { return offload_; }
  int64_t total_numel() const { return total_numel_; }
  int64_t shard_begin() const { return rank_ * shard_numel_; }
  int64_t shard_numel() const { return shard_numel_; }

  // The train loop scales each micro-batch loss by 1/global_tokens before
  // backward, so gradients are SUMMED over ranks. After the step's last
  // backward: reduces the spans still open (see the file comment; a tensor
  // without a gradient contributes zeros), waits for the reductions the
  // hooks started, and adds this rank's reduced gradients since the last
  // call into shard().grad() (like autograd accumulation); the full LoRA
  // grads are then released. One rank: the full gradients are the shard's.
  Status ReduceGradients();
  // Global L2 norm over all shards (every rank gets the same double: the
  // per-rank sums of squares are gathered and added in rank order); clips
  // shard().grad() by min(1, max_norm / (norm + 1e-6)) as torch does; returns
  // the norm before clipping (HF semantics, optim.h).
  Result<double> ClipGradNorm(double max_norm);
  Result<double> GradNorm();
  // After the optimizer step: shards -> every rank's LoRA tensors used in
  // forward.
  Status GatherParams();
  // Seconds the gradient reductions took (device time on CUDA, see
  // "Timing" in fsdp_units.h) and the part of it compute waited for in
  // ReduceGradients.
  double reduce_scatter_seconds();
  double reduce_scatter_exposed_seconds();

  ~ShardedLora();
  ShardedLora(const ShardedLora&) = delete;
  ShardedLora& operator=(const ShardedLora&) = delete;

  struct Entry {
    std::string name;
    int64_t offset = 0;
    int64_t numel = 0;
    std::vector<int64_t> shape;
  };
  const std::vector<Entry>& layout() const { return layout_; }  // PEFT names, flat offsets

 private:
  ShardedLora() = default;
  Result<at::Tensor> FullFlat(bool grads) const;
  // Offloading: a copy of `t` (fp32) in a new host buffer, pinned when the
  // model is on a GPU; the copy has finished when it returns.
  at::Tensor HostCopy(const at::Tensor& t) const;
  // A decoder layer's adapters: a span [begin, end) of the flat vector.
  struct Span {
    int64_t begin = 0, end = 0;
    size_t first = 0, count = 0;  // entries [first, first + count) of layout()
    std::vector<bool> seen;       // which entries have a gradient this round
    size_t remaining = 0;
    at::Tensor staged;            // fp32 [end - begin] on the comm device; undefined = none yet
  };
  void OnGrad(size_t entry, const at::Tensor& grad);  // a LoRA tensor's hook
  Status ReduceSpan(size_t span);

  std::vector<Span> spans_;
  std::vector<size_t> span_of_;   // layout index -> span
  std::vector<unsigned> hooks_;   // hook handles, params_ order
  bool per_span_ = false;         // more than one rank: reduce during backward
  at::Tensor acc_;                // fp32 [shard_numel] reduced gradients since ReduceGradients
  std::vector<int64_t> marks_;    // device-timed reductions not yet waited for
  FsdpUnits* units_ = nullptr;

  LlamaModel* model_ = nullptr;
  comm::Communicator* comm_ = nullptr;
  int world_ = 1;
  int rank_ = 0;
  int64_t total_numel_ = 0;
  int64_t shard_numel_ = 0;
  std::vector<Entry> layout_;
  std::vector<at::Tensor> params_;  // the model's LoRA tensors, layout() order
  at::Tensor shard_;
  bool offload_ = false;  // FsdpOptions::offload_params of the model's units
  bool pin_ = false;      // offloading from a GPU: host buffers that cross are pinned
  c10::Device comm_device_ = c10::Device(c10::DeviceType::CPU);
  std::shared_ptr<internal::CollectiveClock> clock_;
};

}  // namespace ftune::trainer

#endif  // FTUNE_WORKER_TRAINER_FSDP_LORA_H_
