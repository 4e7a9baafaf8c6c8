// See score.h.
#include "worker/trainer/score.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/core/GradMode.h>
#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <memory>
#include <utility>

#include "ftune/file_util.h"
#include "ftune/text_lines.h"
#include "worker/trainer/bnb_checkpoint.h"
#include "worker/trainer/loss.h"

namespace ftune::trainer {
namespace {

using json = nlohmann::json;

// Tokens files are read whole; this bound only turns a wrong path (a model
// shard, a dataset dump) into a message instead of an out-of-memory kill.
constexpr uint64_t kMaxTokensFileBytes = uint64_t{4} << 30;

std::string Where(const std::string& source_name, int64_t line) {
  return source_name + " line " + std::to_string(line) + ": ";
}

// An array of integer ids; `what` names it in errors ("input_ids").
Status ParseIdArray(const json& value, const std::string& what, const std::string& where,
                    std::vector<int64_t>* out) {
  if (!value.is_array()) {
    return InvalidArgumentError(where + what + " must be an array of integer token ids, got " +
                                value.type_name());
  }
  out->clear();
  out->reserve(value.size());
  for (size_t i = 0; i < value.size(); ++i) {
    const json& v = value[i];
    // Unsigned values above INT64_MAX cannot be ids of any vocabulary; say so
    // here rather than wrap them to negatives.
    const bool fits = v.is_number_integer() &&
                      (!v.is_number_unsigned() ||
                       v.get<uint64_t>() <= static_cast<uint64_t>(INT64_MAX));
    if (!fits) {
      return InvalidArgumentError(where + what + "[" + std::to_string(i) + "] is " + v.dump() +
                                  ", not an integer token id");
    }
    out->push_back(v.get<int64_t>());
  }
  return OkStatus();
}

Result<ScoreSequence> ParseLine(std::string_view line_text, int64_t line,
                                const std::string& source_name) {
  const std::string where = Where(source_name, line);
  json doc = json::parse(line_text.begin(), line_text.end(), nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) {
    return InvalidArgumentError(where + "not valid JSON (expected {\"input_ids\": [...]} or [ids])");
  }
  ScoreSequence seq;
  seq.line = line;
  if (doc.is_array()) {
    FTUNE_RETURN_IF_ERROR(ParseIdArray(doc, "the id array", where, &seq.input_ids));
    seq.labels = seq.input_ids;
  } else if (doc.is_object()) {
    for (const auto& [key, value] : doc.items()) {
      if (key != "input_ids" && key != "labels" && key != "attention_mask") {
        return InvalidArgumentError(where + "unknown key \"" + key +
                                    "\" (expected input_ids, labels, attention_mask)");
      }
    }
    if (!doc.contains("input_ids")) return InvalidArgumentError(where + "missing \"input_ids\"");
    FTUNE_RETURN_IF_ERROR(ParseIdArray(doc["input_ids"], "input_ids", where, &seq.input_ids));
    if (doc.contains("labels") && !doc["labels"].is_null()) {
      FTUNE_RETURN_IF_ERROR(ParseIdArray(doc["labels"], "labels", where, &seq.labels));
      if (seq.labels.size() != seq.input_ids.size()) {
        return InvalidArgumentError(where + "labels has " + std::to_string(seq.labels.size()) +
                                    " entries but input_ids has " +
                                    std::to_string(seq.input_ids.size()));
      }
    } else {
      seq.labels = seq.input_ids;
    }
    if (doc.contains("attention_mask")) {
      std::vector<int64_t> mask;
      FTUNE_RETURN_IF_ERROR(ParseIdArray(doc["attention_mask"], "attention_mask", where, &mask));
      if (mask.size() != seq.input_ids.size()) {
        return InvalidArgumentError(where + "attention_mask has " + std::to_string(mask.size()) +
                                    " entries but input_ids has " +
                                    std::to_string(seq.input_ids.size()));
      }
      for (size_t i = 0; i < mask.size(); ++i) {
        if (mask[i] != 1) {
          return InvalidArgumentError(
              where + "attention_mask[" + std::to_string(i) + "] is " + std::to_string(mask[i]) +
              ": padding is not supported, give each sequence unpadded on its own line");
        }
      }
    }
  } else {
    return InvalidArgumentError(where + "expected an object {\"input_ids\": [...]} or an array of ids, got " +
                                doc.type_name());
  }
  if (seq.input_ids.empty()) return InvalidArgumentError(where + "input_ids is empty");
  return seq;
}

std::string DtypeName(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return "float32";
    case c10::ScalarType::BFloat16: return "bfloat16";
    case c10::ScalarType::Half: return "float16";
    default: return c10::toString(t);
  }
}

json OptionalNumber(const std::optional<double>& v) { return v ? json(*v) : json(nullptr); }

}  // namespace

std::optional<double> SequenceScore::MeanLoss() const {
  if (num_tokens == 0) return std::nullopt;
  return loss_sum / static_cast<double>(num_tokens);
}

std::optional<double> ScoreReport::MeanLoss() const {
  if (num_tokens == 0) return std::nullopt;
  return loss_sum / static_cast<double>(num_tokens);
}

Result<std::vector<ScoreSequence>> ParseTokenLines(std::string_view text,
                                                   const std::string& source_name) {
  std::vector<ScoreSequence> out;
  NonBlankLines lines(text);
  std::string_view line_text;
  int64_t line = 0;
  while (lines.Next(&line_text, &line)) {
    FTUNE_ASSIGN_OR_RETURN(ScoreSequence seq, ParseLine(line_text, line, source_name));
    out.push_back(std::move(seq));
  }
  if (out.empty()) return InvalidArgumentError(source_name + ": no sequences (the file is empty)");
  return out;
}

Result<std::vector<ScoreSequence>> ReadTokensFile(const std::string& path) {
  Result<std::string> text = ReadFileToString(path, kMaxTokensFileBytes);
  if (!text.ok()) {
    return Status(text.status().code(), "tokens file " + text.status().message());
  }
  return ParseTokenLines(*text, path);
}

Status CheckVocabRange(const std::vector<ScoreSequence>& sequences, int64_t vocab_size,
                       const std::string& source_name) {
  for (const ScoreSequence& seq : sequences) {
    const std::string where = Where(source_name, seq.line);
    for (size_t i = 0; i < seq.input_ids.size(); ++i) {
      const int64_t id = seq.input_ids[i];
      if (id < 0 || id >= vocab_size) {
        return InvalidArgumentError(where + "input_ids[" + std::to_string(i) + "] = " +
                                    std::to_string(id) + " is outside the vocabulary [0, " +
                                    std::to_string(vocab_size) + ")");
      }
    }
    for (size_t i = 0; i < seq.labels.size(); ++i) {
      const int64_t id = seq.labels[i];
      if (id != kIgnoreIndex && (id < 0 || id >= vocab_size)) {
        return InvalidArgumentError(where + "labels[" + std::to_string(i) + "] = " +
                                    std::to_string(id) + " is outside the vocabulary [0, " +
                                    std::to_string(vocab_size) + ") and is not -100");
      }
    }
  }
  return OkStatus();
}

Result<ScoreReport> ScoreSequences(const LlamaModel& model,
                                   const std::vector<ScoreSequence>& sequences) {
  c10::NoGradGuard no_grad;
  const c10::Device device = model.options().device;
  const auto int64_cpu = at::TensorOptions().dtype(at::kLong);
  ScoreReport report;
  report.sequences.reserve(sequences.size());
  for (const ScoreSequence& seq : sequences) {
    SequenceScore score;
    score.line = seq.line;
    const int64_t len = static_cast<int64_t>(seq.input_ids.size());
    score.logprobs.assign(static_cast<size_t>(len - 1), std::nullopt);
    try {
      // Target t is labels[t + 1], predicted from hidden state t (HF shift).
      std::vector<int64_t> rows, targets;
      for (int64_t t = 0; t + 1 < len; ++t) {
        if (seq.labels[t + 1] == kIgnoreIndex) continue;
        rows.push_back(t);
        targets.push_back(seq.labels[t + 1]);
      }
      if (!rows.empty()) {
        at::Tensor ids = at::tensor(seq.input_ids, int64_cpu).view({1, len}).to(device);
        // Labels may name tokens other than the next input (any HF labels),
        // so the targets go to the chunked log-prob directly instead of
        // through TokenLogProbs, which scores the next input id.
        at::Tensor h = model.Hidden(ids, at::Tensor(), /*training=*/false)[0];  // (len, hidden)
        at::Tensor picked = h.index_select(0, at::tensor(rows, int64_cpu).to(device));
        at::Tensor lp = ChunkedTargetLogProbs(picked, model.lm_head(),
                                              at::tensor(targets, int64_cpu).to(device),
                                              model.options().loss_chunk_tokens)
                            .to(at::kDouble)
                            .cpu()
                            .contiguous();  // (num targets)
        const double* v = lp.data_ptr<double>();
        for (size_t i = 0; i < rows.size(); ++i) {
          score.logprobs[static_cast<size_t>(rows[i])] = v[i];
          score.loss_sum -= v[i];
        }
        score.num_tokens = static_cast<int64_t>(rows.size());
      }
    } catch (const c10::Error& e) {
      return InternalError("scoring line " + std::to_string(seq.line) + ": " +
                           e.what_without_backtrace());
    }
    report.loss_sum += score.loss_sum;
    report.num_tokens += score.num_tokens;
    report.sequences.push_back(std::move(score));
  }
  return report;
}

std::string ScoreReportToJson(const ScoreReport& report, const ScoreOptions& options,
                              const std::string& dtype_name) {
  json seqs = json::array();
  for (const SequenceScore& s : report.sequences) {
    json lps = json::array();
    for (const auto& lp : s.logprobs) lps.push_back(OptionalNumber(lp));
    seqs.push_back(json{{"line", s.line},
                        {"num_tokens", s.num_tokens},
                        {"mean_loss", OptionalNumber(s.MeanLoss())},
                        {"logprobs", std::move(lps)}});
  }
  json doc{{"model", options.model_dir},
           {"adapter", options.adapter_dir.empty() ? json(nullptr) : json(options.adapter_dir)},
           {"device", options.device},
           {"dtype", dtype_name},
           {"sequences", std::move(seqs)},
           {"num_tokens", report.num_tokens},
           {"mean_loss", OptionalNumber(report.MeanLoss())}};
  return doc.dump();
}

Result<std::string> RunScore(const ScoreOptions& options) {
  if (options.chunk_tokens < 1) {
    return InvalidArgumentError("--chunk (" + std::to_string(options.chunk_tokens) +
                                ") must be >= 1");
  }
  c10::Device device(c10::kCPU);
  if (options.device == "cuda") {
    if (!at::hasCUDA()) {
      return FailedPreconditionError("--device cuda: this LibTorch build or machine has no CUDA");
    }
    device = c10::Device(c10::kCUDA, 0);
  } else if (options.device != "cpu") {
    return InvalidArgumentError("--device must be cpu or cuda, got \"" + options.device + "\"");
  }
  // The tokens first: a malformed file should not wait for a model to load.
  FTUNE_ASSIGN_OR_RETURN(std::vector<ScoreSequence> sequences,
                                 ReadTokensFile(options.tokens_path));

  ModelOptions model_options = DefaultModelOptions(device);
  model_options.loss_chunk_tokens = options.chunk_tokens;
  // A dense directory or a bitsandbytes 4-bit one, as `train` accepts.
  FTUNE_ASSIGN_OR_RETURN(
      std::unique_ptr<LlamaModel> model,
      LoadModelAndAdapter(options.model_dir, options.adapter_dir, model_options));
  FTUNE_RETURN_IF_ERROR(
      CheckVocabRange(sequences, model->config().vocab_size, options.tokens_path));
  FTUNE_ASSIGN_OR_RETURN(ScoreReport report, ScoreSequences(*model, sequences));
  return ScoreReportToJson(report, options, DtypeName(model_options.dtype));
}

}  // namespace ftune::trainer
