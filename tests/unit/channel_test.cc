// Length-delimited framing of the agent <-> rank channel.
#include <sys/socket.h>
#include <unistd.h>

#include <thread>

#include <gtest/gtest.h>

#include "channel.h"
#include "ftune/v1/rank_channel.pb.h"

namespace ftune {
namespace {

TEST(Channel, RoundTripsMessagesInOrder) {
  int fds[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
  Channel a(fds[0]), b(fds[1]);
  for (int i = 0; i < 100; ++i) {
    v1::RankMessage m;
    m.mutable_step()->set_step(i);
    m.mutable_step()->set_loss(1.0 / (i + 1));
    ASSERT_TRUE(a.Write(m));
  }
  v1::RankMessage big;
  big.mutable_log()->set_text(std::string(300000, 'x'));  // multi-byte varint length
  std::thread writer([&] { ASSERT_TRUE(a.Write(big)); });
  for (int i = 0; i < 100; ++i) {
    v1::RankMessage m;
    ASSERT_TRUE(b.Read(&m)) << b.error();
    EXPECT_EQ(m.step().step(), i);
  }
  v1::RankMessage got;
  ASSERT_TRUE(b.Read(&got));
  writer.join();
  EXPECT_EQ(got.log().text().size(), 300000u);
}

TEST(Channel, CleanEndVersusTruncatedFrame) {
  int fds[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
  Channel b(fds[1]);
  const char partial[] = {10, 'a', 'b'};  // says 10 bytes, sends 2
  ASSERT_EQ(write(fds[0], partial, sizeof(partial)), 3);
  close(fds[0]);
  v1::RankMessage m;
  EXPECT_FALSE(b.Read(&m));
  EXPECT_NE(b.error().find("middle of a message"), std::string::npos) << b.error();

  int fds2[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, fds2), 0);
  Channel c(fds2[1]);
  close(fds2[0]);
  EXPECT_FALSE(c.Read(&m));
  EXPECT_EQ(c.error(), "");
}

TEST(Channel, RejectsOversizedLength) {
  int fds[2];
  ASSERT_EQ(socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
  Channel b(fds[1]);
  const unsigned char huge[] = {0xff, 0xff, 0xff, 0xff, 0x0f};
  ASSERT_EQ(write(fds[0], huge, sizeof(huge)), 5);
  v1::RankMessage m;
  EXPECT_FALSE(b.Read(&m));
  EXPECT_NE(b.error().find("exceeds"), std::string::npos) << b.error();
  close(fds[0]);
}

}  // namespace
}  // namespace ftune
