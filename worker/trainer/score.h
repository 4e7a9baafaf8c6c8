// `ftune-rank score`: per-token log-probabilities and mean loss of token
// sequences under a model (+ optional PEFT adapter), for parity checks
// against transformers/peft by anyone with a tokens file.
//
// Tokens file (JSONL), one sequence per line, blank lines skipped:
//   {"input_ids": [1, 5, 9], "labels": [-100, 5, 9]}    labels optional
//   [1, 5, 9]                                           labels = input_ids
// "attention_mask" is accepted only when it is all ones: sequences are scored
// one at a time with no padding, so a zero would silently mean something the
// model does not do.
//
// Label convention is transformers' causal LM: labels[t + 1] is the target
// predicted from position t, -100 is ignored. So a sequence of length L has
// L - 1 scored positions; logprobs[t] = log p(labels[t + 1] | ids[..t]), null
// where labels[t + 1] == -100. labels[0] is never a target (it is still
// range-checked: an out-of-vocab label anywhere is a broken file).
//
// Output JSON:
//   {"model": DIR, "adapter": DIR|null, "device": "cpu", "dtype": "float32",
//    "sequences": [{"line": N, "num_tokens": k, "mean_loss": x|null,
//                   "logprobs": [..]}],
//    "num_tokens": T, "mean_loss": X|null}
// mean_loss is -sum(logprobs)/num_tokens; the overall one is token-weighted
// (what HF's loss over the whole file as one batch would be), null when no
// token is scored.
//
// Sequences are scored one per forward: no padding, no mask, and a packed
// row would need the (seq x seq) block mask on every layer; scoring is for
// checks, not throughput.
//
// Thread-safety: free functions over their arguments; ScoreSequences only
// reads the model (LlamaModel's forwards are const and thread-safe).
#ifndef FTUNE_WORKER_TRAINER_SCORE_H_
#define FTUNE_WORKER_TRAINER_SCORE_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "worker/trainer/model.h"
#include "ftune/status.h"

namespace ftune::trainer {

struct ScoreSequence {
  int64_t line = 0;  // 1-based line of the tokens file, for messages
  std::vector<int64_t> input_ids;
  std::vector<int64_t> labels;  // same length as input_ids; -100 ignored
};

// Parses tokens-file text; `source_name` (the path) prefixes every error,
// with the line: "toks.jsonl line 3: input_ids[2] is 1.5, not an integer".
// INVALID_ARGUMENT for malformed lines; at least one sequence is required.
Result<std::vector<ScoreSequence>> ParseTokenLines(std::string_view text,
                                                   const std::string& source_name);
// Reads and parses a tokens file (NOT_FOUND when it cannot be opened).
Result<std::vector<ScoreSequence>> ReadTokensFile(const std::string& path);

// Every id in [0, vocab_size), every label too or -100; the error names the
// file, line, index, value and vocab size.
Status CheckVocabRange(const std::vector<ScoreSequence>& sequences, int64_t vocab_size,
                       const std::string& source_name);

struct SequenceScore {
  int64_t line = 0;
  std::vector<std::optional<double>> logprobs;  // length len - 1; nullopt = ignored
  double loss_sum = 0;                          // -sum of the scored logprobs
  int64_t num_tokens = 0;
  std::optional<double> MeanLoss() const;       // nullopt without scored tokens
};

struct ScoreReport {
  std::vector<SequenceScore> sequences;
  double loss_sum = 0;
  int64_t num_tokens = 0;
  std::optional<double> MeanLoss() const;
};

// Scores every sequence (ids must be in range: CheckVocabRange first). Errors
// from the tensor code (c10::Error, e.g. out of device memory) come back as
// INTERNAL with the sequence's line.
Result<ScoreReport> ScoreSequences(const LlamaModel& model,
                                   const std::vector<ScoreSequence>& sequences);

struct ScoreOptions {
  std::string model_dir;
  std::string adapter_dir;  // empty: base model only
  std::string tokens_path;
  int64_t chunk_tokens = 1024;  // lm_head + log-softmax rows at a time
  std::string device = "cpu";   // "cpu" or "cuda" (bf16 on CUDA, fp32 on CPU)
};

// The whole command: read the tokens, load the model and adapter, check the
// ids, score. Returns the output JSON document (see the top of this file).
Result<std::string> RunScore(const ScoreOptions& options);

// The output document for a report; `options` fills the header fields.
std::string ScoreReportToJson(const ScoreReport& report, const ScoreOptions& options,
                              const std::string& dtype_name);

}  // namespace ftune::trainer

#endif  // FTUNE_WORKER_TRAINER_SCORE_H_
