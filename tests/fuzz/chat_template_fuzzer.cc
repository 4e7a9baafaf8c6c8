// libFuzzer target: chat-template inputs. A conversation arrives as the
// `messages` JSON of a dataset record (any roles, any bytes in contents and
// special tokens); rendering it with each template must return the text or an
// error, never crash, and the assistant spans must lie inside the text, in
// order, one per assistant message. Detecting a Jinja chat_template of
// arbitrary text must not crash either.
//
// Input: byte 0 picks the template and add_generation_prompt; the rest is
// JSON, either an array of messages or an object
//   {"messages": [...], "bos_token": s, "eos_token": s, "date_string": s,
//    "chat_template": s}
// (a message: {"role": s, "content": s}; other JSON types are dumped to text).
// When the rest is not JSON it is taken as a Jinja chat_template.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "worker/data/chat_template.h"

using nlohmann::json;
namespace data = ftune::data;

namespace {

std::string Text(const json& j) { return j.is_string() ? j.get<std::string>() : j.dump(); }

void CheckRendered(const std::vector<data::ChatMessage>& messages, const data::RenderedChat& r) {
  size_t num_assistant = 0;
  for (const data::ChatMessage& m : messages) num_assistant += m.role == "assistant";
  if (r.assistant_spans.size() != num_assistant) __builtin_trap();
  size_t prev_end = 0;
  for (const data::ByteSpan& span : r.assistant_spans) {
    if (span.begin < prev_end || span.begin > span.end || span.end > r.text.size()) {
      __builtin_trap();
    }
    prev_end = span.end;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* bytes, size_t size) {
  if (size == 0) return 0;
  const std::vector<std::string>& names = data::SupportedChatTemplateNames();
  const uint8_t control = bytes[0];
  const std::string_view rest(reinterpret_cast<const char*>(bytes) + 1, size - 1);

  data::ChatTemplate tmpl;
  tmpl.kind = *data::ChatTemplateKindFromName(names[(control & 0x7f) % names.size()]);
  const bool add_generation_prompt = (control & 0x80) != 0;
  tmpl.bos_token = "<s>";
  tmpl.eos_token = "</s>";

  const json j = json::parse(rest, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    (void)data::DetectChatTemplate(rest, "tokenizer_config.json");
    (void)data::PythonStrip(rest);
    return 0;
  }
  const json* list = &j;
  if (j.is_object()) {
    if (auto it = j.find("bos_token"); it != j.end()) tmpl.bos_token = Text(*it);
    if (auto it = j.find("eos_token"); it != j.end()) tmpl.eos_token = Text(*it);
    if (auto it = j.find("date_string"); it != j.end()) tmpl.date_string = Text(*it);
    if (auto it = j.find("chat_template"); it != j.end()) {
      ftune::data::TokenizerConfig config;
      config.chat_template = Text(*it);
      config.bos_token = tmpl.bos_token;
      config.eos_token = tmpl.eos_token;
      for (const std::string& name : {std::string("auto"), std::string("llama3")}) {
        auto resolved = data::ResolveChatTemplate(name, config, "fuzz");
        if (resolved.ok() && resolved->bos_token != tmpl.bos_token) __builtin_trap();
      }
    }
    auto it = j.find("messages");
    if (it == j.end()) return 0;
    list = &*it;
  }
  if (!list->is_array()) return 0;
  std::vector<data::ChatMessage> messages;
  for (const json& m : *list) {
    data::ChatMessage msg;
    if (m.is_object()) {
      if (auto r = m.find("role"); r != m.end()) msg.role = Text(*r);
      if (auto c = m.find("content"); c != m.end()) msg.content = Text(*c);
    } else {
      msg.content = Text(m);
    }
    messages.push_back(std::move(msg));
  }
  auto rendered = data::RenderChat(tmpl, messages, add_generation_prompt);
  if (!rendered.ok()) {
    if (rendered.status().message().empty()) __builtin_trap();  // errors say why
    return 0;
  }
  CheckRendered(messages, *rendered);
  return 0;
}
