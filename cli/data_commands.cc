// See data_commands.h.
#include "cli/data_commands.h"

#include <unistd.h>

#include <cstdint>
#include <memory>
#include <sstream>
#include <utility>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "jobspec.h"
#include "worker/config/run_config.h"
#include "worker/data/prepare.h"
#include "worker/data/token_file.h"
#include "worker/data/tokenizer.h"

namespace ftune::cli {
namespace {

constexpr int kOk = 0;
constexpr int kFailed = 1;
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
    } catch (const json::exception& e) {  // parse_error, or out_of_range for 1e999
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
    } catch (const json::exception& e) {  // parse_error, or out_of_range for 1e999
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


int Prepare(const std::string& job_path, const std::string& cache_dir_flag, std::ostream& out,
            std::ostream& err) {
  // The job's dataset options exactly as its ranks derive them: the spec
  // resolved by LoadJobSpec, then RunConfig.
  char cwd[4096];
  const std::string base = ::getcwd(cwd, sizeof(cwd)) != nullptr ? cwd : "";
  Result<v1::JobSpec> spec = LoadJobSpec(job_path, base);
  Result<trainer::RunConfig> run =
      spec.ok() ? trainer::MakeRunConfig(*spec, trainer::DeviceKind::kCpu)
                : Result<trainer::RunConfig>(spec.status());
  if (!run.ok()) {
    std::istringstream lines(run.status().message());
    for (std::string line; std::getline(lines, line);) err << "ftune data prepare: " << line << "\n";
    return kUsage;
  }
  const data::DatasetOptions& options = run->data;
  const std::string cache_dir = cache_dir_flag.empty() ? data::DefaultDataCacheDir() : cache_dir_flag;
  // One line per phase change and per tenth of a phase, not per record.
  std::string last_phase;
  int64_t last_tenth = -1;
  const auto progress = [&](const data::PrepareProgress& p) {
    const int64_t tenth = p.total > 0 ? p.done * 10 / p.total : 0;
    if (p.phase == last_phase && tenth == last_tenth) return;
    last_phase = p.phase;
    last_tenth = tenth;
    err << "prepare: " << p.phase << " " << p.done << "/" << p.total << "\n";
    err.flush();
  };
  Result<data::PreparedDataset> prepared = data::PrepareDataset(options, cache_dir, progress);
  if (!prepared.ok()) {
    err << "ftune data prepare: " << prepared.status().message() << "\n";
    return kFailed;
  }
  const data::PreparedDataset& p = *prepared;
  for (const std::string& w : p.warnings) err << "ftune data prepare: warning: " << w << "\n";
  const json report = {{"train_path", p.train_path},
                       {"eval_path", p.eval_path},
                       {"manifest_path", p.manifest_path},
                       {"cache_key", p.cache_key},
                       {"cache_hit", p.cache_hit},
                       {"format", p.format},
                       {"chat_template", p.chat_template},
                       {"train_rows", p.train_rows},
                       {"eval_rows", p.eval_rows},
                       {"train_tokens", p.train_tokens},
                       {"eval_tokens", p.eval_tokens},
                       {"train_documents", p.train_documents},
                       {"eval_documents", p.eval_documents},
                       {"train_trained_tokens", p.train_trained_tokens},
                       {"truncated_documents", p.truncated_documents},
                       {"skipped_records", p.skipped_records},
                       {"skipped_examples", p.skipped_examples},
                       {"warnings", p.warnings}};
  out << report.dump(2, ' ', false, json::error_handler_t::replace) << "\n";
  return kOk;
}

// Decoded text of ids[begin, end) in context: the difference of the decoded
// prefixes, so SentencePiece spaces and multi-byte characters split across
// the boundary come out as in the whole text.
std::string DecodeRange(const data::Tokenizer& tok, const int32_t* ids, int64_t begin, int64_t end,
                        const std::string& decoded_prefix, std::string* decoded_through_end) {
  *decoded_through_end = tok.Decode(std::vector<int32_t>(ids, ids + end), false);
  if (decoded_through_end->compare(0, decoded_prefix.size(), decoded_prefix) == 0) {
    return decoded_through_end->substr(decoded_prefix.size());
  }
  return tok.Decode(std::vector<int32_t>(ids + begin, ids + end), false);
}

int Inspect(const std::string& path, int64_t num_rows, const std::string& tokenizer_flag,
            std::ostream& out, std::ostream& err) {
  Result<std::unique_ptr<data::TokenFile>> file = data::TokenFile::Open(path);
  if (!file.ok()) {
    err << "ftune data inspect: " << file.status().message() << "\n";
    return kUsage;
  }
  const data::TokenFile& f = **file;
  const json meta = json::parse(f.metadata_json(), nullptr, false);
  std::string tokenizer_dir = tokenizer_flag;
  if (tokenizer_dir.empty() && meta.is_object()) tokenizer_dir = meta.value("tokenizer_dir", "");
  if (tokenizer_dir.empty()) {
    err << "ftune data inspect: " << path << " records no tokenizer directory; pass --tokenizer DIR\n";
    return kUsage;
  }
  auto tok = data::Tokenizer::Load(tokenizer_dir);
  if (!tok.ok()) {
    err << "ftune data inspect: " << tok.status().message() << "\n";
    return kUsage;
  }
  out << path << ": " << f.num_rows() << " rows, " << f.num_tokens() << " tokens, max_seq_len "
      << f.max_seq_len() << ", " << (f.packed() ? "packed" : "not packed") << ", pad " << f.pad_token_id()
      << "\n";
  if (meta.is_object()) {
    out << "format " << meta.value("format", "?") << ", chat_template "
        << (meta.value("chat_template", "").empty() ? "-" : meta.value("chat_template", ""))
        << ", completion_only_loss " << (meta.value("completion_only_loss", true) ? "true" : "false")
        << ", tokenizer " << tokenizer_dir << "\n";
  }
  out << "Text the loss trains on is wrapped in [[ ]].\n";
  for (int64_t i = 0; i < std::min(num_rows, f.num_rows()); ++i) {
    const data::TokenRow row = f.row(i);
    int64_t trained = 0, docs = 0;
    for (int64_t t = 0; t < row.length; ++t) {
      trained += row.labels[t] != data::kIgnoreLabel;
      docs += row.position_ids[t] == 0;
    }
    out << "\n=== row " << i << ": " << row.length << " tokens, " << docs << " document"
        << (docs == 1 ? "" : "s") << ", " << trained << " trained\n";
    int64_t doc = 0;
    for (int64_t start = 0; start < row.length;) {
      int64_t end = start + 1;
      while (end < row.length && row.position_ids[end] != 0) ++end;
      out << "--- document " << doc++ << " (" << (end - start) << " tokens)\n";
      const int32_t* ids = row.input_ids + start;
      const int32_t* labels = row.labels + start;
      const int64_t n = end - start;
      std::string text, prefix;
      for (int64_t a = 0; a < n;) {
        const bool on = labels[a] != data::kIgnoreLabel;
        int64_t b = a + 1;
        while (b < n && (labels[b] != data::kIgnoreLabel) == on) ++b;
        std::string through;
        const std::string piece = DecodeRange(**tok, ids, a, b, prefix, &through);
        text += on ? "[[" + piece + "]]" : piece;
        prefix = std::move(through);
        a = b;
      }
      out << text << "\n";
      start = end;
    }
  }
  return kOk;
}

}  // namespace

int RunDataCommand(const std::vector<std::string>& args, std::istream& in, std::ostream& out,
                   std::ostream& err) {
  CLI::App app("ftune data: tokenize with a Hugging Face tokenizer.json, prepare and inspect datasets",
               "ftune data");
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

  std::string job_path, cache_dir, file_path, inspect_tokenizer;
  int64_t inspect_rows = 3;
  CLI::App* prepare = app.add_subcommand(
      "prepare", "Tokenize, mask and pack a job's dataset into cached token files; print them as JSON");
  prepare->add_option("job", job_path, "Job YAML (model.model_name_or_path, dataset, training)")
      ->required();
  prepare->add_option("--cache-dir", cache_dir,
                      "Cache directory (default $FTUNE_DATA_CACHE or ~/.cache/ftune/data)");
  CLI::App* inspect = app.add_subcommand(
      "inspect", "Print rows of a token file decoded, trained text wrapped in [[ ]]");
  inspect->add_option("file", file_path, "Token file (.ftok) written by prepare")->required();
  inspect->add_option("--rows", inspect_rows, "Rows to print")->check(CLI::NonNegativeNumber);
  inspect->add_option("--tokenizer", inspect_tokenizer,
                      "Tokenizer directory (default: the one recorded in the file)");

  // args[0] is the program, args[1] "data"; CLI11 wants them reversed.
  std::vector<std::string> rest(args.rbegin(), args.rend() - 2);
  try {
    app.parse(rest);
  } catch (const CLI::ParseError& e) {
    return app.exit(e, out, err) == 0 ? kOk : kUsage;
  }
  if (prepare->parsed()) return Prepare(job_path, cache_dir, out, err);
  if (inspect->parsed()) return Inspect(file_path, inspect_rows, inspect_tokenizer, out, err);
  auto loaded = data::Tokenizer::Load(dir);
  if (!loaded.ok()) {
    err << "ftune data: " << loaded.status().message() << "\n";
    return kUsage;
  }
  if (tokenize->parsed()) return Tokenize(**loaded, add_special_tokens, in, out, err);
  return Detokenize(**loaded, skip_special_tokens, in, out, err);
}

}  // namespace ftune::cli
