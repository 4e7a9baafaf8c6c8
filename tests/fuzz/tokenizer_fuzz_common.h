// Small tokenizer.json documents shaped like the real ones (Llama 3:
// byte-level BPE with the tiktoken-style Split regex, added tokens,
// ignore_merges, TemplateProcessing; Llama 2: Prepend/Replace normalizer,
// byte fallback, Replace/ByteFallback/Fuse/Strip decoder), for the fuzzers.
#ifndef FTUNE_TESTS_FUZZ_TOKENIZER_FUZZ_COMMON_H_
#define FTUNE_TESTS_FUZZ_TOKENIZER_FUZZ_COMMON_H_

#include <cstdio>
#include <string>

#include <nlohmann/json.hpp>

#include "worker/data/byte_level.h"

namespace ftune::data::fuzz {

inline std::string ByteLevelTokenizerJson() {
  using json = nlohmann::json;
  json vocab = json::object();
  int id = 0;
  for (int b = 0; b < 256; ++b) vocab[BytesToByteLevel(std::string(1, static_cast<char>(b)))] = id++;
  json merges = json::array();
  const char* const kMerges[][2] = {{"h", "e"}, {"l", "l"}, {"he", "ll"}, {"hell", "o"},
                                    {"\xC4\xA0", "w"}, {"\xC4\xA0", "\xC4\xA0"}, {"\xC4\xA0\xC4\xA0", "\xC4\xA0\xC4\xA0"},
                                    {"\xC3\x83", "\xC2\xA9"}, {"t", "h"}, {"th", "e"}};
  for (const auto& m : kMerges) {
    vocab[std::string(m[0]) + m[1]] = id++;
    merges.push_back(std::string(m[0]) + " " + m[1]);
  }
  return json{
      {"added_tokens",
       {{{"id", 400}, {"content", "<|begin_of_text|>"}, {"special", true}, {"normalized", false}},
        {{"id", 401}, {"content", "<|eot_id|>"}, {"special", true}, {"normalized", false}},
        {{"id", 402}, {"content", "<m>"}, {"single_word", true}}}},
      {"normalizer", nullptr},
      {"pre_tokenizer",
       {{"type", "Sequence"},
        {"pretokenizers",
         {{{"type", "Split"},
           {"pattern",
            {{"Regex",
              "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
              "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}}},
           {"behavior", "Isolated"},
           {"invert", false}},
          {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}}},
      {"post_processor",
       {{"type", "TemplateProcessing"},
        {"single", {{{"SpecialToken", {{"id", "<|begin_of_text|>"}, {"type_id", 0}}}},
                    {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
        {"special_tokens",
         {{"<|begin_of_text|>",
           {{"id", "<|begin_of_text|>"}, {"ids", {400}}, {"tokens", {"<|begin_of_text|>"}}}}}}}},
      {"decoder", {{"type", "ByteLevel"}}},
      {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}, {"ignore_merges", true}}}}
      .dump();
}

inline std::string SentencePieceTokenizerJson() {
  using json = nlohmann::json;
  json vocab = {{"<unk>", 0}, {"<s>", 1}, {"</s>", 2}};
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    vocab[name] = 3 + b;
  }
  int id = 259;
  for (const char* t : {"\xE2\x96\x81", "a", "b", "\xE2\x96\x81" "a", "ab", "\xE2\x96\x81" "ab"}) vocab[t] = id++;
  return json{{"added_tokens",
               {{{"id", 0}, {"content", "<unk>"}, {"special", true}, {"normalized", false}},
                {{"id", 1}, {"content", "<s>"}, {"special", true}, {"normalized", false}},
                {{"id", 2}, {"content", "</s>"}, {"special", true}, {"normalized", false}}}},
              {"normalizer",
               {{"type", "Sequence"},
                {"normalizers",
                 {{{"type", "Prepend"}, {"prepend", "\xE2\x96\x81"}},
                  {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", "\xE2\x96\x81"}}}}}},
              {"pre_tokenizer", nullptr},
              {"post_processor", nullptr},
              {"decoder",
               {{"type", "Sequence"},
                {"decoders",
                 {{{"type", "Replace"}, {"pattern", {{"String", "\xE2\x96\x81"}}}, {"content", " "}},
                  {{"type", "ByteFallback"}},
                  {{"type", "Fuse"}},
                  {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}}}}},
              {"model",
               {{"type", "BPE"},
                {"unk_token", "<unk>"},
                {"fuse_unk", true},
                {"byte_fallback", true},
                {"vocab", vocab},
                {"merges", {"\xE2\x96\x81 a", "a b", "\xE2\x96\x81" "a b"}}}}}
      .dump();
}

}  // namespace ftune::data::fuzz

#endif  // FTUNE_TESTS_FUZZ_TOKENIZER_FUZZ_COMMON_H_
