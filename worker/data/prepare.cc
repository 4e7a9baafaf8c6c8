// See prepare.h. No std::filesystem: the trainer links this library on GPU
// hosts next to pip LibTorch (see common/ftune/file_util.h for why).
#include "worker/data/prepare.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "ftune/file_util.h"
#include "worker/data/chat_template.h"
#include "worker/data/dataset.h"
#include "worker/data/packing.h"
#include "worker/data/sha256.h"
#include "worker/data/tokenizer.h"

namespace ftune::data {
namespace {

using json = nlohmann::json;

// Bumped whenever the pipeline's output for the same inputs changes, so old
// cache entries are not reused.
constexpr char kPipelineVersion[] = "ftune-data-prepare-1";

// Whole-file reads are bounded and of regular files only (ReadFileToString):
// `data_files: [/dev/zero]` fails at once instead of filling the host's
// memory.
Result<std::string> ReadWholeFile(const std::string& path, const char* what, uint64_t max_bytes) {
  Result<std::string> text = ReadFileToString(path, max_bytes);
  if (!text.ok()) {
    return Status(text.status().code(), text.status().message() + " (the " + what + ")");
  }
  return text;
}

bool Exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

Status MakeDirs(const std::string& dir) {
  std::string path;
  size_t pos = 0;
  while (pos <= dir.size()) {
    const size_t slash = dir.find('/', pos);
    path = dir.substr(0, slash == std::string::npos ? dir.size() : slash);
    pos = slash == std::string::npos ? dir.size() + 1 : slash + 1;
    if (path.empty()) continue;
    if (::mkdir(path.c_str(), 0755) != 0 && errno != EEXIST) {
      return InternalError(path + ": cannot create the cache directory: " + std::strerror(errno));
    }
  }
  return OkStatus();
}

std::string Absolute(const std::string& path) {
  char buf[PATH_MAX];
  return ::realpath(path.c_str(), buf) != nullptr ? std::string(buf) : path;
}

// Holds an exclusive flock on a lock file until destroyed.
class FileLock {
 public:
  static Result<std::unique_ptr<FileLock>> Acquire(const std::string& path) {
    const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return InternalError(path + ": cannot open the cache lock: " + std::strerror(errno));
    while (::flock(fd, LOCK_EX) != 0) {
      if (errno != EINTR) {
        const std::string err = std::strerror(errno);
        ::close(fd);
        return InternalError(path + ": flock: " + err);
      }
    }
    return std::unique_ptr<FileLock>(new FileLock(fd));
  }
  ~FileLock() {
    ::flock(fd_, LOCK_UN);
    ::close(fd_);
  }

 private:
  explicit FileLock(int fd) : fd_(fd) {}
  int fd_;
};

Status WriteFileAtomic(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return InternalError(tmp + ": cannot create: " + std::strerror(errno));
  size_t off = 0;
  while (off < text.size()) {
    const ssize_t w = ::write(fd, text.data() + off, text.size() - off);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) {
      const std::string err = std::strerror(errno);
      ::close(fd);
      ::unlink(tmp.c_str());
      return InternalError(tmp + ": write: " + err);
    }
    off += static_cast<size_t>(w);
  }
  const bool synced = ::fsync(fd) == 0;
  ::close(fd);
  if (!synced || ::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string err = std::strerror(errno);
    ::unlink(tmp.c_str());
    return InternalError(path + ": cannot write: " + err);
  }
  return OkStatus();
}

Status CheckOptions(const DatasetOptions& o) {
  if (o.data_files.empty()) return InvalidArgumentError("dataset.data_files is empty: list at least one file");
  if (o.tokenizer_dir.empty()) return InvalidArgumentError("no tokenizer directory (model.model_name_or_path)");
  if (o.max_seq_len < 1) {
    return InvalidArgumentError("max_seq_len (" + std::to_string(o.max_seq_len) + ") must be >= 1");
  }
  if (!(o.eval_split_ratio >= 0 && o.eval_split_ratio < 1)) {
    return InvalidArgumentError("eval_split_ratio (" + std::to_string(o.eval_split_ratio) +
                                ") must be in [0, 1)");
  }
  if (o.eval_split_ratio > 0 && !o.eval_data_files.empty()) {
    return InvalidArgumentError("eval_split_ratio must be 0 when eval_data_files are given");
  }
  if (o.format != "auto" && o.format != "messages" && o.format != "text" && o.format != "prompt_completion") {
    return InvalidArgumentError("dataset.format \"" + o.format +
                                "\" is not one of auto, messages, text, prompt_completion");
  }
  if (o.chat_template != "auto") FTUNE_RETURN_IF_ERROR(ChatTemplateKindFromName(o.chat_template).status());
  return OkStatus();
}

struct Split {
  std::vector<Row> rows;
  int64_t documents = 0, tokens = 0, trained = 0, truncated = 0;
};

// Tokenizes `records` on `threads` threads (results kept in record order);
// failed records are skipped and counted with skip_invalid, else fatal.
Status Tokenize(const std::vector<Record>& records, const DocumentEncoder& encoder, int threads,
                bool skip_invalid, const PrepareProgressFn& progress, int64_t* done, int64_t total,
                std::vector<TokenizedDoc>* docs, PreparedDataset* stats) {
  std::vector<Result<TokenizedDoc>> results(records.size(), Result<TokenizedDoc>(InternalError("unset")));
  constexpr size_t kChunk = 1024;
  for (size_t begin = 0; begin < records.size(); begin += kChunk * static_cast<size_t>(threads)) {
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
      const size_t b = begin + static_cast<size_t>(t) * kChunk;
      const size_t e = std::min(records.size(), b + kChunk);
      if (b >= e) break;
      pool.emplace_back([&, b, e] {
        for (size_t i = b; i < e; ++i) results[i] = encoder.Encode(records[i]);
      });
    }
    for (std::thread& th : pool) th.join();
    *done += static_cast<int64_t>(std::min(records.size(), begin + kChunk * static_cast<size_t>(threads)) - begin);
    if (progress) progress({"tokenize", *done, total});
  }
  docs->reserve(records.size());
  for (Result<TokenizedDoc>& r : results) {
    if (!r.ok()) {
      if (!skip_invalid) return r.status();
      ++stats->skipped_records;
      if (stats->skipped_examples.size() < kMaxSkippedExamples) stats->skipped_examples.push_back(r.status().message());
      continue;
    }
    if (r->input_ids.empty()) continue;
    docs->push_back(std::move(*r));
  }
  return OkStatus();
}

Split MakeRows(const std::vector<TokenizedDoc>& docs, const DatasetOptions& o) {
  Split s;
  s.rows = o.packing ? PackBestFitDecreasing(docs, o.max_seq_len) : TruncateRows(docs, o.max_seq_len);
  s.documents = static_cast<int64_t>(docs.size());
  for (const TokenizedDoc& d : docs) s.truncated += static_cast<int64_t>(d.input_ids.size()) > o.max_seq_len;
  for (const Row& r : s.rows) {
    s.tokens += static_cast<int64_t>(r.input_ids.size());
    for (int32_t l : r.labels) s.trained += l != kIgnoreLabel;
  }
  return s;
}

PreparedDataset FromManifest(const json& m, const std::string& dir) {
  PreparedDataset p;
  p.cache_key = m.value("cache_key", "");
  p.train_path = dir + "/train.ftok";
  p.eval_path = m.value("has_eval", false) ? dir + "/eval.ftok" : "";
  p.manifest_path = dir + "/manifest.json";
  p.train_rows = m.value("train_rows", int64_t{0});
  p.eval_rows = m.value("eval_rows", int64_t{0});
  p.train_tokens = m.value("train_tokens", int64_t{0});
  p.eval_tokens = m.value("eval_tokens", int64_t{0});
  p.train_documents = m.value("train_documents", int64_t{0});
  p.eval_documents = m.value("eval_documents", int64_t{0});
  p.train_trained_tokens = m.value("train_trained_tokens", int64_t{0});
  p.truncated_documents = m.value("truncated_documents", int64_t{0});
  p.skipped_records = m.value("skipped_records", int64_t{0});
  p.format = m.value("format", "");
  p.chat_template = m.value("chat_template", "");
  if (m.contains("skipped_examples")) p.skipped_examples = m["skipped_examples"].get<std::vector<std::string>>();
  if (m.contains("warnings")) p.warnings = m["warnings"].get<std::vector<std::string>>();
  return p;
}

// Mistral-7B-Instruct-v0.3's template writes the system message only into a
// conversation's last user turn, so training conversations (which end with
// the assistant) lose it. ftune renders what transformers renders, and says
// so once, with the count.
std::string DroppedSystemWarning(ChatTemplateKind kind, const std::vector<Record>& train,
                                 const std::vector<Record>& eval) {
  int64_t dropped = 0, conversations = 0;
  for (const auto* records : {&train, &eval}) {
    for (const Record& r : *records) {
      if (r.format != RecordFormat::kMessages) continue;
      ++conversations;
      dropped += RenderDropsSystemMessage(kind, r.messages);
    }
  }
  if (dropped == 0) return "";
  return "chat template " + ChatTemplateName(kind) + ": " + std::to_string(dropped) + " of " +
         std::to_string(conversations) +
         " conversations start with a system message and end with an assistant turn; "
         "Mistral-7B-Instruct-v0.3's template writes the system message only into a last user "
         "turn, so these are rendered without it (as transformers renders them). To train with "
         "it, put the system text into the first user message";
}

}  // namespace

std::string DefaultDataCacheDir() {
  if (const char* e = std::getenv("FTUNE_DATA_CACHE"); e != nullptr && *e != '\0') return e;
  if (const char* e = std::getenv("XDG_CACHE_HOME"); e != nullptr && *e != '\0') {
    return std::string(e) + "/ftune/data";
  }
  const char* home = std::getenv("HOME");
  return std::string(home != nullptr && *home != '\0' ? home : "/tmp") + "/.cache/ftune/data";
}

std::vector<int64_t> EpochPermutation(int64_t num_rows, uint64_t seed, int64_t epoch) {
  return SeededPermutation(num_rows, seed, static_cast<uint64_t>(epoch));
}

Result<PreparedDataset> PrepareDataset(const DatasetOptions& options, const std::string& cache_dir,
                                       const PrepareProgressFn& progress) {
  FTUNE_RETURN_IF_ERROR(CheckOptions(options));
  if (cache_dir.empty()) return InvalidArgumentError("PrepareDataset: empty cache directory");
  auto report = [&](const char* phase, int64_t done, int64_t total) {
    if (progress) progress({phase, done, total});
  };

  // hash
  const int64_t num_files = static_cast<int64_t>(options.data_files.size() + options.eval_data_files.size());
  std::vector<std::string> train_texts, eval_texts;
  Sha256 key;
  key.UpdateField(kPipelineVersion);
  int64_t hashed = 0;
  for (const auto* list : {&options.data_files, &options.eval_data_files}) {
    key.UpdateField(list == &options.data_files ? "train" : "eval");
    for (const std::string& file : *list) {
      FTUNE_ASSIGN_OR_RETURN(std::string text, ReadWholeFile(file, "data file", kMaxDataFileBytes));
      key.UpdateField(text);
      (list == &options.data_files ? train_texts : eval_texts).push_back(std::move(text));
      report("hash", ++hashed, num_files);
    }
  }
  const std::string tok_json_path = options.tokenizer_dir + "/tokenizer.json";
  const std::string tok_config_path = options.tokenizer_dir + "/tokenizer_config.json";
  FTUNE_ASSIGN_OR_RETURN(const std::string tok_json,
                         ReadWholeFile(tok_json_path, "tokenizer", kMaxTokenizerJsonBytes));
  std::string tok_config;
  if (Exists(tok_config_path)) {
    FTUNE_ASSIGN_OR_RETURN(tok_config,
                           ReadWholeFile(tok_config_path, "tokenizer config", kMaxSmallFileBytes));
  }
  Sha256 tok_hash;
  tok_hash.UpdateField(tok_json);
  tok_hash.UpdateField(tok_config);
  const std::string tokenizer_sha256 = tok_hash.HexDigest();
  const json key_options = {
      {"format", options.format},
      {"chat_template", options.chat_template},
      {"completion_only_loss", options.completion_only_loss},
      {"max_seq_len", options.max_seq_len},
      {"packing", options.packing},
      {"eval_split_ratio", options.eval_split_ratio},
      {"seed", options.seed},
      {"skip_invalid", options.skip_invalid},
      {"tokenizer_sha256", tokenizer_sha256}};
  key.UpdateField(key_options.dump());
  const std::string cache_key = key.HexDigest();

  FTUNE_RETURN_IF_ERROR(MakeDirs(cache_dir));
  const std::string dir = Absolute(cache_dir) + "/" + cache_key;
  FTUNE_ASSIGN_OR_RETURN(std::unique_ptr<FileLock> lock,
                                FileLock::Acquire(Absolute(cache_dir) + "/" + cache_key + ".lock"));
  const std::string manifest_path = dir + "/manifest.json";
  if (Exists(manifest_path)) {
    Result<std::string> text = ReadWholeFile(manifest_path, "manifest", kMaxSmallFileBytes);
    if (text.ok()) {
      json m = json::parse(*text, nullptr, false);
      const bool files_ok = TokenFile::Open(dir + "/train.ftok").ok() &&
                            (!m.is_object() || !m.value("has_eval", false) || TokenFile::Open(dir + "/eval.ftok").ok());
      if (!m.is_discarded() && m.value("cache_key", "") == cache_key && files_ok) {
        PreparedDataset p = FromManifest(m, dir);
        p.cache_hit = true;
        return p;
      }
    }
    // A damaged entry: rebuild it below.
  }

  // read
  FTUNE_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer, Tokenizer::Load(options.tokenizer_dir));
  ReadOptions read_options;
  read_options.format = options.format;
  read_options.skip_invalid = options.skip_invalid;
  ReadResult train_read, eval_read;
  int64_t read_files = 0;
  for (size_t i = 0; i < train_texts.size(); ++i) {
    FTUNE_RETURN_IF_ERROR(ReadDatasetText(train_texts[i], options.data_files[i], read_options, &train_read));
    std::string().swap(train_texts[i]);  // the records hold what is needed
    report("read", ++read_files, num_files);
  }
  if (train_read.records.empty()) {
    return InvalidArgumentError(options.data_files[0] + (options.data_files.size() > 1 ? " (and the other data files)" : "") +
                                ": no valid records" +
                                (train_read.skipped > 0 ? " (" + std::to_string(train_read.skipped) +
                                                              " skipped; first: " + train_read.skipped_examples[0] + ")"
                                                        : ""));
  }
  if (!options.eval_data_files.empty()) {
    // The eval files must have the train files' layout.
    ReadOptions eval_options = read_options;
    eval_options.format = RecordFormatName(train_read.format);
    for (size_t i = 0; i < eval_texts.size(); ++i) {
      FTUNE_RETURN_IF_ERROR(ReadDatasetText(eval_texts[i], options.eval_data_files[i], eval_options, &eval_read));
      std::string().swap(eval_texts[i]);
      report("read", ++read_files, num_files);
    }
  }
  PreparedDataset out;
  out.cache_key = cache_key;
  out.skipped_records = train_read.skipped + eval_read.skipped;
  out.skipped_examples = train_read.skipped_examples;
  for (const std::string& s : eval_read.skipped_examples) {
    if (out.skipped_examples.size() < kMaxSkippedExamples) out.skipped_examples.push_back(s);
  }
  out.format = RecordFormatName(train_read.format);
  std::vector<Record> train_records, eval_records;
  if (options.eval_split_ratio > 0) {
    SplitByRatio(std::move(train_read.records), options.eval_split_ratio, options.seed, &train_records,
                 &eval_records);
  } else {
    train_records = std::move(train_read.records);
    eval_records = std::move(eval_read.records);
  }
  const bool has_eval = !options.eval_data_files.empty() || options.eval_split_ratio > 0;

  // tokenize
  ChatTemplate chat;
  bool needs_chat = false, needs_eos = false;
  for (const auto* records : {&train_records, &eval_records}) {
    for (const Record& r : *records) {
      const bool chat_record = r.format == RecordFormat::kMessages || r.num_prompt_messages > 0;
      needs_chat |= chat_record;
      needs_eos |= !chat_record;
    }
  }
  if (needs_chat) {
    FTUNE_ASSIGN_OR_RETURN(chat, ResolveChatTemplate(options.chat_template, tokenizer->config(),
                                                            options.tokenizer_dir));
    out.chat_template = ChatTemplateName(chat.kind);
    if (std::string w = DroppedSystemWarning(chat.kind, train_records, eval_records); !w.empty()) {
      out.warnings.push_back(std::move(w));
    }
  }
  if (needs_eos && !tokenizer->config().eos_token.has_value()) {
    return InvalidArgumentError(options.tokenizer_dir + "/tokenizer_config.json names no eos_token, which "
                                "ends every " + out.format + " document (TRL's add_eos)");
  }
  const DocumentEncoder encoder(*tokenizer, chat, options.completion_only_loss);
  int threads = options.num_threads > 0 ? options.num_threads
                                        : static_cast<int>(std::min(16u, std::max(1u, std::thread::hardware_concurrency())));
  const int64_t total = static_cast<int64_t>(train_records.size() + eval_records.size());
  int64_t done = 0;
  report("tokenize", 0, total);
  std::vector<TokenizedDoc> train_docs, eval_docs;
  FTUNE_RETURN_IF_ERROR(Tokenize(train_records, encoder, threads, options.skip_invalid, progress, &done,
                                      total, &train_docs, &out));
  FTUNE_RETURN_IF_ERROR(Tokenize(eval_records, encoder, threads, options.skip_invalid, progress, &done,
                                      total, &eval_docs, &out));
  train_records.clear();
  eval_records.clear();
  if (train_docs.empty()) return InvalidArgumentError(options.data_files[0] + ": no record produced tokens");

  // pack
  report("pack", 0, has_eval ? 2 : 1);
  const Split train = MakeRows(train_docs, options);
  report("pack", 1, has_eval ? 2 : 1);
  train_docs.clear();
  const Split eval = has_eval ? MakeRows(eval_docs, options) : Split{};
  if (has_eval) report("pack", 2, 2);

  // write
  FTUNE_RETURN_IF_ERROR(MakeDirs(dir));
  const int32_t pad = tokenizer->pad_id().value_or(tokenizer->eos_id().value_or(0));
  json meta = {{"pipeline", kPipelineVersion},
               {"cache_key", cache_key},
               {"tokenizer_dir", Absolute(options.tokenizer_dir)},
               {"tokenizer_sha256", tokenizer_sha256},
               {"format", out.format},
               {"chat_template", out.chat_template},
               {"completion_only_loss", options.completion_only_loss},
               {"max_seq_len", options.max_seq_len},
               {"packing", options.packing},
               {"packing_rule", options.packing ? "trl-bfd-1000" : "truncate"},
               {"seed", options.seed},
               {"eval_split_ratio", options.eval_split_ratio},
               {"data_files", options.data_files},
               {"eval_data_files", options.eval_data_files}};
  TokenFileHeaderInfo info;
  info.max_seq_len = options.max_seq_len;
  info.pad_token_id = pad;
  info.packed = options.packing;
  report("write", 0, has_eval ? 2 : 1);
  json train_meta = meta;
  train_meta["split"] = "train";
  train_meta["documents"] = train.documents;
  info.metadata_json = train_meta.dump();
  FTUNE_RETURN_IF_ERROR(WriteTokenFile(dir + "/train.ftok", train.rows, info));
  report("write", 1, has_eval ? 2 : 1);
  if (has_eval) {
    json eval_meta = meta;
    eval_meta["split"] = "eval";
    eval_meta["documents"] = eval.documents;
    info.metadata_json = eval_meta.dump();
    FTUNE_RETURN_IF_ERROR(WriteTokenFile(dir + "/eval.ftok", eval.rows, info));
    report("write", 2, 2);
  }
  out.train_path = dir + "/train.ftok";
  out.eval_path = has_eval ? dir + "/eval.ftok" : "";
  out.manifest_path = manifest_path;
  out.train_rows = static_cast<int64_t>(train.rows.size());
  out.eval_rows = static_cast<int64_t>(eval.rows.size());
  out.train_tokens = train.tokens;
  out.eval_tokens = eval.tokens;
  out.train_documents = train.documents;
  out.eval_documents = eval.documents;
  out.train_trained_tokens = train.trained;
  out.truncated_documents = train.truncated + eval.truncated;
  json manifest = meta;
  manifest.update({{"has_eval", has_eval},
                   {"train_rows", out.train_rows},
                   {"eval_rows", out.eval_rows},
                   {"train_tokens", out.train_tokens},
                   {"eval_tokens", out.eval_tokens},
                   {"train_documents", out.train_documents},
                   {"eval_documents", out.eval_documents},
                   {"train_trained_tokens", out.train_trained_tokens},
                   {"truncated_documents", out.truncated_documents},
                   {"skipped_records", out.skipped_records},
                   {"skipped_examples", out.skipped_examples},
                   {"warnings", out.warnings}});
  FTUNE_RETURN_IF_ERROR(WriteFileAtomic(manifest_path, manifest.dump(1) + "\n"));
  return out;
}

}  // namespace ftune::data
