#include <gtest/gtest.h>

#include "job_state.h"

namespace ftune::server {
namespace {

TEST(JobState, TableAllowsTheDocumentedPathsOnly) {
  EXPECT_TRUE(CheckTransition(v1::QUEUED, v1::SCHEDULED).ok());
  EXPECT_TRUE(CheckTransition(v1::SCHEDULED, v1::RUNNING).ok());
  EXPECT_TRUE(CheckTransition(v1::RUNNING, v1::SUCCEEDED).ok());
  EXPECT_TRUE(CheckTransition(v1::RUNNING, v1::RESTARTING).ok());
  EXPECT_TRUE(CheckTransition(v1::RESTARTING, v1::QUEUED).ok());
  EXPECT_TRUE(CheckTransition(v1::RUNNING, v1::CANCELLING).ok());
  EXPECT_TRUE(CheckTransition(v1::CANCELLING, v1::CANCELLED).ok());
  EXPECT_TRUE(CheckTransition(v1::QUEUED, v1::CANCELLED).ok());
  auto st = CheckTransition(v1::QUEUED, v1::RUNNING);
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(st.message(), "job cannot go from QUEUED to RUNNING");
  EXPECT_FALSE(CheckTransition(v1::CANCELLING, v1::RUNNING).ok());
  EXPECT_FALSE(CheckTransition(v1::RUNNING, v1::CANCELLED).ok());  // must pass CANCELLING
}

TEST(JobState, TerminalStatesHaveNoWayOut) {
  for (auto from : {v1::SUCCEEDED, v1::FAILED, v1::CANCELLED}) {
    EXPECT_TRUE(IsTerminal(from));
    for (int to = v1::QUEUED; to <= v1::CANCELLED; ++to)
      EXPECT_FALSE(CheckTransition(from, static_cast<v1::JobState>(to)).ok())
          << StateName(from) << " -> " << to;
  }
  EXPECT_FALSE(IsTerminal(v1::CANCELLING));
}

}  // namespace
}  // namespace ftune::server
