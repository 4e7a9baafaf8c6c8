// See chat_template.h. Each renderer below follows its Jinja source (quoted
// in tests/golden/data/make_golden.py) statement for statement; where the
// template raises, the message is the template's own.
#include "worker/data/chat_template.h"

#include <utility>

#include "worker/data/utf8.h"

namespace ftune::data {
namespace {

// Python's str.isspace(): Unicode White_Space plus the information
// separators U+001C..U+001F, which Python also counts.
bool IsPythonSpace(uint32_t cp) { return IsWhiteSpace(cp) || (cp >= 0x1C && cp <= 0x1F); }

// Code point at `pos` when it is a complete sequence inside `text`, else -1.
// A stray continuation byte is not one: DecodeUtf8At would read it as the
// lead of a 2-byte sequence, past the end of the text when it is the last.
int64_t CodePointAt(std::string_view text, size_t pos, size_t* length) {
  const auto lead = static_cast<unsigned char>(text[pos]);
  if (lead >= 0x80 && lead < 0xC0) return -1;
  const size_t n = Utf8Length(lead);
  if (pos + n > text.size()) return -1;
  return DecodeUtf8At(text, pos, length);
}

// Renders in pieces and records spans; keeps the renderers short.
class Out {
 public:
  void Add(std::string_view s) { text_.append(s); }
  size_t size() const { return text_.size(); }
  void Span(size_t begin) { spans_.push_back({begin, text_.size()}); }
  RenderedChat Take() { return {std::move(text_), std::move(spans_)}; }

 private:
  std::string text_;
  std::vector<ByteSpan> spans_;
};

Status CheckRoles(const std::vector<ChatMessage>& messages) {
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string& r = messages[i].role;
    if (r != "system" && r != "user" && r != "assistant") {
      return InvalidArgumentError("messages[" + std::to_string(i) + "].role: \"" + r +
                                  "\" is not one of system, user, assistant");
    }
  }
  return OkStatus();
}

void Llama3Message(const ChatMessage& m, Out* out) {
  out->Add("<|start_header_id|>");
  out->Add(m.role);
  out->Add("<|end_header_id|>\n\n");
  const size_t begin = out->size();
  out->Add(PythonStrip(m.content));
  out->Add("<|eot_id|>");
  if (m.role == "assistant") out->Span(begin);
}

// An optional leading system message (llama3.1, llama2, mistral): its
// content (nullptr when there is none) and the index of the first other one.
struct LeadingSystem {
  const std::string* content = nullptr;
  size_t first = 0;
};

LeadingSystem SplitSystem(const std::vector<ChatMessage>& messages) {
  if (messages.empty() || messages[0].role != "system") return {};
  return {&messages[0].content, 1};
}

RenderedChat RenderLlama3(const ChatTemplate& t, const std::vector<ChatMessage>& messages,
                          bool add_generation_prompt) {
  Out out;
  for (size_t i = 0; i < messages.size(); ++i) {
    if (i == 0) out.Add(t.bos_token);
    Llama3Message(messages[i], &out);
  }
  if (add_generation_prompt) out.Add("<|start_header_id|>assistant<|end_header_id|>\n\n");
  return out.Take();
}

Result<RenderedChat> RenderLlama31(const ChatTemplate& t, const std::vector<ChatMessage>& messages,
                                   bool add_generation_prompt) {
  // `messages[0]['role']` on an empty list is an UndefinedError in Jinja.
  if (messages.empty()) {
    return InvalidArgumentError("llama3.1 chat template: the conversation has no messages");
  }
  Out out;
  out.Add(t.bos_token);
  const auto [system_message, first] = SplitSystem(messages);
  const std::string_view system =
      system_message != nullptr ? PythonStrip(*system_message) : std::string_view();
  out.Add("<|start_header_id|>system<|end_header_id|>\n\n");
  out.Add("Cutting Knowledge Date: December 2023\n");
  out.Add("Today Date: ");
  out.Add(t.date_string);
  out.Add("\n\n");
  out.Add(system);
  out.Add("<|eot_id|>");
  for (size_t i = first; i < messages.size(); ++i) Llama3Message(messages[i], &out);
  if (add_generation_prompt) out.Add("<|start_header_id|>assistant<|end_header_id|>\n\n");
  return out.Take();
}

Status AlternationError(const char* message) { return InvalidArgumentError(message); }

Result<RenderedChat> RenderLlama2(const ChatTemplate& t, const std::vector<ChatMessage>& messages) {
  const auto [system, first] = SplitSystem(messages);
  Out out;
  for (size_t i = first; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    const size_t index0 = i - first;
    if ((m.role == "user") != (index0 % 2 == 0)) {
      return AlternationError("llama2 chat template: Conversation roles must alternate "
                              "user/assistant/user/assistant/...");
    }
    std::string content;
    if (index0 == 0 && system != nullptr) {
      content = "<<SYS>>\n" + *system + "\n<</SYS>>\n\n" + m.content;
    } else {
      content = m.content;
    }
    if (m.role == "user") {
      out.Add(t.bos_token);
      out.Add("[INST] ");
      out.Add(PythonStrip(content));
      out.Add(" [/INST]");
    } else if (m.role == "assistant") {
      const size_t begin = out.size();
      out.Add(" ");
      out.Add(PythonStrip(content));
      out.Add(" ");
      out.Add(t.eos_token);
      out.Span(begin);
    }
    // A "system" message past the first renders nothing (no branch for it).
  }
  return out.Take();
}

Result<RenderedChat> RenderMistral(const ChatTemplate& t, const std::vector<ChatMessage>& messages) {
  const auto [system, first] = SplitSystem(messages);
  Out out;
  out.Add(t.bos_token);
  for (size_t i = first; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    const size_t index0 = i - first;
    if ((m.role == "user") != (index0 % 2 == 0)) {
      return AlternationError("mistral chat template: After the optional system message, "
                              "conversation roles must alternate user/assistant/user/assistant/...");
    }
    if (m.role == "user") {
      out.Add(" [INST] ");
      if (index0 == 0 && system != nullptr) {
        out.Add(*system);
        out.Add("\n\n");
      }
      out.Add(m.content);
      out.Add(" [/INST]");
    } else if (m.role == "assistant") {
      const size_t begin = out.size();
      out.Add(" ");
      out.Add(m.content);
      out.Add(t.eos_token);
      out.Span(begin);
    } else {
      return InvalidArgumentError(
          "mistral chat template: Only user and assistant roles are supported, with the exception "
          "of an initial optional system message!");
    }
  }
  return out.Take();
}

// Mistral-7B-Instruct-v0.3's template with no tools passed. Its alternation
// check skips tool messages, but ftune refuses those before (they would
// render as [TOOL_CALLS] / [TOOL_RESULTS] blocks), so it counts every message.
Result<RenderedChat> RenderMistralV03(const ChatTemplate& t,
                                      const std::vector<ChatMessage>& messages) {
  // `messages[0]['role']` on an empty list is an UndefinedError in Jinja.
  if (messages.empty()) {
    return InvalidArgumentError("mistral-v0.3 chat template: the conversation has no messages");
  }
  const auto [system, first] = SplitSystem(messages);
  for (size_t i = first; i < messages.size(); ++i) {
    if ((messages[i].role == "user") != ((i - first) % 2 == 0)) {
      return AlternationError("mistral-v0.3 chat template: After the optional system message, "
                              "conversation roles must alternate user/assistant/user/assistant/...");
    }
  }
  Out out;
  out.Add(t.bos_token);
  for (size_t i = first; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    if (m.role == "user") {
      // The quirk: the system message goes into the last message only.
      out.Add("[INST] ");
      if (i + 1 == messages.size() && system != nullptr) {
        out.Add(*system);
        out.Add("\n\n");
      }
      out.Add(m.content);
      out.Add("[/INST]");
    } else if (m.role == "assistant") {
      const size_t begin = out.size();
      out.Add(" ");
      out.Add(PythonStrip(m.content));
      out.Add(t.eos_token);
      out.Span(begin);
    } else {
      return InvalidArgumentError(
          "mistral-v0.3 chat template: Only user and assistant roles are supported, with the "
          "exception of an initial optional system message!");
    }
  }
  return out.Take();
}

// Tool messages, which Mistral v0.3's template renders (as [TOOL_CALLS] /
// [TOOL_RESULTS] blocks) and ftune does not: an error rather than text that
// differs from transformers'.
Status RefuseMistralV03Tools(const std::vector<ChatMessage>& messages) {
  for (size_t i = 0; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    const bool tool_role = m.role == "tool" || m.role == "tool_results";
    if (!tool_role && !m.tool_calls) continue;
    return InvalidArgumentError(
        "mistral-v0.3 chat template: messages[" + std::to_string(i) + "] " +
        (tool_role ? "has role \"" + m.role + "\"" : std::string("has tool_calls")) +
        ": ftune renders Mistral-7B-Instruct-v0.3's template without tools (no tool calls or "
        "tool results)");
  }
  return OkStatus();
}

// One ChatML turn; an assistant turn's content and end marker are its span.
void AddChatMLTurn(Out& out, const ChatMessage& m) {
  out.Add("<|im_start|>");
  out.Add(m.role);
  out.Add("\n");
  const size_t begin = out.size();
  out.Add(m.content);
  out.Add("<|im_end|>\n");
  if (m.role == "assistant") out.Span(begin);
}

RenderedChat RenderChatML(const std::vector<ChatMessage>& messages, bool add_generation_prompt) {
  Out out;
  for (const ChatMessage& m : messages) AddChatMLTurn(out, m);
  if (add_generation_prompt) out.Add("<|im_start|>assistant\n");
  return out.Take();
}

constexpr std::string_view kQwenDefaultSystem =
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.";

// Qwen2.5-Instruct's template with no tools passed (its `tools` branches
// are not taken, and no message carries tool_calls).
Result<RenderedChat> RenderQwen25(const std::vector<ChatMessage>& messages,
                                  bool add_generation_prompt) {
  // `messages[0]['role']` on an empty list is an UndefinedError in Jinja.
  if (messages.empty()) {
    return InvalidArgumentError("qwen2.5 chat template: the conversation has no messages");
  }
  Out out;
  out.Add("<|im_start|>system\n");
  out.Add(messages[0].role == "system" ? std::string_view(messages[0].content)
                                       : kQwenDefaultSystem);
  out.Add("<|im_end|>\n");
  for (size_t i = 0; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    if (m.role == "system" && i == 0) continue;  // rendered above
    AddChatMLTurn(out, m);
  }
  if (add_generation_prompt) out.Add("<|im_start|>assistant\n");
  return out.Take();
}

bool Has(std::string_view text, std::string_view marker) {
  return text.find(marker) != std::string_view::npos;
}

std::string SupportedList() {
  std::string s;
  for (const std::string& n : SupportedChatTemplateNames()) s += (s.empty() ? "" : ", ") + n;
  return s;
}

}  // namespace

std::string_view PythonStrip(std::string_view text) {
  size_t begin = 0;
  while (begin < text.size()) {
    size_t n = 0;
    const int64_t cp = CodePointAt(text, begin, &n);
    if (cp < 0 || !IsPythonSpace(static_cast<uint32_t>(cp))) break;
    begin += n;
  }
  size_t end = text.size();
  while (end > begin) {
    size_t start = end - 1;  // back up to the lead byte (at most 3 continuation bytes)
    while (start > begin && end - start < 4 &&
           (static_cast<unsigned char>(text[start]) & 0xC0) == 0x80) {
      --start;
    }
    size_t n = 0;
    const int64_t cp = CodePointAt(text, start, &n);
    if (cp < 0 || start + n != end || !IsPythonSpace(static_cast<uint32_t>(cp))) break;
    end = start;
  }
  return text.substr(begin, end - begin);
}

const std::vector<std::string>& SupportedChatTemplateNames() {
  static const std::vector<std::string> names = {"llama3",  "llama3.1", "llama2",      "chatml",
                                                 "mistral", "qwen2.5",  "mistral-v0.3"};
  return names;
}

std::string ChatTemplateName(ChatTemplateKind kind) {
  switch (kind) {
    case ChatTemplateKind::kLlama3: return "llama3";
    case ChatTemplateKind::kLlama31: return "llama3.1";
    case ChatTemplateKind::kLlama2: return "llama2";
    case ChatTemplateKind::kChatML: return "chatml";
    case ChatTemplateKind::kMistral: return "mistral";
    case ChatTemplateKind::kQwen25: return "qwen2.5";
    case ChatTemplateKind::kMistralV03: return "mistral-v0.3";
  }
  return "unknown";
}

Result<ChatTemplateKind> ChatTemplateKindFromName(const std::string& name) {
  if (name == "llama3") return ChatTemplateKind::kLlama3;
  if (name == "llama3.1") return ChatTemplateKind::kLlama31;
  if (name == "llama2") return ChatTemplateKind::kLlama2;
  if (name == "chatml") return ChatTemplateKind::kChatML;
  if (name == "mistral") return ChatTemplateKind::kMistral;
  if (name == "qwen2.5") return ChatTemplateKind::kQwen25;
  if (name == "mistral-v0.3") return ChatTemplateKind::kMistralV03;
  return InvalidArgumentError("chat_template \"" + name + "\" is not supported; use auto or one of " +
                              SupportedList());
}

Result<ChatTemplateKind> DetectChatTemplate(std::string_view jinja, const std::string& source) {
  const std::string where = source + ": chat_template ";
  const std::string fix = "; set dataset.chat_template to one of " + SupportedList();
  if (Has(jinja, "<|start_header_id|>") && Has(jinja, "<|eot_id|>")) {
    if (Has(jinja, "Cutting Knowledge Date")) {
      if (Has(jinja, "strftime_now")) {
        return InvalidArgumentError(
            where + "is Llama 3.2-style: it stamps today's date (strftime_now) into every "
                    "conversation, which makes prepared data depend on the day" + fix +
            " (llama3.1 renders the fixed date 26 Jul 2024)");
      }
      if (!Has(jinja, "date_string")) {
        return InvalidArgumentError(where + "looks like Llama 3.1's but has no date_string" + fix);
      }
      return ChatTemplateKind::kLlama31;
    }
    if (!Has(jinja, "add_generation_prompt")) {
      return InvalidArgumentError(
          where + "looks like Llama 3's but always appends the assistant header (the base "
                  "model's template, not a chat template)" + fix + " (llama3 is Meta-Llama-3-Instruct's)");
    }
    if (Has(jinja, "tools") || Has(jinja, "ipython")) {
      return InvalidArgumentError(where + "is a Llama 3 template with tool handling ftune does not "
                                          "recognize" + fix);
    }
    return ChatTemplateKind::kLlama3;
  }
  if (Has(jinja, "<<SYS>>") && Has(jinja, "[INST]")) return ChatTemplateKind::kLlama2;
  if (Has(jinja, "[INST]")) {
    // Mistral-7B-Instruct-v0.3: tool blocks written with a space before the
    // list, "[INST] " with one after, the system message in the last turn.
    // Later templates write "[INST]" without the space (Mistral Nemo) or
    // have a [SYSTEM_PROMPT] block.
    if (Has(jinja, "[AVAILABLE_TOOLS] [") && Has(jinja, "[TOOL_CALLS] [") &&
        Has(jinja, "[INST] ") && Has(jinja, "loop.last and system_message is defined") &&
        !Has(jinja, "[SYSTEM_PROMPT]")) {
      return ChatTemplateKind::kMistralV03;
    }
    if (Has(jinja, "[AVAILABLE_TOOLS]") || Has(jinja, "[SYSTEM_PROMPT]")) {
      return InvalidArgumentError(
          where + "is a later Mistral template (tools / [SYSTEM_PROMPT]) that ftune does not "
                  "render" + fix + " (mistral-v0.3 is Mistral-7B-Instruct-v0.3's)");
    }
    if (!Has(jinja, "' [INST] '") || !Has(jinja, "system_message")) {
      return InvalidArgumentError(
          where + "is an early Mistral template ('[INST] ' without the leading space, no system "
                  "message) that ftune does not render" + fix +
          " (mistral is the 2024 Mistral-7B/Mixtral-8x7B-Instruct template)");
    }
    return ChatTemplateKind::kMistral;
  }
  if (Has(jinja, "<|im_start|>") && Has(jinja, "<|im_end|>")) {
    // Qwen2.5-Instruct: its default system prompt and its tool-call format.
    // Only conversations without tools are rendered (the data has none).
    if (Has(jinja, kQwenDefaultSystem) && Has(jinja, "<tool_call>") &&
        Has(jinja, "add_generation_prompt")) {
      return ChatTemplateKind::kQwen25;
    }
    if (Has(jinja, "tools") || Has(jinja, "You are")) {
      return InvalidArgumentError(where + "is a ChatML variant with a default system prompt or tool "
                                          "handling that ftune does not render (Qwen2.5-Instruct's "
                                          "is recognized; this is another)" + fix);
    }
    return ChatTemplateKind::kChatML;
  }
  return InvalidArgumentError(where + "is not one ftune recognizes" + fix);
}

Result<ChatTemplate> ResolveChatTemplate(const std::string& name, const TokenizerConfig& config,
                                         const std::string& source) {
  ChatTemplate t;
  if (name == "auto" || name.empty()) {
    if (!config.chat_template.has_value() || config.chat_template->empty()) {
      return InvalidArgumentError(source + "/tokenizer_config.json has no chat_template, so "
                                           "chat_template \"auto\" cannot choose one; set "
                                           "dataset.chat_template to one of " + SupportedList());
    }
    FTUNE_ASSIGN_OR_RETURN(t.kind, DetectChatTemplate(*config.chat_template,
                                                             source + "/tokenizer_config.json"));
  } else {
    FTUNE_ASSIGN_OR_RETURN(t.kind, ChatTemplateKindFromName(name));
    // "llama3" names the family (the JobSpec's choices have no "llama3.1"):
    // a model whose own template is Llama 3.1's renders with it.
    if (t.kind == ChatTemplateKind::kLlama3 && config.chat_template.has_value()) {
      Result<ChatTemplateKind> own = DetectChatTemplate(*config.chat_template, source);
      if (own.ok() && *own == ChatTemplateKind::kLlama31) t.kind = ChatTemplateKind::kLlama31;
    }
  }
  t.bos_token = config.bos_token.value_or("");
  t.eos_token = config.eos_token.value_or("");
  const bool needs_bos = t.kind != ChatTemplateKind::kChatML && t.kind != ChatTemplateKind::kQwen25;
  const bool needs_eos = t.kind == ChatTemplateKind::kLlama2 || t.kind == ChatTemplateKind::kMistral ||
                         t.kind == ChatTemplateKind::kMistralV03;
  if ((needs_bos && t.bos_token.empty()) || (needs_eos && t.eos_token.empty())) {
    return InvalidArgumentError(source + "/tokenizer_config.json names no " +
                                (needs_bos && t.bos_token.empty() ? "bos_token" : "eos_token") +
                                ", which the " + ChatTemplateName(t.kind) + " chat template needs");
  }
  return t;
}

Result<RenderedChat> RenderChat(const ChatTemplate& tmpl, const std::vector<ChatMessage>& messages,
                                bool add_generation_prompt) {
  // Before CheckRoles, so that a tool message is refused naming the template.
  if (tmpl.kind == ChatTemplateKind::kMistralV03) {
    FTUNE_RETURN_IF_ERROR(RefuseMistralV03Tools(messages));
  }
  FTUNE_RETURN_IF_ERROR(CheckRoles(messages));
  switch (tmpl.kind) {
    case ChatTemplateKind::kLlama3: return RenderLlama3(tmpl, messages, add_generation_prompt);
    case ChatTemplateKind::kLlama31: return RenderLlama31(tmpl, messages, add_generation_prompt);
    case ChatTemplateKind::kLlama2: return RenderLlama2(tmpl, messages);
    case ChatTemplateKind::kChatML: return RenderChatML(messages, add_generation_prompt);
    case ChatTemplateKind::kMistral: return RenderMistral(tmpl, messages);
    case ChatTemplateKind::kQwen25: return RenderQwen25(messages, add_generation_prompt);
    // add_generation_prompt: the template has no generation prompt.
    case ChatTemplateKind::kMistralV03: return RenderMistralV03(tmpl, messages);
  }
  return InternalError("unknown chat template kind");
}

bool RenderDropsSystemMessage(ChatTemplateKind kind, const std::vector<ChatMessage>& messages) {
  return kind == ChatTemplateKind::kMistralV03 && !messages.empty() &&
         messages.front().role == "system" && messages.back().role != "user";
}

}  // namespace ftune::data
