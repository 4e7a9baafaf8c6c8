// GPU discovery through NVML, loaded at run time with dlopen so that the
// agent builds and runs on hosts without the NVIDIA driver (CPU slots only).
// The handful of NVML types and signatures used here are declared locally;
// nvml.h is not needed at build time.
//
// Plain C++ (no abseil) so the probe can also be built alone for a quick
// check on a GPU host.
//
// Thread-safe: ProbeNvmlGpus may be called from any thread; NVML itself is
// initialised and shut down inside each call.
#ifndef FTUNE_WORKER_AGENT_NVML_H_
#define FTUNE_WORKER_AGENT_NVML_H_

#include <cstdint>
#include <string>
#include <vector>

namespace ftune::agent {

struct NvmlGpu {
  int index = 0;     // NVML index (PCI bus order)
  std::string uuid;  // "GPU-..."
  std::string name;  // "NVIDIA H100 80GB HBM3"
  int64_t memory_bytes = 0;
};

// Fills *gpus with every GPU NVML reports. Returns false with *error set when
// NVML cannot be loaded or fails (no driver, no permission, ...); a host with
// a driver and no GPU returns true with an empty list.
bool ProbeNvmlGpus(std::vector<NvmlGpu>* gpus, std::string* error);

}  // namespace ftune::agent

#endif  // FTUNE_WORKER_AGENT_NVML_H_
