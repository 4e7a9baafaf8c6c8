// Runs the real `ftune data tokenize` / `ftune data detokenize` binary over
// the golden corpus and checks it prints HF's ids and round-trips the text.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tokenizer_test_data.h"

namespace ftune::data {
namespace {

using json = nlohmann::json;

std::string TempPath(const std::string& name) {
  return ::testing::TempDir() + "/ftune_data_cli_" + std::to_string(getpid()) + "_" + name;
}

std::vector<std::string> ReadLines(const std::string& path) {
  std::vector<std::string> lines;
  std::ifstream in(path);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

// Runs `ftune data ARGS < input > output 2> errors`; returns the exit code.
int RunFtune(const std::string& args, const std::string& input, const std::string& output,
             const std::string& errors) {
  const std::string command = std::string("'") + FTUNE_BINARY + "' data " + args + " < '" + input +
                              "' > '" + output + "' 2> '" + errors + "'";
  const int status = std::system(command.c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

TEST(FtuneDataCliTest, TokenizeAndDetokenizeMatchGolden) {
  for (const std::string name : {"llama3_1", "llama2"}) {
    std::string missing;
    const std::string dir = test_data::TokenizerDir(name, &missing);
    if (dir.empty()) GTEST_SKIP() << missing;
    std::vector<json> golden;
    std::ofstream corpus(TempPath("in.jsonl"));
    for (const std::string& line : ReadLines(test_data::GoldenDir() + "/golden_" + name + ".jsonl")) {
      json rec = json::parse(line);
      if (rec["kind"] != "encode") continue;
      corpus << json(rec["text"]).dump() << "\n";
      golden.push_back(rec);
    }
    corpus.close();
    ASSERT_FALSE(golden.empty());

    ASSERT_EQ(RunFtune("tokenize --tokenizer '" + dir + "' --add-special-tokens", TempPath("in.jsonl"),
                       TempPath("ids.jsonl"), TempPath("err.txt")),
              0)
        << ReadLines(TempPath("err.txt")).front();
    const std::vector<std::string> ids = ReadLines(TempPath("ids.jsonl"));
    ASSERT_EQ(ids.size(), golden.size());
    for (size_t i = 0; i < ids.size(); ++i) {
      EXPECT_EQ(json::parse(ids[i]), golden[i]["ids_special"]) << name << " line " << i;
    }

    ASSERT_EQ(RunFtune("detokenize --tokenizer '" + dir + "' --skip-special-tokens",
                       TempPath("ids.jsonl"), TempPath("text.jsonl"), TempPath("err.txt")),
              0);
    const std::vector<std::string> texts = ReadLines(TempPath("text.jsonl"));
    ASSERT_EQ(texts.size(), golden.size());
    for (size_t i = 0; i < texts.size(); ++i) {
      EXPECT_EQ(json::parse(texts[i]), golden[i]["decoded_skip"]) << name << " line " << i;
    }
  }
}

TEST(FtuneDataCliTest, BadInputAndMissingTokenizerAreUsageErrors) {
  std::string missing;
  const std::string dir = test_data::TokenizerDir("llama3", &missing);
  if (dir.empty()) GTEST_SKIP() << missing;
  std::ofstream(TempPath("bad.jsonl")) << "\"fine\"\nnot json\n";
  EXPECT_EQ(RunFtune("tokenize --tokenizer '" + dir + "'", TempPath("bad.jsonl"), TempPath("out"),
                     TempPath("err")),
            2);
  EXPECT_NE(ReadLines(TempPath("err")).at(0).find("stdin line 2"), std::string::npos);
  EXPECT_EQ(ReadLines(TempPath("out")).size(), 1u);  // the good line was printed first

  EXPECT_EQ(RunFtune("tokenize --tokenizer /nonexistent", TempPath("bad.jsonl"), TempPath("out"),
                     TempPath("err")),
            2);
  EXPECT_NE(ReadLines(TempPath("err")).at(0).find("/nonexistent/tokenizer.json"), std::string::npos);
  EXPECT_EQ(RunFtune("tokenize", TempPath("bad.jsonl"), TempPath("out"), TempPath("err")), 2);
}

}  // namespace
}  // namespace ftune::data
