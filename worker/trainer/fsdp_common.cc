// Helpers shared by the FSDP files; see fsdp_common.h.
#include "worker/trainer/fsdp_common.h"

#include <ATen/ATen.h>

namespace ftune::trainer::internal {

using comm::DataType;

std::string Where(int rank, int world) {
  return "rank " + std::to_string(rank) + " of " + std::to_string(world);
}

Status Prefixed(const Status& s, const std::string& what) {
  return Status(s.code(), what + ": " + s.message());
}

c10::Device CommDevice(comm::Communicator* comm, c10::Device model_device) {
  if (comm != nullptr && comm->backend() == "gloo") return c10::Device(c10::DeviceType::CPU);
  return model_device;
}

Status AllGatherBytes(comm::Communicator* comm, const at::Tensor& send, at::Tensor& recv,
                      int64_t bytes, int64_t send_offset, int64_t recv_offset,
                      comm::StreamHandle stream) {
  const uint8_t* src = send.data_ptr<uint8_t>() + send_offset;
  uint8_t* dst = recv.data_ptr<uint8_t>() + recv_offset;
  if (comm == nullptr || comm->size() == 1) {
    if (src != dst) recv.narrow(0, recv_offset, bytes).copy_(send.narrow(0, send_offset, bytes));
    return OkStatus();
  }
  return comm->AllGather(src, dst, static_cast<size_t>(bytes), DataType::kUInt8, stream);
}

Status CheckSameOnEveryRank(comm::Communicator* comm, c10::Device model_device,
                            const std::vector<int64_t>& mine, const std::string& what) {
  if (comm == nullptr || comm->size() == 1) return OkStatus();
  const int world = comm->size();
  // Sizes first: the fingerprints themselves must be gathered with equal counts.
  const c10::Device dev = CommDevice(comm, model_device);
  const auto i64 = at::TensorOptions().dtype(at::kLong);
  auto gather = [&](const at::Tensor& v, int64_t n) -> Result<at::Tensor> {
    at::Tensor send = v.to(dev);
    at::Tensor all = at::empty({n * world}, i64.device(dev));
    const Status s = comm->AllGather(send.data_ptr(), all.data_ptr(), static_cast<size_t>(n),
                                     DataType::kInt64, nullptr);
    if (!s.ok()) return Prefixed(s, what + ": comparing ranks on " + Where(comm->rank(), world));
    return all.cpu();
  };
  const int64_t n = static_cast<int64_t>(mine.size());
  FTUNE_ASSIGN_OR_RETURN(at::Tensor sizes, gather(at::full({1}, n, i64), 1));
  for (int r = 0; r < world; ++r) {
    if (sizes.data_ptr<int64_t>()[r] != n) {
      return FailedPreconditionError(what + " differs between rank " + std::to_string(r) +
                                     " and rank " + std::to_string(comm->rank()) +
                                     ": every rank must load the same model with the same options");
    }
  }
  FTUNE_ASSIGN_OR_RETURN(at::Tensor all, gather(at::tensor(mine, i64), n));
  for (int r = 0; r < world; ++r) {
    for (int64_t i = 0; i < n; ++i) {
      if (all.data_ptr<int64_t>()[r * n + i] != mine[i]) {
        return FailedPreconditionError(
            what + " differs between rank " + std::to_string(r) + " and rank " +
            std::to_string(comm->rank()) + " (value " + std::to_string(i) + ": " +
            std::to_string(all.data_ptr<int64_t>()[r * n + i]) + " vs " + std::to_string(mine[i]) +
            "): every rank must load the same model with the same options");
      }
    }
  }
  return OkStatus();
}

}  // namespace ftune::trainer::internal
