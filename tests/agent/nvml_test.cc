// GPU slots through NVML (label gpu): runs on a host with the NVIDIA driver
// and skips, saying so, elsewhere.
#include "worker/agent/nvml.h"

#include <dlfcn.h>
#include <gtest/gtest.h>

#include "worker/agent/slots.h"

namespace ftune::agent {
namespace {

TEST(AgentNvmlTest, EveryGpuBecomesASlot) {
  void* h = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
  if (h == nullptr)
    GTEST_SKIP() << "libnvidia-ml.so.1 is not installed: no NVIDIA driver on this host";
  dlclose(h);
  std::vector<NvmlGpu> gpus;
  std::string error;
  ASSERT_TRUE(ProbeNvmlGpus(&gpus, &error)) << error;
  ASSERT_FALSE(gpus.empty()) << "the driver is installed but NVML reports no GPU";
  auto slots = DiscoverSlots(0);
  ASSERT_TRUE(slots.ok()) << slots.status();
  ASSERT_EQ(slots->size(), gpus.size());
  for (size_t i = 0; i < gpus.size(); ++i) {
    const HostSlot& s = (*slots)[i];
    EXPECT_EQ(s.slot.index(), static_cast<int>(i));
    EXPECT_EQ(s.gpu_index, gpus[i].index);
    EXPECT_EQ(s.slot.device_uuid().rfind("GPU-", 0), 0u) << s.slot.device_uuid();
    EXPECT_FALSE(s.slot.name().empty());
    EXPECT_GT(s.slot.memory_bytes(), int64_t{1} << 30);
    EXPECT_EQ(s.device(), "cuda:0");
  }
}

}  // namespace
}  // namespace ftune::agent
