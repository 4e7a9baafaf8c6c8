// Runs a binary the tests were built with and keeps what it printed: for
// tests that drive a command line end to end (`ftune-rank score`,
// `ftune-rank generate`, ...).
#ifndef FTUNE_TESTS_COMMON_RUN_BINARY_H_
#define FTUNE_TESTS_COMMON_RUN_BINARY_H_

#include <sys/wait.h>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

namespace ftune::testutil {

// The whole file (empty when it cannot be read).
inline std::string ReadAll(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

struct RunResult {
  int exit_code = -1;  // -1 when the process did not exit normally
  std::string out, err;
};

// `BINARY ARGS > DIR/out 2> DIR/err` through the shell (ARGS is shell
// text), then both files read back.
inline RunResult RunBinary(const std::string& binary, const std::string& args,
                           const std::string& dir) {
  const std::string out = dir + "/out", err = dir + "/err";
  const std::string command =
      "'" + binary + "' " + args + " > '" + out + "' 2> '" + err + "'";
  const int status = std::system(command.c_str());
  RunResult r;
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.out = ReadAll(out);
  r.err = ReadAll(err);
  return r;
}

}  // namespace ftune::testutil

#endif  // FTUNE_TESTS_COMMON_RUN_BINARY_H_
