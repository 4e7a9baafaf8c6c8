// The non-blank lines of a text (JSON-lines files and the like), with their
// 1-based line numbers for error messages. A line is blank when it holds
// only spaces, tabs and '\r'.
#ifndef FTUNE_COMMON_TEXT_LINES_H_
#define FTUNE_COMMON_TEXT_LINES_H_

#include <cstdint>
#include <string_view>

namespace ftune {

class NonBlankLines {
 public:
  explicit NonBlankLines(std::string_view text) : text_(text) {}
  // The next non-blank line (without its '\n') and its number; false at the end.
  bool Next(std::string_view* line, int64_t* number) {
    while (pos_ < text_.size()) {
      size_t end = text_.find('\n', pos_);
      if (end == std::string_view::npos) end = text_.size();
      const std::string_view l = text_.substr(pos_, end - pos_);
      ++number_;
      pos_ = end + 1;
      if (l.find_first_not_of(" \t\r") == std::string_view::npos) continue;
      *line = l;
      *number = number_;
      return true;
    }
    return false;
  }

 private:
  std::string_view text_;
  size_t pos_ = 0;
  int64_t number_ = 0;
};

}  // namespace ftune

#endif  // FTUNE_COMMON_TEXT_LINES_H_
