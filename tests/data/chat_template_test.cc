// Chat templates against transformers: every conversation of
// tests/golden/data/golden_data.json (made by make_golden.py with
// transformers 5.17 apply_chat_template on the real models' Jinja templates)
// must render to the same string with the same assistant spans, or fail
// where the template raises. Also: detection from tokenizer_config.json
// chat_template strings, Python strip semantics.
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tokenizer_test_data.h"
#include "worker/data/chat_template.h"
#include "worker/data/tokenizer.h"

namespace ftune::data {
namespace {

using json = nlohmann::json;

json LoadGolden() {
  std::ifstream in(std::string(FTUNE_DATA_GOLDEN_DIR) + "/golden_data.json");
  EXPECT_TRUE(in.good()) << "cannot read " << FTUNE_DATA_GOLDEN_DIR << "/golden_data.json";
  return json::parse(in);
}

// bos/eos as make_golden.py passed them to each template.
ChatTemplate TemplateFor(const std::string& name) {
  ChatTemplate t;
  t.kind = *ChatTemplateKindFromName(name);
  if (name == "llama3" || name == "llama3.1") {
    t.bos_token = "<|begin_of_text|>";
    t.eos_token = "<|eot_id|>";
  } else if (name == "chatml") {
    t.bos_token = "<|im_start|>";
    t.eos_token = "<|im_end|>";
  } else if (name == "qwen2.5") {
    t.eos_token = "<|im_end|>";  // Qwen2.5 has no bos_token
  } else {
    t.bos_token = "<s>";
    t.eos_token = "</s>";
  }
  return t;
}

std::vector<ChatMessage> Messages(const json& j) {
  std::vector<ChatMessage> out;
  for (const json& m : j) out.push_back({m.at("role"), m.at("content")});
  return out;
}

TEST(ChatTemplateTest, MatchesTransformersApplyChatTemplate) {
  const json golden = LoadGolden();
  std::map<std::string, int> records, raised;  // by template
  for (const json& rec : golden.at("chat")) {
    const std::string name = rec.at("template");
    const std::string where = name + " conversation " + std::to_string(rec.at("conversation").get<int>());
    const std::vector<ChatMessage> messages = Messages(rec.at("messages"));
    ++records[name];
    Result<RenderedChat> r = RenderChat(TemplateFor(name), messages);
    if (rec.contains("error")) {
      ASSERT_FALSE(r.ok()) << where << " should fail like transformers: " << rec.at("error");
      EXPECT_NE(r.status().message().find(rec.at("error").get<std::string>()), std::string::npos)
          << where << ": " << r.status().message();
      ++raised[name];
      continue;
    }
    ASSERT_TRUE(r.ok()) << where << ": " << r.status().ToString();
    EXPECT_EQ(r->text, rec.at("text").get<std::string>()) << where;
    std::vector<ByteSpan> spans;
    for (const json& s : rec.at("assistant_spans")) spans.push_back({s[0], s[1]});
    EXPECT_EQ(r->assistant_spans, spans) << where;
    Result<RenderedChat> gen = RenderChat(TemplateFor(name), messages, /*add_generation_prompt=*/true);
    ASSERT_TRUE(gen.ok());
    EXPECT_EQ(gen->text, rec.at("generation_prompt").get<std::string>()) << where;
  }
  // Every record of the file is checked above, whatever its template; these
  // say which records the file must hold.
  const std::map<std::string, int> want_records = {{"llama3", 10}, {"llama3.1", 10},
                                                   {"llama2", 10}, {"chatml", 10},
                                                   {"mistral", 10}, {"qwen2.5", 11},
                                                   {"mistral-v0.3", 19}};
  for (const auto& [name, n] : want_records) EXPECT_EQ(records[name], n) << name;
  EXPECT_EQ(raised["llama2"], 1);
  EXPECT_EQ(raised["mistral"], 1);
  EXPECT_EQ(raised["mistral-v0.3"], 5);
}

TEST(ChatTemplateTest, SpansCoverContentAndEndOfTurn) {
  const std::vector<ChatMessage> conv = {{"user", "Hi"}, {"assistant", "Hello!"}};
  const auto span_text = [&](const std::string& name) {
    const RenderedChat r = *RenderChat(TemplateFor(name), conv);
    EXPECT_EQ(r.assistant_spans.size(), 1u);
    return r.text.substr(r.assistant_spans[0].begin, r.assistant_spans[0].end - r.assistant_spans[0].begin);
  };
  EXPECT_EQ(span_text("llama3"), "Hello!<|eot_id|>");
  EXPECT_EQ(span_text("llama3.1"), "Hello!<|eot_id|>");
  EXPECT_EQ(span_text("llama2"), " Hello! </s>");
  EXPECT_EQ(span_text("chatml"), "Hello!<|im_end|>\n");
  EXPECT_EQ(span_text("mistral"), " Hello!</s>");
  EXPECT_EQ(span_text("qwen2.5"), "Hello!<|im_end|>\n");
  EXPECT_EQ(span_text("mistral-v0.3"), " Hello!</s>");
}

// Mistral-7B-Instruct-v0.3's template, strings as jinja2 renders its Jinja
// source (make_golden.py's MISTRAL_V0_3) in transformers' environment.
TEST(ChatTemplateTest, MistralV03) {
  const ChatTemplate t = TemplateFor("mistral-v0.3");
  const auto span_text = [](const RenderedChat& r, size_t i) {
    const ByteSpan s = r.assistant_spans.at(i);
    return r.text.substr(s.begin, s.end - s.begin);
  };
  // A training conversation (ending with the assistant) loses its system
  // message, as in transformers.
  const std::vector<ChatMessage> trained = {
      {"system", "You are a terse assistant."}, {"user", "Name a prime."}, {"assistant", "7"}};
  const RenderedChat one = *RenderChat(t, trained);
  EXPECT_EQ(one.text, "<s>[INST] Name a prime.[/INST] 7</s>");
  ASSERT_EQ(one.assistant_spans.size(), 1u);
  EXPECT_EQ(span_text(one, 0), " 7</s>");
  EXPECT_EQ(RenderChat(t, trained, /*add_generation_prompt=*/true)->text, one.text);  // no effect
  EXPECT_TRUE(RenderDropsSystemMessage(ChatTemplateKind::kMistralV03, trained));
  EXPECT_FALSE(RenderDropsSystemMessage(ChatTemplateKind::kMistral, trained));

  // Ending with a user turn: the system message is written into that last turn
  // (not the first), with the user text untrimmed.
  const std::vector<ChatMessage> prompt = {{"system", "Be brief."},
                                           {"user", "Hi"},
                                           {"assistant", "Hello!"},
                                           {"user", "  And now?  "}};
  const RenderedChat multi = *RenderChat(t, prompt, /*add_generation_prompt=*/true);
  EXPECT_EQ(multi.text, "<s>[INST] Hi[/INST] Hello!</s>[INST] Be brief.\n\n  And now?  [/INST]");
  ASSERT_EQ(multi.assistant_spans.size(), 1u);
  EXPECT_EQ(multi.assistant_spans[0], (ByteSpan{19, 30}));
  EXPECT_FALSE(RenderDropsSystemMessage(ChatTemplateKind::kMistralV03, prompt));
  EXPECT_EQ(RenderChat(t, {{"system", ""}, {"user", "q"}})->text, "<s>[INST] \n\nq[/INST]");

  // Answers are trim()med (Python's strip: U+3000 and NBSP are whitespace).
  const RenderedChat trimmed = *RenderChat(
      t, {{"user", "one"}, {"assistant", "\xE3\x80\x80two\xC2\xA0\n"}, {"user", "three"}});
  EXPECT_EQ(trimmed.text, "<s>[INST] one[/INST] two</s>[INST] three[/INST]");
  EXPECT_EQ(span_text(trimmed, 0), " two</s>");

  // The template's own errors.
  const auto error = [&](const std::vector<ChatMessage>& messages) {
    Result<RenderedChat> r = RenderChat(t, messages);
    EXPECT_FALSE(r.ok());
    return r.ok() ? std::string() : std::string(r.status().message());
  };
  EXPECT_EQ(error({{"system", "s"}, {"assistant", "no user first"}}),
            "mistral-v0.3 chat template: After the optional system message, conversation roles "
            "must alternate user/assistant/user/assistant/...");
  EXPECT_NE(error({{"user", "a"}, {"assistant", "b"}, {"assistant", "c"}}).find("must alternate"),
            std::string::npos);
  EXPECT_EQ(error({{"user", "a"}, {"system", "late"}}),
            "mistral-v0.3 chat template: Only user and assistant roles are supported, with the "
            "exception of an initial optional system message!");
  EXPECT_NE(error({}).find("no messages"), std::string::npos);

  // Tools: refused, naming the template.
  const std::string tool = error({{"user", "weather?"}, {"tool", "{\"temp\": 20}"}});
  EXPECT_NE(tool.find("mistral-v0.3 chat template: messages[1] has role \"tool\""),
            std::string::npos)
      << tool;
  EXPECT_NE(tool.find("without tools"), std::string::npos) << tool;
  EXPECT_NE(error({{"user", "x"}, {"tool_results", "y"}}).find("tool_results"), std::string::npos);
  ChatMessage call{"assistant", "", /*tool_calls=*/true};
  EXPECT_NE(error({{"user", "weather?"}, call}).find("messages[1] has tool_calls"),
            std::string::npos);
  // The other renderers ignore the field (llama3.1's and qwen2.5's Jinja
  // sources would render the calls; the others ignore them too).
  EXPECT_TRUE(RenderChat(TemplateFor("mistral"), {{"user", "weather?"}, call}).ok());

  // eos is needed: every answer ends with it.
  TokenizerConfig config;
  config.bos_token = "<s>";
  auto no_eos = ResolveChatTemplate("mistral-v0.3", config, "/m");
  ASSERT_FALSE(no_eos.ok());
  EXPECT_NE(no_eos.status().message().find("eos_token"), std::string::npos);
}

TEST(ChatTemplateTest, Qwen25SystemBlockIsAlwaysThere) {
  const ChatTemplate t = TemplateFor("qwen2.5");
  const RenderedChat plain = *RenderChat(t, {{"user", "Hi"}});
  EXPECT_EQ(plain.text,
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
            "assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n");
  const RenderedChat own = *RenderChat(t, {{"system", "Be brief."}, {"user", "Hi"}}, true);
  EXPECT_EQ(own.text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>assistant\n");
  // A system message later in the conversation renders where it is.
  const RenderedChat later = *RenderChat(t, {{"user", "a"}, {"system", "b"}});
  EXPECT_NE(later.text.find("<|im_start|>user\na<|im_end|>\n<|im_start|>system\nb<|im_end|>\n"),
            std::string::npos);
  EXPECT_FALSE(RenderChat(t, {}).ok());
}

TEST(ChatTemplateTest, PythonStripUsesUnicodeWhitespace) {
  EXPECT_EQ(PythonStrip("  a b \n"), "a b");
  EXPECT_EQ(PythonStrip("\xC2\xA0\xE3\x80\x80x\xE2\x80\xA8"), "x");  // NBSP, ideographic space, U+2028
  EXPECT_EQ(PythonStrip("\x1C\x1Fx\x1D"), "x");                      // Python counts U+001C..U+001F
  EXPECT_EQ(PythonStrip("\xE2\x80\x8Bx"), "\xE2\x80\x8Bx");           // zero-width space is not whitespace
  // Stray continuation bytes are not code points: these two once decoded as
  // U+0085 (NEL) and were stripped, and a last one was read past the end.
  EXPECT_EQ(PythonStrip("\x82\x85x"), "\x82\x85x");
  const std::string tail = "x\xAD";
  EXPECT_EQ(PythonStrip(std::string_view(tail.data(), tail.size())), "x\xAD");
  EXPECT_EQ(PythonStrip("   "), "");
  EXPECT_EQ(PythonStrip("x\xE2"), "x\xE2");                           // a cut sequence is kept, not read past
}

TEST(ChatTemplateTest, DetectsKnownTemplatesFromMarkers) {
  const auto kind = [](const std::string& jinja) { return DetectChatTemplate(jinja, "cfg"); };
  // The real Llama 3 Instruct template (as in the npm llama3_1 package).
  std::string missing;
  const std::string dir = test_data::TokenizerDir("llama3_1", &missing);
  if (!dir.empty()) {
    auto tok = Tokenizer::Load(dir);
    ASSERT_TRUE(tok.ok());
    ASSERT_TRUE((*tok)->config().chat_template.has_value());
    auto k = kind(*(*tok)->config().chat_template);
    ASSERT_TRUE(k.ok()) << k.status().ToString();
    EXPECT_EQ(*k, ChatTemplateKind::kLlama3);
    auto resolved = ResolveChatTemplate("auto", (*tok)->config(), dir);
    ASSERT_TRUE(resolved.ok());
    EXPECT_EQ(resolved->bos_token, "<|begin_of_text|>");
  }
  // The base model's template (npm llama3 package) always appends the header.
  const std::string base_dir = test_data::TokenizerDir("llama3", &missing);
  if (!base_dir.empty()) {
    auto tok = Tokenizer::Load(base_dir);
    ASSERT_TRUE(tok.ok());
    auto k = kind(*(*tok)->config().chat_template);
    ASSERT_FALSE(k.ok());
    EXPECT_NE(k.status().message().find("always appends the assistant header"), std::string::npos);
  }
  EXPECT_EQ(*kind("{{- bos_token }}{%- if not date_string is defined %}{%- set date_string = \"26 Jul "
                  "2024\" %}{%- endif %}<|start_header_id|>Cutting Knowledge Date: December 2023 "
                  "<|eot_id|>{% if add_generation_prompt %}{% endif %}"),
            ChatTemplateKind::kLlama31);
  auto llama32 = kind("<|start_header_id|><|eot_id|>Cutting Knowledge Date date_string strftime_now");
  ASSERT_FALSE(llama32.ok());
  EXPECT_NE(llama32.status().message().find("strftime_now"), std::string::npos);
  EXPECT_EQ(*kind("{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
                  "'<<SYS>>\\n' + system_message"),
            ChatTemplateKind::kLlama2);
  EXPECT_EQ(*kind("{{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"),
            ChatTemplateKind::kMistral);
  EXPECT_FALSE(kind("{{ '[INST] ' + message['content'] + ' [/INST]' }}").ok());  // Mistral v0.1 original
  // Mistral-7B-Instruct-v0.3's markers; then Mistral Nemo's (no space after
  // "[INST]" or before the tool lists) and the v7 [SYSTEM_PROMPT] template.
  const std::string v03 =
      "{%- if loop.last and system_message is defined %}{{- \"[INST] \" + system_message + "
      "\"\\n\\n\" + message[\"content\"] + \"[/INST]\" }}{%- endif %}{{- \"[AVAILABLE_TOOLS] [\" }}"
      "{{- \"[TOOL_CALLS] [\" }}";
  EXPECT_EQ(*kind(v03), ChatTemplateKind::kMistralV03);
  const auto later = [&](const std::string& jinja) {
    Result<ChatTemplateKind> k = kind(jinja);
    EXPECT_FALSE(k.ok()) << jinja;
    return k.ok() ? std::string() : std::string(k.status().message());
  };
  EXPECT_NE(later("{%- if loop.last and system_message is defined %}"
                  "{{- \"[INST]\" + system_message }}{{- \"[AVAILABLE_TOOLS][\" }}"
                  "{{- \"[TOOL_CALLS][\" }}")
                .find("later Mistral template"),
            std::string::npos);
  EXPECT_NE(later(v03 + "{{ '[SYSTEM_PROMPT] ' + message['content'] + '[/SYSTEM_PROMPT]' }}")
                .find("mistral-v0.3 is Mistral-7B-Instruct-v0.3's"),
            std::string::npos);
  EXPECT_FALSE(kind("{{ bos_token }}{{ '[INST] ' + message['content'] + '[/INST]' }}"
                    "{{ '[SYSTEM_PROMPT] ' + message['content'] + '[/SYSTEM_PROMPT]' }}")
                   .ok());
  EXPECT_EQ(*kind("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
                  "+ '<|im_end|>' + '\n'}}{% endfor %}"),
            ChatTemplateKind::kChatML);
  EXPECT_FALSE(kind("<|im_start|>system\nYou are Qwen<|im_end|>").ok());
  // Qwen2's (not 2.5's) template, whose default system prompt differs.
  EXPECT_FALSE(kind("{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
                    "<tool_call>{% if add_generation_prompt %}{% endif %}")
                   .ok());
  // The real Qwen2.5-Instruct template (npm qwen2_5 package), resolved from
  // its tokenizer_config.json, which names no bos_token.
  const std::string qwen_dir = test_data::TokenizerDir("qwen2_5", &missing);
  if (!qwen_dir.empty()) {
    auto tok = Tokenizer::Load(qwen_dir);
    ASSERT_TRUE(tok.ok()) << tok.status().ToString();
    auto resolved = ResolveChatTemplate("auto", (*tok)->config(), qwen_dir);
    ASSERT_TRUE(resolved.ok()) << resolved.status().ToString();
    EXPECT_EQ(resolved->kind, ChatTemplateKind::kQwen25);
    EXPECT_EQ(resolved->eos_token, "<|im_end|>");
  }
  auto unknown = kind("{{ messages }}<start_of_turn>");
  ASSERT_FALSE(unknown.ok());
  for (const char* name :
       {"llama3", "llama3.1", "llama2", "chatml", "mistral", "qwen2.5", "mistral-v0.3"}) {
    EXPECT_NE(unknown.status().message().find(name), std::string::npos) << unknown.status().message();
  }
  EXPECT_NE(unknown.status().message().find("cfg"), std::string::npos);
}

TEST(ChatTemplateTest, NamesAndConfigErrors) {
  EXPECT_FALSE(ChatTemplateKindFromName("vicuna").ok());
  EXPECT_NE(ChatTemplateKindFromName("vicuna").status().message().find("llama2"), std::string::npos);
  TokenizerConfig config;  // no chat_template, no tokens
  auto r = ResolveChatTemplate("auto", config, "/models/x");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("/models/x/tokenizer_config.json has no chat_template"),
            std::string::npos);
  auto no_bos = ResolveChatTemplate("llama3", config, "/models/x");
  ASSERT_FALSE(no_bos.ok());
  EXPECT_NE(no_bos.status().message().find("bos_token"), std::string::npos);
  EXPECT_TRUE(ResolveChatTemplate("chatml", config, "/models/x").ok());  // uses no special tokens
  // "llama3" follows the model's own Llama 3 version.
  config.bos_token = "<|begin_of_text|>";
  config.chat_template = "<|start_header_id|><|eot_id|>Cutting Knowledge Date date_string";
  EXPECT_EQ(ResolveChatTemplate("llama3", config, "/m")->kind, ChatTemplateKind::kLlama31);
  config.chat_template = "{% if add_generation_prompt %}<|start_header_id|><|eot_id|>{% endif %}";
  EXPECT_EQ(ResolveChatTemplate("llama3", config, "/m")->kind, ChatTemplateKind::kLlama3);
  EXPECT_EQ(ResolveChatTemplate("llama3.1", config, "/m")->kind, ChatTemplateKind::kLlama31);
  EXPECT_FALSE(RenderChat(TemplateFor("llama3"), {{"tool", "x"}}).ok());
  EXPECT_FALSE(RenderChat(TemplateFor("llama3.1"), {}).ok());
}

}  // namespace
}  // namespace ftune::data
