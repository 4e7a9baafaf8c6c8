// FollowJob's reconnect policy with an injected clock: a coordinator that
// stays unreachable is retried with growing backoff for kReconnectWindow,
// reported once, and then given up on, all without real waiting.
#include <sys/socket.h>
#include <netinet/in.h>
#include <unistd.h>

#include <sstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "cli/commands.h"

namespace ftune::cli {
namespace {

using ::testing::HasSubstr;

// A loopback address nothing listens on: bind a port, then close it.
std::string DeadAddress() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  close(fd);
  return "127.0.0.1:" + std::to_string(ntohs(addr.sin_port));
}

TEST(CliFollowTest, GivesUpAfterTheReconnectWindowWithGrowingBackoff) {
  ConnectionOptions options;
  options.coordinator = DeadAddress();
  JobClient client(options);

  std::ostringstream out, err;
  int64_t now = 1000000;
  std::vector<int64_t> sleeps;
  Environment env;
  env.out = &out;
  env.err = &err;
  env.now_ms = [&] { return now; };
  env.sleep = [&](std::chrono::milliseconds d) {
    sleeps.push_back(d.count());
    now += d.count();
  };
  int events = 0;
  absl::StatusOr<v1::Job> job =
      FollowJob(client, "job-1", 5, [&](const v1::JobEvent&) { ++events; }, env);

  ASSERT_FALSE(job.ok());
  EXPECT_TRUE(absl::IsUnavailable(job.status())) << job.status();
  EXPECT_THAT(std::string(job.status().message()), HasSubstr("gave up reconnecting after 60s"));
  EXPECT_EQ(events, 0);
  // Reported once, naming where it will resume.
  EXPECT_THAT(err.str(), HasSubstr("ftune: watch of job job-1 interrupted ("));
  EXPECT_THAT(err.str(), HasSubstr("resuming after event 5\n"));
  EXPECT_EQ(err.str().find("interrupted", err.str().find("interrupted") + 1), std::string::npos);
  // 100ms doubling to a 2s cap, until just past the 60s window.
  ASSERT_GE(sleeps.size(), 6u);
  EXPECT_EQ(sleeps[0], 100);
  EXPECT_EQ(sleeps[1], 200);
  EXPECT_EQ(sleeps[4], 1600);
  EXPECT_EQ(sleeps[5], 2000);
  EXPECT_EQ(sleeps.back(), 2000);
  int64_t slept = 0;
  for (int64_t s : sleeps) slept += s;
  EXPECT_GT(slept, 60000);
  EXPECT_LE(slept, 62000);
}

}  // namespace
}  // namespace ftune::cli
