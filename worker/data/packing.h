// Records -> token ids with labels -> training rows, as TRL's SFTTrainer
// builds them (trl main of 2026: trl/data_utils.py, trl/trainer/sft_trainer.py;
// "bfd" has been the default packing strategy since TRL 0.20, the padding-free
// collator's first-token label masking is from later releases).
//
// Tokenization and loss masking (labels are -100 where no loss is taken):
//   messages           chat template (chat_template.h), then
//                      Encode(rendered, add_special_tokens=false) -- what
//                      apply_chat_template(tokenize=True) does. With
//                      completion_only_loss only the assistant spans are
//                      labelled (TRL's assistant_only_loss), by transformers'
//                      return_assistant_tokens_mask rule: every token from the
//                      one holding the span's first byte to the one holding
//                      its last byte.
//   text               TRL's add_eos: text + eos_token unless it already ends
//                      with it, Encode(..., add_special_tokens=true); all labelled.
//   prompt/completion  completion + eos_token likewise; prompt_ids =
//                      Encode(prompt, true), ids = Encode(prompt + completion,
//                      true); with completion_only_loss the first
//                      len(prompt_ids) labels are -100 (TRL's completion_mask).
//                      Conversational (lists of messages): prompt_ids =
//                      Encode(template(prompt, add_generation_prompt), false),
//                      ids = Encode(template(prompt + completion), false), the
//                      same masking, no EOS appended (TRL).
// Documents with no tokens are dropped (and counted).
//
// Rows:
//   packing    TRL pack_dataset(strategy="bfd") (trl/data_utils.py _pack_bfd):
//              each document is truncated to max_seq_len; within each group
//              of 1000 consecutive documents (datasets.map's batch size)
//              documents are taken longest first (ties in document order) and
//              each goes to the open bin with the least space that still fits
//              it (the oldest such bin on ties), else to a new bin; rows are
//              the bins in creation order, documents in insertion order.
//              position_ids restart at 0 at each document, and the label of
//              each document's first token is -100 (TRL's padding-free
//              collator: labels[position_ids == 0] = -100), so no token is
//              trained to follow another document.
//   no packing one row per document, truncated to max_seq_len (TRL's
//              truncate_dataset), position_ids 0..n-1, labels as masked.
//
// Thread-safety: DocumentEncoder is immutable after construction and may be
// used from several threads (the Tokenizer is thread-safe).
#ifndef FTUNE_WORKER_DATA_PACKING_H_
#define FTUNE_WORKER_DATA_PACKING_H_

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "worker/data/chat_template.h"
#include "worker/data/dataset.h"
#include "ftune/status.h"
#include "worker/data/tokenizer.h"

namespace ftune::data {

inline constexpr int32_t kIgnoreLabel = -100;
inline constexpr int64_t kPackGroupSize = 1000;

struct TokenizedDoc {
  std::vector<int32_t> input_ids;
  std::vector<int32_t> labels;  // same length; kIgnoreLabel where not trained
};

struct Row {
  std::vector<int32_t> input_ids, labels, position_ids;
};

// Byte range [begin, end) of `text` that each of `ids` covers, when `ids`
// is Encode(text, false) of the tokenizer: reconstructed from the token
// strings (byte-level tokens map back to bytes exactly; SentencePiece-style
// "▁" pieces and <0xNN> byte fallbacks map to spaces and bytes, with the
// spaces the normalizer prepended taking no bytes). An error when the tokens
// do not spell `text` (a tokenizer this does not model).
Result<std::vector<std::pair<size_t, size_t>>> TokenByteOffsets(const Tokenizer& tokenizer,
                                                                std::string_view text,
                                                                const std::vector<int32_t>& ids);

// 1 for the tokens that transformers' return_assistant_tokens_mask marks for
// `spans`, given the tokens' byte offsets.
std::vector<uint8_t> SpanTokenMask(const std::vector<std::pair<size_t, size_t>>& offsets,
                                   const std::vector<ByteSpan>& spans);

class DocumentEncoder {
 public:
  // `chat` is used for messages records only.
  DocumentEncoder(const Tokenizer& tokenizer, ChatTemplate chat, bool completion_only_loss);

  // Errors name the record's source ("train.jsonl:4: ...").
  Result<TokenizedDoc> Encode(const Record& record) const;

 private:
  const Tokenizer& tokenizer_;
  ChatTemplate chat_;
  bool completion_only_loss_;
  std::string eos_token_;
};

std::vector<Row> PackBestFitDecreasing(const std::vector<TokenizedDoc>& docs, int64_t max_seq_len,
                                       int64_t group_size = kPackGroupSize);
std::vector<Row> TruncateRows(const std::vector<TokenizedDoc>& docs, int64_t max_seq_len);

}  // namespace ftune::data

#endif  // FTUNE_WORKER_DATA_PACKING_H_
