// See generate_command.h.
#include "worker/trainer/generate_command.h"

#include <ATen/Context.h>
#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <optional>
#include <utility>

#include "ftune/file_util.h"
#include "ftune/text_lines.h"
#include "worker/data/text_stream.h"
#include "worker/data/tokenizer.h"
#include "worker/trainer/bnb_checkpoint.h"

namespace ftune::trainer {
namespace {

using json = nlohmann::json;

// Messages files are conversations typed or assembled by hand.
constexpr uint64_t kMaxMessagesFileBytes = 64ull << 20;

std::string Dump(const json& j) {
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}


Result<c10::Device> ParseDevice(const std::string& name) {
  if (name == "cpu") return c10::Device(c10::kCPU);
  if (name == "cuda") {
    if (!at::hasCUDA()) {
      return FailedPreconditionError("--device cuda: this LibTorch build or machine has no CUDA");
    }
    return c10::Device(c10::kCUDA, 0);
  }
  return InvalidArgumentError("--device must be cpu or cuda, got \"" + name + "\"");
}

std::string DtypeName(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return "float32";
    case c10::ScalarType::BFloat16: return "bfloat16";
    case c10::ScalarType::Half: return "float16";
    default: return c10::toString(t);
  }
}

// eos_token_id of generation_config.json (an id or a list), when the file
// exists; transformers' generate stops at these.
Result<std::vector<int64_t>> GenerationConfigEos(const std::string& dir) {
  const std::string path = dir + "/generation_config.json";
  if (!IsRegularFile(path)) return std::vector<int64_t>{};
  FTUNE_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path, kMaxSmallFileBytes));
  json doc = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded() || !doc.is_object()) {
    return InvalidArgumentError(path + ": not a JSON object");
  }
  std::vector<int64_t> out;
  if (!doc.contains("eos_token_id") || doc["eos_token_id"].is_null()) return out;
  const json& e = doc["eos_token_id"];
  for (const json& v : e.is_array() ? e : json::array({e})) {
    if (!v.is_number_integer()) {
      return InvalidArgumentError(path + ": eos_token_id must be an id or a list of ids, got " +
                                  e.dump());
    }
    out.push_back(v.get<int64_t>());
  }
  return out;
}

// The prompt's ids and, when a chat template rendered it, that template.
struct Prompt {
  std::vector<int64_t> ids;
  std::optional<data::ChatTemplate> chat;
};

Result<Prompt> BuildPrompt(const GenerateCommandOptions& o, const data::Tokenizer* tokenizer,
                           const std::string& tokenizer_dir,
                           const std::vector<data::ChatMessage>& messages) {
  Prompt p;
  if (!o.input_ids.empty()) {
    FTUNE_ASSIGN_OR_RETURN(p.ids, ParseIdList(o.input_ids));
    return p;
  }
  std::vector<int32_t> ids;
  if (o.chat_template == "none") {
    if (!o.messages_path.empty() || !o.system.empty()) {
      return InvalidArgumentError(
          "--chat-template none takes --prompt alone (messages and --system need a template)");
    }
    ids = tokenizer->Encode(o.prompt, /*add_special_tokens=*/true);
  } else {
    FTUNE_ASSIGN_OR_RETURN(data::ChatTemplate chat,
                           data::ResolveChatTemplate(o.chat_template, tokenizer->config(),
                                                     tokenizer_dir));
    Result<data::RenderedChat> rendered = data::RenderChat(chat, messages,
                                                           /*add_generation_prompt=*/true);
    if (!rendered.ok()) {
      return Status(rendered.status().code(),
                    "chat template " + data::ChatTemplateName(chat.kind) + ": " +
                        rendered.status().message());
    }
    // As the data pipeline encodes a rendered conversation: the template
    // writes bos itself.
    ids = tokenizer->Encode(rendered->text, /*add_special_tokens=*/false);
    p.chat = chat;
  }
  p.ids.assign(ids.begin(), ids.end());
  return p;
}

Status CheckOptions(const GenerateCommandOptions& o) {
  const int inputs = !o.prompt.empty() + !o.messages_path.empty() + !o.input_ids.empty();
  if (inputs != 1) {
    return InvalidArgumentError(inputs == 0
                                    ? "give the input: --prompt TEXT, --messages FILE or --input-ids"
                                    : "--prompt, --messages and --input-ids exclude each other");
  }
  if (!o.system.empty() && o.prompt.empty()) {
    return InvalidArgumentError("--system goes with --prompt (put a system line in --messages)");
  }
  if (o.max_new_tokens < 1) {
    return InvalidArgumentError("--max-new-tokens (" + std::to_string(o.max_new_tokens) +
                                ") must be >= 1");
  }
  FTUNE_RETURN_IF_ERROR(o.sampling.Validate());
  if (o.model_dir.empty()) return InvalidArgumentError("--model is required");
  if (!IsDirectory(o.model_dir)) {
    return NotFoundError("--model " + o.model_dir + ": no such directory");
  }
  if (!o.adapter_dir.empty() && !IsDirectory(o.adapter_dir)) {
    return NotFoundError("--adapter " + o.adapter_dir + ": no such directory");
  }
  return OkStatus();
}

}  // namespace

std::vector<int64_t> GenerationStopIds(const LlamaConfig& config,
                                       const std::vector<int64_t>& generation_eos,
                                       const data::Tokenizer* tokenizer,
                                       const std::optional<data::ChatTemplate>& chat) {
  std::vector<int64_t> ids = config.eos_token_ids;
  ids.insert(ids.end(), generation_eos.begin(), generation_eos.end());
  if (tokenizer != nullptr) {
    if (tokenizer->eos_id()) ids.push_back(*tokenizer->eos_id());
    if (chat) {
      const char* end_of_turn = nullptr;
      switch (chat->kind) {
        case data::ChatTemplateKind::kLlama3:
        case data::ChatTemplateKind::kLlama31: end_of_turn = "<|eot_id|>"; break;
        case data::ChatTemplateKind::kChatML: end_of_turn = "<|im_end|>"; break;
        default: break;  // llama2 / mistral end a turn with eos
      }
      if (end_of_turn != nullptr) {
        if (std::optional<int32_t> id = tokenizer->TokenToId(end_of_turn)) ids.push_back(*id);
      }
    }
  }
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  return ids;
}

Result<std::vector<data::ChatMessage>> ParseMessagesJsonl(std::string_view text,
                                                          const std::string& source) {
  std::vector<data::ChatMessage> out;
  NonBlankLines lines(text);
  std::string_view line_text;
  int64_t line = 0;
  while (lines.Next(&line_text, &line)) {
    const std::string where = source + " line " + std::to_string(line) + ": ";
    json doc = json::parse(line_text.begin(), line_text.end(), nullptr, /*allow_exceptions=*/false);
    if (doc.is_discarded()) {
      return InvalidArgumentError(where +
                                  "not valid JSON (expected {\"role\": ..., \"content\": ...})");
    }
    if (!doc.is_object()) {
      return InvalidArgumentError(where + "expected an object {\"role\": ..., \"content\": ...}, got " +
                                  doc.type_name());
    }
    for (const char* key : {"role", "content"}) {
      if (!doc.contains(key) || !doc[key].is_string()) {
        return InvalidArgumentError(where + "\"" + key + "\" must be a string");
      }
    }
    data::ChatMessage m{doc["role"].get<std::string>(), doc["content"].get<std::string>(),
                        doc.contains("tool_calls") && !doc["tool_calls"].is_null()};
    if (m.role != "system" && m.role != "user" && m.role != "assistant") {
      return InvalidArgumentError(where + "unknown role \"" + m.role +
                                  "\" (expected system, user or assistant)");
    }
    out.push_back(std::move(m));
  }
  if (out.empty()) return InvalidArgumentError(source + ": no messages (the file is empty)");
  return out;
}

Result<std::vector<int64_t>> ParseIdList(const std::string& text) {
  std::vector<int64_t> ids;
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t end = text.find(',', pos);
    if (end == std::string::npos) end = text.size();
    std::string item = text.substr(pos, end - pos);
    item.erase(0, item.find_first_not_of(" \t"));
    item.erase(item.find_last_not_of(" \t") + 1);
    char* stop = nullptr;
    const long long v = item.empty() ? 0 : std::strtoll(item.c_str(), &stop, 10);
    if (item.empty() || *stop != '\0' || v < 0) {
      return InvalidArgumentError("--input-ids: \"" + item + "\" (entry " +
                                  std::to_string(ids.size()) + ") is not a token id");
    }
    ids.push_back(v);
    pos = end + 1;
  }
  return ids;
}

Status RunGenerate(const GenerateCommandOptions& o, std::ostream& out, std::ostream& err) {
  FTUNE_RETURN_IF_ERROR(CheckOptions(o));
  FTUNE_ASSIGN_OR_RETURN(c10::Device device, ParseDevice(o.device));

  // Everything about the input before the model loads, so a typo fails fast.
  std::vector<data::ChatMessage> messages;
  if (!o.messages_path.empty()) {
    Result<std::string> text = ReadFileToString(o.messages_path, kMaxMessagesFileBytes);
    if (!text.ok()) {
      return Status(text.status().code(), "--messages " + text.status().message());
    }
    FTUNE_ASSIGN_OR_RETURN(messages, ParseMessagesJsonl(*text, o.messages_path));
  } else if (!o.prompt.empty()) {
    if (!o.system.empty()) messages.push_back({"system", o.system});
    messages.push_back({"user", o.prompt});
  }
  const std::string tokenizer_dir = o.tokenizer_dir.empty() ? o.model_dir : o.tokenizer_dir;
  std::unique_ptr<data::Tokenizer> tokenizer;
  const bool has_tokenizer_file = IsRegularFile(tokenizer_dir + "/tokenizer.json");
  if (o.input_ids.empty() || has_tokenizer_file) {
    if (!has_tokenizer_file) {
      return NotFoundError(tokenizer_dir + " has no tokenizer.json (give --tokenizer DIR)");
    }
    FTUNE_ASSIGN_OR_RETURN(tokenizer, data::Tokenizer::Load(tokenizer_dir));
  } else if (!o.json) {
    return InvalidArgumentError("--input-ids without a tokenizer.json in " + tokenizer_dir +
                                " can only print ids: add -o json");
  }
  FTUNE_ASSIGN_OR_RETURN(Prompt prompt, BuildPrompt(o, tokenizer.get(), tokenizer_dir, messages));
  FTUNE_ASSIGN_OR_RETURN(std::vector<int64_t> generation_eos, GenerationConfigEos(o.model_dir));

  FTUNE_ASSIGN_OR_RETURN(bool bnb_dir, IsBnb4bitDirectory(o.model_dir));
  ModelOptions model_options = DefaultModelOptions(device);
  model_options.quantize_base = o.load_in_4bit;
  FTUNE_ASSIGN_OR_RETURN(std::unique_ptr<LlamaModel> model,
                         LoadModelAndAdapter(o.model_dir, o.adapter_dir, model_options));

  GenerateOptions gen;
  gen.max_new_tokens = o.max_new_tokens;
  gen.sampling = o.sampling;
  if (!o.ignore_eos) {
    gen.stop_ids = GenerationStopIds(model->config(), generation_eos, tokenizer.get(), prompt.chat);
  }
  std::optional<data::TextStream> stream;
  if (tokenizer) stream.emplace(*tokenizer);
  int64_t index = 0;
  std::string text;
  auto on_token = [&](int64_t id) {
    const bool stop = std::find(gen.stop_ids.begin(), gen.stop_ids.end(), id) != gen.stop_ids.end();
    std::string chunk;
    // The stop id ends the turn; it is not part of the answer's text.
    if (stream && !stop) chunk = stream->Push(static_cast<int32_t>(id));
    text += chunk;
    if (o.json) {
      json line{{"event", "token"}, {"index", index}, {"id", id}};
      if (stream) line["text"] = chunk;
      out << Dump(line) << "\n" << std::flush;
    } else if (!chunk.empty()) {
      out << chunk << std::flush;
    }
    ++index;
  };
  FTUNE_ASSIGN_OR_RETURN(GenerateResult r, Generate(*model, prompt.ids, gen, on_token));
  if (stream) {
    const std::string rest = stream->Finish();
    text += rest;
    if (!o.json && !rest.empty()) out << rest;
  }
  const bool stopped = r.stop_reason == StopReason::kStopId;
  if (o.json) {
    json done{{"event", "done"},
              {"model", o.model_dir},
              {"adapter", o.adapter_dir.empty() ? json(nullptr) : json(o.adapter_dir)},
              {"base", bnb_dir ? "bnb-4bit" : o.load_in_4bit ? "nf4" : "dense"},
              {"device", o.device},
              {"dtype", DtypeName(model_options.dtype)},
              {"prompt_ids", prompt.ids},
              {"prompt_tokens", r.prompt_tokens},
              {"ids", r.ids},
              {"new_tokens", static_cast<int64_t>(r.ids.size())},
              {"stop_reason", StopReasonName(r.stop_reason)},
              {"stop_id", stopped ? json(r.ids.back()) : json(nullptr)},
              {"prefill_seconds", r.prefill_seconds},
              {"decode_seconds", r.decode_seconds},
              {"decode_tokens_per_s", r.DecodeTokensPerSecond()}};
    if (stream) done["text"] = text;
    out << Dump(done) << "\n" << std::flush;
  } else {
    out << "\n" << std::flush;
    err << "[" << r.prompt_tokens << " prompt tokens, " << r.ids.size() << " new, "
        << StopReasonName(r.stop_reason) << ", prefill " << r.prefill_seconds << " s, decode "
        << r.DecodeTokensPerSecond() << " tokens/s]\n";
  }
  return OkStatus();
}

}  // namespace ftune::trainer
