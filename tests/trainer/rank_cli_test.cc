// Runs the real `ftune-rank` binary: `score` over the golden tiny models with
// and without their PEFT adapter must print the per-token log-probs and loss
// that the committed golden logits imply (log_softmax here, 1e-4), and bad
// input must fail with exit code 2 and a message naming the file and line.
#include <ATen/ATen.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "model_test_util.h"
#include "run_binary.h"
#include "temp_dir.h"

namespace ftune::trainer {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using json = nlohmann::json;
using testing::GoldenDir;
using testing::GoldenFile;

std::string TempPath(const std::string& name) {
  return testutil::SharedTempDir("rank_cli_test") + "/" + name;
}

using testutil::ReadAll;
using testutil::RunResult;

// `ftune-rank ARGS > out 2> err`.
RunResult RunRank(const std::string& args) {
  return testutil::RunBinary(FTUNE_RANK_BINARY, args, testutil::SharedTempDir("rank_cli_test"));
}

std::vector<int64_t> Row(const at::Tensor& t) {
  at::Tensor c = t.to(at::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

class RankScoreCliTest : public ::testing::TestWithParam<std::string> {};

TEST_P(RankScoreCliTest, ScoreMatchesTheGoldenLogitsWithAndWithoutAdapter) {
  const std::string name = GetParam();
  GoldenFile golden(name);
  const at::Tensor ids = golden.Get("a.input_ids"), labels = golden.Get("a.labels");
  // Row 0 with its labels as an object, row 1 as a bare id array (labels =
  // input_ids), so both line forms go through the binary.
  const std::string tokens = TempPath(name + ".jsonl");
  std::ofstream(tokens) << json{{"input_ids", Row(ids[0])}, {"labels", Row(labels[0])}}.dump()
                        << "\n\n"
                        << json(Row(ids[1])).dump() << "\n";
  const std::vector<std::vector<int64_t>> want_labels = {Row(labels[0]), Row(ids[1])};

  for (bool adapter : {false, true}) {
    const std::string what = name + (adapter ? "+adapter" : " base");
    std::string args = "score --model '" + GoldenDir() + "/" + name + "' --tokens '" + tokens + "'";
    if (adapter) args += " --adapter '" + GoldenDir() + "/" + name + "_adapter' --chunk 3";
    const RunResult r = RunRank(args);
    ASSERT_EQ(r.exit_code, 0) << what << ": " << r.err;
    const json doc = json::parse(r.out);
    ASSERT_EQ(doc["sequences"].size(), 2u) << what;
    EXPECT_EQ(doc["sequences"][0]["line"], 1);
    EXPECT_EQ(doc["sequences"][1]["line"], 3);  // the blank line still counts
    EXPECT_EQ(doc["adapter"].is_null(), !adapter);

    const at::Tensor lsm =
        at::log_softmax(golden.Get(adapter ? "a.logits" : "a.base_logits").to(at::kDouble), -1);
    double total = 0, worst = 0;
    int64_t total_n = 0;
    for (int64_t b = 0; b < 2; ++b) {
      const json& seq = doc["sequences"][static_cast<size_t>(b)];
      const std::vector<int64_t>& lab = want_labels[static_cast<size_t>(b)];
      ASSERT_EQ(seq["logprobs"].size(), lab.size() - 1) << what;
      double sum = 0;
      int64_t n = 0;
      for (size_t t = 0; t + 1 < lab.size(); ++t) {
        const json& got = seq["logprobs"][t];
        if (lab[t + 1] == -100) {
          EXPECT_TRUE(got.is_null()) << what << " row " << b << " position " << t;
          continue;
        }
        ASSERT_TRUE(got.is_number()) << what << " row " << b << " position " << t;
        const double want = lsm[b][static_cast<int64_t>(t)][lab[t + 1]].item<double>();
        worst = std::max(worst, std::abs(got.get<double>() - want));
        EXPECT_NEAR(got.get<double>(), want, 1e-4) << what << " row " << b << " position " << t;
        sum -= want;
        ++n;
      }
      EXPECT_EQ(seq["num_tokens"], n) << what;
      EXPECT_NEAR(seq["mean_loss"].get<double>(), sum / n, 1e-4 * sum / n) << what;
      total += sum;
      total_n += n;
    }
    EXPECT_EQ(doc["num_tokens"], total_n) << what;
    EXPECT_NEAR(doc["mean_loss"].get<double>(), total / total_n, 1e-4 * total / total_n) << what;
    std::printf("PARITY ftune-rank score %s logprobs max-abs=%.3g mean_loss=%.8f\n", what.c_str(),
                worst, doc["mean_loss"].get<double>());
  }
}

INSTANTIATE_TEST_SUITE_P(TinyLlamas, RankScoreCliTest,
                         ::testing::Values("llama3_tiny", "llama2_tiny"));

TEST(RankCli, BadInputsExitWithUsageCodeAndNameTheFileAndLine) {
  const std::string model = "--model '" + GoldenDir() + "/llama3_tiny'";

  const std::string bad_json = TempPath("bad.jsonl");
  std::ofstream(bad_json) << "[1, 2]\n{\"input_ids\": [1,\n";
  RunResult r = RunRank("score " + model + " --tokens '" + bad_json + "'");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr(bad_json + " line 2: not valid JSON"));
  EXPECT_EQ(r.out, "");  // nothing half-written on stdout

  const std::string vocab = TempPath("vocab.jsonl");
  std::ofstream(vocab) << "[1, 2]\n[1, 2]\n[7, 128]\n";
  r = RunRank("score " + model + " --tokens '" + vocab + "'");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr(vocab + " line 3: input_ids[1] = 128 is outside the vocabulary [0, 128)"));

  r = RunRank("score --model /nonexistent/model --tokens '" + vocab + "'");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("/nonexistent/model"));

  r = RunRank("score " + model + " --tokens /nonexistent/toks.jsonl");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("tokens file /nonexistent/toks.jsonl"));

  r = RunRank("score --tokens '" + vocab + "'");  // --model is required
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("--model is required"));

  r = RunRank("score " + model + " --tokens '" + vocab + "' --device tpu");
  EXPECT_EQ(r.exit_code, 2);
}

TEST(RankCli, HelpListsOnlyRealCommands) {
  RunResult r = RunRank("--help");
  EXPECT_EQ(r.exit_code, 0);
  // The names under "Subcommands:": only commands that exist are advertised.
  const size_t section = r.out.find("Subcommands:");
  ASSERT_NE(section, std::string::npos) << r.out;
  std::vector<std::string> names;
  std::istringstream lines(r.out.substr(section));
  std::string line;
  std::getline(lines, line);  // the heading
  while (std::getline(lines, line)) {
    std::istringstream words(line);
    std::string first;
    if (words >> first) names.push_back(first);
  }
  EXPECT_EQ(names, (std::vector<std::string>{"train", "run", "score", "generate", "quantize",
                                              "export", "init-model", "plan", "info"}))
      << r.out;
  EXPECT_THAT(r.out, Not(HasSubstr("not available")));
  r = RunRank("");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("subcommand is required"));
  r = RunRank("train --spec no-such-job.yaml");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("no-such-job.yaml"));
}

TEST(RankCli, PlanSaysWhetherAJobFitsTheGpus) {
  const std::string spec = TempPath("plan.yaml");
  std::ofstream(spec) << "model: {model_name_or_path: /nonexistent}\n"
                         "dataset: {data_files: [x.jsonl]}\n"
                         "lora: {r: 16, lora_alpha: 32}\n"
                         "training: {max_seq_len: 2048, per_device_train_batch_size: 1,"
                         " gradient_checkpointing: true}\n";
  // Llama 3 70B on 2 GPUs without offload: about 32 GiB per GPU.
  RunResult r = RunRank("plan --spec '" + spec +
                        "' --preset llama3-70b --world-size 2 --device-memory 80GiB");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const json fits = json::parse(r.out);
  EXPECT_EQ(fits["fits"], true);
  EXPECT_EQ(fits["world_size"], 2);
  EXPECT_GT(fits["device_peak_bytes"].get<int64_t>(), int64_t{24} << 30);
  EXPECT_LT(fits["device_peak_bytes"].get<int64_t>(), int64_t{80} << 30);
  EXPECT_THAT(r.err, HasSubstr("frozen shards"));
  r = RunRank("plan --spec '" + spec + "' --preset llama3-70b --world-size 2 --device-memory 24GiB");
  EXPECT_EQ(r.exit_code, 3) << r.err;
  EXPECT_EQ(json::parse(r.out)["fits"], false);
  // Without a preset the spec's model directory must have a config.json.
  r = RunRank("plan --spec '" + spec + "'");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("/nonexistent/config.json"));
}

TEST(RankCli, InfoSaysWhatThisBuildRuns) {
  RunResult r = RunRank("info");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const json info = json::parse(r.out);
  EXPECT_EQ(info["train"], true);
  EXPECT_TRUE(info["cuda"].is_boolean());
  EXPECT_FALSE(info["torch_version"].get<std::string>().empty());
}

TEST(RankCli, QuantizeWritesABitsandbytesDirectoryAndExportMerges) {
  const std::string quantized = TempPath("quantized");
  RunResult r = RunRank("quantize --model '" + GoldenDir() + "/llama3_tiny' --out '" + quantized +
                        "'");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const json config = json::parse(ReadAll(quantized + "/config.json"));
  EXPECT_EQ(config["quantization_config"]["bnb_4bit_quant_type"], "nf4");
  EXPECT_EQ(config["quantization_config"]["bnb_4bit_use_double_quant"], true);
  // A quantized directory is not a merge base: the error says which one is.
  r = RunRank("export --model '" + quantized + "' --adapter '" + GoldenDir() +
              "/llama3_tiny_adapter' --out '" + TempPath("merged-bad") + "'");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("4-bit"));
  r = RunRank("export --model '" + GoldenDir() + "/llama3_tiny' --adapter '" + GoldenDir() +
              "/llama3_tiny_adapter' --out '" + TempPath("merged") + "'");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_GT(json::parse(r.out)["merged_projections"].get<int>(), 0);
}

}  // namespace
}  // namespace ftune::trainer
