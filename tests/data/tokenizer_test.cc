// Unit tests of the tokenizer's pieces on small, hand-built tokenizers: the
// byte map, UTF-8 repair, BPE merge order (against a naive reference),
// ignore_merges, byte fallback and unk fusing, added-token splitting, the
// Onig -> PCRE2 regex rewrite, decoders, post-processors and load errors.
// Parity with HF on the real Llama files is tokenizer_golden_test.
#include <algorithm>
#include <climits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "worker/data/added_vocabulary.h"
#include "worker/data/bpe.h"
#include "worker/data/byte_level.h"
#include "worker/data/regex.h"
#include "worker/data/tokenizer.h"
#include "worker/data/utf8.h"

namespace ftune::data {
namespace {

using json = nlohmann::json;
using Ids = std::vector<int32_t>;

// ---------------------------------------------------------------- byte map

TEST(ByteLevelTest, MapIsTheGpt2Bijection) {
  std::vector<bool> seen(0x200, false);
  for (int b = 0; b < 256; ++b) {
    const uint32_t cp = ByteToCodePoint(static_cast<uint8_t>(b));
    ASSERT_LT(cp, 0x200u);
    EXPECT_FALSE(seen[cp]) << "two bytes map to U+" << std::hex << cp;
    seen[cp] = true;
    EXPECT_EQ(CodePointToByte(cp), b);
  }
  EXPECT_EQ(ByteToCodePoint(' '), 0x120u);   // 'Ġ'
  EXPECT_EQ(ByteToCodePoint('\n'), 0x10Au);  // 'Ċ'
  EXPECT_EQ(ByteToCodePoint('A'), static_cast<uint32_t>('A'));
  EXPECT_EQ(ByteToCodePoint(0xE9), 0xE9u);   // printable Latin-1 maps to itself
  EXPECT_EQ(ByteToCodePoint(0xAD), 0x143u);  // soft hyphen: the last of the 68
  EXPECT_EQ(CodePointToByte(0x4E2D), -1);
}

TEST(ByteLevelTest, StringsRoundTrip) {
  EXPECT_EQ(BytesToByteLevel("hi there\n"), "hi\xC4\xA0there\xC4\x8A");
  std::string bytes;
  ASSERT_TRUE(ByteLevelToBytes("hi\xC4\xA0there\xC4\x8A", &bytes));
  EXPECT_EQ(bytes, "hi there\n");
  const std::string utf8 = "\xE4\xB8\xAD";  // 中: three bytes, three mapped chars
  ASSERT_TRUE(ByteLevelToBytes(BytesToByteLevel(utf8), &bytes));
  EXPECT_EQ(bytes, utf8);
  EXPECT_FALSE(ByteLevelToBytes("\xE4\xB8\xAD", &bytes));  // 中 is not in the map
}

// -------------------------------------------------------------------- UTF-8

TEST(Utf8Test, LossyReplacesMaximalSubpartsLikeRust) {
  const std::string fffd = "\xEF\xBF\xBD";
  const auto lossy = [](const std::string& s) {
    std::string out;
    AppendUtf8Lossy(s, &out);
    return out;
  };
  EXPECT_EQ(lossy("ok \xE4\xB8\xAD"), "ok \xE4\xB8\xAD");
  EXPECT_EQ(lossy("\xF0\x9F\x98"), fffd);                 // truncated emoji: one
  EXPECT_EQ(lossy("\xC0\x80"), fffd + fffd);              // overlong: lead and tail
  EXPECT_EQ(lossy("\xED\xA0\x80"), fffd + fffd + fffd);   // surrogate
  EXPECT_EQ(lossy("\xE2\x82" "A"), fffd + "A");
  EXPECT_EQ(lossy("\xFF\xFE"), fffd + fffd);
  EXPECT_EQ(lossy("\xF4\x90\x80\x80"), fffd + fffd + fffd + fffd);  // > U+10FFFF
  EXPECT_TRUE(IsValidUtf8("plain ascii that is longer than eight bytes \xF0\x9F\x98\x80"));
  EXPECT_FALSE(IsValidUtf8("plain ascii that is longer than eight bytes \xF0\x9F\x98"));
}

TEST(Utf8Test, WhiteSpaceIsUnicodeWhiteSpace) {
  for (uint32_t cp : {0x09u, 0x0Au, 0x0Du, 0x20u, 0x85u, 0xA0u, 0x1680u, 0x2000u, 0x200Au,
                      0x2028u, 0x202Fu, 0x3000u}) {
    EXPECT_TRUE(IsWhiteSpace(cp)) << std::hex << cp;
  }
  for (uint32_t cp : {0x08u, 0x1Cu, 0x180Eu, 0x200Bu, 0xFEFFu, 0x41u}) {
    EXPECT_FALSE(IsWhiteSpace(cp)) << std::hex << cp;
  }
}

// ------------------------------------------------------------------- regex

TEST(RegexTest, WhitespaceClassesFollowOniguruma) {
  Result<std::string> translated = TranslateOnigPattern("\\s+(?!\\S)|[^\\s\\p{L}]");
  ASSERT_TRUE(translated.ok());
  EXPECT_EQ(translated->find("\\s"), std::string::npos) << *translated;
  EXPECT_EQ(translated->find("\\S"), std::string::npos) << *translated;

  Result<std::unique_ptr<Regex>> ws = Regex::Compile("\\s+");
  ASSERT_TRUE(ws.ok()) << ws.status().ToString();
  std::vector<std::pair<uint32_t, uint32_t>> matches;
  (*ws)->FindAll("a\xE1\xA0\x8E" "b", &matches);  // U+180E: not White_Space (PCRE2 says it is)
  EXPECT_TRUE(matches.empty());
  (*ws)->FindAll("a\xC2\x85\xE3\x80\x80" "b", &matches);  // NEL + ideographic space
  ASSERT_EQ(matches.size(), 1u);
  EXPECT_EQ(matches[0], std::make_pair(1u, 6u));
  EXPECT_FALSE(TranslateOnigPattern("[a-z&&[^aeiou]]").ok());
  EXPECT_FALSE(TranslateOnigPattern("[\\S]").ok());
}

TEST(RegexTest, FindAllIsLeftToRightAndNonOverlapping) {
  Result<std::unique_ptr<Regex>> re =
      Regex::Compile("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}");
  ASSERT_TRUE(re.ok());
  std::vector<std::pair<uint32_t, uint32_t>> m;
  const std::string text = "I'M 12345";
  (*re)->FindAll(text, &m);
  std::vector<std::string> pieces;
  for (auto [s, e] : m) pieces.push_back(text.substr(s, e - s));
  EXPECT_EQ(pieces, (std::vector<std::string>{"I", "'M", "123", "45"}));
}

// --------------------------------------------------------------------- BPE

// A char-level BPE over `vocab` (ids by position) with merges by rank.
struct SmallBpe {
  std::vector<std::string> vocab;
  std::vector<std::pair<std::string, std::string>> merges;

  int32_t Id(const std::string& s) const {
    auto it = std::find(vocab.begin(), vocab.end(), s);
    return it == vocab.end() ? -1 : static_cast<int32_t>(it - vocab.begin());
  }

  std::unique_ptr<BpeModel> Build(BpeOptions options) const {
    StringIdMap v;
    for (size_t i = 0; i < vocab.size(); ++i) v.Set(vocab[i], static_cast<int32_t>(i));
    MergeMap m;
    for (size_t r = 0; r < merges.size(); ++r) {
      m.Insert(Id(merges[r].first), Id(merges[r].second),
               MergeMap::Merge{static_cast<int32_t>(r), Id(merges[r].first + merges[r].second)});
    }
    return std::make_unique<BpeModel>(options, std::move(v), std::move(m));
  }

  // The textbook algorithm: merge the lowest-rank adjacent pair, leftmost
  // first, until none merges.
  Ids Reference(const std::string& word) const {
    std::vector<std::string> syms;
    for (char c : word) syms.emplace_back(1, c);
    while (true) {
      int best = -1, best_rank = INT_MAX;
      for (size_t i = 0; i + 1 < syms.size(); ++i) {
        for (size_t r = 0; r < merges.size(); ++r) {
          if (merges[r].first == syms[i] && merges[r].second == syms[i + 1]) {
            if (static_cast<int>(r) < best_rank) {
              best_rank = static_cast<int>(r);
              best = static_cast<int>(i);
            }
            break;
          }
        }
      }
      if (best < 0) break;
      syms[best] += syms[best + 1];
      syms.erase(syms.begin() + best + 1);
    }
    Ids ids;
    for (const auto& s : syms) ids.push_back(Id(s));
    return ids;
  }
};

TEST(BpeTest, MergesByRankLeftmostFirst) {
  SmallBpe bpe{{"a", "b", "c", "ab", "bc", "abc", "aa", "aaaa"},
               {{"b", "c"}, {"a", "b"}, {"a", "bc"}, {"a", "a"}, {"aa", "aa"}}};
  auto model = bpe.Build({});
  Ids ids;
  model->Tokenize("abc", &ids);  // (b,c) ranks before (a,b): a + bc -> abc
  EXPECT_EQ(ids, Ids{bpe.Id("abc")});
  ids.clear();
  model->Tokenize("aaa", &ids);  // the leftmost (a,a) merges first: aa + a
  EXPECT_EQ(ids, (Ids{bpe.Id("aa"), bpe.Id("a")}));
  ids.clear();
  model->Tokenize("aaaa", &ids);
  EXPECT_EQ(ids, Ids{bpe.Id("aaaa")});
}

TEST(BpeTest, ScanAndHeapPathsAgreeWithReference) {
  // Random merges over a 4-letter alphabet; words short (array scan) and
  // long (heap) must both give the textbook answer.
  std::mt19937 rng(7);
  SmallBpe bpe;
  bpe.vocab = {"a", "b", "c", "d"};
  for (int k = 0; k < 60; ++k) {
    const std::string l = bpe.vocab[rng() % bpe.vocab.size()];
    const std::string r = bpe.vocab[rng() % bpe.vocab.size()];
    if (l.size() + r.size() > 8 || bpe.Id(l + r) >= 0) continue;
    bpe.vocab.push_back(l + r);
    bpe.merges.emplace_back(l, r);
  }
  for (size_t cache : {size_t{0}, size_t{1} << 10}) {
    BpeOptions options;
    options.cache_capacity = cache;
    auto model = bpe.Build(options);
    for (int trial = 0; trial < 300; ++trial) {
      const size_t n = 1 + rng() % (trial % 2 ? 300 : BpeModel::kScanLimit);
      std::string word;
      for (size_t i = 0; i < n; ++i) word.push_back("abcd"[rng() % 4]);
      Ids ids;
      model->Tokenize(word, &ids);
      ASSERT_EQ(ids, bpe.Reference(word)) << word;
      ids.clear();
      model->Tokenize(word, &ids);  // second time: from the cache when on
      ASSERT_EQ(ids, bpe.Reference(word)) << word;
    }
  }
}

TEST(BpeTest, IgnoreMergesEmitsAVocabPieceWhole) {
  // "abc" is in the vocab but no merge chain reaches it.
  SmallBpe bpe{{"a", "b", "c", "ab", "abc"}, {{"a", "b"}}};
  BpeOptions options;
  Ids ids;
  bpe.Build(options)->Tokenize("abc", &ids);
  EXPECT_EQ(ids, (Ids{bpe.Id("ab"), bpe.Id("c")}));
  options.ignore_merges = true;
  ids.clear();
  bpe.Build(options)->Tokenize("abc", &ids);
  EXPECT_EQ(ids, Ids{bpe.Id("abc")});
}

TEST(BpeTest, ByteFallbackAndUnk) {
  SmallBpe bpe{{"<unk>", "<0xC3>", "<0xA9>", "a"}, {}};
  BpeOptions options;
  options.unk_id = 0;
  options.byte_fallback = true;
  Ids ids;
  bpe.Build(options)->Tokenize("a\xC3\xA9" "a", &ids);  // "aéa": é has no token, its bytes do
  EXPECT_EQ(ids, (Ids{3, 1, 2, 3}));

  options.byte_fallback = false;
  ids.clear();
  bpe.Build(options)->Tokenize("xya", &ids);  // two unknown chars: two unks
  EXPECT_EQ(ids, (Ids{0, 0, 3}));
  options.fuse_unk = true;
  ids.clear();
  bpe.Build(options)->Tokenize("xya", &ids);  // fused into one
  EXPECT_EQ(ids, (Ids{0, 3}));
}

// ----------------------------------------------------------- added tokens

std::vector<std::string> Pieces(const AddedVocabulary& added, const std::string& text) {
  std::vector<AddedVocabulary::Segment> segments;
  added.Split(text, false, &segments);
  std::vector<std::string> out;
  for (const auto& s : segments) {
    out.push_back((s.id >= 0 ? "#" : "") + text.substr(s.start, s.end - s.start));
  }
  return out;
}

TEST(AddedVocabularyTest, LeftmostLongestMatch) {
  AddedVocabulary added({{10, "<a>"}, {11, "<a><b>"}, {12, "<b>"}}, nullptr);
  EXPECT_EQ(Pieces(added, "x<a><b>y<b><a>"),
            (std::vector<std::string>{"x", "#<a><b>", "y", "#<b>", "#<a>"}));
  EXPECT_EQ(Pieces(added, "<a"), (std::vector<std::string>{"<a"}));
  EXPECT_EQ(Pieces(added, ""), (std::vector<std::string>{""}));
}

TEST(AddedVocabularyTest, SingleWordAndStrip) {
  AddedToken hi{20, "hi"};
  hi.single_word = true;
  AddedToken mask{21, "<m>"};
  mask.lstrip = true;
  mask.rstrip = true;
  AddedVocabulary added({hi, mask}, nullptr);
  EXPECT_EQ(Pieces(added, "hi there, this hi_x (hi)"),
            (std::vector<std::string>{"#hi", " there, this hi_x (", "#hi", ")"}));
  EXPECT_EQ(Pieces(added, "a \t<m>  b"), (std::vector<std::string>{"a", "# \t<m>  ", "b"}));
}

// ------------------------------------------------------- whole tokenizers

// A byte-level BPE tokenizer.json: every byte, a few merges, special tokens.
json ByteLevelJson() {
  json vocab = json::object();
  int32_t id = 0;
  for (int b = 0; b < 256; ++b) vocab[BytesToByteLevel(std::string(1, static_cast<char>(b)))] = id++;
  const std::vector<std::pair<std::string, std::string>> merges = {
      {"h", "e"}, {"l", "l"}, {"he", "ll"}, {"hell", "o"}, {"\xC4\xA0", "w"}};
  json merge_list = json::array();
  for (const auto& [a, b] : merges) {
    vocab[a + b] = id++;
    merge_list.push_back(a + " " + b);
  }
  return {
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens",
       {{{"id", 300}, {"content", "<|bos|>"}, {"special", true}, {"normalized", false}},
        {{"id", 301}, {"content", "<|user|>"}, {"special", false}, {"normalized", false}}}},
      {"normalizer", nullptr},
      {"pre_tokenizer",
       {{"type", "Sequence"},
        {"pretokenizers",
         {{{"type", "Split"},
           {"pattern", {{"Regex", " ?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"}}},
           {"behavior", "Isolated"},
           {"invert", false}},
          {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}}},
      {"post_processor",
       {{"type", "TemplateProcessing"},
        {"single", {{{"SpecialToken", {{"id", "<|bos|>"}, {"type_id", 0}}}},
                    {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
        {"special_tokens", {{"<|bos|>", {{"id", "<|bos|>"}, {"ids", {300}}, {"tokens", {"<|bos|>"}}}}}}}},
      {"decoder", {{"type", "ByteLevel"}}},
      {"model",
       {{"type", "BPE"}, {"vocab", vocab}, {"merges", merge_list}, {"ignore_merges", true}}}};
}

std::unique_ptr<Tokenizer> Make(const json& j, const std::string& config = "") {
  Result<std::unique_ptr<Tokenizer>> t = Tokenizer::FromJson(j.dump(), config, "test");
  EXPECT_TRUE(t.ok()) << t.status().ToString();
  return t.ok() ? std::move(t).value() : nullptr;
}

TEST(TokenizerTest, ByteLevelPipeline) {
  auto tok = Make(ByteLevelJson());
  ASSERT_NE(tok, nullptr);
  const int32_t hello = *tok->TokenToId("hello");
  const int32_t space_w = *tok->TokenToId("\xC4\xA0w");
  // "hello world": pieces "hello", " world" -> hello | Ġw o r l d
  EXPECT_EQ(tok->Encode("hello world", false),
            (Ids{hello, space_w, 'o', 'r', 'l', 'd'}));
  EXPECT_EQ(tok->Encode("hello", true), (Ids{300, hello}));
  EXPECT_EQ(tok->Encode("<|bos|>hello<|user|>", false), (Ids{300, hello, 301}));
  EXPECT_EQ(tok->Decode(tok->Encode("hi\n\xE4\xB8\xAD", true), false), "<|bos|>hi\n\xE4\xB8\xAD");
  EXPECT_EQ(tok->Decode(tok->Encode("<|bos|>a<|user|>", false), true), "a<|user|>");
  EXPECT_EQ(tok->vocab_size(), 302);
  EXPECT_TRUE(tok->IsSpecial(300));
  EXPECT_FALSE(tok->IsSpecial(301));
  // A lone byte of a multi-byte character decodes to U+FFFD; unknown ids
  // are dropped.
  EXPECT_EQ(tok->Decode({0xE4, 99999}, false), "\xEF\xBF\xBD");
}

TEST(TokenizerTest, InvalidUtf8IsEncodedAsReplacementCharacters) {
  auto tok = Make(ByteLevelJson());
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->Encode("a\xFF\xC0" "b", false), tok->Encode("a\xEF\xBF\xBD\xEF\xBF\xBD" "b", false));
  EXPECT_EQ(tok->Encode(std::string("a\0b", 3), false).size(), 3u);
}

// SentencePiece-style BPE like Llama 2: Prepend + Replace normalizer, byte
// fallback, Replace/ByteFallback/Fuse/Strip decoder.
json SentencePieceJson() {
  json vocab = {{"<unk>", 0}, {"<s>", 1}, {"</s>", 2}};
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    vocab[name] = 3 + b;
  }
  int32_t id = 259;
  for (const char* t : {"\xE2\x96\x81", "h", "i", "\xE2\x96\x81h", "\xE2\x96\x81hi"}) vocab[t] = id++;
  return {{"added_tokens",
           {{{"id", 0}, {"content", "<unk>"}, {"special", true}, {"normalized", false}},
            {{"id", 1}, {"content", "<s>"}, {"special", true}, {"normalized", false}},
            {{"id", 2}, {"content", "</s>"}, {"special", true}, {"normalized", false}}}},
          {"normalizer",
           {{"type", "Sequence"},
            {"normalizers",
             {{{"type", "Prepend"}, {"prepend", "\xE2\x96\x81"}},
              {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", "\xE2\x96\x81"}}}}}},
          {"pre_tokenizer", nullptr},
          {"post_processor",
           {{"type", "TemplateProcessing"},
            {"single", {{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}},
                        {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
            {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {1}}, {"tokens", {"<s>"}}}}}}}},
          {"decoder",
           {{"type", "Sequence"},
            {"decoders",
             {{{"type", "Replace"}, {"pattern", {{"String", "\xE2\x96\x81"}}}, {"content", " "}},
              {{"type", "ByteFallback"}},
              {{"type", "Fuse"}},
              {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}}}}},
          {"model",
           {{"type", "BPE"},
            {"unk_token", "<unk>"},
            {"fuse_unk", true},
            {"byte_fallback", true},
            {"vocab", vocab},
            {"merges", {"\xE2\x96\x81 h", "\xE2\x96\x81h i"}}}}};
}

TEST(TokenizerTest, SentencePiecePipeline) {
  auto tok = Make(SentencePieceJson(), R"({"bos_token": {"content": "<s>"}, "eos_token": "</s>",
                                         "add_bos_token": true, "add_eos_token": false})");
  ASSERT_NE(tok, nullptr);
  const int32_t hi = 263, space = 259;
  EXPECT_EQ(tok->Encode("hi", true), (Ids{1, hi}));
  // "hi é": ▁hi ▁ then é by byte fallback (C3 A9).
  EXPECT_EQ(tok->Encode("hi \xC3\xA9", false), (Ids{hi, space, 3 + 0xC3, 3 + 0xA9}));
  // Each text run between added tokens is normalized on its own, so "hi"
  // after <s> gets its own "▁" (HF's behaviour for these files).
  EXPECT_EQ(tok->Encode("<s>hi", false), (Ids{1, hi}));
  EXPECT_EQ(tok->Decode({1, hi, space, 3 + 0xC3, 3 + 0xA9}, false), "<s> hi \xC3\xA9");
  EXPECT_EQ(tok->Decode({1, hi, space, 3 + 0xC3, 3 + 0xA9}, true), "hi \xC3\xA9");
  // A byte run that is not UTF-8: one U+FFFD per byte (ByteFallback's rule).
  EXPECT_EQ(tok->Decode({hi, 3 + 0xC3, 3 + 0xC3}, false), "hi\xEF\xBF\xBD\xEF\xBF\xBD");
  EXPECT_EQ(tok->bos_id(), 1);
  EXPECT_EQ(tok->eos_id(), 2);
  EXPECT_EQ(tok->config().add_bos_token, true);
  EXPECT_EQ(tok->config().add_eos_token, false);
}

TEST(TokenizerTest, MetaspacePreTokenizerAndDecoder) {
  json j = SentencePieceJson();
  j["normalizer"] = nullptr;
  j["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", "\xE2\x96\x81"},
                        {"prepend_scheme", "first"}, {"split", true}};
  j["decoder"] = {{"type", "Metaspace"}, {"replacement", "\xE2\x96\x81"}, {"prepend_scheme", "first"}};
  auto tok = Make(j);
  ASSERT_NE(tok, nullptr);
  const int32_t h = 260, i = 261, hi = 263;
  EXPECT_EQ(tok->Encode("hi hi", false), (Ids{hi, hi}));
  // "first": only the run at the start of the input gets the prefix.
  EXPECT_EQ(tok->Encode("<s>hi", false), (Ids{1, h, i}));
  EXPECT_EQ(tok->Decode({hi, hi}, false), "hi hi");
}

TEST(TokenizerTest, LoadErrorsNameFileAndComponent) {
  Result<std::unique_ptr<Tokenizer>> missing = Tokenizer::Load("/nonexistent/model");
  ASSERT_FALSE(missing.ok());
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("/nonexistent/model/tokenizer.json"), std::string::npos);

  const auto error = [](const json& j, const std::string& config = "") {
    Result<std::unique_ptr<Tokenizer>> t = Tokenizer::FromJson(j.dump(), config, "dir");
    return t.ok() ? std::string("loaded") : t.status().message();
  };
  Result<std::unique_ptr<Tokenizer>> bad = Tokenizer::FromJson("{\"model\": ", "", "dir");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("dir/tokenizer.json: malformed JSON"), std::string::npos)
      << bad.status().message();

  json j = ByteLevelJson();
  j["model"]["type"] = "Unigram";
  EXPECT_NE(error(j).find("dir/tokenizer.json: model type \"Unigram\" is not supported"),
            std::string::npos);
  j = ByteLevelJson();
  j["normalizer"] = {{"type", "NFKC"}};
  EXPECT_NE(error(j).find("normalizer type \"NFKC\" is not supported"), std::string::npos);
  j = ByteLevelJson();
  j["pre_tokenizer"] = {{"type", "Whitespace"}};
  EXPECT_NE(error(j).find("pre_tokenizer type \"Whitespace\" is not supported"), std::string::npos);
  j = ByteLevelJson();
  j["decoder"] = {{"type", "WordPiece"}};
  EXPECT_NE(error(j).find("decoder type \"WordPiece\" is not supported"), std::string::npos);
  j = ByteLevelJson();
  j["post_processor"] = {{"type", "BertProcessing"}};
  EXPECT_NE(error(j).find("post_processor type \"BertProcessing\""), std::string::npos);
  j = ByteLevelJson();
  j["padding"] = {{"strategy", "BatchLongest"}};
  EXPECT_NE(error(j).find("\"padding\" is set"), std::string::npos);
  j = ByteLevelJson();
  j["model"]["merges"].push_back("nota merge");
  EXPECT_NE(error(j).find("merge 6"), std::string::npos);
  EXPECT_NE(error(ByteLevelJson(), "{oops").find("dir/tokenizer_config.json: malformed JSON"),
            std::string::npos);
  EXPECT_EQ(error(ByteLevelJson(), "{\"bos_token\": \"<|bos|>\"}"), "loaded");
}

}  // namespace
}  // namespace ftune::data
