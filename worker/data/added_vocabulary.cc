// See added_vocabulary.h.
#include "worker/data/added_vocabulary.h"

#include <algorithm>
#include <utility>

#include "worker/data/utf8.h"

namespace ftune::data {

AddedVocabulary::AddedVocabulary(std::vector<AddedToken> tokens,
                                 const std::function<std::string(std::string_view)>& normalize)
    : tokens_(std::move(tokens)) {
  for (size_t i = 0; i < tokens_.size(); ++i) {
    const AddedToken& t = tokens_[i];
    by_id_[t.id] = i;
    by_content_.emplace(t.content, t.id);
    if (t.content.empty()) continue;  // HF skips empty tokens when splitting
    if (t.normalized) {
      const std::string pattern = normalize ? normalize(t.content) : t.content;
      if (!pattern.empty()) Insert(&groups_[1], pattern, static_cast<int32_t>(i));
    } else {
      Insert(&groups_[0], t.content, static_cast<int32_t>(i));
    }
  }
  // Rust's char::is_alphanumeric is Alphabetic || Numeric.
  Result<std::unique_ptr<Regex>> word = Regex::Compile("[\\p{Alphabetic}\\p{N}_]");
  if (word.ok()) word_char_ = std::move(word).value();
}

void AddedVocabulary::Insert(Group* group, std::string_view pattern, int32_t token_index) {
  if (group->nodes.empty()) group->nodes.emplace_back();
  group->first_byte[static_cast<unsigned char>(pattern[0])] = true;
  int32_t node = 0;
  for (unsigned char c : pattern) {
    int32_t next = -1;
    for (const auto& [byte, child] : group->nodes[node].children) {
      if (byte == c) next = child;
    }
    if (next < 0) {
      next = static_cast<int32_t>(group->nodes.size());
      group->nodes[node].children.emplace_back(c, next);
      group->nodes.emplace_back();
    }
    node = next;
  }
  // Two tokens with the same content: the first listed keeps the pattern.
  if (group->nodes[node].token < 0) group->nodes[node].token = token_index;
}

size_t AddedVocabulary::LongestAt(const Group& group, std::string_view text, size_t pos,
                                  int32_t* token_index) const {
  size_t best = 0;
  int32_t node = 0;
  for (size_t i = pos; i < text.size(); ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    int32_t next = -1;
    for (const auto& [byte, child] : group.nodes[node].children) {
      if (byte == c) {
        next = child;
        break;
      }
    }
    if (next < 0) break;
    node = next;
    if (group.nodes[node].token >= 0) {
      best = i + 1 - pos;
      *token_index = group.nodes[node].token;
    }
  }
  return best;
}

bool AddedVocabulary::IsWordCharBefore(std::string_view text, size_t pos) const {
  if (pos == 0) return false;
  size_t start = pos - 1;
  while (start > 0 && (static_cast<unsigned char>(text[start]) & 0xC0) == 0x80) --start;
  return IsWordCharAt(text.substr(0, pos), start);
}

bool AddedVocabulary::IsWordCharAt(std::string_view text, size_t pos) const {
  if (pos >= text.size() || word_char_ == nullptr) return false;
  const size_t len = std::min(Utf8Length(static_cast<unsigned char>(text[pos])), text.size() - pos);
  std::vector<std::pair<uint32_t, uint32_t>> matches;
  word_char_->FindAll(text.substr(pos, len), &matches);
  return !matches.empty();
}

void AddedVocabulary::Split(std::string_view text, bool normalized_group,
                            std::vector<Segment>* segments) const {
  const auto n = static_cast<uint32_t>(text.size());
  if (n == 0) {
    segments->push_back(Segment{0, 0, -1});
    return;
  }
  const Group& group = groups_[normalized_group ? 1 : 0];
  if (group.nodes.empty()) {
    segments->push_back(Segment{0, n, -1});
    return;
  }
  uint32_t start_offset = 0;  // end of the last split emitted
  size_t pos = 0;             // where the matcher resumes: after the last match
  while (pos < n) {
    if (!group.first_byte[static_cast<unsigned char>(text[pos])]) {
      ++pos;
      continue;
    }
    int32_t index = -1;
    const size_t length = LongestAt(group, text, pos, &index);
    if (length == 0) {
      ++pos;
      continue;
    }
    auto start = static_cast<uint32_t>(pos);
    auto stop = static_cast<uint32_t>(pos + length);
    pos += length;
    const AddedToken& token = tokens_[static_cast<size_t>(index)];
    if (token.single_word && (IsWordCharBefore(text, start) || IsWordCharAt(text, stop))) continue;
    if (token.lstrip) {
      uint32_t new_start = start;
      while (new_start > 0) {
        uint32_t char_start = new_start - 1;
        while (char_start > 0 && (static_cast<unsigned char>(text[char_start]) & 0xC0) == 0x80) {
          --char_start;
        }
        size_t len;
        if (!IsWhiteSpace(DecodeUtf8At(text, char_start, &len))) break;
        new_start = char_start;
      }
      start = std::max(new_start, start_offset);
    }
    if (token.rstrip) {
      while (stop < n) {
        size_t len;
        if (!IsWhiteSpace(DecodeUtf8At(text, stop, &len))) break;
        stop += static_cast<uint32_t>(len);
      }
    }
    if (start_offset < start) segments->push_back(Segment{start_offset, start, -1});
    segments->push_back(Segment{start, stop, token.id});
    start_offset = stop;
  }
  if (start_offset != n) segments->push_back(Segment{start_offset, n, -1});
}

const AddedToken* AddedVocabulary::FindById(int32_t id) const {
  auto it = by_id_.find(id);
  return it == by_id_.end() ? nullptr : &tokens_[it->second];
}

int32_t AddedVocabulary::FindByContent(std::string_view content) const {
  auto it = by_content_.find(std::string(content));
  return it == by_content_.end() ? -1 : it->second;
}

}  // namespace ftune::data
