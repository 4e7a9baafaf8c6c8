// See data_commands.h.
#include "cli/data_commands.h"

#include <cstdint>
#include <memory>
#include <utility>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "worker/data/tokenizer.h"

namespace ftune::cli {
namespace {

constexpr int kOk = 0;
constexpr int kUsage = 2;

using json = nlohmann::json;

int Tokenize(const data::Tokenizer& tok, bool add_special_tokens, std::istream& in,
             std::ostream& out, std::ostream& err) {
  std::vector<int32_t> ids;
  size_t number = 0;
  for (std::string line; std::getline(in, line);) {
    ++number;
    json text;
    try {
      text = json::parse(line);
    } catch (const json::parse_error& e) {
      err << "ftune data tokenize: stdin line " << number << ": not JSON: " << e.what() << "\n";
      return kUsage;
    }
    if (!text.is_string()) {
      err << "ftune data tokenize: stdin line " << number << ": expected a JSON string, got "
          << text.type_name() << "\n";
      return kUsage;
    }
    ids.clear();
    tok.EncodeAppend(text.get_ref<const std::string&>(), add_special_tokens, &ids);
    out << json(ids).dump() << "\n";
    out.flush();
  }
  return kOk;
}

int Detokenize(const data::Tokenizer& tok, bool skip_special_tokens, std::istream& in,
               std::ostream& out, std::ostream& err) {
  size_t number = 0;
  for (std::string line; std::getline(in, line);) {
    ++number;
    json array;
    try {
      array = json::parse(line);
    } catch (const json::parse_error& e) {
      err << "ftune data detokenize: stdin line " << number << ": not JSON: " << e.what() << "\n";
      return kUsage;
    }
    std::vector<int32_t> ids;
    bool ok = array.is_array();
    if (ok) {
      for (const json& id : array) {
        if (!id.is_number_integer() || id.get<int64_t>() < INT32_MIN || id.get<int64_t>() > INT32_MAX) {
          ok = false;
          break;
        }
        ids.push_back(static_cast<int32_t>(id.get<int64_t>()));
      }
    }
    if (!ok) {
      err << "ftune data detokenize: stdin line " << number
          << ": expected a JSON array of integer token ids\n";
      return kUsage;
    }
    out << json(tok.Decode(ids, skip_special_tokens))
               .dump(-1, ' ', false, json::error_handler_t::replace)
        << "\n";
    out.flush();
  }
  return kOk;
}

}  // namespace

int RunDataCommand(const std::vector<std::string>& args, std::istream& in, std::ostream& out,
                   std::ostream& err) {
  CLI::App app("ftune data: tokenize and detokenize with a Hugging Face tokenizer.json", "ftune data");
  app.require_subcommand(1);
  std::string dir;
  bool add_special_tokens = false;
  bool skip_special_tokens = false;
  CLI::App* tokenize = app.add_subcommand(
      "tokenize", "Read one JSON string per line on stdin, print one JSON array of ids per line");
  tokenize->add_option("--tokenizer", dir, "Directory with tokenizer.json")->required();
  tokenize->add_flag("--add-special-tokens", add_special_tokens,
                     "Apply the tokenizer's post-processor (BOS/EOS), like HF add_special_tokens=True");
  CLI::App* detokenize = app.add_subcommand(
      "detokenize", "Read one JSON array of ids per line on stdin, print one JSON string per line");
  detokenize->add_option("--tokenizer", dir, "Directory with tokenizer.json")->required();
  detokenize->add_flag("--skip-special-tokens", skip_special_tokens,
                       "Leave special tokens out of the text, like HF skip_special_tokens=True");

  // args[0] is the program, args[1] "data"; CLI11 wants them reversed.
  std::vector<std::string> rest(args.rbegin(), args.rend() - 2);
  try {
    app.parse(rest);
  } catch (const CLI::ParseError& e) {
    return app.exit(e, out, err) == 0 ? kOk : kUsage;
  }
  auto loaded = data::Tokenizer::Load(dir);
  if (!loaded.ok()) {
    err << "ftune data: " << loaded.status().message() << "\n";
    return kUsage;
  }
  if (tokenize->parsed()) return Tokenize(**loaded, add_special_tokens, in, out, err);
  return Detokenize(**loaded, skip_special_tokens, in, out, err);
}

}  // namespace ftune::cli
