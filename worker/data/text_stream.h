// Incremental detokenization: the text of generated ids as it becomes final,
// one chunk per id, never half a UTF-8 character.
//
// Decoding ids one at a time and concatenating is wrong twice over: a
// byte-level token (Llama 3) or a byte-fallback token (<0xE2>, Llama 2) may
// hold part of a UTF-8 sequence, which Decode turns into U+FFFD, and
// SentencePiece-style decoders drop the leading space of the first token of
// whatever they are given. So each Push decodes a short window that starts a
// little before the new ids (from the first id of the previously emitted
// chunk) and emits only what the window added past its own earlier text;
// while the window's text ends with U+FFFD (an incomplete character, most
// likely) the ids are held back until a later id completes it. Finish emits
// whatever is held, replacement characters included, so the chunks always
// concatenate to Decode(all ids) for these decoders. (This is the offset
// scheme text-generation servers use; transformers' TextStreamer re-decodes
// everything since the last newline instead.)
//
// Thread-safety: one TextStream per sequence, used by one thread; the
// Tokenizer is shared read-only.
#ifndef FTUNE_WORKER_DATA_TEXT_STREAM_H_
#define FTUNE_WORKER_DATA_TEXT_STREAM_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "worker/data/tokenizer.h"

namespace ftune::data {

class TextStream {
 public:
  // `tokenizer` must outlive the stream. Special tokens are dropped from the
  // text with skip_special_tokens, as a chat front end shows it.
  explicit TextStream(const Tokenizer& tokenizer, bool skip_special_tokens = true);

  // Adds one generated id; returns the text that became final with it
  // (often empty: held back, or a special token).
  std::string Push(int32_t id);
  // The held-back rest. Further Pushes start a new stream of the same ids.
  std::string Finish();

  const std::vector<int32_t>& ids() const { return ids_; }

 private:
  std::string DecodeRange(size_t begin, size_t end) const;

  const Tokenizer& tokenizer_;
  bool skip_special_tokens_;
  std::vector<int32_t> ids_;
  size_t prefix_offset_ = 0;  // window start: first id of the last emitted chunk
  size_t read_offset_ = 0;    // ids before this are emitted
};

// True when `text` ends with U+FFFD (EF BF BD).
bool EndsWithReplacementCharacter(const std::string& text);

}  // namespace ftune::data

#endif  // FTUNE_WORKER_DATA_TEXT_STREAM_H_
