#include "worker/agent/slots.h"

#include <unistd.h>

#include "absl/strings/str_cat.h"
#include "worker/agent/nvml.h"

namespace ftune::agent {

std::vector<HostSlot> CpuSlots(int num_slots) {
  std::vector<HostSlot> slots;
  if (num_slots <= 0) return slots;
  const int64_t pages = ::sysconf(_SC_PHYS_PAGES);
  const int64_t page_size = ::sysconf(_SC_PAGE_SIZE);
  const int64_t total = pages > 0 && page_size > 0 ? pages * page_size : 0;
  for (int i = 0; i < num_slots; ++i) {
    HostSlot s;
    s.slot.set_index(i);
    s.slot.set_device_uuid(absl::StrCat("cpu-", i));
    s.slot.set_name("CPU");
    s.slot.set_memory_bytes(total / num_slots);
    slots.push_back(std::move(s));
  }
  return slots;
}

absl::StatusOr<std::vector<HostSlot>> DiscoverSlots(int cpu_slots) {
  if (cpu_slots < 0) {
    return absl::InvalidArgumentError(absl::StrCat("--cpu-slots (", cpu_slots, ") must be >= 0"));
  }
  if (cpu_slots > 0) return CpuSlots(cpu_slots);
  std::vector<NvmlGpu> gpus;
  std::string error;
  if (!ProbeNvmlGpus(&gpus, &error)) {
    return absl::FailedPreconditionError(
        absl::StrCat("no slots: ", error,
                     ". Install the NVIDIA driver, or pass --cpu-slots N to run N CPU ranks"));
  }
  if (gpus.empty()) {
    return absl::FailedPreconditionError(
        "no slots: NVML reports no GPU on this host. Pass --cpu-slots N to run N CPU ranks");
  }
  std::vector<HostSlot> slots;
  for (const NvmlGpu& gpu : gpus) {
    HostSlot s;
    s.slot.set_index(static_cast<int>(slots.size()));
    s.slot.set_device_uuid(gpu.uuid);
    s.slot.set_name(gpu.name);
    s.slot.set_memory_bytes(gpu.memory_bytes);
    s.gpu_index = gpu.index;
    slots.push_back(std::move(s));
  }
  return slots;
}

}  // namespace ftune::agent
