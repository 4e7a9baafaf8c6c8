// libFuzzer target: encoding arbitrary bytes (invalid UTF-8 included) with
// a Llama 3-shaped byte-level tokenizer and a Llama 2-shaped SentencePiece
// one (tokenizer_fuzz_common.h). Besides not crashing, the byte-level
// tokenizer must round-trip: decode(encode(x)) equals x with ill-formed
// UTF-8 replaced by U+FFFD, as HF would see it. (Its added tokens have no
// lstrip/rstrip, which swallow whitespace by design.)
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "tests/fuzz/tokenizer_fuzz_common.h"
#include "worker/data/tokenizer.h"
#include "worker/data/utf8.h"

namespace {

std::unique_ptr<ftune::data::Tokenizer> Load(const std::string& json) {
  auto tok = ftune::data::Tokenizer::FromJson(json, "", "fuzz");
  if (!tok.ok()) __builtin_trap();
  return std::move(tok).value();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::unique_ptr<ftune::data::Tokenizer> byte_level =
      Load(ftune::data::fuzz::ByteLevelTokenizerJson());
  static const std::unique_ptr<ftune::data::Tokenizer> sentence_piece =
      Load(ftune::data::fuzz::SentencePieceTokenizerJson());
  const std::string text(reinterpret_cast<const char*>(data), size);

  const auto ids = byte_level->Encode(text, false);
  std::string repaired;
  ftune::data::AppendUtf8Lossy(text, &repaired);
  if (byte_level->Decode(ids, false) != repaired) __builtin_trap();
  byte_level->Decode(byte_level->Encode(text, true), true);

  const auto sp_ids = sentence_piece->Encode(text, true);
  const std::string decoded = sentence_piece->Decode(sp_ids, false);
  if (!ftune::data::IsValidUtf8(decoded)) __builtin_trap();
  return 0;
}
