// The BPE trainer: its tokenizer files load in ftune's own Tokenizer and
// round-trip text (the training corpus and the tokenizer golden corpus, which
// it never saw), special tokens sit at the declared ids, training is a pure
// function of the corpus (order included), merges follow the documented
// count / tie rule, and the file layout is the real Llama 3 one.
#include <algorithm>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tokenizer_test_data.h"
#include "worker/data/bpe_trainer.h"
#include "worker/data/tokenizer.h"

namespace ftune::data {
namespace {

using json = nlohmann::json;

std::vector<std::string> ReadJsonLines(const std::string& path) {
  std::ifstream in(path);
  std::vector<std::string> out;
  std::string line;
  while (std::getline(in, line)) {
    if (!line.empty()) out.push_back(json::parse(line).get<std::string>());
  }
  return out;
}

// A small English corpus with repetition, digits, code and a little Unicode.
std::vector<std::string> TrainingCorpus() {
  std::vector<std::string> corpus;
  const char* names[] = {"Paris", "Berlin", "Madrid", "Rome", "Lisbon", "Vienna"};
  const char* countries[] = {"France", "Germany", "Spain", "Italy", "Portugal", "Austria"};
  for (int i = 0; i < 6; ++i) {
    corpus.push_back(std::string("What is the capital of ") + countries[i] + "?");
    corpus.push_back(std::string("The capital of ") + countries[i] + " is " + names[i] + ".");
  }
  for (int a = 1; a < 40; a += 3) {
    corpus.push_back("What is " + std::to_string(a) + " plus " + std::to_string(a * 7) + "?");
    corpus.push_back(std::to_string(a) + " + " + std::to_string(a * 7) + " = " +
                     std::to_string(a * 8));
  }
  corpus.push_back("def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n");
  corpus.push_back("Reverse the word \"tokenizer\": rezinekot");
  corpus.push_back("Café, naïve, Straße, 東京, 🙂 and    spaces\t\ttabs\r\n");
  corpus.push_back("I'm sure they're right; we'll see what you've done.");
  return corpus;
}

std::unique_ptr<Tokenizer> Load(const TokenizerFiles& files) {
  auto tok = Tokenizer::FromJson(files.tokenizer_json, files.tokenizer_config_json, "trained");
  EXPECT_TRUE(tok.ok()) << tok.status().ToString();
  return tok.ok() ? std::move(tok).value() : nullptr;
}

TEST(BpeTrainerTest, TokenizerLoadsAndRoundTrips) {
  BpeTrainerOptions options;
  options.vocab_size = 512;
  auto files = TrainLlama3Tokenizer(TrainingCorpus(), options);
  ASSERT_TRUE(files.ok()) << files.status().ToString();
  auto tok = Load(*files);
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->vocab_size(), 512);
  EXPECT_EQ(files->vocab_size, 512);

  std::vector<std::string> texts = TrainingCorpus();
  const std::vector<std::string> unseen =
      ReadJsonLines(FTUNE_SOURCE_DIR "/tests/golden/tokenizer/corpus.jsonl");
  ASSERT_GT(unseen.size(), 50u);
  texts.insert(texts.end(), unseen.begin(), unseen.end());
  size_t corpus_bytes = 0, corpus_tokens = 0;
  for (size_t i = 0; i < texts.size(); ++i) {
    const std::vector<int32_t> ids = tok->Encode(texts[i], false);
    for (int32_t id : ids) ASSERT_TRUE(id >= 0 && id < 512) << id;
    EXPECT_EQ(tok->Decode(ids, false), texts[i]) << "text " << i;
    if (i < TrainingCorpus().size()) {
      corpus_bytes += texts[i].size();
      corpus_tokens += ids.size();
    }
  }
  // The merges compress what they were trained on.
  EXPECT_LT(corpus_tokens * 2, corpus_bytes) << corpus_tokens << " tokens, " << corpus_bytes
                                             << " bytes";
}

TEST(BpeTrainerTest, SpecialTokensAreAtTheDeclaredIds) {
  BpeTrainerOptions options;
  options.vocab_size = 600;
  auto files = TrainLlama3Tokenizer(TrainingCorpus(), options);
  ASSERT_TRUE(files.ok()) << files.status().ToString();
  auto tok = Load(*files);
  ASSERT_NE(tok, nullptr);

  // Specials follow the BPE tokens in the documented order.
  const auto first = tok->TokenToId(kBeginOfText);
  ASSERT_TRUE(first.has_value());
  const std::vector<std::string>& specials = Llama3SpecialTokens();
  for (size_t i = 0; i < specials.size(); ++i) {
    EXPECT_EQ(tok->TokenToId(specials[i]), *first + static_cast<int32_t>(i)) << specials[i];
    EXPECT_TRUE(tok->IsSpecial(*first + static_cast<int32_t>(i)));
  }
  EXPECT_EQ(files->bos_id, *first);
  EXPECT_EQ(files->end_of_text_id, *tok->TokenToId(kEndOfText));
  EXPECT_EQ(files->eos_id, *tok->TokenToId(kEotId));
  EXPECT_EQ(files->pad_id, *tok->TokenToId(kFinetuneRightPadId));
  EXPECT_EQ(tok->bos_id(), files->bos_id);
  EXPECT_EQ(tok->eos_id(), files->eos_id);
  EXPECT_EQ(tok->pad_id(), files->pad_id);
  // The reserved fill runs to the last id.
  EXPECT_EQ(tok->IdToToken(599).value_or(""),
            "<|reserved_special_token_" + std::to_string(599 - *first - 6) + "|>");
  EXPECT_TRUE(tok->IsSpecial(599));
  EXPECT_FALSE(tok->IsSpecial(*first - 1));

  // The post-processor adds BOS; special tokens in text are split out.
  const std::vector<int32_t> with_bos = tok->Encode("hi", true);
  ASSERT_GE(with_bos.size(), 2u);
  EXPECT_EQ(with_bos.front(), files->bos_id);
  EXPECT_EQ(std::vector<int32_t>(with_bos.begin() + 1, with_bos.end()), tok->Encode("hi", false));
  const std::vector<int32_t> turn = tok->Encode(
      "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>", false);
  ASSERT_GE(turn.size(), 4u);
  EXPECT_EQ(turn.front(), *tok->TokenToId(kStartHeaderId));
  EXPECT_EQ(turn.back(), files->eos_id);
  EXPECT_EQ(tok->Decode(turn, true), "user\n\nHi");

  // tokenizer_config.json: the Llama 3 chat template and BOS/EOS names.
  EXPECT_EQ(tok->config().chat_template.value_or(""), kLlama3ChatTemplate);
  EXPECT_EQ(tok->config().bos_token.value_or(""), kBeginOfText);
  EXPECT_EQ(tok->config().eos_token.value_or(""), kEotId);
}

TEST(BpeTrainerTest, TrainingIsDeterministicAndIgnoresCorpusOrder) {
  BpeTrainerOptions options;
  options.vocab_size = 700;
  auto a = TrainLlama3Tokenizer(TrainingCorpus(), options);
  auto b = TrainLlama3Tokenizer(TrainingCorpus(), options);
  std::vector<std::string> reversed = TrainingCorpus();
  std::reverse(reversed.begin(), reversed.end());
  auto c = TrainLlama3Tokenizer(reversed, options);
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  EXPECT_EQ(a->tokenizer_json, b->tokenizer_json);
  EXPECT_EQ(a->tokenizer_json, c->tokenizer_json);
  EXPECT_EQ(a->tokenizer_config_json, c->tokenizer_config_json);
}

TEST(BpeTrainerTest, MergesFollowCountsThenTheTieRule) {
  // Pre-tokens: "xy" x3, "ab" x2, "cd" x2 (each string is one pre-token).
  const std::vector<std::string> corpus = {"xy", "xy", "xy", "cd", "ab", "cd", "ab"};
  BpeTrainerOptions options;
  options.vocab_size = 256 + 6 + 3;
  options.min_frequency = 1;
  auto bpe = TrainByteLevelBpe(corpus, options);
  ASSERT_TRUE(bpe.ok()) << bpe.status().ToString();
  ASSERT_EQ(bpe->merges.size(), 3u);
  // Highest count first, then the tie ("ab" vs "cd", 2 each) by smaller left id.
  EXPECT_EQ(bpe->tokens[bpe->merges[0].merged], "xy");
  EXPECT_EQ(bpe->tokens[bpe->merges[1].merged], "ab");
  EXPECT_EQ(bpe->tokens[bpe->merges[2].merged], "cd");
  EXPECT_EQ(bpe->merges[1].left, 'a');
  EXPECT_EQ(bpe->merges[1].right, 'b');
  EXPECT_EQ(bpe->merges[0].merged, 256);

  // min_frequency stops training: only "xy" occurs 3 times; the rest of the
  // vocabulary becomes reserved special tokens.
  options.min_frequency = 3;
  options.vocab_size = 300;
  auto few = TrainLlama3Tokenizer(corpus, options);
  ASSERT_TRUE(few.ok());
  auto tok = Load(*few);
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->vocab_size(), 300);
  EXPECT_EQ(tok->Encode("xy", false), std::vector<int32_t>({256}));
  EXPECT_EQ(tok->Encode("ab", false), std::vector<int32_t>({'a', 'b'}));
  EXPECT_EQ(few->bos_id, 257);
}

TEST(BpeTrainerTest, RepeatedPairsMergeLeftToRight) {
  // "aaaaa" x2: (a,a) merges to "aa" giving [aa, aa, a]; then (aa,aa) and
  // (aa,a) tie at 2 and the smaller right id ('a' = 97 < 256) wins: "aaa",
  // giving [aa, aaa]; then (aa, aaa).
  auto bpe = TrainByteLevelBpe({"aaaaa", "aaaaa"}, {262 + 3, 2});
  ASSERT_TRUE(bpe.ok()) << bpe.status().ToString();
  ASSERT_EQ(bpe->merges.size(), 3u);
  EXPECT_EQ(bpe->tokens[bpe->merges[0].merged], "aa");
  EXPECT_EQ(bpe->tokens[bpe->merges[1].merged], "aaa");
  EXPECT_EQ(bpe->tokens[bpe->merges[2].merged], "aaaaa");
}

// The obvious algorithm: recount every pair of every word before each merge.
std::vector<TrainedBpe::Merge> NaiveMerges(const std::vector<std::string>& words_in,
                                           size_t max_tokens, int64_t min_frequency) {
  std::map<std::string, int64_t> counts;
  for (const std::string& w : words_in) ++counts[w];
  std::vector<std::pair<std::vector<int32_t>, int64_t>> words;
  for (const auto& [w, c] : counts) {
    std::vector<int32_t> s;
    for (unsigned char ch : w) s.push_back(ch);
    words.push_back({s, c});
  }
  std::vector<std::string> tokens;
  for (int b = 0; b < 256; ++b) tokens.emplace_back(1, static_cast<char>(b));
  std::vector<TrainedBpe::Merge> merges;
  while (tokens.size() < max_tokens) {
    std::map<std::pair<int32_t, int32_t>, int64_t> pairs;  // ordered by (left, right)
    for (const auto& [s, c] : words) {
      for (size_t j = 0; j + 1 < s.size(); ++j) pairs[{s[j], s[j + 1]}] += c;
    }
    std::pair<int32_t, int32_t> best{-1, -1};
    int64_t best_count = 0;
    for (const auto& [p, c] : pairs) {
      if (c > best_count) {  // strict: the first (smallest) pair wins ties
        best = p;
        best_count = c;
      }
    }
    if (best_count < min_frequency || best_count == 0) break;
    const std::string bytes = tokens[best.first] + tokens[best.second];
    int32_t merged = -1;
    for (size_t i = 0; i < tokens.size(); ++i) {
      if (tokens[i] == bytes) merged = static_cast<int32_t>(i);
    }
    if (merged < 0) {
      merged = static_cast<int32_t>(tokens.size());
      tokens.push_back(bytes);
    }
    merges.push_back({best.first, best.second, merged});
    for (auto& [s, c] : words) {
      std::vector<int32_t> out;
      for (size_t j = 0; j < s.size(); ++j) {
        if (j + 1 < s.size() && s[j] == best.first && s[j + 1] == best.second) {
          out.push_back(merged);
          ++j;
        } else {
          out.push_back(s[j]);
        }
      }
      s = out;
    }
  }
  return merges;
}

TEST(BpeTrainerTest, MergesEqualTheNaiveAlgorithm) {
  // Random words over a small alphabet (many ties, repeated and overlapping
  // pairs, merges that spell existing tokens), each string one pre-token.
  std::mt19937 rng(7);
  std::vector<std::string> corpus;
  for (int i = 0; i < 600; ++i) {
    std::string w;
    const int len = 1 + static_cast<int>(rng() % 9);
    for (int j = 0; j < len; ++j) w += "abcab"[rng() % 5];
    corpus.push_back(w);
  }
  for (int64_t min_frequency : {1, 2, 5}) {
    BpeTrainerOptions options;
    options.vocab_size = 256 + 6 + 120;
    options.min_frequency = min_frequency;
    auto bpe = TrainByteLevelBpe(corpus, options);
    ASSERT_TRUE(bpe.ok()) << bpe.status().ToString();
    const std::vector<TrainedBpe::Merge> want = NaiveMerges(corpus, 256 + 120, min_frequency);
    ASSERT_EQ(bpe->merges.size(), want.size()) << "min_frequency " << min_frequency;
    ASSERT_GT(want.size(), 20u);
    for (size_t i = 0; i < want.size(); ++i) {
      ASSERT_EQ(bpe->merges[i].left, want[i].left) << "merge " << i;
      ASSERT_EQ(bpe->merges[i].right, want[i].right) << "merge " << i;
      ASSERT_EQ(bpe->merges[i].merged, want[i].merged) << "merge " << i;
    }
  }
}

TEST(BpeTrainerTest, BadInputsAreErrors) {
  auto small = TrainByteLevelBpe({"x"}, {100, 2});
  ASSERT_FALSE(small.ok());
  EXPECT_NE(small.status().message().find("vocab_size (100)"), std::string::npos)
      << small.status().message();
  auto freq = TrainByteLevelBpe({"x"}, {512, 0});
  ASSERT_FALSE(freq.ok());
  EXPECT_NE(freq.status().message().find("min_frequency (0)"), std::string::npos);
  auto utf8 = TrainByteLevelBpe({"ok", "bad \xff"}, {512, 2});
  ASSERT_FALSE(utf8.ok());
  EXPECT_NE(utf8.status().message().find("corpus string 1"), std::string::npos)
      << utf8.status().message();
}

// The written JSON has the shape of the real Llama 3.1 files: the same
// pre-tokenizer, decoder and post-processor (up to the BOS id), the same
// BPE flags and added-token fields, and the same chat template.
TEST(BpeTrainerTest, LayoutMatchesTheRealLlama3Files) {
  std::string missing;
  const std::string dir = test_data::TokenizerDir("llama3_1", &missing);
  if (dir.empty()) GTEST_SKIP() << missing;
  std::ifstream tin(dir + "/tokenizer.json"), cin(dir + "/tokenizer_config.json");
  const json real = json::parse(tin);
  const json real_cfg = json::parse(cin);

  auto files = TrainLlama3Tokenizer(TrainingCorpus(), {512, 2});
  ASSERT_TRUE(files.ok());
  const json ours = json::parse(files->tokenizer_json);
  const json ours_cfg = json::parse(files->tokenizer_config_json);

  EXPECT_EQ(ours["pre_tokenizer"], real["pre_tokenizer"]);
  EXPECT_EQ(ours["decoder"], real["decoder"]);
  EXPECT_EQ(ours["normalizer"], real["normalizer"]);
  json real_post = real["post_processor"];
  json& real_special = real_post["processors"][1]["special_tokens"][kBeginOfText]["ids"];
  ASSERT_EQ(real_special, json::array({128000}));
  real_special = json::array({files->bos_id});
  EXPECT_EQ(ours["post_processor"], real_post);
  for (const char* key : {"type", "dropout", "unk_token", "continuing_subword_prefix",
                          "end_of_word_suffix", "fuse_unk", "byte_fallback", "ignore_merges"}) {
    EXPECT_EQ(ours["model"][key], real["model"][key]) << key;
  }
  json real_added = real["added_tokens"][0];
  json our_added = ours["added_tokens"][0];
  real_added.erase("id");
  our_added.erase("id");
  EXPECT_EQ(our_added, real_added);
  EXPECT_EQ(ours_cfg["chat_template"], real_cfg["chat_template"]);
  EXPECT_EQ(ours_cfg["bos_token"], real_cfg["bos_token"]);
  EXPECT_EQ(ours_cfg["eos_token"], real_cfg["eos_token"]);
  EXPECT_EQ(ours_cfg["tokenizer_class"], real_cfg["tokenizer_class"]);
  // The byte tokens are spelled as in the real vocab.
  EXPECT_EQ(ours["model"]["vocab"]["Ġ"], ' ');
  EXPECT_TRUE(real["model"]["vocab"].contains("Ġ"));
}

}  // namespace
}  // namespace ftune::data
