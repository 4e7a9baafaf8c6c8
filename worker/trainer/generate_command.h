// `ftune-rank generate`: try a model from the command line. Loads a model
// directory (dense, dense quantized to NF4 at load as training does, or a
// bitsandbytes 4-bit directory), optionally a PEFT adapter, renders the
// conversation with the chat template the data pipeline trains with (the
// assistant's generation prompt added), generates (generate.h) and streams
// the text to stdout as it is produced (text_stream.h).
//
// Input, one of:
//   --prompt TEXT [--system TEXT]  one user message (after a system one)
//   --messages FILE.jsonl          one message per line:
//                                  {"role": "system"|"user"|"assistant", "content": "..."}
//   --input-ids 1,5,9              ids as given: no tokenizer, no template
//                                  (parity checks; text needs a tokenizer)
// --chat-template auto|llama3|llama3.1|llama2|chatml|mistral|none: "none"
// encodes --prompt as plain text with the tokenizer's special tokens (base
// models without a template).
//
// Stop ids: config.json's and generation_config.json's eos_token_id, the
// tokenizer's eos token and the template's end-of-turn token (<|eot_id|>,
// <|im_end|>); --ignore-eos generates max_new_tokens whatever comes.
//
// Output: the text on stdout, flushed per chunk; a one-line summary on
// stderr. With -o json, JSON lines on stdout instead:
//   {"event": "token", "index": i, "id": id, "text": "chunk"}   per id
//   {"event": "done", "prompt_ids": [...], "ids": [...], "text": "...",
//    "prompt_tokens": n, "new_tokens": m, "stop_reason": "stop_id"|"max_new_tokens",
//    "stop_id": id|null, "prefill_seconds": s, "decode_seconds": s,
//    "decode_tokens_per_s": r, "model": DIR, "adapter": DIR|null,
//    "base": "dense"|"nf4"|"bnb-4bit", "device": "cpu"|"cuda", "dtype": "float32"|"bfloat16"}
// "text" fields are absent when there is no tokenizer (--input-ids only).
//
// Thread-safety: RunGenerate is a whole command; call it from one thread.
#ifndef FTUNE_WORKER_TRAINER_GENERATE_COMMAND_H_
#define FTUNE_WORKER_TRAINER_GENERATE_COMMAND_H_

#include <cstdint>
#include <optional>
#include <ostream>
#include <string>
#include <string_view>
#include <vector>

#include "ftune/status.h"
#include "worker/data/chat_template.h"
#include "worker/data/tokenizer.h"
#include "worker/trainer/generate.h"

namespace ftune::trainer {

struct GenerateCommandOptions {
  std::string model_dir;
  std::string adapter_dir;    // empty: none
  std::string tokenizer_dir;  // empty: model_dir
  std::string prompt;
  std::string system;
  std::string messages_path;
  std::string input_ids;  // "1,5,9"
  std::string chat_template = "auto";
  int64_t max_new_tokens = 256;
  SamplingOptions sampling;
  bool ignore_eos = false;
  bool load_in_4bit = false;  // quantize a dense base to NF4 at load (as `train`)
  std::string device = "cpu";  // "cpu" (fp32) or "cuda" (bf16)
  bool json = false;
};

// A messages file's text: one JSON object with string "role" and "content"
// per non-blank line. Errors name `source` and the line:
// "chat.jsonl line 2: not valid JSON", "... unknown role \"bot\" ...".
Result<std::vector<data::ChatMessage>> ParseMessagesJsonl(std::string_view text,
                                                          const std::string& source);

// "1, 5,9" -> {1, 5, 9}; INVALID_ARGUMENT naming the bad entry.
Result<std::vector<int64_t>> ParseIdList(const std::string& text);

// The ids generation stops at: config.json's eos_token_ids,
// generation_config.json's (`generation_eos`), the tokenizer's eos token and,
// when a chat template rendered the prompt, its end-of-turn token
// (<|eot_id|> for llama3/llama3.1, <|im_end|> for chatml); sorted, unique.
std::vector<int64_t> GenerationStopIds(const LlamaConfig& config,
                                       const std::vector<int64_t>& generation_eos,
                                       const data::Tokenizer* tokenizer,
                                       const std::optional<data::ChatTemplate>& chat);

// The whole command: checks the options, loads, generates, streams to `out`
// (and the text mode's summary to `err`).
Status RunGenerate(const GenerateCommandOptions& options, std::ostream& out, std::ostream& err);

}  // namespace ftune::trainer

#endif  // FTUNE_WORKER_TRAINER_GENERATE_COMMAND_H_
