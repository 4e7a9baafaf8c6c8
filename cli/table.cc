// See table.h.
#include "cli/table.h"

#include <algorithm>
#include <utility>

namespace ftune::cli {

size_t DisplayWidth(const std::string& text) {
  size_t width = 0;
  for (unsigned char c : text) {
    if ((c & 0xC0) != 0x80) ++width;
  }
  return width;
}

TextTable::TextTable(std::vector<std::string> header)
    : header_(std::move(header)), align_(header_.size(), Align::kLeft) {}

void TextTable::SetAlign(size_t column, Align align) {
  if (column >= align_.size()) align_.resize(column + 1, Align::kLeft);
  align_[column] = align;
}

void TextTable::AddRow(std::vector<std::string> row) {
  rows_.push_back(std::move(row));
}

std::string TextTable::Render() const {
  size_t num_columns = header_.size();
  for (const auto& row : rows_) num_columns = std::max(num_columns, row.size());

  std::vector<size_t> widths(num_columns, 0);
  auto measure = [&](const std::vector<std::string>& cells) {
    for (size_t i = 0; i < cells.size(); ++i) {
      widths[i] = std::max(widths[i], DisplayWidth(cells[i]));
    }
  };
  measure(header_);
  for (const auto& row : rows_) measure(row);

  std::string out;
  auto render_line = [&](const std::vector<std::string>& cells) {
    std::string line;
    for (size_t i = 0; i < num_columns; ++i) {
      const std::string empty;
      const std::string& cell = i < cells.size() ? cells[i] : empty;
      const size_t pad = widths[i] - DisplayWidth(cell);
      const bool last = i + 1 == num_columns;
      const Align align = i < align_.size() ? align_[i] : Align::kLeft;
      if (i > 0) line += "  ";
      if (align == Align::kRight) {
        line.append(pad, ' ');
        line += cell;
      } else {
        line += cell;
        if (!last) line.append(pad, ' ');
      }
    }
    // Empty trailing cells would otherwise leave the separator behind.
    while (!line.empty() && line.back() == ' ') line.pop_back();
    out += line;
    out += '\n';
  };
  render_line(header_);
  for (const auto& row : rows_) render_line(row);
  return out;
}

}  // namespace ftune::cli
