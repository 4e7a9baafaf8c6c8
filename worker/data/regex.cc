// See regex.h.
#include "worker/data/regex.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "worker/data/utf8.h"

namespace ftune::data {
namespace {

// Unicode White_Space, the set Oniguruma's \s matches with a Unicode
// encoding, as PCRE2 class items.
constexpr std::string_view kWhiteSpaceItems =
    "\\t\\n\\x{0B}\\f\\r\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}"
    "\\x{202F}\\x{205F}\\x{3000}";

// Per-thread PCRE2 state: match data sized for the whole-match offsets only
// (any pattern fits) and a JIT stack larger than the 32 KiB default, so long
// whitespace runs under \s+(?!\S) do not hit the stack limit.
struct MatchScratch {
  pcre2_match_data* data = nullptr;
  pcre2_match_context* context = nullptr;
  pcre2_jit_stack* stack = nullptr;

  MatchScratch() {
    data = pcre2_match_data_create(1, nullptr);
    context = pcre2_match_context_create(nullptr);
    stack = pcre2_jit_stack_create(32 * 1024, 4 * 1024 * 1024, nullptr);
    if (context != nullptr && stack != nullptr) pcre2_jit_stack_assign(context, nullptr, stack);
  }
  ~MatchScratch() {
    pcre2_match_data_free(data);
    pcre2_match_context_free(context);
    pcre2_jit_stack_free(stack);
  }
};

MatchScratch& Scratch() {
  thread_local MatchScratch scratch;
  return scratch;
}

}  // namespace

Result<std::string> TranslateOnigPattern(std::string_view pattern) {
  std::string out;
  out.reserve(pattern.size() + 64);
  bool in_class = false;
  for (size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (c == '\\') {
      if (i + 1 >= pattern.size()) return InvalidArgumentError("pattern ends with a lone backslash");
      const char e = pattern[++i];
      if (e == 's') {
        if (in_class) {
          out += kWhiteSpaceItems;
        } else {
          out += '[';
          out += kWhiteSpaceItems;
          out += ']';
        }
      } else if (e == 'S') {
        if (in_class) {
          return InvalidArgumentError("\\S inside a character class is not supported");
        }
        out += "[^";
        out += kWhiteSpaceItems;
        out += ']';
      } else {
        out += c;
        out += e;
      }
      continue;
    }
    if (in_class) {
      if (c == '[') {
        if (i + 1 < pattern.size() && pattern[i + 1] == ':') {
          // POSIX class [:alpha:]: copy through its closing ":]".
          const size_t close = pattern.find(":]", i + 2);
          if (close == std::string_view::npos) {
            return InvalidArgumentError("unterminated POSIX class in pattern");
          }
          out.append(pattern.substr(i, close + 2 - i));
          i = close + 1;
          continue;
        }
        return InvalidArgumentError("nested character classes (Oniguruma set operations) are not supported");
      }
      if (c == ']') in_class = false;
      out += c;
      continue;
    }
    out += c;
    if (c == '[') {
      in_class = true;
      // A ']' right after '[' or '[^' is a literal, not the end.
      if (i + 1 < pattern.size() && pattern[i + 1] == '^') out += pattern[++i];
      if (i + 1 < pattern.size() && pattern[i + 1] == ']') out += pattern[++i];
    }
  }
  if (in_class) return InvalidArgumentError("unterminated character class in pattern");
  return out;
}

Result<std::unique_ptr<Regex>> Regex::Compile(std::string_view onig_pattern) {
  Result<std::string> pattern = TranslateOnigPattern(onig_pattern);
  if (!pattern.ok()) return pattern.status();
  int error = 0;
  PCRE2_SIZE offset = 0;
  pcre2_code* code =
      pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern->data()), pattern->size(),
                    PCRE2_UTF | PCRE2_UCP, &error, &offset, nullptr);
  if (code == nullptr) {
    PCRE2_UCHAR message[256];
    pcre2_get_error_message(error, message, sizeof(message));
    return InvalidArgumentError("regex " + std::string(onig_pattern) + " does not compile at offset " +
                                std::to_string(offset) + ": " + reinterpret_cast<char*>(message));
  }
  std::unique_ptr<Regex> regex(new Regex());
  regex->code_ = code;
  uint32_t has_jit = 0;
  pcre2_config(PCRE2_CONFIG_JIT, &has_jit);
  regex->jit_ = has_jit != 0 && pcre2_jit_compile(code, PCRE2_JIT_COMPLETE) == 0;
  return regex;
}

Regex::~Regex() { pcre2_code_free(static_cast<pcre2_code*>(code_)); }

bool Regex::FindAll(std::string_view subject,
                    std::vector<std::pair<uint32_t, uint32_t>>* matches) const {
  auto* code = static_cast<pcre2_code*>(code_);
  MatchScratch& scratch = Scratch();
  const auto* text = reinterpret_cast<PCRE2_SPTR>(subject.data());
  size_t pos = 0;
  while (pos <= subject.size()) {
    // The tokenizer hands over valid UTF-8 only (it sanitizes its input).
    int rc = jit_ ? pcre2_jit_match(code, text, subject.size(), pos, PCRE2_NO_UTF_CHECK,
                                    scratch.data, scratch.context)
                  : PCRE2_ERROR_JIT_BADOPTION;
    if (rc == PCRE2_ERROR_JIT_STACKLIMIT || rc == PCRE2_ERROR_JIT_BADOPTION) {
      // The interpreter keeps its backtracking state on the heap.
      rc = pcre2_match(code, text, subject.size(), pos, PCRE2_NO_UTF_CHECK, scratch.data, nullptr);
    }
    if (rc == PCRE2_ERROR_NOMATCH) return true;
    if (rc < 0) return false;
    const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(scratch.data);
    const size_t start = ovector[0];
    const size_t end = ovector[1];
    matches->emplace_back(static_cast<uint32_t>(start), static_cast<uint32_t>(end));
    if (end > start) {
      pos = end;
    } else {
      if (end >= subject.size()) return true;
      pos = end + Utf8Length(static_cast<unsigned char>(subject[end]));
    }
  }
  return true;
}

}  // namespace ftune::data
