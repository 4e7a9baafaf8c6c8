// The pre-tokenizer regexes of tokenizer.json, run with PCRE2 (UTF + UCP,
// JIT-compiled when the library has a JIT).
//
// HF tokenizers runs these patterns with Oniguruma, whose \s is Unicode's
// White_Space property; PCRE2's \s under UCP also matches U+180E and misses
// nothing else, so \s and \S are rewritten to explicit White_Space classes
// (TranslateOnigPattern). The rest of the syntax the Llama / GPT-2 patterns
// use (\p{L}, \p{N}, (?i:...), (?!...), {1,3}) means the same in both; both
// libraries here carry Unicode 14 tables.
//
// Thread-safety: a compiled Regex is immutable; FindAll may run on many
// threads at once (each thread keeps its own match data and JIT stack).
#ifndef FTUNE_WORKER_DATA_REGEX_H_
#define FTUNE_WORKER_DATA_REGEX_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "ftune/status.h"

namespace ftune::data {

// Rewrites an Oniguruma pattern into the PCRE2 pattern that matches the same
// strings; an error names the construct it cannot carry over.
Result<std::string> TranslateOnigPattern(std::string_view pattern);

class Regex {
 public:
  // Compiles an Oniguruma-syntax pattern (as tokenizer.json holds).
  static Result<std::unique_ptr<Regex>> Compile(std::string_view onig_pattern);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Every non-overlapping match in `subject` (valid UTF-8), left to right,
  // as byte [start, end) ranges appended to *matches; after an empty match
  // the search resumes one character later, as Oniguruma's find_iter does.
  // False when PCRE2 gave up (a resource limit); *matches then holds the
  // matches found before that point.
  bool FindAll(std::string_view subject, std::vector<std::pair<uint32_t, uint32_t>>* matches) const;

  bool jit() const { return jit_; }

 private:
  Regex() = default;
  void* code_ = nullptr;  // pcre2_code_8*; void keeps pcre2.h out of this header
  bool jit_ = false;
};

}  // namespace ftune::data

#endif  // FTUNE_WORKER_DATA_REGEX_H_
