// Golden parity with HF tokenizers: every line of
// tests/golden/tokenizer/corpus.jsonl must encode to the same ids (with and
// without special tokens) and decode to the same text (with and without
// skip_special_tokens), and seeded random id sequences must decode the same,
// for each real tokenizer (tokenizer_test_data.h). The golden files come
// from tests/golden/tokenizer/make_golden.py run with Python tokenizers.
#include <fstream>
#include <thread>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tokenizer_test_data.h"
#include "worker/data/tokenizer.h"

namespace ftune::data {
namespace {

using test_data::GoldenDir;
using test_data::TokenizerDir;

// At most this many mismatches are printed per tokenizer; the count of all
// of them is printed at the end.
constexpr int kMaxReported = 10;

std::string Show(const std::vector<int32_t>& ids) {
  std::string s = "[";
  for (size_t i = 0; i < ids.size(); ++i) s += (i ? "," : "") + std::to_string(ids[i]);
  return s + "]";
}

class GoldenTest : public ::testing::TestWithParam<std::string> {};

TEST_P(GoldenTest, MatchesHuggingFaceTokenizers) {
  const std::string name = GetParam();
  std::string missing;
  const std::string dir = TokenizerDir(name, &missing);
  if (dir.empty()) GTEST_SKIP() << missing;
  Result<std::unique_ptr<Tokenizer>> loaded = Tokenizer::Load(dir);
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  const Tokenizer& tok = **loaded;

  const std::string golden_path = GoldenDir() + "/golden_" + name + ".jsonl";
  std::ifstream golden(golden_path);
  ASSERT_TRUE(golden.good()) << "cannot read " << golden_path;
  int encodes = 0, decodes = 0, mismatches = 0;
  const auto report = [&](const std::string& what) {
    if (++mismatches <= kMaxReported) ADD_FAILURE() << name << ": " << what;
  };
  for (std::string line; std::getline(golden, line);) {
    const nlohmann::json rec = nlohmann::json::parse(line);
    const std::string kind = rec.at("kind");
    if (kind == "meta") {
      EXPECT_EQ(tok.vocab_size(), rec.at("vocab_size_with_added").get<int32_t>());
      continue;
    }
    const std::vector<int32_t> golden_ids = rec.at("ids");
    const std::string decoded = rec.at("decoded");
    const std::string decoded_skip = rec.at("decoded_skip");
    const std::string where = kind + " #" + std::to_string(rec.at("i").get<int>());
    if (kind == "encode") {
      ++encodes;
      const std::string text = rec.at("text");
      const std::vector<int32_t> golden_special = rec.at("ids_special");
      const std::vector<int32_t> ids = tok.Encode(text, /*add_special_tokens=*/false);
      const std::vector<int32_t> ids_special = tok.Encode(text, /*add_special_tokens=*/true);
      if (ids != golden_ids) {
        report(where + " ids " + Show(ids) + " != HF " + Show(golden_ids) + " for " +
               nlohmann::json(text).dump());
      }
      if (ids_special != golden_special) {
        report(where + " ids (add_special_tokens) " + Show(ids_special) + " != HF " +
               Show(golden_special));
      }
      if (tok.Decode(golden_special, false) != decoded) {
        report(where + " decode " + nlohmann::json(tok.Decode(golden_special, false)).dump() +
               " != HF " + nlohmann::json(decoded).dump());
      }
      if (tok.Decode(golden_special, true) != decoded_skip) {
        report(where + " decode (skip special) " +
               nlohmann::json(tok.Decode(golden_special, true)).dump() + " != HF " +
               nlohmann::json(decoded_skip).dump());
      }
    } else {
      ++decodes;
      const std::string ours = tok.Decode(golden_ids, false);
      const std::string ours_skip = tok.Decode(golden_ids, true);
      if (ours != decoded) {
        report(where + " decode of " + Show(golden_ids) + ": " +
               nlohmann::json(ours).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) +
               " != HF " + nlohmann::json(decoded).dump());
      }
      if (ours_skip != decoded_skip) {
        report(where + " decode (skip special) of " + Show(golden_ids));
      }
    }
  }
  EXPECT_GT(encodes, 0) << golden_path << " has no encode records";
  EXPECT_EQ(mismatches, 0) << name << ": " << mismatches << " mismatches over " << encodes
                           << " corpus lines and " << decodes << " decode sequences";
  std::printf("%s: %d corpus lines (x2 encodes, x2 decodes) and %d decode sequences compared, "
              "%d mismatches\n",
              name.c_str(), encodes, decodes, mismatches);
}

// Encode from several threads at once (the BPE cache is shared) gives what
// one thread gives.
TEST_P(GoldenTest, ConcurrentEncodeMatchesSequential) {
  std::string missing;
  const std::string dir = TokenizerDir(GetParam(), &missing);
  if (dir.empty()) GTEST_SKIP() << missing;
  Result<std::unique_ptr<Tokenizer>> loaded = Tokenizer::Load(dir);
  ASSERT_TRUE(loaded.ok()) << loaded.status().ToString();
  std::vector<std::string> corpus;
  std::ifstream in(GoldenDir() + "/corpus.jsonl");
  for (std::string line; std::getline(in, line);) corpus.push_back(nlohmann::json::parse(line));
  ASSERT_FALSE(corpus.empty());
  // Reference first, with a fresh tokenizer whose cache is off.
  TokenizerLoadOptions no_cache;
  no_cache.bpe_cache_capacity = 0;
  Result<std::unique_ptr<Tokenizer>> reference = Tokenizer::Load(dir, no_cache);
  ASSERT_TRUE(reference.ok());
  std::vector<std::vector<int32_t>> expected;
  for (const std::string& text : corpus) expected.push_back((*reference)->Encode(text, true));

  constexpr int kThreads = 4;
  std::vector<int> wrong(kThreads, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int round = 0; round < 5; ++round) {
        for (size_t i = 0; i < corpus.size(); ++i) {
          const size_t k = (i * 7 + static_cast<size_t>(t) * 13) % corpus.size();
          if ((*loaded)->Encode(corpus[k], true) != expected[k]) ++wrong[t];
        }
      }
    });
  }
  for (std::thread& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(wrong[t], 0) << "thread " << t;
}

// Bytes that are not UTF-8 (HF's API cannot take them) encode as U+FFFD
// would, and decode(encode(x)) gives back the repaired text.
TEST_P(GoldenTest, InvalidUtf8EncodesAsReplacementCharacter) {
  std::string missing;
  const std::string dir = TokenizerDir(GetParam(), &missing);
  if (dir.empty()) GTEST_SKIP() << missing;
  Result<std::unique_ptr<Tokenizer>> loaded = Tokenizer::Load(dir);
  ASSERT_TRUE(loaded.ok());
  const Tokenizer& tok = **loaded;
  const std::string bad = "caf\xC3 \xF0\x9F\x98 ok \xFF\xFE";
  const std::string repaired = "caf\xEF\xBF\xBD \xEF\xBF\xBD ok \xEF\xBF\xBD\xEF\xBF\xBD";
  EXPECT_EQ(tok.Encode(bad, false), tok.Encode(repaired, false));
  EXPECT_EQ(tok.Decode(tok.Encode(bad, false), true), repaired);
}

// Qwen2's tokenizer.json normalizes to NFC first: decomposed text encodes as
// its composed form (Llama 3's file, without a normalizer, keeps them apart).
TEST(QwenTokenizer, NfcNormalizerComposesBeforeSplitting) {
  std::string missing;
  const std::string dir = test_data::TokenizerDir("qwen2_5", &missing);
  if (dir.empty()) GTEST_SKIP() << missing;
  auto tok = Tokenizer::Load(dir);
  ASSERT_TRUE(tok.ok()) << tok.status().ToString();
  const std::string composed = "caf\xC3\xA9 \xEA\xB0\x80";           // "café 가"
  const std::string decomposed = "cafe\xCC\x81 \xE1\x84\x80\xE1\x85\xA1";  // e + U+0301, L + V jamo
  EXPECT_EQ((*tok)->Encode(decomposed, false), (*tok)->Encode(composed, false));
  EXPECT_EQ((*tok)->Decode((*tok)->Encode(decomposed, false), false), composed);
  const std::string llama3 = test_data::TokenizerDir("llama3", &missing);
  if (llama3.empty()) return;
  auto plain = Tokenizer::Load(llama3);
  ASSERT_TRUE(plain.ok());
  EXPECT_NE((*plain)->Encode(decomposed, false), (*plain)->Encode(composed, false));
}

INSTANTIATE_TEST_SUITE_P(RealTokenizers, GoldenTest,
                         ::testing::ValuesIn(test_data::GoldenTokenizerNames()),
                         [](const ::testing::TestParamInfo<std::string>& info) { return info.param; });

}  // namespace
}  // namespace ftune::data
