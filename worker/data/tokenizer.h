// A Hugging Face `tokenizer.json` tokenizer whose ids and decoded text are
// identical to HF `tokenizers` (Tokenizer.encode / Tokenizer.decode) for the
// Llama 2, Llama 3, Mistral and Qwen2 / Qwen2.5 families.
//
// Encode pipeline, in HF's order:
//   1. added tokens with normalized=false are split out of the raw text;
//   2. each remaining run is normalized (Sequence / NFC / Prepend / Replace), then
//      added tokens with normalized=true are split out of it;
//   3. the pre-tokenizer cuts each run into pieces (Split with a regex or a
//      string, ByteLevel, Metaspace, Sequence of those);
//   4. BPE turns each piece into ids (bpe.h);
//   5. with add_special_tokens, the post-processor (TemplateProcessing,
//      ByteLevel, Sequence) adds BOS/EOS as tokenizer.json says.
// Decode maps ids to token strings (added tokens first, unknown ids dropped,
// special tokens dropped on request) and runs the decoder chain (ByteLevel,
// Replace, ByteFallback, Fuse, Strip, Metaspace, Sequence).
//
// What is supported is what the Llama files and their close relatives use;
// anything else (another model type, NFKC, WordPiece decoders, padding or
// truncation settings) is refused at load with an error naming the file and
// the component, never approximated.
//
// Input that is not valid UTF-8 (HF's API cannot receive it: Python str and
// Rust &str are always valid) is encoded as if each ill-formed sequence were
// U+FFFD, the replacement Rust's from_utf8_lossy makes.
//
// tokenizer_config.json is read for what tokenizer.json does not hold: the
// BOS/EOS/pad token names and add_bos_token / add_eos_token, which the data
// pipeline uses to decide on EOS after a document. It does not change
// Encode: Encode follows tokenizer.json's post-processor exactly, as HF
// `tokenizers` does.
//
// Thread-safety: a loaded Tokenizer is immutable apart from an internal,
// mutex-guarded BPE cache; Encode and Decode may be called from many threads
// at once.
#ifndef FTUNE_WORKER_DATA_TOKENIZER_H_
#define FTUNE_WORKER_DATA_TOKENIZER_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ftune/status.h"

namespace ftune::data {

// What tokenizer_config.json says (all optional).
struct TokenizerConfig {
  std::optional<std::string> bos_token;
  std::optional<std::string> eos_token;
  std::optional<std::string> pad_token;
  std::optional<std::string> unk_token;
  std::optional<bool> add_bos_token;
  std::optional<bool> add_eos_token;
  std::optional<std::string> chat_template;
  std::optional<std::string> tokenizer_class;
};

struct TokenizerLoadOptions {
  // Entries of the per-piece BPE cache; 0 switches it off (benchmarks of the
  // merge loop, memory-tight tools).
  size_t bpe_cache_capacity = 1 << 16;
};

// tokenizer.json is read whole: larger ones (and files that are not
// regular) are refused. tokenizer_config.json is capped at
// kMaxSmallFileBytes (ftune/file_util.h).
inline constexpr uint64_t kMaxTokenizerJsonBytes = 256ull << 20;

class Tokenizer {
 public:
  // Loads DIR/tokenizer.json and, when present, DIR/tokenizer_config.json.
  static Result<std::unique_ptr<Tokenizer>> Load(const std::string& dir,
                                                 const TokenizerLoadOptions& options = {});

  // From the texts of the two files; `config_json` may be empty (no config).
  // `source` names them in errors (a directory or "tokenizer.json").
  static Result<std::unique_ptr<Tokenizer>> FromJson(std::string_view tokenizer_json,
                                                     std::string_view config_json,
                                                     const std::string& source,
                                                     const TokenizerLoadOptions& options = {});

  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // HF tokenizer.encode(text, add_special_tokens=...).ids
  std::vector<int32_t> Encode(std::string_view text, bool add_special_tokens) const;
  // The same, appended to *ids (reuses the caller's buffer).
  void EncodeAppend(std::string_view text, bool add_special_tokens,
                    std::vector<int32_t>* ids) const;

  // HF tokenizer.decode(ids, skip_special_tokens=...). Ids outside the
  // vocabulary are skipped, as HF does.
  std::string Decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const;

  // Token string of an id as tokenizer.json spells it (byte-level strings
  // for Llama 3: "Ġthe"), or nullopt.
  std::optional<std::string> IdToToken(int32_t id) const;
  // Id of a token string (added tokens first), or nullopt.
  std::optional<int32_t> TokenToId(std::string_view token) const;
  // True for added tokens marked special.
  bool IsSpecial(int32_t id) const;

  // One past the largest id (model vocab and added tokens): the number of
  // embedding rows a model needs. 128256 for Llama 3, 32000 for Llama 2.
  int32_t vocab_size() const { return vocab_size_; }

  const TokenizerConfig& config() const { return config_; }
  // Ids of the config's BOS / EOS tokens, when it names them and they exist.
  std::optional<int32_t> bos_id() const { return bos_id_; }
  std::optional<int32_t> eos_id() const { return eos_id_; }
  std::optional<int32_t> pad_id() const { return pad_id_; }

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);

  std::unique_ptr<Impl> impl_;
  TokenizerConfig config_;
  int32_t vocab_size_ = 0;
  std::optional<int32_t> bos_id_;
  std::optional<int32_t> eos_id_;
  std::optional<int32_t> pad_id_;
};

}  // namespace ftune::data

#endif  // FTUNE_WORKER_DATA_TOKENIZER_H_
