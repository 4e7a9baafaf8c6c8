// Runs a test body in N forked rank processes (LocalRankGroup) and collects
// each rank's exit and output, so multi-process tests read like ordinary
// ones: the body returns a Status; a non-OK one is printed as
// "RANK_ERROR <status>" and makes the rank exit 1.
#ifndef FTUNE_TESTS_COMM_RANK_HARNESS_H_
#define FTUNE_TESTS_COMM_RANK_HARNESS_H_

#include <chrono>
#include <cstdio>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "worker/comm/local_launcher.h"
#include "ftune/status.h"

namespace ftune::comm::testing {

using RankBody = std::function<Status(int rank, const std::string& store)>;

inline RankMain WrapBody(const RankBody& body) {
  return [body](int rank, const std::string& store) {
    const Status s = body(rank, store);
    if (!s.ok()) {
      std::fprintf(stderr, "RANK_ERROR %s\n", s.ToString().c_str());
      return 1;
    }
    return 0;
  };
}

// Starts `n` ranks with captured output; fails the test on launch errors.
inline std::unique_ptr<LocalRankGroup> StartRanks(int n, const RankBody& body) {
  LocalLaunchOptions options;
  options.nproc = n;
  options.capture_output = true;
  std::unique_ptr<LocalRankGroup> group;
  const Status s = LocalRankGroup::Start(options, WrapBody(body), &group);
  if (!s.ok()) {
    std::fprintf(stderr, "cannot start ranks: %s\n", s.ToString().c_str());
    return nullptr;
  }
  return group;
}

inline std::vector<RankExit> RunRanks(int n, const RankBody& body,
                                      std::chrono::milliseconds deadline) {
  auto group = StartRanks(n, body);
  if (group == nullptr) return {};
  return group->Wait(deadline);
}

// Every rank's exit and output, for assertion messages.
inline std::string Report(const std::vector<RankExit>& exits) {
  std::string s;
  for (const auto& e : exits) {
    s += "--- " + e.Describe() + "\n" + e.output;
  }
  return s;
}

inline bool AllOk(const std::vector<RankExit>& exits, size_t n) {
  if (exits.size() != n) return false;
  for (const auto& e : exits) {
    if (!e.ok()) return false;
  }
  return true;
}

}  // namespace ftune::comm::testing

#endif  // FTUNE_TESTS_COMM_RANK_HARNESS_H_
