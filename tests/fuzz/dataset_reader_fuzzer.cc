// libFuzzer target: the dataset readers (JSONL and JSON-array records, every
// format, with and without skip_invalid). Reading must return records or an
// error naming the input, never crash, hang or leak; records that are read
// must satisfy the reader's invariants (roles alternate, fields set), and
// rendering them with every chat template must not crash.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "worker/data/chat_template.h"
#include "worker/data/dataset.h"

using ftune::data::ReadOptions;
using ftune::data::ReadResult;
using ftune::data::RecordFormat;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  // First byte: format and skip_invalid.
  static const char* kFormats[] = {"auto", "messages", "text", "prompt_completion"};
  ReadOptions options;
  options.format = kFormats[data[0] & 3];
  options.skip_invalid = (data[0] & 4) != 0;
  const std::string_view text(reinterpret_cast<const char*>(data) + 1, size - 1);
  ReadResult out;
  const ftune::Status s = ftune::data::ReadDatasetText(text, "fuzz.jsonl", options, &out);
  if (!s.ok()) {
    if (s.message().rfind("fuzz.jsonl", 0) != 0 && s.message().find("fuzz.jsonl") == std::string::npos &&
        s.message().find("format") == std::string::npos) {
      __builtin_trap();  // errors must name the input
    }
    return 0;
  }
  if (!options.skip_invalid && out.skipped != 0) __builtin_trap();
  for (const ftune::data::Record& r : out.records) {
    if (r.format != out.format) __builtin_trap();
    if (r.format != RecordFormat::kMessages && r.num_prompt_messages == 0) continue;
    if (r.num_prompt_messages > 0 &&
        (r.format != RecordFormat::kPromptCompletion || r.num_prompt_messages >= r.messages.size() ||
         r.messages[r.num_prompt_messages - 1].role != "user")) {
      __builtin_trap();
    }
    if (r.messages.empty()) __builtin_trap();
    size_t first = r.messages[0].role == "system" ? 1 : 0;
    for (size_t i = first; i < r.messages.size(); ++i) {
      if (r.messages[i].role != ((i - first) % 2 == 0 ? "user" : "assistant")) __builtin_trap();
    }
    for (const std::string& name : ftune::data::SupportedChatTemplateNames()) {
      ftune::data::ChatTemplate t;
      t.kind = *ftune::data::ChatTemplateKindFromName(name);
      t.bos_token = "<s>";
      t.eos_token = "</s>";
      auto rendered = ftune::data::RenderChat(t, r.messages);
      if (!rendered.ok()) __builtin_trap();  // valid records render with every template
      for (const auto& span : rendered->assistant_spans) {
        if (span.begin > span.end || span.end > rendered->text.size()) __builtin_trap();
      }
    }
  }
  return 0;
}
