// Dataset readers: JSONL and JSON-array files of training records in the
// three layouts TRL's SFTTrainer takes:
//   {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
//   {"text": "..."}
//   {"prompt": "...", "completion": "..."}
//   {"prompt": [messages ending with user], "completion": [assistant message, ...]}
// Other keys of a record are ignored. The format is given or "auto": the
// first valid record decides (messages, then prompt+completion, then text),
// and every later record must have the same layout.
//
// A file whose first non-blank byte is '[' is a JSON array of records, any
// other file JSONL (one record per line; blank lines skipped; a UTF-8 BOM
// allowed). A bad record -- not JSON, not an object, a missing field, a
// field of the wrong type, a role other than system/user/assistant, roles out
// of order (an optional first system message, then user and assistant
// alternating, starting with user), an empty conversation -- is an error
// naming file, line and field ("train.jsonl:7: messages[2].role: ..."), or,
// with skip_invalid, skipped and counted (the first few messages kept for
// the report).
//
// Train/eval split: eval files when given; otherwise eval_split_ratio of
// the records (rounded to nearest, at least 1 when the ratio is > 0 and
// there are 2 or more records) chosen by a seeded permutation
// (SeededPermutation, fully specified) with both splits kept in file order.
//
// Thread-safety: pure functions; no shared state.
#ifndef FTUNE_WORKER_DATA_DATASET_H_
#define FTUNE_WORKER_DATA_DATASET_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "worker/data/chat_template.h"
#include "ftune/status.h"

namespace ftune::data {

enum class RecordFormat { kMessages, kText, kPromptCompletion };

std::string RecordFormatName(RecordFormat format);  // "messages" | "text" | "prompt_completion"

struct Record {
  RecordFormat format = RecordFormat::kText;
  // kMessages; for a conversational kPromptCompletion record the prompt's
  // messages followed by the completion's.
  std::vector<ChatMessage> messages;
  // kPromptCompletion with lists of messages: how many of `messages` are the
  // prompt (> 0); 0 for string prompt/completion.
  size_t num_prompt_messages = 0;
  std::string text;                   // kText
  std::string prompt, completion;     // kPromptCompletion with strings
  std::string source;                 // "file:line", for later errors
};

struct ReadOptions {
  std::string format = "auto";  // auto | messages | text | prompt_completion
  bool skip_invalid = false;
};

struct ReadResult {
  std::vector<Record> records;
  int64_t skipped = 0;
  std::vector<std::string> skipped_examples;  // the first kMaxSkippedExamples errors
  bool format_known = false;                  // false until a record fixes it
  RecordFormat format = RecordFormat::kText;
};

inline constexpr size_t kMaxSkippedExamples = 10;

// A data file is read whole into memory: larger ones are refused with the
// sizes in the message, and so is anything that is not a regular file
// (/dev/zero, a FIFO) before a byte is read.
inline constexpr uint64_t kMaxDataFileBytes = 4ull << 30;

// Reads `files` in order into *out (appending; the format already fixed in
// *out, if any, must match). Errors name the file and line.
Status ReadDatasetFiles(const std::vector<std::string>& files, const ReadOptions& options,
                        ReadResult* out);

// The same on the text of one file; `name` is used in messages. Exposed for
// tests and the fuzzer.
Status ReadDatasetText(std::string_view text, const std::string& name, const ReadOptions& options,
                       ReadResult* out);

// A permutation of [0, n) that depends only on (n, seed, stream): splitmix64
// seeded with seed and stream, Fisher-Yates from the last index down, each
// draw reduced to [0, i] by rejection sampling (no modulo bias). Never
// std::shuffle or std distributions, whose output is implementation-defined.
std::vector<int64_t> SeededPermutation(int64_t n, uint64_t seed, uint64_t stream);

// Splits `records` into train and eval as described above.
void SplitByRatio(std::vector<Record> records, double eval_ratio, uint64_t seed,
                  std::vector<Record>* train, std::vector<Record>* eval);

}  // namespace ftune::data

#endif  // FTUNE_WORKER_DATA_DATASET_H_
