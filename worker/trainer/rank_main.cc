// ftune-rank: the rank engine's command line. Only flag parsing lives here;
// each command is a library function (score.h) so tests can call it without
// a process.
//
//   ftune-rank score --model DIR [--adapter DIR] --tokens FILE
//                    [--chunk N] [--device cpu|cuda]
//
// Exit codes: 0 ok; 2 usage error or bad input (flags, tokens file, model or
// adapter directory); 1 failure while computing (tensor or device errors).
#include <iostream>
#include <string>

#include <CLI/CLI.hpp>

#include "worker/trainer/score.h"

namespace {

constexpr int kOk = 0;
constexpr int kFailed = 1;
constexpr int kUsage = 2;

}  // namespace

int main(int argc, char** argv) {
  CLI::App app("ftune-rank: the ftune training engine (one rank)", "ftune-rank");
  app.require_subcommand(1);

  ftune::trainer::ScoreOptions score;
  CLI::App* score_cmd = app.add_subcommand(
      "score",
      "Per-token log-probabilities and mean loss of token sequences as JSON on stdout "
      "(parity checks against transformers/peft)");
  score_cmd->add_option("--model", score.model_dir, "HF Llama model directory")->required();
  score_cmd->add_option("--adapter", score.adapter_dir, "PEFT adapter directory (optional)");
  score_cmd
      ->add_option("--tokens", score.tokens_path,
                   "JSONL file: per line {\"input_ids\": [...], \"labels\": [...]} (labels "
                   "optional, -100 ignored) or a JSON array of ids")
      ->required();
  score_cmd
      ->add_option("--chunk", score.chunk_tokens,
                   "tokens per lm_head/log-softmax chunk (bounds the logits memory)")
      ->capture_default_str();
  score_cmd->add_option("--device", score.device, "cpu (fp32) or cuda (bf16)")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? kOk : kUsage;
  }

  if (score_cmd->parsed()) {
    ftune::Result<std::string> out = ftune::trainer::RunScore(score);
    if (!out.ok()) {
      std::cerr << "ftune-rank score: " << out.status().ToString() << "\n";
      // INTERNAL is the engine failing (a tensor or device error); every other
      // code is about what the user gave us.
      return out.status().code() == ftune::StatusCode::kInternal ? kFailed : kUsage;
    }
    std::cout << *out << "\n";
    return kOk;
  }
  return kUsage;  // unreachable: require_subcommand(1)
}
