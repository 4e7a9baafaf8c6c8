// See packing.h. PackBestFitDecreasing is trl/data_utils.py `_pack_bfd`
// (requeue off) step for step, segment tree included, so that ties resolve
// the same way and rows come out in the same order.
#include "worker/data/packing.h"

#include <algorithm>
#include <deque>
#include <map>
#include <numeric>

#include "worker/data/byte_level.h"

namespace ftune::data {
namespace {

constexpr std::string_view kMetaspace = "\xE2\x96\x81";  // '▁'

// "<0x0A>" -> 0x0A; -1 when `token` is not a byte-fallback token.
int ByteFallback(std::string_view token) {
  if (token.size() != 6 || token.substr(0, 3) != "<0x" || token[5] != '>') return -1;
  int value = 0;
  for (char c : token.substr(3, 2)) {
    value <<= 4;
    if (c >= '0' && c <= '9') value |= c - '0';
    else if (c >= 'A' && c <= 'F') value |= c - 'A' + 10;
    else return -1;
  }
  return value;
}

// What a SentencePiece-style token spells in the normalized text: '▁' is a
// space, a byte-fallback token its byte, special tokens themselves.
std::string SentencePiecePiece(const Tokenizer& tok, int32_t id, const std::string& token) {
  if (tok.IsSpecial(id)) return token;
  const int byte = ByteFallback(token);
  if (byte >= 0) return std::string(1, static_cast<char>(byte));
  std::string out;
  for (size_t pos = 0; pos < token.size();) {
    if (token.compare(pos, kMetaspace.size(), kMetaspace) == 0) {
      out += ' ';
      pos += kMetaspace.size();
    } else {
      out += token[pos++];
    }
  }
  return out;
}

// TRL's _SegmentTree: max over [1, maxval], search(v) = smallest stored
// value >= v on the leftmost path, i.e. the best fit.
class SegmentTree {
 public:
  explicit SegmentTree(int64_t maxval) {
    int bits = 0;
    for (int64_t v = maxval - 1; v > 0; v >>= 1) ++bits;
    size_ = int64_t{1} << bits;
    tree_.assign(static_cast<size_t>(2 * size_), 0);
  }
  void Add(int64_t val) { Set(val, val); }
  void Remove(int64_t val) { Set(val, 0); }
  int64_t Search(int64_t val) const {
    int64_t i = 1;
    while (i < size_) i = tree_[static_cast<size_t>(i << 1)] >= val ? i << 1 : (i << 1) + 1;
    return tree_[static_cast<size_t>(i)];
  }

 private:
  void Set(int64_t val, int64_t stored) {
    int64_t i = size_ + val - 1;
    tree_[static_cast<size_t>(i)] = stored;
    while (i > 1) {
      i >>= 1;
      tree_[static_cast<size_t>(i)] = std::max(tree_[static_cast<size_t>(i << 1)],
                                               tree_[static_cast<size_t>((i << 1) + 1)]);
    }
  }
  int64_t size_ = 1;
  std::vector<int64_t> tree_;
};

void AppendDoc(const TokenizedDoc& doc, int64_t length, bool mask_first, Row* row) {
  for (int64_t j = 0; j < length; ++j) {
    row->input_ids.push_back(doc.input_ids[static_cast<size_t>(j)]);
    row->labels.push_back(mask_first && j == 0 ? kIgnoreLabel : doc.labels[static_cast<size_t>(j)]);
    row->position_ids.push_back(static_cast<int32_t>(j));
  }
}

}  // namespace

Result<std::vector<std::pair<size_t, size_t>>> TokenByteOffsets(const Tokenizer& tokenizer,
                                                                std::string_view text,
                                                                const std::vector<int32_t>& ids) {
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (int32_t id : ids) {
    std::optional<std::string> t = tokenizer.IdToToken(id);
    if (!t) return InternalError("token id " + std::to_string(id) + " has no token string");
    tokens.push_back(std::move(*t));
  }
  std::vector<std::pair<size_t, size_t>> offsets;
  offsets.reserve(ids.size());
  // Byte-level (Llama 3): the tokens' bytes are the text, exactly.
  {
    size_t pos = 0;
    bool ok = true;
    std::string bytes;
    for (size_t i = 0; i < tokens.size() && ok; ++i) {
      if (tokenizer.IsSpecial(ids[i]) || !ByteLevelToBytes(tokens[i], &bytes)) bytes = tokens[i];
      ok = text.compare(pos, bytes.size(), bytes) == 0;
      offsets.emplace_back(pos, pos + bytes.size());
      pos += bytes.size();
    }
    if (ok && pos == text.size()) return offsets;
  }
  // SentencePiece-style (Llama 2, Mistral): the pieces spell the text with
  // extra spaces where the normalizer prepended '▁'.
  offsets.clear();
  size_t pos = 0;
  for (size_t i = 0; i < tokens.size(); ++i) {
    const std::string piece = SentencePiecePiece(tokenizer, ids[i], tokens[i]);
    size_t begin = std::string::npos;
    for (char c : piece) {
      if (pos < text.size() && text[pos] == c) {
        if (begin == std::string::npos) begin = pos;
        ++pos;
      } else if (c != ' ') {
        return InternalError("tokens do not spell the text at byte " + std::to_string(pos) +
                             " (token " + std::to_string(i) + ", id " + std::to_string(ids[i]) +
                             "); cannot map assistant spans onto tokens for this tokenizer");
      }
    }
    offsets.emplace_back(begin == std::string::npos ? pos : begin, pos);
  }
  if (pos != text.size()) {
    return InternalError("tokens spell only " + std::to_string(pos) + " of " +
                         std::to_string(text.size()) + " bytes of the text");
  }
  return offsets;
}

std::vector<uint8_t> SpanTokenMask(const std::vector<std::pair<size_t, size_t>>& offsets,
                                   const std::vector<ByteSpan>& spans) {
  std::vector<uint8_t> mask(offsets.size(), 0);
  // transformers' char_to_token(c): the first token whose range holds c.
  auto token_at = [&](size_t c) -> int64_t {
    for (size_t t = 0; t < offsets.size(); ++t) {
      if (offsets[t].first <= c && c < offsets[t].second) return static_cast<int64_t>(t);
    }
    return -1;
  };
  for (const ByteSpan& span : spans) {
    if (span.end <= span.begin) continue;
    const int64_t first = token_at(span.begin);
    if (first < 0) continue;
    int64_t last = token_at(span.end - 1);
    if (last < 0) last = static_cast<int64_t>(offsets.size()) - 1;
    for (int64_t t = first; t <= last; ++t) mask[static_cast<size_t>(t)] = 1;
  }
  return mask;
}

DocumentEncoder::DocumentEncoder(const Tokenizer& tokenizer, ChatTemplate chat,
                                 bool completion_only_loss)
    : tokenizer_(tokenizer),
      chat_(std::move(chat)),
      completion_only_loss_(completion_only_loss),
      eos_token_(tokenizer.config().eos_token.value_or("")) {}

Result<TokenizedDoc> DocumentEncoder::Encode(const Record& record) const {
  TokenizedDoc doc;
  auto with_eos = [&](const std::string& s) -> Result<std::string> {
    if (eos_token_.empty()) {
      return InvalidArgumentError(record.source + ": the tokenizer config names no eos_token to end "
                                                  "the document with");
    }
    const bool has = s.size() >= eos_token_.size() &&
                     s.compare(s.size() - eos_token_.size(), eos_token_.size(), eos_token_) == 0;
    return has ? s : s + eos_token_;
  };
  switch (record.format) {
    case RecordFormat::kMessages: {
      Result<RenderedChat> chat = RenderChat(chat_, record.messages);
      if (!chat.ok()) return InvalidArgumentError(record.source + ": " + chat.status().message());
      doc.input_ids = tokenizer_.Encode(chat->text, false);
      if (!completion_only_loss_) {
        doc.labels = doc.input_ids;
        break;
      }
      Result<std::vector<std::pair<size_t, size_t>>> offsets =
          TokenByteOffsets(tokenizer_, chat->text, doc.input_ids);
      if (!offsets.ok()) return InternalError(record.source + ": " + offsets.status().message());
      const std::vector<uint8_t> mask = SpanTokenMask(*offsets, chat->assistant_spans);
      doc.labels.resize(doc.input_ids.size());
      for (size_t i = 0; i < mask.size(); ++i) doc.labels[i] = mask[i] ? doc.input_ids[i] : kIgnoreLabel;
      break;
    }
    case RecordFormat::kText: {
      FTUNE_ASSIGN_OR_RETURN(const std::string text, with_eos(record.text));
      doc.input_ids = tokenizer_.Encode(text, true);
      doc.labels = doc.input_ids;
      break;
    }
    case RecordFormat::kPromptCompletion: {
      if (record.num_prompt_messages > 0) {
        // TRL: prompt_ids = apply_chat_template(prompt, add_generation_prompt=True,
        // tokenize=True); ids = apply_chat_template(prompt + completion, tokenize=True);
        // the first len(prompt_ids) labels are masked. No EOS is appended.
        const std::vector<ChatMessage> prompt(record.messages.begin(),
                                              record.messages.begin() +
                                                  static_cast<std::ptrdiff_t>(record.num_prompt_messages));
        Result<RenderedChat> p = RenderChat(chat_, prompt, /*add_generation_prompt=*/true);
        Result<RenderedChat> full = RenderChat(chat_, record.messages);
        if (!p.ok()) return InvalidArgumentError(record.source + ": " + p.status().message());
        if (!full.ok()) return InvalidArgumentError(record.source + ": " + full.status().message());
        if (full->text.compare(0, p->text.size(), p->text) != 0) {
          const bool dropped = RenderDropsSystemMessage(chat_.kind, record.messages);
          return InvalidArgumentError(
              record.source + ": the chat template applied to the prompt + completion does not "
                              "start with the template applied to the prompt alone" +
              (dropped ? std::string(" (" + ChatTemplateName(chat_.kind) +
                                     " writes the system message only into a conversation that "
                                     "ends with a user turn: the prompt has it, the prompt + "
                                     "completion does not)")
                       : std::string()));
        }
        const size_t num_prompt = tokenizer_.Encode(p->text, false).size();
        doc.input_ids = tokenizer_.Encode(full->text, false);
        doc.labels = doc.input_ids;
        if (completion_only_loss_) {
          const size_t n = std::min(num_prompt, doc.labels.size());
          std::fill(doc.labels.begin(), doc.labels.begin() + static_cast<std::ptrdiff_t>(n), kIgnoreLabel);
        }
        break;
      }
      FTUNE_ASSIGN_OR_RETURN(const std::string completion, with_eos(record.completion));
      const size_t num_prompt = tokenizer_.Encode(record.prompt, true).size();
      doc.input_ids = tokenizer_.Encode(record.prompt + completion, true);
      doc.labels = doc.input_ids;
      if (completion_only_loss_) {
        const size_t n = std::min(num_prompt, doc.labels.size());
        std::fill(doc.labels.begin(), doc.labels.begin() + static_cast<std::ptrdiff_t>(n), kIgnoreLabel);
      }
      break;
    }
  }
  return doc;
}

std::vector<Row> PackBestFitDecreasing(const std::vector<TokenizedDoc>& docs, int64_t max_seq_len,
                                       int64_t group_size) {
  std::vector<Row> rows;
  for (size_t g0 = 0; g0 < docs.size(); g0 += static_cast<size_t>(group_size)) {
    const size_t g1 = std::min(docs.size(), g0 + static_cast<size_t>(group_size));
    std::vector<size_t> order;
    std::vector<int64_t> length(g1 - g0);
    for (size_t i = g0; i < g1; ++i) {
      length[i - g0] = std::min<int64_t>(static_cast<int64_t>(docs[i].input_ids.size()), max_seq_len);
      if (length[i - g0] > 0) order.push_back(i - g0);
    }
    std::stable_sort(order.begin(), order.end(),
                     [&](size_t a, size_t b) { return length[a] > length[b]; });
    struct Bin {
      std::vector<size_t> docs;
      int64_t length = 0;
    };
    std::vector<Bin> bins;
    SegmentTree tree(max_seq_len);
    tree.Add(max_seq_len);  // a new bin is always available
    std::map<int64_t, std::deque<size_t>> space_to_bin;
    for (size_t idx : order) {
      const int64_t len = length[idx];
      int64_t space = tree.Search(len);
      size_t bin;
      if (space < max_seq_len) {
        std::deque<size_t>& q = space_to_bin[space];
        bin = q.front();
        q.pop_front();
      } else {
        bin = bins.size();
        bins.emplace_back();
      }
      bins[bin].docs.push_back(idx);
      bins[bin].length += len;
      if (space < max_seq_len && space_to_bin[space].empty()) tree.Remove(space);
      space -= len;
      space_to_bin[space].push_back(bin);
      if (space > 0) tree.Add(space);
    }
    for (const Bin& bin : bins) {
      Row row;
      row.input_ids.reserve(static_cast<size_t>(bin.length));
      row.labels.reserve(static_cast<size_t>(bin.length));
      row.position_ids.reserve(static_cast<size_t>(bin.length));
      for (size_t idx : bin.docs) AppendDoc(docs[g0 + idx], length[idx], /*mask_first=*/true, &row);
      rows.push_back(std::move(row));
    }
  }
  return rows;
}

std::vector<Row> TruncateRows(const std::vector<TokenizedDoc>& docs, int64_t max_seq_len) {
  std::vector<Row> rows;
  rows.reserve(docs.size());
  for (const TokenizedDoc& doc : docs) {
    const int64_t n = std::min<int64_t>(static_cast<int64_t>(doc.input_ids.size()), max_seq_len);
    if (n == 0) continue;
    Row row;
    AppendDoc(doc, n, /*mask_first=*/false, &row);
    rows.push_back(std::move(row));
  }
  return rows;
}

}  // namespace ftune::data
