// Which rows of the prepared dataset each rank trains on, and how a few rows
// become the (batch, seq) tensors the model takes.
//
// Order: epoch e visits the rows in data::EpochPermutation(rows, seed, e).
// The job consumes "global micro-batches" of per_device_batch x world rows,
// one after another, crossing epoch boundaries without a gap; rank r takes
// rows [r * B, (r + 1) * B) of each. An epoch that does not divide evenly is
// topped up from the start of its own permutation (torch's
// DistributedSampler pads the same way), so every rank always has B rows:
// FSDP's collectives need every rank in every forward.
//
// Consequences: the data position is one integer (global micro-batches
// consumed), which is all a checkpoint needs to resume exactly; and W ranks
// with batch B see, per step, the same rows as 1 rank with batch W x B, so
// their loss curves agree.
//
// Padding: rows of one micro-batch are right-padded to the longest with the
// tokenizer's pad id, label -100, and position ids that keep counting (so no
// document boundary appears); under causal attention real tokens never see
// the padding, and it carries no loss.
//
// Thread-safety: DataOrder is immutable after construction except for its
// permutation cache (not thread-safe: one training thread).
#ifndef FTUNE_WORKER_TRAINER_BATCH_H_
#define FTUNE_WORKER_TRAINER_BATCH_H_

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <vector>

#include "worker/data/prepare.h"
#include "worker/data/token_file.h"

namespace ftune::trainer {

class DataOrder {
 public:
  DataOrder(int64_t num_rows, int64_t per_device_batch, int world_size, uint64_t seed);

  // Global micro-batches in one epoch: ceil(rows / (B * W)).
  int64_t micro_batches_per_epoch() const { return micro_per_epoch_; }
  // The rows rank `rank` trains on in global micro-batch g (B of them).
  std::vector<int64_t> RowsFor(int64_t g, int rank);
  // Epoch progress (fractional) after g global micro-batches.
  double EpochAt(int64_t g) const;

 private:
  int64_t rows_, batch_, micro_per_epoch_;
  int world_;
  uint64_t seed_;
  int64_t cached_epoch_ = -1;
  std::vector<int64_t> perm_;
};

struct Batch {
  at::Tensor input_ids;     // (batch, seq) int64
  at::Tensor position_ids;  // (batch, seq) int64
  at::Tensor labels;        // (batch, seq) int64, -100 ignored
  int64_t num_input_tokens = 0;  // real (unpadded) tokens
  // The same position ids and labels on the CPU, for what the host needs to
  // know of the batch without waiting for the device (LlamaModel::HostLayout).
  at::Tensor host_position_ids;
  at::Tensor host_labels;
};

Batch MakeBatch(const data::TokenFile& file, const std::vector<int64_t>& rows,
                c10::Device device);

}  // namespace ftune::trainer

#endif  // FTUNE_WORKER_TRAINER_BATCH_H_
