// Slot discovery: CPU slots from --cpu-slots, and the message an operator
// gets when a host has no slot at all.
#include "worker/agent/slots.h"

#include <dlfcn.h>
#include <gtest/gtest.h>
#include <unistd.h>

namespace ftune::agent {
namespace {

bool NvmlLoadable() {
  void* h = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
  if (h != nullptr) dlclose(h);
  return h != nullptr;
}

TEST(AgentSlotsTest, CpuSlotsSplitHostMemory) {
  const std::vector<HostSlot> slots = CpuSlots(3);
  ASSERT_EQ(slots.size(), 3u);
  const int64_t total = static_cast<int64_t>(::sysconf(_SC_PHYS_PAGES)) * ::sysconf(_SC_PAGE_SIZE);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(slots[i].slot.index(), i);
    EXPECT_EQ(slots[i].slot.device_uuid(), "cpu-" + std::to_string(i));
    EXPECT_EQ(slots[i].slot.name(), "CPU");
    EXPECT_EQ(slots[i].slot.memory_bytes(), total / 3);
    EXPECT_FALSE(slots[i].is_gpu());
    EXPECT_EQ(slots[i].device(), "cpu");
  }
}

TEST(AgentSlotsTest, CpuSlotsFlagWinsOverNvml) {
  auto slots = DiscoverSlots(2);
  ASSERT_TRUE(slots.ok()) << slots.status();
  ASSERT_EQ(slots->size(), 2u);
  EXPECT_EQ((*slots)[1].slot.device_uuid(), "cpu-1");
}

TEST(AgentSlotsTest, NegativeCpuSlotsIsRejected) {
  auto slots = DiscoverSlots(-1);
  ASSERT_FALSE(slots.ok());
  EXPECT_NE(std::string(slots.status().message()).find("--cpu-slots (-1)"), std::string::npos);
}

TEST(AgentSlotsTest, HostWithoutNvmlSaysHowToGetSlots) {
  if (NvmlLoadable()) GTEST_SKIP() << "this host has NVML; see agent_nvml_test";
  auto slots = DiscoverSlots(0);
  ASSERT_FALSE(slots.ok());
  const std::string msg(slots.status().message());
  EXPECT_NE(msg.find("Install the NVIDIA driver"), std::string::npos) << msg;
  EXPECT_NE(msg.find("--cpu-slots N"), std::string::npos) << msg;
}

}  // namespace
}  // namespace ftune::agent
