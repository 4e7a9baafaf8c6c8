// PrepareDataset: data files + tokenizer -> cached, memory-mappable token
// files. Every rank calls it before it loads the model; ranks that share a
// cache directory (those of one host) prepare the data once: the first one
// builds the files, the others wait on its lock and find them. The steps:
//   hash      read every data and tokenizer file; the cache key is SHA-256 of
//             their bytes and of every option that changes the result
//             (format, chat_template, completion_only_loss, max_seq_len,
//             packing, eval split, seed, skip_invalid, pipeline version)
//   read      parse records (dataset.h), split train/eval
//   tokenize  chat template, token ids, loss masks (packing.h), on
//             num_threads threads, results in record order
//   pack      best-fit-decreasing packing or truncation (packing.h)
//   write     CACHE/<key>/train.ftok, eval.ftok (token_file.h), then
//             CACHE/<key>/manifest.json last, each written atomically
// A second call with the same key finds manifest.json and returns at once
// (cache_hit). Two processes preparing the same key serialize on an
// exclusive flock of CACHE/<key>.lock: the second waits, then finds the
// first one's files. A crash leaves no manifest, so the next call rebuilds.
//
// Thread-safety: PrepareDataset may run concurrently in several threads and
// processes (see above); the progress callback is called from the calling
// thread only.
#ifndef FTUNE_WORKER_DATA_PREPARE_H_
#define FTUNE_WORKER_DATA_PREPARE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "ftune/status.h"
#include "worker/data/token_file.h"

namespace ftune::data {

struct DatasetOptions {
  std::vector<std::string> data_files, eval_data_files;
  std::string format = "auto";          // auto|messages|text|prompt_completion
  std::string chat_template = "auto";   // auto or a name of SupportedChatTemplateNames()
  double eval_split_ratio = 0;
  bool skip_invalid = false;
  bool completion_only_loss = true;
  int64_t max_seq_len = 2048;
  bool packing = true;
  uint64_t seed = 42;
  std::string tokenizer_dir;            // model dir with tokenizer.json
  int num_threads = 0;                  // tokenization threads; 0: one per core (at most 16)
};

struct PreparedDataset {
  std::string train_path;   // token file; "" never
  std::string eval_path;    // "" when there is no eval split
  int64_t train_rows = 0, eval_rows = 0, train_tokens = 0, skipped_records = 0;
  bool cache_hit = false;
  std::string cache_key;
  // Also reported (manifest.json holds them all):
  std::string manifest_path;
  int64_t eval_tokens = 0;
  int64_t train_documents = 0, eval_documents = 0;
  int64_t train_trained_tokens = 0;  // labels != -100
  int64_t truncated_documents = 0;   // longer than max_seq_len (both splits)
  std::string format;                // the record format used
  std::string chat_template;         // the template used ("" when not a messages dataset)
  std::vector<std::string> skipped_examples;
  // Things about the data a user should know that are not errors, each said
  // once (e.g. mistral-v0.3 dropping system messages); kept in the manifest,
  // so a cache hit reports them too.
  std::vector<std::string> warnings;
};

struct PrepareProgress {
  std::string phase;  // "hash", "read", "tokenize", "pack", "write"
  int64_t done = 0, total = 0;
};
using PrepareProgressFn = std::function<void(const PrepareProgress&)>;

Result<PreparedDataset> PrepareDataset(const DatasetOptions& options, const std::string& cache_dir,
                                       const PrepareProgressFn& progress = nullptr);

// $FTUNE_DATA_CACHE, else $XDG_CACHE_HOME/ftune/data, else $HOME/.cache/ftune/data.
std::string DefaultDataCacheDir();

// Deterministic per-epoch shuffle, the same on every machine and process: a
// permutation of [0, num_rows) that depends only on its arguments
// (SeededPermutation(num_rows, seed, epoch), dataset.h: splitmix64 +
// Fisher-Yates with rejection sampling).
std::vector<int64_t> EpochPermutation(int64_t num_rows, uint64_t seed, int64_t epoch);

}  // namespace ftune::data

#endif  // FTUNE_WORKER_DATA_PREPARE_H_
