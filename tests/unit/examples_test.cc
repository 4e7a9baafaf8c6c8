// Every job YAML shipped in examples/ parses and validates: the docs'
// examples must never rot.
#include <filesystem>

#include <gtest/gtest.h>

#include "jobspec.h"

namespace ftune {
namespace {

TEST(Examples, EveryExampleSpecIsValid) {
  int n = 0;
  for (const auto& entry : std::filesystem::directory_iterator(FTUNE_SOURCE_DIR "/examples")) {
    if (entry.path().extension() != ".yaml") continue;
    ++n;
    v1::JobSpec spec;
    std::vector<std::string> errors;
    ASSERT_TRUE(LoadJobSpecFile(entry.path().string(), &spec, &errors)) << errors[0];
    ApplyJobSpecDefaults(&spec);
    auto problems = ValidateJobSpec(spec);
    EXPECT_TRUE(problems.empty()) << entry.path() << ": " << problems[0];
  }
  EXPECT_GE(n, 4);
}

}  // namespace
}  // namespace ftune
