// TextStream on the real Llama 3 (byte-level BPE) and Llama 2 (SentencePiece
// with byte fallback) tokenizers: text with multi-byte characters that the
// tokenizers split across ids comes out in chunks that are each valid UTF-8
// without replacement characters, concatenating to Decode of all ids; ids
// that end inside a character are held back until Finish.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "tokenizer_test_data.h"
#include "worker/data/text_stream.h"
#include "worker/data/tokenizer.h"
#include "worker/data/utf8.h"

namespace ftune::data {
namespace {

// Well-formed UTF-8 with no U+FFFD: the real tokenizers' text decodes whole.
bool ValidUtf8WithoutReplacement(const std::string& s) {
  return IsValidUtf8(s) && s.find("\xEF\xBF\xBD") == std::string::npos;
}

class TextStreamTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    std::string missing;
    const std::string dir = test_data::TokenizerDir(GetParam(), &missing);
    if (dir.empty()) GTEST_SKIP() << missing;
    auto t = Tokenizer::Load(dir);
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    tok_ = std::move(t).value();
  }
  std::unique_ptr<Tokenizer> tok_;
};

TEST_P(TextStreamTest, ChunksAreWholeCharactersAndConcatenateToDecode) {
  const std::string text =
      "Llamas 🦙 live in the Andes; 骆驼 and 羊驼 differ. Ünïcödé — naïve café, "
      "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and emoji 👩‍👩‍👧 too.\n  Two  spaces.";
  std::vector<int32_t> ids = tok_->Encode(text, /*add_special_tokens=*/false);
  // A special token in the middle is dropped from the text, as Decode does.
  if (auto eos = tok_->eos_id()) ids.insert(ids.begin() + 3, *eos);
  TextStream stream(*tok_);
  std::string joined;
  int held = 0;
  for (int32_t id : ids) {
    const std::string chunk = stream.Push(id);
    EXPECT_TRUE(ValidUtf8WithoutReplacement(chunk)) << "after id " << id << ": " << chunk;
    held += chunk.empty();
    joined += chunk;
  }
  joined += stream.Finish();
  EXPECT_EQ(joined, tok_->Decode(ids, /*skip_special_tokens=*/true));
  EXPECT_EQ(joined, text);
  // Some ids carry only part of a character (the CJK and emoji bytes): the
  // stream held them back rather than print half a character.
  EXPECT_GT(held, 1);
}

TEST_P(TextStreamTest, UnfinishedCharacterIsHeldUntilFinish) {
  const std::vector<int32_t> all = tok_->Encode("ok 🦙", false);
  // Find a prefix whose decoding ends inside the emoji.
  size_t cut = 0;
  for (size_t n = 1; n < all.size(); ++n) {
    const std::string d = tok_->Decode(std::vector<int32_t>(all.begin(), all.begin() + n), true);
    if (EndsWithReplacementCharacter(d)) cut = n;
  }
  if (cut == 0) GTEST_SKIP() << GetParam() << " encodes the emoji as one id";
  TextStream stream(*tok_);
  std::string shown;
  for (size_t i = 0; i < cut; ++i) shown += stream.Push(all[i]);
  // The space is shown when it is a token of its own (Llama 2's "▁"),
  // held with the emoji's first bytes when they share a token (Llama 3).
  EXPECT_TRUE(shown == "ok" || shown == "ok ") << shown;
  const std::string rest = stream.Finish();
  EXPECT_TRUE(EndsWithReplacementCharacter(rest)) << rest;
  EXPECT_EQ(shown + rest,
            tok_->Decode(std::vector<int32_t>(all.begin(), all.begin() + cut), true));
}

INSTANTIATE_TEST_SUITE_P(RealTokenizers, TextStreamTest, ::testing::Values("llama3", "llama2"));

}  // namespace
}  // namespace ftune::data
