// Chat templates against transformers: every conversation of
// tests/golden/data/golden_data.json (made by make_golden.py with
// transformers 5.17 apply_chat_template on the real models' Jinja templates)
// must render to the same string with the same assistant spans, or fail
// where the template raises. Also: detection from tokenizer_config.json
// chat_template strings, Python strip semantics.
#include <fstream>
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
  int rendered = 0, raised = 0;
  for (const json& rec : golden.at("chat")) {
    const std::string name = rec.at("template");
    const std::string where = name + " conversation " + std::to_string(rec.at("conversation").get<int>());
    const std::vector<ChatMessage> messages = Messages(rec.at("messages"));
    Result<RenderedChat> r = RenderChat(TemplateFor(name), messages);
    if (rec.contains("error")) {
      ASSERT_FALSE(r.ok()) << where << " should fail like transformers: " << rec.at("error");
      EXPECT_NE(r.status().message().find(rec.at("error").get<std::string>()), std::string::npos)
          << where << ": " << r.status().message();
      ++raised;
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
    ++rendered;
  }
  // 10 conversations x 5 templates (2 raise) + 11 for qwen2.5 (none raises).
  EXPECT_EQ(rendered, 59);
  EXPECT_EQ(raised, 2);
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
  for (const char* name : {"llama3", "llama3.1", "llama2", "chatml", "mistral", "qwen2.5"}) {
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
