// TextTable: alignment, padding and UTF-8 widths of the CLI's tables.
#include "cli/table.h"

#include <gtest/gtest.h>

namespace ftune::cli {
namespace {

TEST(CliTableTest, PadsColumnsToTheWidestCellWithoutTrailingSpaces) {
  TextTable t({"ID", "STATE", "REASON"});
  t.AddRow({"job-1", "RUNNING", "training"});
  t.AddRow({"j2", "QUEUED", ""});
  EXPECT_EQ(t.Render(),
            "ID     STATE    REASON\n"
            "job-1  RUNNING  training\n"
            "j2     QUEUED\n");
  EXPECT_EQ(t.num_rows(), 2u);
}

TEST(CliTableTest, RightAlignsNumericColumns) {
  TextTable t({"STEP", "LOSS", "NAME"});
  t.SetAlign(0, TextTable::Align::kRight);
  t.SetAlign(1, TextTable::Align::kRight);
  t.AddRow({"5", "1.2000", "a"});
  t.AddRow({"12000", "0.5", "b"});
  EXPECT_EQ(t.Render(),
            " STEP    LOSS  NAME\n"
            "    5  1.2000  a\n"
            "12000     0.5  b\n");
}

TEST(CliTableTest, CountsUtf8CodePointsNotBytes) {
  EXPECT_EQ(DisplayWidth("abc"), 3u);
  EXPECT_EQ(DisplayWidth("h\xC3\xBCgel"), 5u);       // "hügel"
  EXPECT_EQ(DisplayWidth("\xE2\x86\x92"), 1u);       // "→"
  TextTable t({"NAME", "STATE"});
  t.AddRow({"h\xC3\xBCgel", "RUNNING"});
  t.AddRow({"x", "QUEUED"});
  EXPECT_EQ(t.Render(),
            "NAME   STATE\n"
            "h\xC3\xBCgel  RUNNING\n"
            "x      QUEUED\n");
}

TEST(CliTableTest, ShortAndLongRows) {
  TextTable t({"A", "B"});
  t.AddRow({"1"});
  t.AddRow({"1", "2", "3"});
  EXPECT_EQ(t.Render(),
            "A  B\n"
            "1\n"
            "1  2  3\n");
}

TEST(CliTableTest, HeaderOnlyWhenEmpty) {
  TextTable t({"AGENT", "HOST"});
  EXPECT_EQ(t.Render(), "AGENT  HOST\n");
}

}  // namespace
}  // namespace ftune::cli
