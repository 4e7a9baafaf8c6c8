// Runs the real `ftune data tokenize` / `ftune data detokenize` binary over
// the golden corpus and checks it prints HF's ids and round-trips the text;
// runs `ftune data prepare` / `ftune data inspect` on a small job.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "temp_dir.h"
#include "tokenizer_test_data.h"

namespace ftune::data {
namespace {

using json = nlohmann::json;

std::string TempPath(const std::string& name) {
  return testutil::SharedTempDir("ftune_data_cli_test") + "/" + name;
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

std::string ReadAll(const std::string& path) {
  std::ifstream in(path);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

TEST(FtuneDataCliTest, PrepareThenInspect) {
  std::string missing;
  const std::string dir = test_data::TokenizerDir("llama3_1", &missing);
  if (dir.empty()) GTEST_SKIP() << missing;
  const std::string data = TempPath("chat.jsonl");
  {
    std::ofstream out(data);
    for (int i = 0; i < 5; ++i) {
      out << json({{"messages",
                    {{{"role", "system"}, {"content", "Be brief."}},
                     {{"role", "user"}, {"content", "Question " + std::to_string(i)}},
                     {{"role", "assistant"}, {"content", "Answer " + std::to_string(i)}}}}})
                 .dump()
          << "\n";
    }
  }
  const std::string job = TempPath("job.yaml");
  std::ofstream(job) << "model: {model_name_or_path: '" << dir << "'}\n"
                     << "dataset: {data_files: ['" << data << "'], eval_split_ratio: 0.2}\n"
                     << "training: {max_seq_len: 128, packing: true}\n";
  const std::string cache = TempPath("cache");
  std::ofstream(TempPath("empty")) << "";
  ASSERT_EQ(RunFtune("prepare '" + job + "' --cache-dir '" + cache + "'", TempPath("empty"),
                     TempPath("prep.json"), TempPath("prep.err")),
            0)
      << ReadAll(TempPath("prep.err"));
  const json first = json::parse(ReadAll(TempPath("prep.json")));
  EXPECT_FALSE(first["cache_hit"].get<bool>());
  EXPECT_EQ(first["train_documents"], 4);
  EXPECT_EQ(first["eval_documents"], 1);
  EXPECT_EQ(first["chat_template"], "llama3");
  EXPECT_NE(ReadAll(TempPath("prep.err")).find("prepare: tokenize 5/5"), std::string::npos);
  const std::string train = first["train_path"];
  EXPECT_NE(train.find("cache/" + first["cache_key"].get<std::string>() + "/train.ftok"), std::string::npos);
  EXPECT_FALSE(first["eval_path"].get<std::string>().empty());

  ASSERT_EQ(RunFtune("prepare '" + job + "' --cache-dir '" + cache + "'", TempPath("empty"),
                     TempPath("prep2.json"), TempPath("prep.err")),
            0);
  const json second = json::parse(ReadAll(TempPath("prep2.json")));
  EXPECT_TRUE(second["cache_hit"].get<bool>());
  EXPECT_EQ(second["train_path"], first["train_path"]);
  EXPECT_EQ(second["train_tokens"], first["train_tokens"]);

  ASSERT_EQ(RunFtune("inspect '" + train + "' --rows 1", TempPath("empty"), TempPath("inspect.txt"),
                     TempPath("inspect.err")),
            0)
      << ReadAll(TempPath("inspect.err"));
  const std::string shown = ReadAll(TempPath("inspect.txt"));
  EXPECT_NE(shown.find("=== row 0:"), std::string::npos) << shown;
  EXPECT_EQ(shown.find("=== row 1:"), std::string::npos) << shown;
  // The assistant answers are trained, the prompt is not.
  EXPECT_NE(shown.find("<|end_header_id|>\n\n[[Answer "), std::string::npos) << shown;
  EXPECT_NE(shown.find("<|eot_id|>]]"), std::string::npos) << shown;
  EXPECT_EQ(shown.find("[[Question"), std::string::npos) << shown;
}

TEST(FtuneDataCliTest, PrepareErrorsNameTheRecordOrTheKey) {
  std::string missing;
  const std::string dir = test_data::TokenizerDir("llama3_1", &missing);
  if (dir.empty()) GTEST_SKIP() << missing;
  const std::string data = TempPath("bad.jsonl");
  std::ofstream(data) << "{\"text\": \"fine\"}\n{\"text\": [1]}\n";
  const std::string job = TempPath("bad_job.yaml");
  std::ofstream(job) << "model: {model_name_or_path: '" << dir << "'}\n"
                     << "dataset: {data_files: ['" << data << "']}\n";
  std::ofstream(TempPath("empty")) << "";
  EXPECT_EQ(RunFtune("prepare '" + job + "' --cache-dir '" + TempPath("cache2") + "'", TempPath("empty"),
                     TempPath("out"), TempPath("err")),
            1);
  EXPECT_NE(ReadAll(TempPath("err")).find(data + ":2: text: expected a string, got array"), std::string::npos)
      << ReadAll(TempPath("err"));
  std::ofstream(job) << "model: {model_name_or_path: '" << dir << "'}\n"
                     << "dataset: {data_files: ['" << data << "'], format: csv}\n";
  EXPECT_EQ(RunFtune("prepare '" + job + "'", TempPath("empty"), TempPath("out"), TempPath("err")), 2);
  EXPECT_NE(ReadAll(TempPath("err")).find("dataset.format"), std::string::npos) << ReadAll(TempPath("err"));
  EXPECT_EQ(RunFtune("inspect '" + data + "'", TempPath("empty"), TempPath("out"), TempPath("err")), 2);
  EXPECT_NE(ReadAll(TempPath("err")).find("not a valid ftune token file"), std::string::npos);
}

}  // namespace
}  // namespace ftune::data
