// The /proc readers of file_util.h: this process' resident set, read as
// itself and by pid, and a process that does not exist.
#include <unistd.h>

#include <cstdint>
#include <vector>

#include <gtest/gtest.h>

#include "ftune/file_util.h"

namespace ftune {
namespace {

TEST(FileUtilTest, ResidentSetOfThisProcessAndByPid) {
  // Touch 64 MiB so the figure is well above the binary's own pages.
  std::vector<char> block(64 << 20, 1);
  const int64_t self = CurrentRssBytes();
  const int64_t by_pid = ProcessRssBytes(getpid());
  EXPECT_GT(self, int64_t{64} << 20);
  EXPECT_NEAR(static_cast<double>(by_pid), static_cast<double>(self), 8.0 * (1 << 20));
  EXPECT_GE(PeakRssBytes(), self);
  EXPECT_EQ(block[12345], 1);
}

TEST(FileUtilTest, ANonexistentProcessHasNoResidentSet) {
  EXPECT_EQ(ProcessRssBytes(-1), 0);
  EXPECT_EQ(ProcessRssBytes(int64_t{1} << 40), 0);
}

}  // namespace
}  // namespace ftune
