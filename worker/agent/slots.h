// The host's slots: one per GPU found through NVML, or N CPU slots asked for
// with --cpu-slots N. A slot is where one rank runs.
//
// --cpu-slots takes precedence over NVML (NVML is not probed then): a host is
// either a GPU host or a CPU test host, so a gang never mixes device kinds.
//
// Thread-safe: the functions keep no state.
#ifndef FTUNE_WORKER_AGENT_SLOTS_H_
#define FTUNE_WORKER_AGENT_SLOTS_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "ftune/v1/job_service.pb.h"

namespace ftune::agent {

struct HostSlot {
  // What the agent registers: index, device_uuid, name, memory_bytes.
  v1::Slot slot;
  // NVML index of the GPU (becomes CUDA_VISIBLE_DEVICES); -1 for a CPU slot.
  int gpu_index = -1;

  bool is_gpu() const { return gpu_index >= 0; }
  // The rank's --device: "cuda:0" (the only GPU it sees) or "cpu".
  std::string device() const { return is_gpu() ? "cuda:0" : "cpu"; }
};

// N CPU slots "cpu-<i>" named "CPU", each with total host RAM / N bytes.
std::vector<HostSlot> CpuSlots(int num_slots);

// --cpu-slots N > 0: CpuSlots(N). Otherwise the GPUs NVML reports. An error
// (FAILED_PRECONDITION) says how to get slots when there are none.
absl::StatusOr<std::vector<HostSlot>> DiscoverSlots(int cpu_slots);

}  // namespace ftune::agent

#endif  // FTUNE_WORKER_AGENT_SLOTS_H_
