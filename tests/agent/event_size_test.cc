// What the agent does to oversized rank events before it spools them.
#include "worker/agent/event_size.h"

#include <gtest/gtest.h>

#include "absl/strings/match.h"

namespace ftune::agent {
namespace {

v1::RankEvent LogEvent(size_t bytes) {
  v1::RankEvent e;
  e.set_job_id("job-1");
  e.mutable_message()->mutable_log()->set_level("INFO");
  e.mutable_message()->mutable_log()->set_text(std::string(bytes, 'x'));
  return e;
}

TEST(AgentEventSize, AFiveMegabyteLogLineIsCutAndMarked) {
  v1::RankEvent e = LogEvent(5 << 20);
  const std::string what = FitEvent(&e);
  EXPECT_NE(what.find("1 string(s) over 65536 bytes truncated"), std::string::npos) << what;
  const std::string& text = e.message().log().text();
  EXPECT_LT(text.size(), kMaxEventStringBytes + 100);
  EXPECT_TRUE(absl::StartsWith(text, std::string(1000, 'x')));
  EXPECT_TRUE(absl::EndsWith(text, "[... truncated by ftune-agent: 5242880 bytes in all]")) << text.substr(text.size() - 80);
  EXPECT_EQ(e.message().log().level(), "INFO");
  EXPECT_LE(e.ByteSizeLong(), kMaxEventBytes);
}

TEST(AgentEventSize, SmallEventsAreLeftAlone) {
  v1::RankEvent e = LogEvent(100);
  const std::string before = e.SerializeAsString();
  EXPECT_EQ(FitEvent(&e), "");
  EXPECT_EQ(e.SerializeAsString(), before);
}

TEST(AgentEventSize, CutsAtACharacterBoundary) {
  std::string s = "ab\xc3\xa9" "cd";  // "abécd": é is two bytes
  EXPECT_TRUE(TruncateString(&s, 3));  // byte 3 is inside é
  EXPECT_TRUE(absl::StartsWith(s, "ab [... truncated")) << s;
  std::string fits = "abc";
  EXPECT_FALSE(TruncateString(&fits, 3));
  EXPECT_EQ(fits, "abc");
}

TEST(AgentEventSize, EveryStringIsCutRepeatedAndNestedToo) {
  v1::RankEvent e;
  auto* error = e.mutable_message()->mutable_error();
  error->set_message(std::string(20 << 20, 'e'));  // 20 MiB
  for (int i = 0; i < 3; ++i) error->add_stderr_tail(std::string(100 << 10, 't'));
  EXPECT_EQ(TruncateStrings(&e, kMaxEventStringBytes), 4);
  EXPECT_LT(error->message().size(), kMaxEventStringBytes + 100);
  for (const auto& line : error->stderr_tail()) EXPECT_LT(line.size(), kMaxEventStringBytes + 100);
}

TEST(AgentEventSize, AnEventStillTooBigLosesItsTailThenItsPayload) {
  v1::RankEvent exit;
  exit.mutable_exit()->set_exit_code(3);
  for (int i = 0; i < 40; ++i) exit.mutable_exit()->add_stderr_tail(std::string(60 << 10, 't'));
  EXPECT_NE(FitEvent(&exit).find("cut to"), std::string::npos);
  EXPECT_EQ(exit.exit().exit_code(), 3);  // the exit code always survives
  EXPECT_EQ(exit.exit().stderr_tail_size(), 0);
  EXPECT_LE(exit.ByteSizeLong(), kMaxEventBytes);
}

}  // namespace
}  // namespace ftune::agent
