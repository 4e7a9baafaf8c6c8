#include "worker/trainer/batch.h"

#include <ATen/ATen.h>

#include <algorithm>

namespace ftune::trainer {

DataOrder::DataOrder(int64_t num_rows, int64_t per_device_batch, int world_size, uint64_t seed)
    : rows_(num_rows), batch_(per_device_batch), world_(world_size), seed_(seed) {
  TORCH_CHECK(rows_ > 0 && batch_ > 0 && world_ > 0, "DataOrder: rows ", rows_, ", batch ",
              batch_, ", world ", world_, " must all be positive");
  const int64_t global = batch_ * world_;
  micro_per_epoch_ = (rows_ + global - 1) / global;
}

std::vector<int64_t> DataOrder::RowsFor(int64_t g, int rank) {
  const int64_t epoch = g / micro_per_epoch_;
  const int64_t within = g % micro_per_epoch_;
  if (epoch != cached_epoch_) {
    perm_ = data::EpochPermutation(rows_, seed_, epoch);
    cached_epoch_ = epoch;
  }
  std::vector<int64_t> out;
  out.reserve(batch_);
  const int64_t first = within * batch_ * world_ + rank * batch_;
  for (int64_t i = 0; i < batch_; ++i) out.push_back(perm_[(first + i) % rows_]);
  return out;
}

double DataOrder::EpochAt(int64_t g) const {
  return static_cast<double>(g) / static_cast<double>(micro_per_epoch_);
}

Batch MakeBatch(const data::TokenFile& file, const std::vector<int64_t>& rows,
                c10::Device device) {
  int64_t seq = 1;
  for (int64_t r : rows) seq = std::max(seq, file.row(r).length);
  const int64_t n = static_cast<int64_t>(rows.size());
  at::Tensor ids = at::full({n, seq}, static_cast<int64_t>(file.pad_token_id()), at::kLong);
  at::Tensor pos = at::empty({n, seq}, at::kLong);
  at::Tensor labels = at::full({n, seq}, static_cast<int64_t>(-100), at::kLong);
  auto ids_a = ids.accessor<int64_t, 2>();
  auto pos_a = pos.accessor<int64_t, 2>();
  auto lab_a = labels.accessor<int64_t, 2>();
  Batch b;
  for (int64_t i = 0; i < n; ++i) {
    const data::TokenRow row = file.row(rows[i]);
    int64_t next_pos = 0;
    for (int64_t t = 0; t < row.length; ++t) {
      ids_a[i][t] = row.input_ids[t];
      lab_a[i][t] = row.labels[t];
      pos_a[i][t] = row.position_ids[t];
      next_pos = row.position_ids[t] + 1;
    }
    for (int64_t t = row.length; t < seq; ++t) pos_a[i][t] = next_pos++;
    b.num_input_tokens += row.length;
  }
  b.input_ids = ids.to(device);
  b.position_ids = pos.to(device);
  b.labels = labels.to(device);
  b.host_position_ids = pos;
  b.host_labels = labels;
  return b;
}

}  // namespace ftune::trainer
