// Plain-text tables for the CLI's human output (`ftune jobs`, `agents`, ...).
//
// Columns are separated by two spaces and padded to the widest cell, the way
// kubectl and docker print lists, so the output lines up in a terminal and
// still splits on whitespace. Widths count UTF-8 code points rather than
// bytes because job names and hosts may hold non-ASCII text. The last column
// is never padded, so no line ends in spaces.
//
// Not thread-safe; build a table in one thread and render it.
#ifndef FTUNE_CLI_TABLE_H_
#define FTUNE_CLI_TABLE_H_

#include <cstddef>
#include <string>
#include <vector>

namespace ftune::cli {

class TextTable {
 public:
  enum class Align { kLeft, kRight };

  explicit TextTable(std::vector<std::string> header);

  // Numbers read better right-aligned; text stays left-aligned.
  void SetAlign(size_t column, Align align);

  // A row shorter than the header is padded with empty cells; a longer one
  // widens the table (its extra columns get an empty header).
  void AddRow(std::vector<std::string> row);

  size_t num_rows() const { return rows_.size(); }

  // Header line plus one line per row, each ending in '\n'.
  std::string Render() const;

 private:
  std::vector<std::string> header_;
  std::vector<Align> align_;
  std::vector<std::vector<std::string>> rows_;
};

// Display width of UTF-8 text: the number of code points (continuation bytes
// do not count). Good enough for names and paths; wide CJK glyphs are rare
// in what ftune prints.
size_t DisplayWidth(const std::string& text);

}  // namespace ftune::cli

#endif  // FTUNE_CLI_TABLE_H_
