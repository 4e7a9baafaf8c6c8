// Dataset readers: JSONL and JSON-array files, format detection, errors that
// name file/line/field, skip_invalid, the seeded split and permutations.
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "temp_dir.h"
#include "worker/data/dataset.h"
#include "worker/data/prepare.h"
#include "worker/data/sha256.h"

namespace ftune::data {
namespace {

ReadResult Read(const std::string& text, const std::string& format = "auto", bool skip = false) {
  ReadResult r;
  ReadOptions o;
  o.format = format;
  o.skip_invalid = skip;
  const Status s = ReadDatasetText(text, "d.jsonl", o, &r);
  EXPECT_TRUE(s.ok()) << s.ToString();
  return r;
}

std::string Error(const std::string& text, const std::string& format = "auto") {
  ReadResult r;
  ReadOptions o;
  o.format = format;
  const Status s = ReadDatasetText(text, "d.jsonl", o, &r);
  EXPECT_FALSE(s.ok()) << text;
  return s.message();
}

TEST(DatasetTest, ReadsTheThreeFormatsFromJsonl) {
  ReadResult m = Read(
      "{\"messages\": [{\"role\": \"system\", \"content\": \"s\"}, {\"role\": \"user\", \"content\": \"u\"},"
      " {\"role\": \"assistant\", \"content\": \"a\"}], \"id\": 3}\n\n"
      "{\"messages\": [{\"role\": \"user\", \"content\": \"u2\"}]}\r\n");
  ASSERT_EQ(m.records.size(), 2u);
  EXPECT_EQ(m.format, RecordFormat::kMessages);
  EXPECT_EQ(m.records[0].messages.size(), 3u);
  EXPECT_EQ(m.records[0].messages[2].content, "a");
  EXPECT_EQ(m.records[1].source, "d.jsonl:3");

  ReadResult t = Read("{\"text\": \"hello\"}\n{\"text\": \"\\u00e9\", \"extra\": 1}");
  ASSERT_EQ(t.records.size(), 2u);
  EXPECT_EQ(t.format, RecordFormat::kText);
  EXPECT_EQ(t.records[1].text, "\xC3\xA9");

  ReadResult pc = Read("{\"prompt\": \"p\", \"completion\": \"c\", \"text\": \"ignored\"}\n");
  ASSERT_EQ(pc.records.size(), 1u);
  EXPECT_EQ(pc.format, RecordFormat::kPromptCompletion);
  EXPECT_EQ(pc.records[0].completion, "c");
  EXPECT_EQ(pc.records[0].num_prompt_messages, 0u);

  ReadResult cpc = Read(R"({"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],)"
                        R"( "completion": [{"role": "assistant", "content": "a"}]})");
  ASSERT_EQ(cpc.records.size(), 1u);
  EXPECT_EQ(cpc.format, RecordFormat::kPromptCompletion);
  EXPECT_EQ(cpc.records[0].num_prompt_messages, 2u);
  ASSERT_EQ(cpc.records[0].messages.size(), 3u);
  EXPECT_EQ(cpc.records[0].messages[2].content, "a");
}

TEST(DatasetTest, ReadsJsonArraysWithElementLines) {
  ReadResult r = Read("\xEF\xBB\xBF  [\n {\"text\": \"a, ]} \\\" [\"},\n\n {\"text\": \"b\"}\n]\n");
  ASSERT_EQ(r.records.size(), 2u);
  EXPECT_EQ(r.records[0].text, "a, ]} \" [");
  EXPECT_EQ(r.records[1].source, "d.jsonl:4 (element 1)");
  EXPECT_EQ(Read("[]").records.size(), 0u);
  EXPECT_NE(Error("[\n{\"text\": \"a\"},\n{\"txt\": 1}\n]").find("d.jsonl:3 (element 1): missing field \"text\""),
            std::string::npos);
  EXPECT_NE(Error("[{\"text\": \"a\"}").find("missing ']'"), std::string::npos);
  EXPECT_NE(Error("[{\"text\": \"a\"},]").find("a ',' before ']'"), std::string::npos);
  EXPECT_NE(Error("[{\"text\": \"a\"}] x").find("after the closing"), std::string::npos);
  EXPECT_NE(Error("[{\"text\": \"a}]").find("unterminated string"), std::string::npos);
}

TEST(DatasetTest, BadRecordsNameFileLineAndField) {
  EXPECT_EQ(Error("{\"text\": \"a\"}\nnot json\n").rfind("d.jsonl:2: not JSON: ", 0), 0u);
  EXPECT_EQ(Error("[1]").rfind("d.jsonl:1 (element 0): expected a JSON object, got number", 0), 0u);
  EXPECT_EQ(Error("{\"text\": 5}"), "d.jsonl:1: text: expected a string, got number");
  // A number beyond double's range is nlohmann's out_of_range, not a parse error (found by the fuzzer).
  EXPECT_EQ(Error("{\"text\": \"a\", \"n\": 1e999}").rfind("d.jsonl:1: not JSON: number overflow", 0), 0u);
  EXPECT_EQ(Error("{\"text\": \"a\"}\n{\"prompt\": \"p\"}"), "d.jsonl:2: missing field \"text\"");
  EXPECT_EQ(Error("{\"prompt\": \"p\"}", "prompt_completion"), "d.jsonl:1: missing field \"completion\"");
  EXPECT_EQ(Error("{\"foo\": 1}").rfind("d.jsonl:1: cannot tell the record format", 0), 0u);
  EXPECT_EQ(Error("{\"messages\": []}"), "d.jsonl:1: messages: the conversation is empty");
  EXPECT_EQ(Error("{\"messages\": \"hi\"}").rfind("d.jsonl:1: messages: expected an array", 0), 0u);
  EXPECT_EQ(Error("{\"messages\": [{\"role\": \"user\"}]}"), "d.jsonl:1: messages[0]: missing field \"content\"");
  EXPECT_EQ(Error("{\"messages\": [{\"role\": \"user\", \"content\": 1}]}"),
            "d.jsonl:1: messages[0].content: expected a string, got number");
  EXPECT_EQ(Error("{\"messages\": [{\"role\": \"bot\", \"content\": \"x\"}]}"),
            "d.jsonl:1: messages[0].role: \"bot\" is not one of system, user, assistant");
  EXPECT_EQ(Error("{\"messages\": [{\"role\": \"assistant\", \"content\": \"x\"}]}"),
            "d.jsonl:1: messages[0].role: expected \"user\", got \"assistant\" (after an optional system "
            "message, roles must alternate user/assistant, starting with user)");
  EXPECT_NE(Error("{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}, {\"role\": \"user\", \"content\": \"y\"}]}")
                .find("messages[1].role: expected \"assistant\", got \"user\""),
            std::string::npos);
  EXPECT_NE(Error("{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}, {\"role\": \"system\", \"content\": \"y\"}]}")
                .find("messages[1].role: a system message may only be the first message"),
            std::string::npos);
  EXPECT_NE(Error("{\"messages\": [{\"role\": \"system\", \"content\": \"x\"}]}").find("no user turn"),
            std::string::npos);
  // Conversational prompt/completion.
  EXPECT_EQ(Error(R"({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],)"
                  R"( "completion": [{"role": "assistant", "content": "b"}]})"),
            "d.jsonl:1: prompt: must end with a user message (the completion is the assistant's reply)");
  EXPECT_EQ(Error(R"({"prompt": [{"role": "user", "content": "q"}], "completion": []})"),
            "d.jsonl:1: completion: no messages");
  EXPECT_EQ(Error(R"({"prompt": [{"role": "user", "content": "q"}], "completion": "a"})"),
            "d.jsonl:1: completion: expected an array of {role, content} objects, got string");
  EXPECT_EQ(Error(R"({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]})")
                .rfind("d.jsonl:1: completion[0].role: expected \"assistant\", got \"user\"", 0),
            0u);
  EXPECT_EQ(Error(R"({"prompt": [], "completion": [{"role": "assistant", "content": "a"}]})"),
            "d.jsonl:1: prompt: must end with a user message (the completion is the assistant's reply)");
  EXPECT_NE(Error("{\"text\": \"a\"}", "csv").find("not one of auto, messages, text, prompt_completion"),
            std::string::npos);
}

TEST(DatasetTest, SkipInvalidCountsAndKeepsExamples) {
  ReadResult r = Read("{\"text\": \"a\"}\nbroken\n{\"text\": 1}\n{\"text\": \"b\"}\n", "auto", true);
  ASSERT_EQ(r.records.size(), 2u);
  EXPECT_EQ(r.skipped, 2);
  ASSERT_EQ(r.skipped_examples.size(), 2u);
  EXPECT_EQ(r.skipped_examples[0].rfind("d.jsonl:2: not JSON", 0), 0u);
  EXPECT_EQ(r.skipped_examples[1], "d.jsonl:3: text: expected a string, got number");
  // A bad first record does not fix the format.
  ReadResult late = Read("{\"foo\": 1}\n{\"prompt\": \"p\", \"completion\": \"c\"}\n", "auto", true);
  EXPECT_EQ(late.format, RecordFormat::kPromptCompletion);
  EXPECT_EQ(late.skipped, 1);
}

TEST(DatasetTest, ReadsSeveralFilesAndNamesMissingOnes) {
  testutil::TempDir tmp("dataset_test");
  const std::string dir = tmp.path();
  std::ofstream(dir + "/a.jsonl") << "{\"text\": \"1\"}\n";
  std::ofstream(dir + "/b.json") << "[{\"text\": \"2\"}, {\"text\": \"3\"}]";
  ReadResult r;
  ASSERT_TRUE(ReadDatasetFiles({dir + "/a.jsonl", dir + "/b.json"}, {}, &r).ok());
  ASSERT_EQ(r.records.size(), 3u);
  EXPECT_EQ(r.records[2].text, "3");
  const Status missing = ReadDatasetFiles({dir + "/none.jsonl"}, {}, &r);
  EXPECT_EQ(missing.code(), StatusCode::kNotFound);
  EXPECT_NE(missing.message().find(dir + "/none.jsonl"), std::string::npos);
  std::ofstream(dir + "/c.jsonl") << "{\"text\": \"1\"}\n{\"messages\": 2}\n";
  ReadResult r2;
  const Status bad = ReadDatasetFiles({dir + "/a.jsonl", dir + "/c.jsonl"}, {}, &r2);
  EXPECT_EQ(bad.message(), dir + "/c.jsonl:2: missing field \"text\"");
}

TEST(DatasetTest, SeededPermutationIsAFixedPureFunction) {
  // Pinned values (also from an independent Python transcription of the
  // algorithm): a change here changes every job's data order.
  EXPECT_EQ(SeededPermutation(10, 42, 0), (std::vector<int64_t>{9, 4, 2, 8, 1, 3, 0, 6, 5, 7}));
  EXPECT_EQ(EpochPermutation(10, 42, 0), SeededPermutation(10, 42, 0));
  for (int64_t n : {0, 1, 2, 7, 1000}) {
    std::vector<int64_t> p = EpochPermutation(n, 7, 3);
    ASSERT_EQ(static_cast<int64_t>(p.size()), n);
    std::sort(p.begin(), p.end());
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(p[static_cast<size_t>(i)], i);
  }
  EXPECT_EQ(EpochPermutation(1000, 7, 3), EpochPermutation(1000, 7, 3));
  EXPECT_NE(EpochPermutation(1000, 7, 3), EpochPermutation(1000, 7, 4));
  EXPECT_NE(EpochPermutation(1000, 7, 3), EpochPermutation(1000, 8, 3));
  // Every position receives every element about equally often (no modulo bias
  // or off-by-one in the Fisher-Yates bounds): 4000 draws of n = 4.
  int counts[4][4] = {};
  for (int e = 0; e < 4000; ++e) {
    const std::vector<int64_t> p = EpochPermutation(4, 1, e);
    for (int i = 0; i < 4; ++i) ++counts[i][p[static_cast<size_t>(i)]];
  }
  for (auto& row : counts) {
    for (int c : row) EXPECT_NEAR(c, 1000, 150);
  }
}

TEST(DatasetTest, SplitByRatioIsSeededAndKeepsOrder) {
  std::vector<Record> records(100);
  for (int i = 0; i < 100; ++i) records[static_cast<size_t>(i)].text = std::to_string(i);
  std::vector<Record> train, eval, train2, eval2;
  SplitByRatio(records, 0.1, 42, &train, &eval);
  SplitByRatio(records, 0.1, 42, &train2, &eval2);
  ASSERT_EQ(eval.size(), 10u);
  ASSERT_EQ(train.size(), 90u);
  std::set<std::string> seen;
  for (size_t i = 0; i < eval.size(); ++i) {
    EXPECT_EQ(eval[i].text, eval2[i].text);
    if (i > 0) EXPECT_LT(std::stoi(eval[i - 1].text), std::stoi(eval[i].text));
    seen.insert(eval[i].text);
  }
  for (const Record& r : train) EXPECT_EQ(seen.count(r.text), 0u);
  std::vector<Record> train3, eval3;
  SplitByRatio(records, 0.1, 43, &train3, &eval3);
  bool differs = false;
  for (size_t i = 0; i < eval.size(); ++i) differs |= eval[i].text != eval3[i].text;
  EXPECT_TRUE(differs);
  std::vector<Record> t4, e4;
  SplitByRatio(std::vector<Record>(3), 0.01, 1, &t4, &e4);  // at least one eval record
  EXPECT_EQ(e4.size(), 1u);
  EXPECT_EQ(t4.size(), 2u);
}

// FIPS 180-4 / NIST example vectors (the cache key's hash).
TEST(Sha256Test, KnownVectors) {
  EXPECT_EQ(Sha256Hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(Sha256Hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(Sha256Hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  Sha256 million;
  const std::string chunk(1000, 'a');
  for (int i = 0; i < 1000; ++i) million.Update(chunk.substr(0, 333)), million.Update(chunk.substr(333));
  EXPECT_EQ(million.HexDigest(), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  Sha256 a, b;  // fields are length-prefixed
  a.UpdateField("ab");
  a.UpdateField("c");
  b.UpdateField("a");
  b.UpdateField("bc");
  EXPECT_NE(a.HexDigest(), b.HexDigest());
}

}  // namespace
}  // namespace ftune::data
