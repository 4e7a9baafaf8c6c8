// See tokenizer.h. Each pipeline component below cites the HF tokenizers
// behaviour it reproduces; where HF has a quirk, the quirk is kept, because
// the ids must be the ones the Python stack trains on.
#include "worker/data/tokenizer.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>
#include <fstream>
#include <sstream>
#include <utility>

#include <nlohmann/json.hpp>
#if FTUNE_HAVE_ICU
#include <unicode/normalizer2.h>
#include <unicode/unistr.h>
#endif

#include "ftune/file_util.h"

#include "worker/data/added_vocabulary.h"
#include "worker/data/bpe.h"
#include "worker/data/byte_level.h"
#include "worker/data/flat_map.h"
#include "worker/data/regex.h"
#include "worker/data/utf8.h"

namespace ftune::data {
namespace {

using json = nlohmann::json;

// Ids above this are refused at load: a real vocabulary is far smaller, and
// the id -> token table is sized by the largest id.
constexpr int64_t kMaxTokenId = 1 << 24;

// HF ByteLevel's own split regex (GPT-2), used when use_regex is true.
constexpr std::string_view kGpt2Pattern =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

constexpr std::string_view kMetaspaceChar = "\xE2\x96\x81";  // U+2581 '▁'

// Thrown while parsing, caught at the load boundary and turned into a
// Status; the message names the component.
struct LoadError {
  std::string message;
};

[[noreturn]] void Fail(std::string message) { throw LoadError{std::move(message)}; }

std::string TypeOf(const json& j, const char* what) {
  if (!j.is_object()) Fail(std::string(what) + " is not a JSON object");
  auto it = j.find("type");
  if (it == j.end() || !it->is_string()) Fail(std::string(what) + " has no \"type\"");
  return it->get<std::string>();
}

bool BoolOr(const json& j, const char* key, bool fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_boolean()) Fail(std::string("\"") + key + "\" is not a boolean");
  return it->get<bool>();
}

std::string StringAt(const json& j, const char* key, const char* what) {
  auto it = j.find(key);
  if (it == j.end() || !it->is_string()) {
    Fail(std::string(what) + ": \"" + key + "\" is missing or not a string");
  }
  return it->get<std::string>();
}

// str.replace(pattern, content) for every non-overlapping occurrence.
void ReplaceAll(std::string_view in, std::string_view pattern, std::string_view content,
                std::string* out) {
  out->clear();
  if (pattern.empty()) {
    out->assign(in);
    return;
  }
  size_t pos = 0;
  while (true) {
    const size_t hit = in.find(pattern, pos);
    if (hit == std::string_view::npos) break;
    out->append(in.substr(pos, hit - pos));
    out->append(content);
    pos = hit + pattern.size();
  }
  out->append(in.substr(pos));
}

void RegexReplaceAll(std::string_view in, const Regex& regex, std::string_view content,
                     std::string* out) {
  std::vector<std::pair<uint32_t, uint32_t>> matches;
  regex.FindAll(in, &matches);
  out->clear();
  size_t pos = 0;
  for (const auto& [start, end] : matches) {
    out->append(in.substr(pos, start - pos));
    out->append(content);
    pos = end;
  }
  out->append(in.substr(pos));
}

// A "pattern" field: {"String": "..."} or {"Regex": "..."}.
struct Pattern {
  std::string literal;
  std::shared_ptr<Regex> regex;  // set for Regex patterns
};

Pattern ParsePattern(const json& j, const char* what) {
  if (!j.is_object()) Fail(std::string(what) + ": \"pattern\" is not an object");
  Pattern p;
  if (auto it = j.find("String"); it != j.end() && it->is_string()) {
    p.literal = it->get<std::string>();
  } else if (auto it = j.find("Regex"); it != j.end() && it->is_string()) {
    Result<std::unique_ptr<Regex>> regex = Regex::Compile(it->get<std::string>());
    if (!regex.ok()) Fail(std::string(what) + ": " + regex.status().message());
    p.regex = std::move(regex).value();
  } else {
    Fail(std::string(what) + ": \"pattern\" is neither {\"String\": ...} nor {\"Regex\": ...}");
  }
  return p;
}

// ---------------------------------------------------------------- normalizer

struct NormalizerStep {
  enum class Kind { kPrepend, kReplace, kNfc } kind;
  std::string text;  // Prepend: what to prepend; Replace: the replacement
  Pattern pattern;   // Replace
};

void ParseNormalizer(const json& j, std::vector<NormalizerStep>* steps) {
  if (j.is_null()) return;
  const std::string type = TypeOf(j, "normalizer");
  if (type == "Sequence") {
    auto it = j.find("normalizers");
    if (it == j.end() || !it->is_array()) Fail("normalizer Sequence has no \"normalizers\" list");
    for (const json& child : *it) ParseNormalizer(child, steps);
  } else if (type == "NFC") {
#if FTUNE_HAVE_ICU
    steps->push_back({NormalizerStep::Kind::kNfc, {}, {}});
#else
    Fail("normalizer NFC needs ICU, which this build of ftune lacks (install libicu-dev and "
         "rebuild)");
#endif
  } else if (type == "Prepend") {
    steps->push_back({NormalizerStep::Kind::kPrepend, StringAt(j, "prepend", "normalizer Prepend"), {}});
  } else if (type == "Replace") {
    auto it = j.find("pattern");
    if (it == j.end()) Fail("normalizer Replace has no \"pattern\"");
    steps->push_back({NormalizerStep::Kind::kReplace, StringAt(j, "content", "normalizer Replace"),
                      ParsePattern(*it, "normalizer Replace")});
  } else {
    Fail("normalizer type \"" + type + "\" is not supported (supported: Sequence, NFC, Prepend, Replace)");
  }
}

// ------------------------------------------------------------ pre-tokenizer

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

enum class PrependScheme { kAlways, kFirst, kNever };

struct PreTokenizerStep {
  enum class Kind { kSplit, kByteLevel, kMetaspace } kind;
  // Split (and ByteLevel with use_regex, with the GPT-2 pattern).
  Pattern pattern;
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool invert = false;
  // ByteLevel
  bool add_prefix_space = false;
  bool use_regex = false;
  // Metaspace
  std::string replacement;
  PrependScheme prepend_scheme = PrependScheme::kAlways;
  bool split = true;
};

SplitBehavior ParseBehavior(const std::string& name) {
  if (name == "Removed") return SplitBehavior::kRemoved;
  if (name == "Isolated") return SplitBehavior::kIsolated;
  if (name == "MergedWithPrevious") return SplitBehavior::kMergedWithPrevious;
  if (name == "MergedWithNext") return SplitBehavior::kMergedWithNext;
  if (name == "Contiguous") return SplitBehavior::kContiguous;
  Fail("pre_tokenizer Split behavior \"" + name + "\" is not supported");
}

void ParsePreTokenizer(const json& j, std::vector<PreTokenizerStep>* steps) {
  if (j.is_null()) return;
  const std::string type = TypeOf(j, "pre_tokenizer");
  if (type == "Sequence") {
    auto it = j.find("pretokenizers");
    if (it == j.end() || !it->is_array()) Fail("pre_tokenizer Sequence has no \"pretokenizers\" list");
    for (const json& child : *it) ParsePreTokenizer(child, steps);
    return;
  }
  PreTokenizerStep step;
  if (type == "Split") {
    step.kind = PreTokenizerStep::Kind::kSplit;
    auto it = j.find("pattern");
    if (it == j.end()) Fail("pre_tokenizer Split has no \"pattern\"");
    step.pattern = ParsePattern(*it, "pre_tokenizer Split");
    step.behavior = ParseBehavior(StringAt(j, "behavior", "pre_tokenizer Split"));
    step.invert = BoolOr(j, "invert", false);
  } else if (type == "ByteLevel") {
    step.kind = PreTokenizerStep::Kind::kByteLevel;
    step.add_prefix_space = BoolOr(j, "add_prefix_space", true);
    step.use_regex = BoolOr(j, "use_regex", true);
    if (step.use_regex) {
      Result<std::unique_ptr<Regex>> regex = Regex::Compile(kGpt2Pattern);
      if (!regex.ok()) Fail("pre_tokenizer ByteLevel: " + regex.status().message());
      step.pattern.regex = std::move(regex).value();
    }
  } else if (type == "Metaspace") {
    step.kind = PreTokenizerStep::Kind::kMetaspace;
    step.replacement = StringAt(j, "replacement", "pre_tokenizer Metaspace");
    if (auto it = j.find("prepend_scheme"); it != j.end() && it->is_string()) {
      const std::string scheme = it->get<std::string>();
      if (scheme == "always") {
        step.prepend_scheme = PrependScheme::kAlways;
      } else if (scheme == "first") {
        step.prepend_scheme = PrependScheme::kFirst;
      } else if (scheme == "never") {
        step.prepend_scheme = PrependScheme::kNever;
      } else {
        Fail("pre_tokenizer Metaspace prepend_scheme \"" + scheme + "\" is not supported");
      }
    } else {
      // Files older than prepend_scheme say add_prefix_space.
      step.prepend_scheme =
          BoolOr(j, "add_prefix_space", true) ? PrependScheme::kAlways : PrependScheme::kNever;
    }
    step.split = BoolOr(j, "split", true);
  } else {
    Fail("pre_tokenizer type \"" + type +
         "\" is not supported (supported: Sequence, Split, ByteLevel, Metaspace)");
  }
  steps->push_back(std::move(step));
}

// -------------------------------------------------------------- post-processor

// One TemplateProcessing "single" template: each item is the sequence
// (empty ids, is_sequence) or a special token's ids.
struct TemplateItem {
  bool is_sequence = false;
  std::vector<int32_t> ids;
};
using Template = std::vector<TemplateItem>;

void ParsePostProcessor(const json& j, std::vector<Template>* templates) {
  if (j.is_null()) return;
  const std::string type = TypeOf(j, "post_processor");
  if (type == "Sequence") {
    auto it = j.find("processors");
    if (it == j.end() || !it->is_array()) Fail("post_processor Sequence has no \"processors\" list");
    for (const json& child : *it) ParsePostProcessor(child, templates);
  } else if (type == "ByteLevel") {
    // Only trims offsets; the ids are untouched.
  } else if (type == "TemplateProcessing") {
    auto single = j.find("single");
    auto specials = j.find("special_tokens");
    if (single == j.end() || !single->is_array()) Fail("post_processor TemplateProcessing has no \"single\" list");
    if (specials == j.end() || !specials->is_object()) {
      Fail("post_processor TemplateProcessing has no \"special_tokens\" object");
    }
    Template t;
    for (const json& item : *single) {
      TemplateItem out;
      if (auto seq = item.find("Sequence"); item.is_object() && seq != item.end()) {
        const std::string id = StringAt(*seq, "id", "post_processor TemplateProcessing Sequence");
        if (id != "A") Fail("post_processor TemplateProcessing: single template uses sequence \"" + id + "\"");
        out.is_sequence = true;
      } else if (auto sp = item.find("SpecialToken"); item.is_object() && sp != item.end()) {
        const std::string name = StringAt(*sp, "id", "post_processor TemplateProcessing SpecialToken");
        auto def = specials->find(name);
        if (def == specials->end() || !def->is_object() || !def->contains("ids") ||
            !(*def)["ids"].is_array()) {
          Fail("post_processor TemplateProcessing: special token \"" + name + "\" is not defined");
        }
        for (const json& id : (*def)["ids"]) {
          if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() >= kMaxTokenId) {
            Fail("post_processor TemplateProcessing: special token \"" + name + "\" has a bad id");
          }
          out.ids.push_back(static_cast<int32_t>(id.get<int64_t>()));
        }
      } else {
        Fail("post_processor TemplateProcessing: a single-template item is neither Sequence nor SpecialToken");
      }
      t.push_back(std::move(out));
    }
    templates->push_back(std::move(t));
  } else {
    Fail("post_processor type \"" + type +
         "\" is not supported (supported: Sequence, ByteLevel, TemplateProcessing)");
  }
}

// ------------------------------------------------------------------- decoder

struct DecoderStep {
  enum class Kind { kByteLevel, kReplace, kByteFallback, kFuse, kStrip, kMetaspace } kind;
  Pattern pattern;          // Replace
  std::string content;      // Replace: replacement; Strip: the character; Metaspace: replacement
  size_t start = 0;         // Strip
  size_t stop = 0;          // Strip
  bool prepend_never = false;  // Metaspace
};

void ParseDecoder(const json& j, std::vector<DecoderStep>* steps) {
  if (j.is_null()) return;
  const std::string type = TypeOf(j, "decoder");
  if (type == "Sequence") {
    auto it = j.find("decoders");
    if (it == j.end() || !it->is_array()) Fail("decoder Sequence has no \"decoders\" list");
    for (const json& child : *it) ParseDecoder(child, steps);
    return;
  }
  DecoderStep step;
  if (type == "ByteLevel") {
    step.kind = DecoderStep::Kind::kByteLevel;
  } else if (type == "Replace") {
    step.kind = DecoderStep::Kind::kReplace;
    auto it = j.find("pattern");
    if (it == j.end()) Fail("decoder Replace has no \"pattern\"");
    step.pattern = ParsePattern(*it, "decoder Replace");
    step.content = StringAt(j, "content", "decoder Replace");
  } else if (type == "ByteFallback") {
    step.kind = DecoderStep::Kind::kByteFallback;
  } else if (type == "Fuse") {
    step.kind = DecoderStep::Kind::kFuse;
  } else if (type == "Strip") {
    step.kind = DecoderStep::Kind::kStrip;
    step.content = StringAt(j, "content", "decoder Strip");
    size_t len = 0;
    if (step.content.empty() || !IsValidUtf8(step.content) ||
        (DecodeUtf8At(step.content, 0, &len), len != step.content.size())) {
      Fail("decoder Strip: \"content\" must be one character");
    }
    for (const char* key : {"start", "stop"}) {
      auto it = j.find(key);
      if (it == j.end() || !it->is_number_unsigned()) Fail(std::string("decoder Strip: bad \"") + key + "\"");
    }
    step.start = j["start"].get<size_t>();
    step.stop = j["stop"].get<size_t>();
  } else if (type == "Metaspace") {
    step.kind = DecoderStep::Kind::kMetaspace;
    step.content = StringAt(j, "replacement", "decoder Metaspace");
    std::string scheme = "always";
    if (auto it = j.find("prepend_scheme"); it != j.end() && it->is_string()) {
      scheme = it->get<std::string>();
    } else if (!BoolOr(j, "add_prefix_space", true)) {
      scheme = "never";
    }
    step.prepend_never = scheme == "never";
  } else {
    Fail("decoder type \"" + type +
         "\" is not supported (supported: Sequence, ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace)");
  }
  steps->push_back(std::move(step));
}

// HF ByteLevel::decode_chain: each token's characters map back to bytes
// (a token with a character outside the map contributes its UTF-8 as is),
// and the concatenation is decoded with from_utf8_lossy.
void DecodeByteLevel(std::vector<std::string>* tokens) {
  std::string bytes;
  for (const std::string& token : *tokens) {
    // Token strings come from parsed JSON, so they are valid UTF-8.
    const size_t mark = bytes.size();
    for (size_t i = 0; i < token.size();) {
      size_t len;
      const int b = CodePointToByte(DecodeUtf8At(token, i, &len));
      if (b < 0) {
        bytes.resize(mark);
        bytes += token;
        break;
      }
      bytes.push_back(static_cast<char>(b));
      i += len;
    }
  }
  std::string text;
  AppendUtf8Lossy(bytes, &text);
  tokens->assign(1, std::move(text));
}

// Rust's u8::from_str_radix(s, 16) for a two-character s: an optional '+'
// then hex digits.
bool ParseHexByte(std::string_view s, uint8_t* out) {
  if (s.size() != 2) return false;
  const auto digit = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  if (s[0] == '+') {
    const int d = digit(s[1]);
    if (d < 0) return false;
    *out = static_cast<uint8_t>(d);
    return true;
  }
  const int hi = digit(s[0]);
  const int lo = digit(s[1]);
  if (hi < 0 || lo < 0) return false;
  *out = static_cast<uint8_t>(hi * 16 + lo);
  return true;
}

// HF ByteFallback::decode_chain: runs of <0xNN> tokens become their bytes
// when those form valid UTF-8, else one U+FFFD per byte.
void DecodeByteFallback(std::vector<std::string>* tokens) {
  std::vector<std::string> out;
  out.reserve(tokens->size());
  std::string pending;
  const auto flush = [&]() {
    if (pending.empty()) return;
    if (IsValidUtf8(pending)) {
      out.push_back(pending);
    } else {
      for (size_t i = 0; i < pending.size(); ++i) out.emplace_back("\xEF\xBF\xBD");
    }
    pending.clear();
  };
  for (std::string& token : *tokens) {
    uint8_t byte;
    if (token.size() == 6 && token.compare(0, 3, "<0x") == 0 && token[5] == '>' &&
        ParseHexByte(std::string_view(token).substr(3, 2), &byte)) {
      pending.push_back(static_cast<char>(byte));
      continue;
    }
    flush();
    out.push_back(std::move(token));
  }
  flush();
  tokens->swap(out);
}

// HF Strip::decode_chain: per token, remove up to `start` leading and `stop`
// trailing occurrences of the character.
void DecodeStrip(const DecoderStep& step, std::vector<std::string>* tokens) {
  const std::string& c = step.content;
  for (std::string& token : *tokens) {
    size_t begin = 0;
    for (size_t k = 0; k < step.start && token.compare(begin, c.size(), c) == 0; ++k) begin += c.size();
    size_t end = token.size();
    for (size_t k = 0; k < step.stop && end >= begin + c.size() &&
                       token.compare(end - c.size(), c.size(), c) == 0;
         ++k) {
      end -= c.size();
    }
    token = token.substr(begin, end - begin);
  }
}

// HF Metaspace::decode_chain: the replacement becomes a space, except in the
// first token (unless prepend_scheme is never), where it is dropped.
void DecodeMetaspace(const DecoderStep& step, std::vector<std::string>* tokens) {
  std::string out;
  for (size_t i = 0; i < tokens->size(); ++i) {
    const bool drop = i == 0 && !step.prepend_never;
    ReplaceAll((*tokens)[i], step.content, drop ? "" : " ", &out);
    (*tokens)[i].swap(out);
  }
}

// Reads a token name from tokenizer_config.json: a string, or an AddedToken
// object with "content".
std::optional<std::string> ConfigToken(const json& config, const char* key) {
  auto it = config.find(key);
  if (it == config.end() || it->is_null()) return std::nullopt;
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object()) {
    auto content = it->find("content");
    if (content != it->end() && content->is_string()) return content->get<std::string>();
  }
  Fail(std::string("\"") + key + "\" is neither a string nor an object with \"content\"");
}

Status ParseConfig(std::string_view text, const std::string& path, TokenizerConfig* config) {
  try {
    json cfg;
    try {
      cfg = json::parse(text);
    } catch (const json::parse_error& e) {
      Fail(std::string("malformed JSON: ") + e.what());
    }
    if (!cfg.is_object()) Fail("top level is not a JSON object");
    config->bos_token = ConfigToken(cfg, "bos_token");
    config->eos_token = ConfigToken(cfg, "eos_token");
    config->pad_token = ConfigToken(cfg, "pad_token");
    config->unk_token = ConfigToken(cfg, "unk_token");
    for (const char* key : {"add_bos_token", "add_eos_token"}) {
      auto it = cfg.find(key);
      if (it == cfg.end() || it->is_null()) continue;
      (std::string(key) == "add_bos_token" ? config->add_bos_token : config->add_eos_token) =
          BoolOr(cfg, key, false);
    }
    if (auto it = cfg.find("chat_template"); it != cfg.end()) {
      if (it->is_string()) {
        config->chat_template = it->get<std::string>();
      } else if (it->is_array()) {
        // Newer files list named templates; "default" is the one
        // apply_chat_template uses.
        for (const json& t : *it) {
          if (t.is_object() && t.contains("name") && t["name"] == "default" &&
              t.contains("template") && t["template"].is_string()) {
            config->chat_template = t["template"].get<std::string>();
          }
        }
      }
    }
    if (auto it = cfg.find("tokenizer_class"); it != cfg.end() && it->is_string()) {
      config->tokenizer_class = it->get<std::string>();
    }
  } catch (const LoadError& e) {
    return InvalidArgumentError(path + ": " + e.message);
  } catch (const json::exception& e) {
    return InvalidArgumentError(path + ": unexpected JSON structure: " + e.what());
  }
  return OkStatus();
}

Result<std::string> ReadFile(const std::string& path, uint64_t max_bytes) {
  return ReadFileToString(path, max_bytes);
}

}  // namespace

// Unicode NFC, as HF's NFC normalizer (the unicode-normalization crate's
// nfc()) applies it. ICU 72 carries Unicode 15 tables; NFC of text that was
// assigned in an earlier version does not change between versions (Unicode's
// normalization stability policy), so both agree on all text the older
// tables know. Text that is all ASCII is already NFC and skips ICU.
static void NfcInPlace(std::string* text) {
#if FTUNE_HAVE_ICU
  bool ascii = true;
  for (const char c : *text) {
    if (static_cast<unsigned char>(c) >= 0x80) {
      ascii = false;
      break;
    }
  }
  if (ascii) return;
  UErrorCode err = U_ZERO_ERROR;
  const icu::Normalizer2* nfc = icu::Normalizer2::getNFCInstance(err);
  if (U_FAILURE(err)) return;  // ICU's data is linked in; this does not happen
  const icu::UnicodeString in = icu::UnicodeString::fromUTF8(*text);
  if (nfc->isNormalized(in, err) && U_SUCCESS(err)) return;
  err = U_ZERO_ERROR;
  const icu::UnicodeString out = nfc->normalize(in, err);
  if (U_FAILURE(err)) return;
  text->clear();
  out.toUTF8String(*text);
#else
  (void)text;  // NFC normalizers are refused at load without ICU
#endif
}

// ----------------------------------------------------------------- Impl

struct Tokenizer::Impl {
  std::vector<NormalizerStep> normalizer;
  std::vector<PreTokenizerStep> pre_tokenizer;
  std::vector<Template> templates;
  std::vector<DecoderStep> decoder;
  bool has_decoder = false;
  std::unique_ptr<BpeModel> bpe;
  std::unique_ptr<AddedVocabulary> added;
  std::vector<std::string> id_to_token;  // model vocab, as spelled in tokenizer.json
  std::vector<bool> has_id;
  StringIdMap token_to_id;               // model vocab, as spelled in tokenizer.json

  void Normalize(std::string_view in, std::string* out) const;
  void PreTokenizeAndTokenize(std::string_view text, bool at_origin,
                              std::vector<int32_t>* ids) const;
};

void Tokenizer::Impl::Normalize(std::string_view in, std::string* out) const {
  out->assign(in);
  std::string tmp;
  for (const NormalizerStep& step : normalizer) {
    if (step.kind == NormalizerStep::Kind::kNfc) {
      NfcInPlace(out);
    } else if (step.kind == NormalizerStep::Kind::kPrepend) {
      // HF Prepend leaves an empty string empty.
      if (!out->empty()) out->insert(0, step.text);
    } else if (step.pattern.regex != nullptr) {
      RegexReplaceAll(*out, *step.pattern.regex, step.text, &tmp);
      out->swap(tmp);
    } else {
      ReplaceAll(*out, step.pattern.literal, step.text, &tmp);
      out->swap(tmp);
    }
  }
}

namespace {

struct Piece {
  std::string_view text;
  bool at_origin;  // starts at offset 0 of the original input (Metaspace "first")
};

// HF NormalizedString::split: the matches and the gaps between them, each
// flagged, then shaped by the behavior; empty pieces are dropped.
void SplitPiece(const Piece& piece, const std::vector<std::pair<uint32_t, uint32_t>>& matches,
                SplitBehavior behavior, bool invert, std::vector<Piece>* out) {
  struct Span {
    uint32_t start, end;
    bool is_match;
  };
  thread_local std::vector<Span> spans;
  thread_local std::vector<Span> shaped;
  spans.clear();
  shaped.clear();
  const auto n = static_cast<uint32_t>(piece.text.size());
  uint32_t prev = 0;
  for (const auto& [start, end] : matches) {
    if (prev != start) spans.push_back({prev, start, invert});
    spans.push_back({start, end, !invert});
    prev = end;
  }
  if (prev != n) spans.push_back({prev, n, invert});

  switch (behavior) {
    case SplitBehavior::kRemoved:
      for (const Span& s : spans) {
        if (!s.is_match) shaped.push_back(s);
      }
      break;
    case SplitBehavior::kIsolated:
      shaped = spans;
      break;
    case SplitBehavior::kMergedWithPrevious: {
      bool previous_match = false;
      for (const Span& s : spans) {
        if (s.is_match && !previous_match && !shaped.empty()) {
          shaped.back().end = s.end;
        } else {
          shaped.push_back(s);
        }
        previous_match = s.is_match;
      }
      break;
    }
    case SplitBehavior::kMergedWithNext: {
      bool previous_match = false;
      for (auto it = spans.rbegin(); it != spans.rend(); ++it) {
        if (it->is_match && !previous_match && !shaped.empty()) {
          shaped.back().start = it->start;
        } else {
          shaped.push_back(*it);
        }
        previous_match = it->is_match;
      }
      std::reverse(shaped.begin(), shaped.end());
      break;
    }
    case SplitBehavior::kContiguous: {
      bool previous_match = false;
      for (const Span& s : spans) {
        if (s.is_match == previous_match && !shaped.empty()) {
          shaped.back().end = s.end;
        } else {
          shaped.push_back(s);
        }
        previous_match = s.is_match;
      }
      break;
    }
  }
  for (const Span& s : shaped) {
    if (s.end > s.start) {
      out->push_back(Piece{piece.text.substr(s.start, s.end - s.start),
                           piece.at_origin && s.start == 0});
    }
  }
}

void FindLiteral(std::string_view text, std::string_view literal,
                 std::vector<std::pair<uint32_t, uint32_t>>* matches) {
  if (literal.empty()) return;
  for (size_t pos = text.find(literal); pos != std::string_view::npos;
       pos = text.find(literal, pos + literal.size())) {
    matches->emplace_back(static_cast<uint32_t>(pos), static_cast<uint32_t>(pos + literal.size()));
  }
}

}  // namespace

void Tokenizer::Impl::PreTokenizeAndTokenize(std::string_view text, bool at_origin,
                                             std::vector<int32_t>* ids) const {
  if (pre_tokenizer.empty()) {
    bpe->Tokenize(text, ids);
    return;
  }
  thread_local std::vector<Piece> pieces;
  thread_local std::vector<Piece> next;
  thread_local std::vector<std::pair<uint32_t, uint32_t>> matches;
  // Strings the pre-tokenizer builds (prefix spaces, Metaspace); a deque
  // keeps earlier ones in place while views into them are alive.
  thread_local std::deque<std::string> owned;
  pieces.clear();
  owned.clear();
  pieces.push_back(Piece{text, at_origin});
  for (const PreTokenizerStep& step : pre_tokenizer) {
    next.clear();
    for (const Piece& piece : pieces) {
      Piece current = piece;
      SplitBehavior behavior = step.behavior;
      bool invert = step.invert;
      if (step.kind == PreTokenizerStep::Kind::kByteLevel) {
        if (step.add_prefix_space && (current.text.empty() || current.text[0] != ' ')) {
          owned.emplace_back(" ");
          owned.back().append(current.text);
          current.text = owned.back();
        }
        if (!step.use_regex) {
          next.push_back(current);
          continue;
        }
        behavior = SplitBehavior::kIsolated;
        invert = false;
      } else if (step.kind == PreTokenizerStep::Kind::kMetaspace) {
        owned.emplace_back();
        ReplaceAll(current.text, " ", step.replacement, &owned.back());
        std::string& s = owned.back();
        const bool starts = s.compare(0, step.replacement.size(), step.replacement) == 0;
        if (!starts && (step.prepend_scheme == PrependScheme::kAlways ||
                        (step.prepend_scheme == PrependScheme::kFirst && current.at_origin))) {
          s.insert(0, step.replacement);
        }
        current.text = s;
        if (!step.split) {
          if (!current.text.empty()) next.push_back(current);
          continue;
        }
        matches.clear();
        FindLiteral(current.text, step.replacement, &matches);
        SplitPiece(current, matches, SplitBehavior::kMergedWithNext, false, &next);
        continue;
      }
      matches.clear();
      if (step.pattern.regex != nullptr) {
        if (!step.pattern.regex->FindAll(current.text, &matches)) {
          // PCRE2 ran out of its resource limits (pathological input); the
          // unmatched rest stays one piece rather than failing the encode.
        }
      } else {
        FindLiteral(current.text, step.pattern.literal, &matches);
      }
      SplitPiece(current, matches, behavior, invert, &next);
    }
    pieces.swap(next);
  }
  for (const Piece& piece : pieces) bpe->Tokenize(piece.text, ids);
}

// ------------------------------------------------------------------ Tokenizer

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;

Result<std::unique_ptr<Tokenizer>> Tokenizer::Load(const std::string& dir,
                                                   const TokenizerLoadOptions& options) {
  const std::string tokenizer_path = dir + "/tokenizer.json";
  Result<std::string> tokenizer_json = ReadFile(tokenizer_path, kMaxTokenizerJsonBytes);
  if (!tokenizer_json.ok()) return tokenizer_json.status();
  const std::string config_path = dir + "/tokenizer_config.json";
  std::string config_json;
  std::ifstream probe(config_path);
  if (probe.good()) {
    probe.close();
    Result<std::string> config = ReadFile(config_path, kMaxSmallFileBytes);
    if (!config.ok()) return config.status();
    config_json = std::move(config).value();
  }
  return FromJson(*tokenizer_json, config_json, dir, options);
}

Result<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(std::string_view tokenizer_json,
                                                       std::string_view config_json,
                                                       const std::string& source,
                                                       const TokenizerLoadOptions& options) {
  const std::string file = source + "/tokenizer.json";
  auto impl = std::make_unique<Impl>();
  TokenizerConfig config;
  int32_t max_id = -1;
  try {
    json root;
    try {
      root = json::parse(tokenizer_json);
    } catch (const json::parse_error& e) {
      Fail(std::string("malformed JSON: ") + e.what());
    }
    if (!root.is_object()) Fail("top level is not a JSON object");
    for (const char* key : {"truncation", "padding"}) {
      auto it = root.find(key);
      if (it != root.end() && !it->is_null()) {
        Fail(std::string("\"") + key + "\" is set; encode-time " + key +
             " is not supported (the data pipeline pads and truncates itself)");
      }
    }
    const json null_json;
    const auto field = [&](const char* key) -> const json& {
      auto it = root.find(key);
      return it == root.end() ? null_json : *it;
    };
    ParseNormalizer(field("normalizer"), &impl->normalizer);
    ParsePreTokenizer(field("pre_tokenizer"), &impl->pre_tokenizer);
    ParsePostProcessor(field("post_processor"), &impl->templates);
    ParseDecoder(field("decoder"), &impl->decoder);
    impl->has_decoder = !field("decoder").is_null();

    bool byte_level = false;
    for (size_t i = 0; i < impl->pre_tokenizer.size(); ++i) {
      if (impl->pre_tokenizer[i].kind != PreTokenizerStep::Kind::kByteLevel) continue;
      // Later steps would see byte-level strings, which this implementation
      // never builds (BPE runs on raw bytes, see byte_level.h).
      if (i + 1 != impl->pre_tokenizer.size()) {
        Fail("pre_tokenizer ByteLevel followed by another pre-tokenizer is not supported");
      }
      byte_level = true;
    }

    // --- model
    const json& model = field("model");
    if (!model.is_object()) Fail("\"model\" is missing or not an object");
    std::string type = "BPE";
    if (auto it = model.find("type"); it != model.end()) {
      if (!it->is_string()) Fail("model \"type\" is not a string");
      type = it->get<std::string>();
    }
    if (type != "BPE") Fail("model type \"" + type + "\" is not supported (supported: BPE)");
    if (auto it = model.find("dropout");
        it != model.end() && !it->is_null() && !(it->is_number() && it->get<double>() == 0.0)) {
      Fail("model BPE: dropout is not supported");
    }
    for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
      auto it = model.find(key);
      if (it != model.end() && !it->is_null() && !(it->is_string() && it->get<std::string>().empty())) {
        Fail(std::string("model BPE: ") + key + " is not supported");
      }
    }
    auto vocab_it = model.find("vocab");
    if (vocab_it == model.end() || !vocab_it->is_object()) Fail("model BPE has no \"vocab\" object");
    StringIdMap encode_vocab;
    std::string raw;
    for (auto it = vocab_it->begin(); it != vocab_it->end(); ++it) {
      if (!it.value().is_number_integer()) Fail("model vocab: id of \"" + it.key() + "\" is not an integer");
      const int64_t id = it.value().get<int64_t>();
      if (id < 0 || id >= kMaxTokenId) {
        Fail("model vocab: id " + std::to_string(id) + " of \"" + it.key() + "\" is out of range");
      }
      const auto id32 = static_cast<int32_t>(id);
      max_id = std::max(max_id, id32);
      if (static_cast<size_t>(id32) >= impl->id_to_token.size()) {
        impl->id_to_token.resize(static_cast<size_t>(id32) + 1);
        impl->has_id.resize(static_cast<size_t>(id32) + 1);
      }
      impl->id_to_token[id32] = it.key();
      impl->has_id[id32] = true;
      impl->token_to_id.Set(it.key(), id32);
      if (!byte_level) {
        encode_vocab.Set(it.key(), id32);
      } else if (ByteLevelToBytes(it.key(), &raw)) {
        encode_vocab.Set(raw, id32);
      }
      // A byte-level vocab entry with characters outside the byte map can
      // never be produced from text; it stays decodable only.
    }

    MergeMap merges;
    auto merges_it = model.find("merges");
    if (merges_it != model.end() && !merges_it->is_null()) {
      if (!merges_it->is_array()) Fail("model BPE \"merges\" is not a list");
      std::string left, right;
      int32_t rank = 0;
      for (const json& m : *merges_it) {
        if (m.is_string()) {
          // "a b": exactly one space, as HF requires.
          const std::string s = m.get<std::string>();
          const size_t space = s.find(' ');
          if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos) {
            Fail("model BPE merge " + std::to_string(rank + 1) + " (\"" + s + "\") is not \"a b\"");
          }
          left = s.substr(0, space);
          right = s.substr(space + 1);
        } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
          left = m[0].get<std::string>();
          right = m[1].get<std::string>();
        } else {
          Fail("model BPE merge " + std::to_string(rank + 1) + " is neither \"a b\" nor [\"a\", \"b\"]");
        }
        const int32_t* a = impl->token_to_id.Find(left);
        const int32_t* b = impl->token_to_id.Find(right);
        const int32_t* ab = impl->token_to_id.Find(left + right);
        if (a == nullptr || b == nullptr || ab == nullptr) {
          Fail("model BPE merge " + std::to_string(rank + 1) + " (\"" + left + "\", \"" + right +
               "\") uses a token that is not in the vocab");
        }
        merges.Insert(*a, *b, MergeMap::Merge{rank, *ab});
        ++rank;
      }
    }

    BpeOptions bpe_options;
    bpe_options.byte_level = byte_level;
    bpe_options.ignore_merges = BoolOr(model, "ignore_merges", false);
    bpe_options.byte_fallback = BoolOr(model, "byte_fallback", false);
    bpe_options.fuse_unk = BoolOr(model, "fuse_unk", false);
    bpe_options.cache_capacity = options.bpe_cache_capacity;
    if (auto it = model.find("unk_token"); it != model.end() && !it->is_null()) {
      if (!it->is_string()) Fail("model BPE \"unk_token\" is not a string");
      const int32_t* unk = impl->token_to_id.Find(it->get<std::string>());
      if (unk == nullptr) Fail("model BPE unk_token \"" + it->get<std::string>() + "\" is not in the vocab");
      bpe_options.unk_id = *unk;
    }
    impl->bpe = std::make_unique<BpeModel>(bpe_options, std::move(encode_vocab), std::move(merges));

    // --- added tokens
    std::vector<AddedToken> added;
    const json& added_json = field("added_tokens");
    if (!added_json.is_null()) {
      if (!added_json.is_array()) Fail("\"added_tokens\" is not a list");
      for (const json& t : added_json) {
        if (!t.is_object()) Fail("an added_tokens entry is not an object");
        auto id_it = t.find("id");
        if (id_it == t.end() || !id_it->is_number_integer() || id_it->get<int64_t>() < 0 ||
            id_it->get<int64_t>() >= kMaxTokenId) {
          Fail("an added_tokens entry has a missing or bad \"id\"");
        }
        AddedToken token;
        token.id = static_cast<int32_t>(id_it->get<int64_t>());
        token.content = StringAt(t, "content", "added_tokens entry");
        if (!IsValidUtf8(token.content)) Fail("added token " + std::to_string(token.id) + " is not valid UTF-8");
        token.special = BoolOr(t, "special", false);
        token.single_word = BoolOr(t, "single_word", false);
        token.lstrip = BoolOr(t, "lstrip", false);
        token.rstrip = BoolOr(t, "rstrip", false);
        token.normalized = BoolOr(t, "normalized", true);
        max_id = std::max(max_id, token.id);
        added.push_back(std::move(token));
      }
    }
    const Impl* raw_impl = impl.get();
    impl->added = std::make_unique<AddedVocabulary>(
        std::move(added), [raw_impl](std::string_view s) {
          std::string out;
          raw_impl->Normalize(s, &out);
          return out;
        });

  } catch (const LoadError& e) {
    return InvalidArgumentError(file + ": " + e.message);
  } catch (const json::exception& e) {
    return InvalidArgumentError(file + ": unexpected JSON structure: " + e.what());
  } catch (const std::bad_alloc&) {
    return InvalidArgumentError(file + ": too large to load");
  }

  if (!config_json.empty()) {
    Status status = ParseConfig(config_json, source + "/tokenizer_config.json", &config);
    if (!status.ok()) return status;
  }

  std::unique_ptr<Tokenizer> tokenizer(new Tokenizer(std::move(impl)));
  tokenizer->config_ = std::move(config);
  tokenizer->vocab_size_ = max_id + 1;
  const auto id_of = [&](const std::optional<std::string>& name) -> std::optional<int32_t> {
    if (!name.has_value()) return std::nullopt;
    return tokenizer->TokenToId(*name);
  };
  tokenizer->bos_id_ = id_of(tokenizer->config_.bos_token);
  tokenizer->eos_id_ = id_of(tokenizer->config_.eos_token);
  tokenizer->pad_id_ = id_of(tokenizer->config_.pad_token);
  return tokenizer;
}

std::vector<int32_t> Tokenizer::Encode(std::string_view text, bool add_special_tokens) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 4);
  EncodeAppend(text, add_special_tokens, &ids);
  return ids;
}

void Tokenizer::EncodeAppend(std::string_view text, bool add_special_tokens,
                             std::vector<int32_t>* ids) const {
  const Impl& im = *impl_;
  std::string sanitized;
  if (!IsValidUtf8(text)) {
    AppendUtf8Lossy(text, &sanitized);
    text = sanitized;
  }
  const size_t first = ids->size();
  std::vector<AddedVocabulary::Segment> raw_segments;
  im.added->Split(text, /*normalized_group=*/false, &raw_segments);
  std::string normalized;
  std::vector<AddedVocabulary::Segment> segments;
  for (const AddedVocabulary::Segment& raw : raw_segments) {
    if (raw.id >= 0) {
      ids->push_back(raw.id);
      continue;
    }
    std::string_view run = text.substr(raw.start, raw.end - raw.start);
    if (!im.normalizer.empty()) {
      im.Normalize(run, &normalized);
      run = normalized;
    }
    const bool at_origin = raw.start == 0;
    if (!im.added->has_normalized_tokens()) {
      if (!run.empty()) im.PreTokenizeAndTokenize(run, at_origin, ids);
      continue;
    }
    segments.clear();
    im.added->Split(run, /*normalized_group=*/true, &segments);
    for (const AddedVocabulary::Segment& seg : segments) {
      if (seg.id >= 0) {
        ids->push_back(seg.id);
      } else if (seg.end > seg.start) {
        im.PreTokenizeAndTokenize(run.substr(seg.start, seg.end - seg.start),
                                  at_origin && seg.start == 0, ids);
      }
    }
  }
  if (!add_special_tokens || im.templates.empty()) return;
  // TemplateProcessing: rebuild the sequence around its special tokens.
  std::vector<int32_t> sequence(ids->begin() + static_cast<std::ptrdiff_t>(first), ids->end());
  for (const Template& t : im.templates) {
    ids->resize(first);
    for (const TemplateItem& item : t) {
      if (item.is_sequence) {
        ids->insert(ids->end(), sequence.begin(), sequence.end());
      } else {
        ids->insert(ids->end(), item.ids.begin(), item.ids.end());
      }
    }
    sequence.assign(ids->begin() + static_cast<std::ptrdiff_t>(first), ids->end());
  }
}

std::string Tokenizer::Decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const {
  const Impl& im = *impl_;
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (int32_t id : ids) {
    const std::string* token = nullptr;
    if (const AddedToken* added = im.added->FindById(id)) {
      token = &added->content;
    } else if (id >= 0 && static_cast<size_t>(id) < im.has_id.size() && im.has_id[id]) {
      token = &im.id_to_token[id];
    } else {
      continue;  // HF drops ids it does not know
    }
    // HF asks whether the token *string* is a special token's content.
    if (skip_special_tokens) {
      const int32_t special_id = im.added->FindByContent(*token);
      if (special_id >= 0 && im.added->FindById(special_id)->special) continue;
    }
    tokens.push_back(*token);
  }
  if (!im.has_decoder) {
    std::string joined;
    for (size_t i = 0; i < tokens.size(); ++i) {
      if (i > 0) joined += ' ';
      joined += tokens[i];
    }
    return joined;
  }
  for (const DecoderStep& step : im.decoder) {
    switch (step.kind) {
      case DecoderStep::Kind::kByteLevel:
        DecodeByteLevel(&tokens);
        break;
      case DecoderStep::Kind::kReplace: {
        std::string out;
        for (std::string& token : tokens) {
          if (step.pattern.regex != nullptr) {
            RegexReplaceAll(token, *step.pattern.regex, step.content, &out);
          } else {
            ReplaceAll(token, step.pattern.literal, step.content, &out);
          }
          token.swap(out);
        }
        break;
      }
      case DecoderStep::Kind::kByteFallback:
        DecodeByteFallback(&tokens);
        break;
      case DecoderStep::Kind::kFuse: {
        std::string fused;
        for (const std::string& token : tokens) fused += token;
        tokens.assign(1, std::move(fused));
        break;
      }
      case DecoderStep::Kind::kStrip:
        DecodeStrip(step, &tokens);
        break;
      case DecoderStep::Kind::kMetaspace:
        DecodeMetaspace(step, &tokens);
        break;
    }
  }
  std::string text;
  for (const std::string& token : tokens) text += token;
  return text;
}

std::optional<std::string> Tokenizer::IdToToken(int32_t id) const {
  if (const AddedToken* added = impl_->added->FindById(id)) return added->content;
  if (id >= 0 && static_cast<size_t>(id) < impl_->has_id.size() && impl_->has_id[id]) {
    return impl_->id_to_token[id];
  }
  return std::nullopt;
}

std::optional<int32_t> Tokenizer::TokenToId(std::string_view token) const {
  const int32_t added = impl_->added->FindByContent(token);
  if (added >= 0) return added;
  if (const int32_t* id = impl_->token_to_id.Find(token)) return *id;
  return std::nullopt;
}

bool Tokenizer::IsSpecial(int32_t id) const {
  const AddedToken* added = impl_->added->FindById(id);
  return added != nullptr && added->special;
}

}  // namespace ftune::data
