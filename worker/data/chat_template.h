// Chat templates: a `messages` conversation rendered to the exact string
// transformers' `tokenizer.apply_chat_template(messages, tokenize=False)`
// gives with the real models' Jinja templates, plus the byte spans of what
// the assistant turns train on.
//
// There is no Jinja interpreter here: each supported template is written out
// as code, statement for statement, and checked against transformers' output
// (tests/golden/data/make_golden.py embeds the Jinja sources):
//   llama3    Meta-Llama-3-8B-Instruct: bos, then per message
//             "<|start_header_id|>ROLE<|end_header_id|>\n\n" + trim(content) + "<|eot_id|>"
//   llama3.1  Llama-3.1-8B-Instruct / 3.3: as llama3, after a system block that is
//             always present: "Cutting Knowledge Date: December 2023\nToday Date: "
//             + date_string + "\n\n" + trim(system content). transformers passes no
//             date_string, so the template's own default "26 Jul 2024" is used.
//   llama2    Llama-2-7b-chat-hf: "<s>[INST] <<SYS>>\n...\n<</SYS>>\n\n... [/INST] answer </s>"
//   chatml    TRL's setup_chat_format ChatML: "<|im_start|>ROLE\ncontent<|im_end|>\n"
//   mistral   Mixtral-8x7B-Instruct-v0.1 / Mistral-7B-Instruct-v0.1,v0.2 (2024
//             template): "<s> [INST] system\n\nuser [/INST] answer</s>"
//   mistral-v0.3  Mistral-7B-Instruct-v0.3 without tools:
//             "<s>[INST] user[/INST] answer</s>" with trim(answer). Its quirk,
//             reproduced: the system message is written only into the LAST
//             message, when that is a user turn ("[INST] system\n\nuser[/INST]");
//             a conversation ending with an assistant turn loses it
//             (RenderDropsSystemMessage; the data pipeline warns).
//   qwen2.5   Qwen2.5-*-Instruct without tools: ChatML after a system block that
//             is always there: the first message's content when it is a system
//             message, else "You are Qwen, created by Alibaba Cloud. You are a
//             helpful assistant."; later system messages render in place.
// `trim` / `.strip()` are Python's str.strip() (Unicode whitespace).
//
// Assistant spans: for assistant message i, the span is what TRL calls the
// completion of a conversational prompt/completion pair:
//   render(messages[:i+1])[len(render(messages[:i], add_generation_prompt=True)):]
// i.e. the content and the end-of-turn token ("...<|eot_id|>", " answer </s>",
// "answer<|im_end|>\n", " answer</s>"), placed where it sits in the full text.
// (qwen2.5 and chatml spans are alike: "answer<|im_end|>\n"; mistral-v0.3's
// is " answer</s>" as mistral's. For mistral-v0.3 with a system message TRL's
// prompt is not a prefix of the full text, since only the prompt ends with a
// user turn; its spans are those of the conversation without the system
// message, which sit at the same offsets.)
// Loss masking turns these byte spans into token labels (packing.h).
//
// Thread-safety: pure functions of their arguments.
#ifndef FTUNE_WORKER_DATA_CHAT_TEMPLATE_H_
#define FTUNE_WORKER_DATA_CHAT_TEMPLATE_H_

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

#include "ftune/status.h"
#include "worker/data/tokenizer.h"

namespace ftune::data {

struct ChatMessage {
  std::string role;     // "system" | "user" | "assistant"
  std::string content;
  // The record's message carried a non-null "tool_calls" field. No renderer
  // writes tool calls; mistral-v0.3 refuses such messages (its template
  // would render them), the others render the message as if it had none.
  bool tool_calls = false;
};

// [begin, end) in bytes of a rendered string.
struct ByteSpan {
  size_t begin = 0;
  size_t end = 0;
  bool operator==(const ByteSpan& o) const { return begin == o.begin && end == o.end; }
};

struct RenderedChat {
  std::string text;
  std::vector<ByteSpan> assistant_spans;  // one per assistant message, in order
};

enum class ChatTemplateKind { kLlama3, kLlama31, kLlama2, kChatML, kMistral, kQwen25, kMistralV03 };

struct ChatTemplate {
  ChatTemplateKind kind = ChatTemplateKind::kLlama3;
  std::string bos_token;  // the tokenizer's, as the template sees them
  std::string eos_token;
  std::string date_string = "26 Jul 2024";  // llama3.1 only
};

// "llama3", "llama3.1", "llama2", "chatml", "mistral", "qwen2.5", "mistral-v0.3".
const std::vector<std::string>& SupportedChatTemplateNames();
std::string ChatTemplateName(ChatTemplateKind kind);
// An explicit name; anything else is an error listing the supported names.
Result<ChatTemplateKind> ChatTemplateKindFromName(const std::string& name);

// Recognizes a Jinja chat_template (tokenizer_config.json) by the markers of
// the supported templates. Templates of a known family with features this
// renderer does not reproduce (today's date via strftime_now, tool blocks
// of other families, a base model's unconditional generation prompt, the
// old Mistral spacing, Mistral templates after v0.3's) are errors that say
// what to set instead. `source`
// names the file in errors.
Result<ChatTemplateKind> DetectChatTemplate(std::string_view jinja, const std::string& source);

// name "auto" detects from config.chat_template (an error when absent);
// "llama3" names the Llama 3 family: it renders as llama3.1 when the
// config's own template is Llama 3.1's, else as Meta-Llama-3-Instruct's;
// the other names are taken as given. bos/eos come from the config.
// `source` names the tokenizer directory.
Result<ChatTemplate> ResolveChatTemplate(const std::string& name, const TokenizerConfig& config,
                                         const std::string& source);

// Renders `messages` as apply_chat_template does. Errors where the Jinja
// template raises (Llama 2 / Mistral role alternation, Mistral's
// roles other than user/assistant after the system message, an empty
// conversation for llama3.1, qwen2.5 and mistral-v0.3), for a role other
// than system/user/assistant, and for mistral-v0.3's tool messages (role
// tool / tool_results, or tool_calls), which ftune does not render.
Result<RenderedChat> RenderChat(const ChatTemplate& tmpl, const std::vector<ChatMessage>& messages,
                                bool add_generation_prompt = false);

// True when rendering `messages` with `kind` leaves out their leading system
// message: mistral-v0.3 writes it only into a last message that is a user
// turn, so a conversation ending with an assistant turn (every training
// conversation) is rendered without it, exactly as transformers does.
bool RenderDropsSystemMessage(ChatTemplateKind kind, const std::vector<ChatMessage>& messages);

// Python's str.strip(): removes leading and trailing Unicode whitespace
// (str.isspace) from UTF-8 text.
std::string_view PythonStrip(std::string_view text);

}  // namespace ftune::data

#endif  // FTUNE_WORKER_DATA_CHAT_TEMPLATE_H_
