// Added tokens of a tokenizer.json (`added_tokens`: <|begin_of_text|>,
// <|eot_id|>, <s>, ...): found in the text and split out before the
// normalizer, pre-tokenizer and BPE see it, with the rules of HF's
// AddedVocabulary:
//   - matching is leftmost-longest over all tokens of a group (as HF's
//     aho-corasick with MatchKind::LeftmostLongest), resuming after each
//     match's end;
//   - `single_word`: only a match with no word character (alphanumeric or
//     '_') right before and after it counts;
//   - `lstrip` / `rstrip`: the token swallows the whitespace to its left
//     (not past the previous split) / right;
//   - `normalized`: false tokens are matched in the raw text, true ones in
//     the normalized text, against their own normalized content.
//
// Thread-safety: immutable after construction; Split may run concurrently.
#ifndef FTUNE_WORKER_DATA_ADDED_VOCABULARY_H_
#define FTUNE_WORKER_DATA_ADDED_VOCABULARY_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "worker/data/regex.h"

namespace ftune::data {

struct AddedToken {
  int32_t id = 0;
  std::string content;
  bool special = false;
  bool single_word = false;
  bool lstrip = false;
  bool rstrip = false;
  bool normalized = false;
};

class AddedVocabulary {
 public:
  // A run of the input: an added token (id >= 0) or text for the next stage
  // (id == -1), as byte offsets into the split string.
  struct Segment {
    uint32_t start;
    uint32_t end;
    int32_t id;
  };

  // `normalize` gives the form that `normalized` tokens are matched in (the
  // tokenizer's normalizer; identity when it has none).
  AddedVocabulary(std::vector<AddedToken> tokens,
                  const std::function<std::string(std::string_view)>& normalize);

  // Splits `text` at the tokens of one group: the non-normalized tokens
  // (normalized_group false) or the normalized ones. Appends to *segments;
  // an empty text gives one empty text segment, as in HF.
  void Split(std::string_view text, bool normalized_group, std::vector<Segment>* segments) const;

  bool has_normalized_tokens() const { return !groups_[1].nodes.empty(); }
  const std::vector<AddedToken>& tokens() const { return tokens_; }
  // The token with this id, or nullptr.
  const AddedToken* FindById(int32_t id) const;
  // The id of the token with this content, or -1.
  int32_t FindByContent(std::string_view content) const;

 private:
  // A byte trie of one group's patterns.
  struct Node {
    std::vector<std::pair<unsigned char, int32_t>> children;
    int32_t token = -1;  // index into tokens_ when a pattern ends here
  };
  struct Group {
    std::vector<Node> nodes;   // nodes[0] is the root when non-empty
    bool first_byte[256] = {};
  };

  void Insert(Group* group, std::string_view pattern, int32_t token_index);
  // Longest pattern starting at text[pos]: its length, *token_index set; 0
  // when none starts there.
  size_t LongestAt(const Group& group, std::string_view text, size_t pos,
                   int32_t* token_index) const;
  bool IsWordCharBefore(std::string_view text, size_t pos) const;
  bool IsWordCharAt(std::string_view text, size_t pos) const;

  std::vector<AddedToken> tokens_;
  Group groups_[2];  // [0]: not normalized, [1]: normalized
  std::unordered_map<int32_t, size_t> by_id_;
  std::unordered_map<std::string, int32_t> by_content_;
  std::unique_ptr<Regex> word_char_;  // [\p{Alphabetic}\p{N}_], for single_word
};

}  // namespace ftune::data

#endif  // FTUNE_WORKER_DATA_ADDED_VOCABULARY_H_
