// See text_stream.h.
#include "worker/data/text_stream.h"

#include <string_view>

namespace ftune::data {

bool EndsWithReplacementCharacter(const std::string& text) {
  return std::string_view(text).size() >= 3 && text.compare(text.size() - 3, 3, "\xEF\xBF\xBD") == 0;
}

TextStream::TextStream(const Tokenizer& tokenizer, bool skip_special_tokens)
    : tokenizer_(tokenizer), skip_special_tokens_(skip_special_tokens) {}

std::string TextStream::DecodeRange(size_t begin, size_t end) const {
  return tokenizer_.Decode(std::vector<int32_t>(ids_.begin() + begin, ids_.begin() + end),
                           skip_special_tokens_);
}

std::string TextStream::Push(int32_t id) {
  ids_.push_back(id);
  const std::string before = DecodeRange(prefix_offset_, read_offset_);
  const std::string now = DecodeRange(prefix_offset_, ids_.size());
  // Nothing new yet (a special token, or an id that only extends a held
  // character), or an unfinished character at the end: hold.
  if (now.size() <= before.size() || EndsWithReplacementCharacter(now) ||
      now.compare(0, before.size(), before) != 0) {
    return std::string();
  }
  prefix_offset_ = read_offset_;
  read_offset_ = ids_.size();
  return now.substr(before.size());
}

std::string TextStream::Finish() {
  const std::string before = DecodeRange(prefix_offset_, read_offset_);
  const std::string now = DecodeRange(prefix_offset_, ids_.size());
  prefix_offset_ = read_offset_ = ids_.size();
  if (now.size() >= before.size() && now.compare(0, before.size(), before) == 0) {
    return now.substr(before.size());
  }
  return now;  // not an extension of what was shown: best effort
}

}  // namespace ftune::data
