// See dataset.h. JSON arrays are cut into elements by a small scanner that
// tracks strings and nesting, so each element is parsed (and its errors
// reported) with the line it starts on, like a JSONL line.
#include "worker/data/dataset.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>
#include <utility>

#include <nlohmann/json.hpp>

#include "ftune/file_util.h"

namespace ftune::data {
namespace {

using json = nlohmann::json;

std::string Quote(const std::string& s) { return json(s).dump(-1, ' ', false, json::error_handler_t::replace); }

// nlohmann's "[json.exception.parse_error.101] parse error at ..." without the
// tag. Also out_of_range (a number too large for a double: "1e999").
std::string ParseErrorText(const json::exception& e) {
  std::string what = e.what();
  const size_t tag = what.find("] ");
  return tag == std::string::npos ? what : what.substr(tag + 2);
}

Result<const json*> Field(const json& record, const char* key, const std::string& where) {
  const auto it = record.find(key);
  if (it == record.end()) {
    return InvalidArgumentError(where + ": missing field \"" + key + "\"");
  }
  return &*it;
}

Status ExpectString(const json& value, const std::string& where, const std::string& field) {
  if (value.is_string()) return OkStatus();
  return InvalidArgumentError(where + ": " + field + ": expected a string, got " + value.type_name());
}

// Appends the messages of `array` (the record's `field`) to out->messages,
// continuing the role order in *expected ("user" or "assistant"); a system
// message is allowed only as the very first message of the conversation.
Status ParseMessageList(const json& array, const std::string& where, const std::string& field,
                        const char** expected, Record* out) {
  if (!array.is_array()) {
    return InvalidArgumentError(where + ": " + field + ": expected an array of {role, content} objects, got " +
                                array.type_name());
  }
  for (size_t i = 0; i < array.size(); ++i) {
    const json& m = array[i];
    const std::string item = field + "[" + std::to_string(i) + "]";
    if (!m.is_object()) {
      return InvalidArgumentError(where + ": " + item + ": expected an object, got " + m.type_name());
    }
    const auto role = m.find("role");
    if (role == m.end()) return InvalidArgumentError(where + ": " + item + ": missing field \"role\"");
    FTUNE_RETURN_IF_ERROR(ExpectString(*role, where, item + ".role"));
    const auto content = m.find("content");
    if (content == m.end()) {
      return InvalidArgumentError(where + ": " + item + ": missing field \"content\"");
    }
    FTUNE_RETURN_IF_ERROR(ExpectString(*content, where, item + ".content"));
    const std::string& r = role->get_ref<const std::string&>();
    if (r != "system" && r != "user" && r != "assistant") {
      return InvalidArgumentError(where + ": " + item + ".role: " + Quote(r) +
                                  " is not one of system, user, assistant");
    }
    if (r == "system") {
      if (!out->messages.empty()) {
        return InvalidArgumentError(where + ": " + item +
                                    ".role: a system message may only be the first message");
      }
    } else if (r != *expected) {
      return InvalidArgumentError(where + ": " + item + ".role: expected \"" + *expected + "\", got " +
                                  Quote(r) + " (after an optional system message, roles must "
                                  "alternate user/assistant, starting with user)");
    } else {
      *expected = r == "user" ? "assistant" : "user";
    }
    // Kept for the templates that would render tool calls (mistral-v0.3
    // refuses them, chat_template.h); Jinja's `tool_calls is not none`.
    const auto tool_calls = m.find("tool_calls");
    out->messages.push_back(
        {r, content->get<std::string>(), tool_calls != m.end() && !tool_calls->is_null()});
  }
  return OkStatus();
}

Status ParseMessages(const json& record, const std::string& where, Record* out) {
  FTUNE_ASSIGN_OR_RETURN(const json* messages, Field(record, "messages", where));
  if (messages->is_array() && messages->empty()) {
    return InvalidArgumentError(where + ": messages: the conversation is empty");
  }
  const char* expected = "user";  // after the optional system message
  FTUNE_RETURN_IF_ERROR(ParseMessageList(*messages, where, "messages", &expected, out));
  if (out->messages.size() == 1 && out->messages[0].role == "system") {
    return InvalidArgumentError(where + ": messages: only a system message, no user turn");
  }
  return OkStatus();
}

// TRL's conversational prompt/completion: the prompt ends with a user turn
// (the template's generation prompt follows it), the completion continues
// the conversation with the assistant.
Status ParseConversationalPromptCompletion(const json& prompt, const json& completion,
                                           const std::string& where, Record* out) {
  const char* expected = "user";
  FTUNE_RETURN_IF_ERROR(ParseMessageList(prompt, where, "prompt", &expected, out));
  if (out->messages.empty() || out->messages.back().role != "user") {
    return InvalidArgumentError(where + ": prompt: must end with a user message (the completion is the "
                                        "assistant's reply)");
  }
  out->num_prompt_messages = out->messages.size();
  if (completion.is_array() && completion.empty()) {
    return InvalidArgumentError(where + ": completion: no messages");
  }
  return ParseMessageList(completion, where, "completion", &expected, out);
}

Status ParseRecord(const json& record, RecordFormat format, const std::string& where, Record* out) {
  out->format = format;
  out->source = where;
  switch (format) {
    case RecordFormat::kMessages:
      return ParseMessages(record, where, out);
    case RecordFormat::kText: {
      FTUNE_ASSIGN_OR_RETURN(const json* text, Field(record, "text", where));
      FTUNE_RETURN_IF_ERROR(ExpectString(*text, where, "text"));
      out->text = text->get<std::string>();
      return OkStatus();
    }
    case RecordFormat::kPromptCompletion: {
      FTUNE_ASSIGN_OR_RETURN(const json* prompt, Field(record, "prompt", where));
      FTUNE_ASSIGN_OR_RETURN(const json* completion, Field(record, "completion", where));
      if (prompt->is_array() || completion->is_array()) {
        return ParseConversationalPromptCompletion(*prompt, *completion, where, out);
      }
      FTUNE_RETURN_IF_ERROR(ExpectString(*prompt, where, "prompt"));
      FTUNE_RETURN_IF_ERROR(ExpectString(*completion, where, "completion"));
      out->prompt = prompt->get<std::string>();
      out->completion = completion->get<std::string>();
      return OkStatus();
    }
  }
  return InternalError("unknown record format");
}

Result<RecordFormat> FormatFromName(const std::string& name) {
  if (name == "messages") return RecordFormat::kMessages;
  if (name == "text") return RecordFormat::kText;
  if (name == "prompt_completion") return RecordFormat::kPromptCompletion;
  return InvalidArgumentError("dataset format \"" + name +
                              "\" is not one of auto, messages, text, prompt_completion");
}

Result<RecordFormat> DetectFormat(const json& record, const std::string& where) {
  if (record.contains("messages")) return RecordFormat::kMessages;
  if (record.contains("prompt") && record.contains("completion")) return RecordFormat::kPromptCompletion;
  if (record.contains("text")) return RecordFormat::kText;
  return InvalidArgumentError(where + ": cannot tell the record format: expected a \"messages\", "
                                      "\"text\" or \"prompt\"+\"completion\" field");
}

// One record's text at `line`: parse, detect or check the format, append.
// Returns the record's error (a skip is the caller's decision).
Status AddRecord(std::string_view element, const std::string& where, ReadResult* out) {
  json record;
  try {
    record = json::parse(element.begin(), element.end());
  } catch (const json::exception& e) {
    return InvalidArgumentError(where + ": not JSON: " + ParseErrorText(e));
  }
  if (!record.is_object()) {
    return InvalidArgumentError(where + ": expected a JSON object, got " + std::string(record.type_name()));
  }
  RecordFormat format = out->format;
  if (!out->format_known) {
    FTUNE_ASSIGN_OR_RETURN(format, DetectFormat(record, where));
  }
  Record r;
  FTUNE_RETURN_IF_ERROR(ParseRecord(record, format, where, &r));
  out->format = format;
  out->format_known = true;
  out->records.push_back(std::move(r));
  return OkStatus();
}

Status Handle(Status s, const ReadOptions& options, ReadResult* out) {
  if (s.ok() || !options.skip_invalid) return s;
  ++out->skipped;
  if (out->skipped_examples.size() < kMaxSkippedExamples) out->skipped_examples.push_back(s.message());
  return OkStatus();
}

bool IsSpace(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

// Cuts a JSON array into its elements' texts and their start lines.
// A structural error (unterminated array or string, junk after ']') is fatal
// for the file even with skip_invalid: no later element can be located.
Status SplitJsonArray(std::string_view text, size_t pos, const std::string& name,
                      std::vector<std::pair<std::string_view, size_t>>* elements) {
  size_t line = 1 + static_cast<size_t>(std::count(text.begin(), text.begin() + pos, '\n'));
  auto fail = [&](const std::string& what) {
    return InvalidArgumentError(name + ":" + std::to_string(line) + ": not a JSON array: " + what);
  };
  ++pos;  // '['
  bool expect_element = true;
  bool first = true;
  while (true) {
    while (pos < text.size() && IsSpace(text[pos])) line += text[pos++] == '\n';
    if (pos >= text.size()) return fail("missing ']' at the end of the file");
    if (text[pos] == ']') {
      if (expect_element && !first) return fail("a ',' before ']'");
      ++pos;
      break;
    }
    if (!expect_element) return fail(std::string("expected ',' or ']', got '") + text[pos] + "'");
    const size_t start = pos;
    const size_t start_line = line;
    int depth = 0;
    bool in_string = false;
    for (; pos < text.size(); ++pos) {
      const char c = text[pos];
      if (c == '\n') ++line;
      if (in_string) {
        if (c == '\\') {
          if (pos + 1 < text.size() && text[pos + 1] == '\n') ++line;
          ++pos;
        } else if (c == '"') {
          in_string = false;
        }
        continue;
      }
      if (c == '"') {
        in_string = true;
      } else if (c == '{' || c == '[') {
        ++depth;
      } else if (c == '}' || c == ']') {
        if (depth == 0) break;  // the array's own ']'
        --depth;
      } else if (c == ',' && depth == 0) {
        break;
      }
    }
    if (pos >= text.size()) return fail(in_string ? "unterminated string" : "missing ']' at the end of the file");
    size_t end = pos;
    while (end > start && IsSpace(text[end - 1])) --end;
    elements->emplace_back(text.substr(start, end - start), start_line);
    first = false;
    if (text[pos] == ',') {
      ++pos;
      expect_element = true;
    } else {
      expect_element = false;  // at ']'
    }
  }
  while (pos < text.size() && IsSpace(text[pos])) line += text[pos++] == '\n';
  if (pos < text.size()) return fail("content after the closing ']'");
  return OkStatus();
}

// splitmix64 (Steele, Lea, Flood 2014): the reference constants.
uint64_t SplitMix64(uint64_t* state) {
  uint64_t z = (*state += 0x9E3779B97F4A7C15ULL);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

}  // namespace

std::string RecordFormatName(RecordFormat format) {
  switch (format) {
    case RecordFormat::kMessages: return "messages";
    case RecordFormat::kText: return "text";
    case RecordFormat::kPromptCompletion: return "prompt_completion";
  }
  return "unknown";
}

Status ReadDatasetText(std::string_view text, const std::string& name, const ReadOptions& options,
                       ReadResult* out) {
  if (options.format != "auto") {
    FTUNE_ASSIGN_OR_RETURN(const RecordFormat format, FormatFromName(options.format));
    if (out->format_known && out->format != format) {
      return InternalError("ReadDatasetText: format changed between files");
    }
    out->format = format;
    out->format_known = true;
  }
  if (text.size() >= 3 && text.substr(0, 3) == "\xEF\xBB\xBF") text.remove_prefix(3);
  size_t first = 0;
  while (first < text.size() && IsSpace(text[first])) ++first;
  if (first < text.size() && text[first] == '[') {
    std::vector<std::pair<std::string_view, size_t>> elements;
    FTUNE_RETURN_IF_ERROR(SplitJsonArray(text, first, name, &elements));
    for (size_t i = 0; i < elements.size(); ++i) {
      const std::string where = name + ":" + std::to_string(elements[i].second) + " (element " +
                                std::to_string(i) + ")";
      FTUNE_RETURN_IF_ERROR(Handle(AddRecord(elements[i].first, where, out), options, out));
    }
    return OkStatus();
  }
  size_t line = 0;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string_view::npos) end = text.size();
    std::string_view row = text.substr(pos, end - pos);
    pos = end + 1;
    ++line;
    if (!row.empty() && row.back() == '\r') row.remove_suffix(1);
    if (std::all_of(row.begin(), row.end(), IsSpace)) continue;
    FTUNE_RETURN_IF_ERROR(Handle(AddRecord(row, name + ":" + std::to_string(line), out), options, out));
  }
  return OkStatus();
}

Status ReadDatasetFiles(const std::vector<std::string>& files, const ReadOptions& options,
                        ReadResult* out) {
  for (const std::string& file : files) {
    Result<std::string> text = ReadFileToString(file, kMaxDataFileBytes);
    if (!text.ok()) {
      return Status(text.status().code(), text.status().message() + " (a data file)");
    }
    FTUNE_RETURN_IF_ERROR(ReadDatasetText(*text, file, options, out));
  }
  return OkStatus();
}

std::vector<int64_t> SeededPermutation(int64_t n, uint64_t seed, uint64_t stream) {
  std::vector<int64_t> perm(static_cast<size_t>(std::max<int64_t>(n, 0)));
  for (int64_t i = 0; i < n; ++i) perm[static_cast<size_t>(i)] = i;
  uint64_t mix = stream;
  uint64_t state = seed ^ SplitMix64(&mix);
  for (int64_t i = n - 1; i > 0; --i) {
    const uint64_t bound = static_cast<uint64_t>(i) + 1;
    // Largest multiple of bound that fits: draws at or above it are redrawn.
    const uint64_t limit = UINT64_MAX - UINT64_MAX % bound;
    uint64_t r;
    do {
      r = SplitMix64(&state);
    } while (r >= limit);
    std::swap(perm[static_cast<size_t>(i)], perm[static_cast<size_t>(r % bound)]);
  }
  return perm;
}

void SplitByRatio(std::vector<Record> records, double eval_ratio, uint64_t seed,
                  std::vector<Record>* train, std::vector<Record>* eval) {
  const int64_t n = static_cast<int64_t>(records.size());
  int64_t num_eval = 0;
  if (eval_ratio > 0 && n >= 2) {
    num_eval = std::clamp<int64_t>(std::llround(eval_ratio * static_cast<double>(n)), 1, n - 1);
  }
  std::vector<char> is_eval(records.size(), 0);
  // Stream 0x5EED5B17 ("split") keeps this draw apart from the epoch shuffles.
  const std::vector<int64_t> perm = SeededPermutation(n, seed, 0x5EED5B17ULL);
  for (int64_t i = 0; i < num_eval; ++i) is_eval[static_cast<size_t>(perm[static_cast<size_t>(i)])] = 1;
  for (size_t i = 0; i < records.size(); ++i) {
    (is_eval[i] ? eval : train)->push_back(std::move(records[i]));
  }
}

}  // namespace ftune::data
