// Tokens, loss masks and packing against tests/golden/data/golden_data.json:
// for the Llama 3.1 and Llama 2 tokenizers, the conversations (rendered by
// transformers, tokenized by HF tokenizers, assistant mask by transformers'
// char_to_token rule), text and prompt/completion records must give the
// same ids and labels, and packing with max_seq_len 48 the same rows as
// TRL's bfd rule (make_golden.py), masked and full-sequence, packed and not.
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tokenizer_test_data.h"
#include "worker/data/packing.h"
#include "worker/data/tokenizer.h"

namespace ftune::data {
namespace {

using json = nlohmann::json;

json Golden() {
  std::ifstream in(std::string(FTUNE_DATA_GOLDEN_DIR) + "/golden_data.json");
  return json::parse(in);
}

Record ToRecord(const json& j, size_t index) {
  Record r;
  r.source = "golden record " + std::to_string(index);
  if (j.contains("messages")) {
    r.format = RecordFormat::kMessages;
    for (const json& m : j["messages"]) r.messages.push_back({m["role"], m["content"]});
  } else if (j.contains("text")) {
    r.format = RecordFormat::kText;
    r.text = j["text"];
  } else {
    r.format = RecordFormat::kPromptCompletion;
    r.prompt = j["prompt"];
    r.completion = j["completion"];
  }
  return r;
}

json RowsJson(const std::vector<Row>& rows) {
  json out = json::array();
  for (const Row& r : rows) {
    out.push_back({{"input_ids", r.input_ids}, {"labels", r.labels}, {"position_ids", r.position_ids}});
  }
  return out;
}

struct Case {
  std::string template_name, tokenizer_name;
  ChatTemplateKind kind;
};

class PackingGoldenTest : public ::testing::TestWithParam<Case> {};

TEST_P(PackingGoldenTest, MatchesTransformersAndTrlRule) {
  const Case c = GetParam();
  std::string missing;
  const std::string dir = test_data::TokenizerDir(c.tokenizer_name, &missing);
  if (dir.empty()) GTEST_SKIP() << missing;
  auto tok = Tokenizer::Load(dir);
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  const json golden = Golden().at("packing").at(c.template_name);
  ChatTemplate chat;
  chat.kind = c.kind;
  chat.bos_token = *(*tok)->config().bos_token;
  chat.eos_token = *(*tok)->config().eos_token;
  const int64_t seq = golden.at("seq_length");
  ASSERT_EQ(golden.at("eos_id").get<int32_t>(), *(*tok)->eos_id());
  for (const bool masked : {true, false}) {
    const DocumentEncoder encoder(**tok, chat, /*completion_only_loss=*/masked);
    std::vector<TokenizedDoc> docs;
    const json& records = golden.at("records");
    for (size_t i = 0; i < records.size(); ++i) {
      Result<TokenizedDoc> d = encoder.Encode(ToRecord(records[i], i));
      ASSERT_TRUE(d.ok()) << d.status().ToString();
      docs.push_back(std::move(*d));
    }
    const std::string suffix = masked ? "masked" : "full";
    const json unpacked = RowsJson(TruncateRows(docs, seq));
    const json& want_unpacked = golden.at("unpacked_" + suffix);
    ASSERT_EQ(unpacked.size(), want_unpacked.size());
    for (size_t i = 0; i < unpacked.size(); ++i) {
      EXPECT_EQ(unpacked[i]["input_ids"], want_unpacked[i]["input_ids"]) << suffix << " document " << i;
      EXPECT_EQ(unpacked[i]["labels"], want_unpacked[i]["labels"]) << suffix << " document " << i;
      EXPECT_EQ(unpacked[i]["position_ids"], want_unpacked[i]["position_ids"]) << suffix << " document " << i;
    }
    const json packed = RowsJson(PackBestFitDecreasing(docs, seq));
    const json& want_packed = golden.at("packed_" + suffix);
    ASSERT_EQ(packed.size(), want_packed.size()) << suffix;
    for (size_t i = 0; i < packed.size(); ++i) {
      EXPECT_EQ(packed[i], want_packed[i]) << suffix << " row " << i;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Golden, PackingGoldenTest,
                         ::testing::Values(Case{"llama3.1", "llama3_1", ChatTemplateKind::kLlama31},
                                           Case{"llama2", "llama2", ChatTemplateKind::kLlama2}),
                         [](const auto& info) { return info.param.tokenizer_name; });

// A conversational prompt/completion record (TRL: completion_mask over what
// follows the prompt rendered with its generation prompt) trains on exactly
// the tokens a messages record's assistant span gives, for a conversation
// with one assistant turn at the end.
TEST_P(PackingGoldenTest, ConversationalPromptCompletionEqualsAssistantSpan) {
  const Case c = GetParam();
  std::string missing;
  const std::string dir = test_data::TokenizerDir(c.tokenizer_name, &missing);
  if (dir.empty()) GTEST_SKIP() << missing;
  auto tok = Tokenizer::Load(dir);
  ASSERT_TRUE(tok.ok());
  ChatTemplate chat;
  chat.kind = c.kind;
  chat.bos_token = *(*tok)->config().bos_token;
  chat.eos_token = *(*tok)->config().eos_token;
  const DocumentEncoder encoder(**tok, chat, true);
  const std::vector<ChatMessage> conv = {{"system", "Be exact."},
                                         {"user", "What is 6 x 7?"},
                                         {"assistant", "It is 42."},
                                         {"user", "And 6 x 8?"},
                                         {"assistant", "48, since 6 x 8 = 48."}};
  Record pc;
  pc.format = RecordFormat::kPromptCompletion;
  pc.messages = conv;
  pc.num_prompt_messages = 4;
  Record last_turn_only;  // the messages record, with only the last assistant turn trained
  last_turn_only.format = RecordFormat::kMessages;
  last_turn_only.messages = conv;
  auto a = encoder.Encode(pc);
  auto b = encoder.Encode(last_turn_only);
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(a->input_ids, b->input_ids);
  // b trains both assistant turns; from the first token a trains on, they agree.
  size_t first = 0;
  while (first < a->labels.size() && a->labels[first] == kIgnoreLabel) ++first;
  ASSERT_LT(first, a->labels.size());
  EXPECT_GT(first, 10u);
  EXPECT_EQ(std::vector<int32_t>(a->labels.begin() + first, a->labels.end()),
            std::vector<int32_t>(b->labels.begin() + first, b->labels.end()));
  // Before that, only b trains: the first assistant turn.
  int64_t earlier = 0;
  for (size_t i = 0; i < first; ++i) earlier += b->labels[i] != kIgnoreLabel;
  EXPECT_GT(earlier, 3);
}

// TRL's own docstring example (trl/data_utils.py pack_dataset, strategy
// "bfd"): [[1,2,3,4,5],[6,7],[8,9,10],[11]] at seq_length 4 packs to
// [[1,2,3,4],[8,9,10,11],[6,7]] with seq_lengths [[4],[3,1],[2]].
TEST(PackingTest, TrlDocstringExample) {
  std::vector<TokenizedDoc> docs;
  for (const std::vector<int32_t>& ids :
       std::vector<std::vector<int32_t>>{{1, 2, 3, 4, 5}, {6, 7}, {8, 9, 10}, {11}}) {
    docs.push_back({ids, ids});
  }
  const std::vector<Row> rows = PackBestFitDecreasing(docs, 4);
  ASSERT_EQ(rows.size(), 3u);
  EXPECT_EQ(rows[0].input_ids, (std::vector<int32_t>{1, 2, 3, 4}));
  EXPECT_EQ(rows[1].input_ids, (std::vector<int32_t>{8, 9, 10, 11}));
  EXPECT_EQ(rows[2].input_ids, (std::vector<int32_t>{6, 7}));
  EXPECT_EQ(rows[1].position_ids, (std::vector<int32_t>{0, 1, 2, 0}));
  EXPECT_EQ(rows[1].labels, (std::vector<int32_t>{-100, 9, 10, -100}));
  // Groups of 1000 documents are packed separately, as datasets.map batches them.
  std::vector<TokenizedDoc> many(1001, TokenizedDoc{{5}, {5}});
  EXPECT_EQ(PackBestFitDecreasing(many, 1000).size(), 2u);
  EXPECT_EQ(PackBestFitDecreasing(many, 1000, /*group_size=*/2000).size(), 2u);  // 1001 tokens
  EXPECT_EQ(PackBestFitDecreasing(many, 1001, /*group_size=*/2000).size(), 1u);
}

TEST(PackingTest, BestFitChoosesTheTightestOpenBin) {
  // seq 10: 7 opens bin A (space 3), 6 opens bin B (space 4), then 3 goes to
  // A (exact fit), 4 to B; then 2 opens a new bin.
  std::vector<TokenizedDoc> docs;
  for (int len : {2, 4, 3, 6, 7}) {
    std::vector<int32_t> ids(static_cast<size_t>(len), len);
    docs.push_back({ids, ids});
  }
  const std::vector<Row> rows = PackBestFitDecreasing(docs, 10);
  ASSERT_EQ(rows.size(), 3u);
  EXPECT_EQ(rows[0].input_ids, (std::vector<int32_t>{7, 7, 7, 7, 7, 7, 7, 3, 3, 3}));
  EXPECT_EQ(rows[1].input_ids, (std::vector<int32_t>{6, 6, 6, 6, 6, 6, 4, 4, 4, 4}));
  EXPECT_EQ(rows[2].input_ids, (std::vector<int32_t>{2, 2}));
}

}  // namespace
}  // namespace ftune::data
