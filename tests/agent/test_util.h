// Helpers shared by the agent tests: polling with a deadline (tests never
// sleep for a fixed time to "let things happen") and reading a spool's
// content. Temporary directories are tests/common/temp_dir.h's.
#ifndef FTUNE_TESTS_AGENT_TEST_UTIL_H_
#define FTUNE_TESTS_AGENT_TEST_UTIL_H_

#include <chrono>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "ftune/v1/agent_service.pb.h"
#include "worker/agent/spool.h"

namespace ftune::agent::testing {

// Polls pred every few milliseconds until it holds or the timeout passes.
inline bool WaitFor(const std::function<bool()>& pred,
                    std::chrono::milliseconds timeout = std::chrono::milliseconds(10000)) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!pred()) {
    if (std::chrono::steady_clock::now() >= deadline) return pred();
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return true;
}

inline std::vector<v1::RankEvent> AllEvents(const Spool& spool) {
  auto events = spool.ReadAfter(0, 1 << 20, size_t{1} << 40);
  return events.ok() ? *events : std::vector<v1::RankEvent>{};
}

inline std::string ReadText(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

inline void WriteText(const std::string& path, const std::string& text) {
  std::ofstream(path) << text;
}

}  // namespace ftune::agent::testing

#endif  // FTUNE_TESTS_AGENT_TEST_UTIL_H_
