// Encode throughput of ftune's tokenizer on one core, in MB/s of UTF-8 input,
// on tests/golden/tokenizer/corpus.jsonl repeated to --mb megabytes (each
// corpus line one document, encoded without special tokens, as
// make_golden.py --bench-mb measures HF tokenizers).
//
//   tokenizer_bench [--mb 10] [--corpus FILE] [--no-cache] [NAME=DIR ...]
//
// Without NAME=DIR arguments it runs the test tokenizers
// (tokenizer_test_data.h). Prints one line per tokenizer: best of 3 runs.
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "tokenizer_test_data.h"
#include "worker/data/tokenizer.h"

int main(int argc, char** argv) {
  double megabytes = 10;
  std::string corpus_path = FTUNE_TOKENIZER_CORPUS;
  ftune::data::TokenizerLoadOptions options;
  std::vector<std::pair<std::string, std::string>> tokenizers;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--mb" && i + 1 < argc) {
      megabytes = std::stod(argv[++i]);
    } else if (arg == "--corpus" && i + 1 < argc) {
      corpus_path = argv[++i];
    } else if (arg == "--no-cache") {
      options.bpe_cache_capacity = 0;
    } else if (arg.find('=') != std::string::npos) {
      tokenizers.emplace_back(arg.substr(0, arg.find('=')), arg.substr(arg.find('=') + 1));
    } else {
      std::fprintf(stderr, "usage: %s [--mb N] [--corpus FILE] [--no-cache] [NAME=DIR ...]\n", argv[0]);
      return 2;
    }
  }
  if (tokenizers.empty()) {
    for (const std::string& name : ftune::data::test_data::GoldenTokenizerNames()) {
      std::string missing;
      const std::string dir = ftune::data::test_data::TokenizerDir(name, &missing);
      if (dir.empty()) {
        std::fprintf(stderr, "%s\n", missing.c_str());
        return 1;
      }
      tokenizers.emplace_back(name, dir);
    }
  }

  std::vector<std::string> corpus;
  std::ifstream in(corpus_path);
  for (std::string line; std::getline(in, line);) corpus.push_back(nlohmann::json::parse(line));
  if (corpus.empty()) {
    std::fprintf(stderr, "empty or missing corpus %s\n", corpus_path.c_str());
    return 1;
  }
  std::vector<const std::string*> docs;
  size_t bytes = 0;
  while (bytes < megabytes * 1e6) {
    for (const std::string& text : corpus) {
      docs.push_back(&text);
      bytes += text.size();
    }
  }

  for (const auto& [name, dir] : tokenizers) {
    auto loaded = ftune::data::Tokenizer::Load(dir, options);
    if (!loaded.ok()) {
      std::fprintf(stderr, "%s\n", loaded.status().ToString().c_str());
      return 1;
    }
    const ftune::data::Tokenizer& tok = **loaded;
    std::vector<int32_t> ids;
    for (const std::string& text : corpus) tok.Encode(text, false);  // warm-up
    double best = 0;
    size_t tokens = 0;
    for (int run = 0; run < 3; ++run) {
      tokens = 0;
      const auto start = std::chrono::steady_clock::now();
      for (const std::string* text : docs) {
        ids.clear();
        tok.EncodeAppend(*text, false, &ids);
        tokens += ids.size();
      }
      const double seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (run == 0 || seconds < best) best = seconds;
    }
    std::printf("%-9s %8.2f MB/s  (%zu bytes, %zu docs, %zu tokens, best of 3: %.3f s%s)\n",
                name.c_str(), bytes / 1e6 / best, bytes, docs.size(), tokens, best,
                options.bpe_cache_capacity == 0 ? ", BPE cache off" : "");
    std::fflush(stdout);
  }
  return 0;
}
