// TensorBoard event files: CRC-32C against the published test vectors, the
// TFRecord frame layout, and a written file read back by the independent
// reader of event_file_reader.h (both CRCs of every frame, the Event and
// Summary fields by their published numbers, the values).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "event_file_reader.h"
#include "ftune/file_util.h"
#include "temp_dir.h"
#include "worker/trainer/tensorboard.h"

namespace ftune::trainer {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

// RFC 3720 (iSCSI) appendix B.4 and the customary check value.
TEST(Crc32cTest, KnownVectors) {
  EXPECT_EQ(Crc32c("123456789"), 0xE3069283u);
  EXPECT_EQ(Crc32c(""), 0x00000000u);
  EXPECT_EQ(Crc32c(std::string(32, '\0')), 0x8A9136AAu);
  EXPECT_EQ(Crc32c(std::string(32, '\xff')), 0x62A8AB43u);
  std::string ascending, descending;
  for (int i = 0; i < 32; ++i) {
    ascending.push_back(static_cast<char>(i));
    descending.push_back(static_cast<char>(31 - i));
  }
  EXPECT_EQ(Crc32c(ascending), 0x46DD794Eu);
  EXPECT_EQ(Crc32c(descending), 0x113FDB5Cu);
  // The test reader's bit-at-a-time CRC agrees on the vector and on noise.
  EXPECT_EQ(testutil::BitwiseCrc32c("123456789"), 0xE3069283u);
  std::mt19937 rng(7);
  for (int n : {1, 7, 64, 1000}) {
    std::string data(n, '\0');
    for (char& c : data) c = static_cast<char>(rng());
    EXPECT_EQ(Crc32c(data), testutil::BitwiseCrc32c(data)) << n << " bytes";
  }
}

TEST(Crc32cTest, MaskIsRotateRight15PlusTheConstant) {
  EXPECT_EQ(MaskCrc32c(0), 0xa282ead8u);
  EXPECT_EQ(MaskCrc32c(0xE3069283u), ((0xE3069283u >> 15) | (0xE3069283u << 17)) + 0xa282ead8u);
}

TEST(TfRecordTest, FrameLayout) {
  const std::string frame = TfRecordFrame("abc");
  ASSERT_EQ(frame.size(), 8u + 4 + 3 + 4);
  EXPECT_EQ(frame.substr(0, 8), std::string("\x03\0\0\0\0\0\0\0", 8));  // little-endian
  EXPECT_EQ(frame.substr(12, 3), "abc");
  const auto u32 = [&frame](size_t at) {
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(static_cast<uint8_t>(frame[at + i])) << (8 * i);
    return v;
  };
  EXPECT_EQ(u32(8), testutil::MaskedCrc(frame.substr(0, 8)));
  EXPECT_EQ(u32(15), testutil::MaskedCrc("abc"));
}

TEST(TensorBoardWriterTest, ScalarsReadBackWithAnIndependentReader) {
  testutil::TempDir tmp("ftune-tensorboard-test");
  const std::string dir = tmp.path() + "/runs/job";
  const double t0 = 1700000000.25;
  Result<std::unique_ptr<TensorBoardWriter>> w = TensorBoardWriter::Open(dir, t0);
  ASSERT_TRUE(w.ok()) << w.status().ToString();
  const std::string path = (*w)->path();
  EXPECT_THAT(path, StartsWith(dir + "/events.out.tfevents.1700000000."));
  EXPECT_GT(path.size(), (dir + "/events.out.tfevents.1700000000.").size()) << "host name";
  // A value of 0 must be on the wire (TensorBoard drops a Value without one).
  for (int64_t step = 1; step <= 3; ++step) {
    ASSERT_TRUE((*w)->WriteScalars(step,
                                   {{"train/loss", 4.0 / step},
                                    {"train/learning_rate", 2e-4 * step},
                                    {"train/grad_norm", step == 2 ? 0.0 : 1.5}},
                                   t0 + step)
                    .ok());
  }
  ASSERT_TRUE((*w)->WriteScalars(3, {{"eval/loss", 1.25}}, t0 + 4).ok());
  w->reset();

  std::vector<testutil::TbEvent> events;
  std::string error;
  ASSERT_TRUE(testutil::ReadEventFile(path, &events, &error)) << error;
  ASSERT_EQ(events.size(), 5u);
  EXPECT_EQ(events[0].file_version, "brain.Event:2");
  EXPECT_FALSE(events[0].has_summary);
  EXPECT_DOUBLE_EQ(events[0].wall_time, t0);
  for (int64_t step = 1; step <= 3; ++step) {
    const testutil::TbEvent& e = events[step];
    EXPECT_EQ(e.step, step);
    EXPECT_DOUBLE_EQ(e.wall_time, t0 + step);
    ASSERT_EQ(e.values.size(), 3u);
    EXPECT_EQ(e.values.at("train/loss"), static_cast<float>(4.0 / step));
    EXPECT_EQ(e.values.at("train/learning_rate"), static_cast<float>(2e-4 * step));
    EXPECT_EQ(e.values.at("train/grad_norm"), step == 2 ? 0.0f : 1.5f);
  }
  EXPECT_EQ(events[4].step, 3);
  EXPECT_EQ(events[4].values.at("eval/loss"), 1.25f);
}

TEST(TensorBoardWriterTest, ARestartInTheSameSecondGetsItsOwnFile) {
  testutil::TempDir tmp("ftune-tensorboard-test");
  auto a = TensorBoardWriter::Open(tmp.path(), 1700000000);
  auto b = TensorBoardWriter::Open(tmp.path(), 1700000000.5);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_NE((*a)->path(), (*b)->path());
  EXPECT_EQ((*b)->path(), (*a)->path() + ".1");
  std::vector<testutil::TbEvent> events;
  std::string error;
  ASSERT_TRUE(testutil::ReadEventFile((*a)->path(), &events, &error)) << error;
  EXPECT_EQ(events.size(), 1u);
}

TEST(TensorBoardWriterTest, ADirectoryThatCannotBeMadeIsAnError) {
  testutil::TempDir tmp("ftune-tensorboard-test");
  ASSERT_TRUE(WriteFileAtomically(tmp.path() + "/file", "x").ok());
  auto w = TensorBoardWriter::Open(tmp.path() + "/file/runs", 0);
  ASSERT_FALSE(w.ok());
  EXPECT_THAT(w.status().message(), HasSubstr(tmp.path() + "/file"));
}

TEST(TensorBoardLogDirTest, TheJobNameIsOneSafePathComponent) {
  EXPECT_EQ(TensorBoardLogDir("/out", "llama3-8b_guanaco.v2"), "/out/runs/llama3-8b_guanaco.v2");
  EXPECT_EQ(TensorBoardLogDir("/out", "my run/../x"), "/out/runs/my_run_.._x");
  EXPECT_EQ(TensorBoardLogDir("/out", ""), "/out/runs/run");
  EXPECT_EQ(TensorBoardLogDir("/out", ".."), "/out/runs/run");
}

}  // namespace
}  // namespace ftune::trainer
