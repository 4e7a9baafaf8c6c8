// libFuzzer target: tokenizer.json loading. The input is the text of a
// tokenizer.json, optionally followed by "\n#config\n" and the text of a
// tokenizer_config.json. Loading must return a tokenizer or an error, never
// crash, hang or leak; a tokenizer that loads must encode and decode a
// mixed-script sample.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "worker/data/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view input(reinterpret_cast<const char*>(data), size);
  std::string_view config;
  const size_t split = input.find("\n#config\n");
  if (split != std::string_view::npos) {
    config = input.substr(split + 9);
    input = input.substr(0, split);
  }
  ftune::data::TokenizerLoadOptions options;
  options.bpe_cache_capacity = 64;
  auto tok = ftune::data::Tokenizer::FromJson(input, config, "fuzz", options);
  if (!tok.ok()) {
    if (tok.status().message().empty()) __builtin_trap();  // errors must say something
    return 0;
  }
  for (bool special : {false, true}) {
    const auto ids = (*tok)->Encode("Hello wörld, I'M 123 \xE4\xB8\xAD <s>\t\n  x", special);
    (*tok)->Decode(ids, false);
    (*tok)->Decode(ids, true);
  }
  return 0;
}
