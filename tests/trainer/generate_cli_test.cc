// Runs the real `ftune-rank generate`:
// - on the golden tiny models (+ adapters) with --input-ids: the JSON lines'
//   ids are transformers' greedy ids (tests/golden/generate);
// - on a bitsandbytes 4-bit directory written by `ftune-rank quantize`: the
//   same ids as --load-in-4bit on the dense directory;
// - on a tiny model with a tokenizer and the Llama 3 chat template
//   (init-model): the prompt ids are the data pipeline's rendering with the
//   generation prompt, the streamed chunks are valid UTF-8 and concatenate
//   to the final text, text mode prints that text, and a seed reproduces a
//   sampled run;
// - bad input exits with code 2 and a message naming the problem.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <sys/wait.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "run_binary.h"
#include "temp_dir.h"
#include "worker/data/chat_template.h"
#include "worker/data/tokenizer.h"
#include "worker/data/utf8.h"
#include "worker/trainer/generate_command.h"

namespace {

using ::testing::HasSubstr;
using json = nlohmann::json;

const std::string kGolden = FTUNE_GOLDEN_MODEL_DIR;

std::string TempPath(const std::string& name) {
  return ftune::testutil::SharedTempDir("generate_cli_test") + "/" + name;
}

using ftune::testutil::ReadAll;
using ftune::testutil::RunResult;

// `ftune-rank ARGS > out 2> err`.
RunResult RunRank(const std::string& args) {
  return ftune::testutil::RunBinary(FTUNE_RANK_BINARY, args, ftune::testutil::SharedTempDir("generate_cli_test"));
}

std::vector<json> JsonLines(const std::string& text) {
  std::vector<json> lines;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) lines.push_back(json::parse(line));
  return lines;
}

std::string Join(const std::vector<int64_t>& ids) {
  std::string s;
  for (int64_t id : ids) s += (s.empty() ? "" : ",") + std::to_string(id);
  return s;
}

// Every token line's id in order, and the final line.
void CheckJsonLines(const std::vector<json>& lines, const std::string& what) {
  ASSERT_GE(lines.size(), 2u) << what;
  const json& done = lines.back();
  ASSERT_EQ(done["event"], "done") << what;
  ASSERT_EQ(done["ids"].size(), lines.size() - 1) << what;
  for (size_t i = 0; i + 1 < lines.size(); ++i) {
    EXPECT_EQ(lines[i]["event"], "token");
    EXPECT_EQ(lines[i]["index"], i);
    EXPECT_EQ(lines[i]["id"], done["ids"][i]) << what << " token " << i;
  }
  EXPECT_EQ(done["new_tokens"], done["ids"].size());
}

TEST(GenerateCli, GreedyIdsEqualTransformersOnTheGoldenModels) {
  std::ifstream in(std::string(FTUNE_GOLDEN_GENERATE_DIR) + "/golden_generate.json");
  const json golden = json::parse(in);
  int checked = 0;
  for (const json& c : golden["cases"]) {
    if (!c["eos_token_id"].is_null()) continue;  // the library test covers stop ids
    const std::string model = kGolden + "/" + c["model"].get<std::string>();
    std::string args = "generate --model '" + model + "' --input-ids " +
                       Join(c["prompt"].get<std::vector<int64_t>>()) +
                       " --max-new-tokens 24 --ignore-eos -o json";
    if (c["adapter"]) args += " --adapter '" + model + "_adapter'";
    const RunResult r = RunRank(args);
    ASSERT_EQ(r.exit_code, 0) << c["name"] << ": " << r.err;
    const std::vector<json> lines = JsonLines(r.out);
    CheckJsonLines(lines, c["name"]);
    const json& done = lines.back();
    EXPECT_EQ(done["ids"], c["new_ids"]) << c["name"];
    EXPECT_EQ(done["stop_reason"], "max_new_tokens");
    EXPECT_TRUE(done["stop_id"].is_null());
    EXPECT_EQ(done["prompt_ids"], c["prompt"]);
    EXPECT_EQ(done["base"], "dense");
    EXPECT_FALSE(done.contains("text"));  // no tokenizer in these directories
    EXPECT_EQ(done["adapter"].is_null(), !c["adapter"].get<bool>());
    ++checked;
  }
  EXPECT_EQ(checked, 12);
}

TEST(GenerateCli, Bitsandbytes4bitDirectoryGeneratesAsNf4AtLoad) {
  const std::string bnb = TempPath("llama2_tiny_bnb");
  RunResult q = RunRank("quantize --model '" + kGolden + "/llama2_tiny' --out '" + bnb +
                        "' --compute-dtype float32");
  ASSERT_EQ(q.exit_code, 0) << q.err;
  const std::string common = " --adapter '" + kGolden +
                             "/llama2_tiny_adapter' --input-ids 57,104,78 --max-new-tokens 16 "
                             "--ignore-eos -o json";
  const RunResult a = RunRank("generate --model '" + bnb + "'" + common);
  ASSERT_EQ(a.exit_code, 0) << a.err;
  const RunResult b =
      RunRank("generate --model '" + kGolden + "/llama2_tiny' --load-in-4bit" + common);
  ASSERT_EQ(b.exit_code, 0) << b.err;
  const json da = JsonLines(a.out).back(), db = JsonLines(b.out).back();
  EXPECT_EQ(da["base"], "bnb-4bit");
  EXPECT_EQ(db["base"], "nf4");
  EXPECT_EQ(da["ids"], db["ids"]);
  EXPECT_EQ(da["ids"].size(), 16u);
  // `score` takes the 4-bit directory too.
  const std::string tokens = TempPath("bnb_tokens.jsonl");
  std::ofstream(tokens) << "[1, 57, 104, 78, 9]\n";
  const RunResult s = RunRank("score --model '" + bnb + "' --tokens '" + tokens + "'");
  EXPECT_EQ(s.exit_code, 0) << s.err;
  EXPECT_EQ(json::parse(s.out)["num_tokens"], 4);
}

// A tiny random Llama with a BPE tokenizer and the Llama 3 chat template.
const std::string& ChatModel() {
  static const std::string dir = [] {
    const std::string d = TempPath("chat_model");
    if (std::ifstream(d + "/model.safetensors").good()) return d;
    const RunResult r = RunRank("init-model --preset tiny --layers 1 --out '" + d +
                                "' --tokenizer-corpus '" FTUNE_EXAMPLES_DIR "/data/instructions.jsonl'");
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return d;
  }();
  return dir;
}


TEST(GenerateCli, ChatTemplateStreamingAndText) {
  const std::string model = ChatModel();
  const std::string messages = TempPath("chat.jsonl");
  std::ofstream(messages) << "{\"role\": \"system\", \"content\": \"You are terse.\"}\n\n"
                          << "{\"role\": \"user\", \"content\": \"Name a colour: café 🦙?\"}\n";
  const std::string args = "generate --model '" + model + "' --messages '" + messages +
                           "' --max-new-tokens 40";
  const RunResult r = RunRank(args + " -o json");
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::vector<json> lines = JsonLines(r.out);
  CheckJsonLines(lines, "chat");
  const json& done = lines.back();

  // The prompt is the data pipeline's rendering of the conversation with the
  // assistant's generation prompt.
  auto tok = ftune::data::Tokenizer::Load(model);
  ASSERT_TRUE(tok.ok());
  auto tmpl = ftune::data::ResolveChatTemplate("auto", (*tok)->config(), model);
  ASSERT_TRUE(tmpl.ok());
  auto rendered = ftune::data::RenderChat(
      *tmpl, {{"system", "You are terse."}, {"user", "Name a colour: café 🦙?"}}, true);
  ASSERT_TRUE(rendered.ok());
  EXPECT_THAT(rendered->text, ::testing::EndsWith("<|start_header_id|>assistant<|end_header_id|>\n\n"));
  const std::vector<int32_t> want_prompt = (*tok)->Encode(rendered->text, false);
  EXPECT_EQ(done["prompt_ids"].get<std::vector<int32_t>>(), want_prompt);

  // Chunks: well-formed UTF-8, concatenating to the final text, which is the
  // tokenizer's decoding of the ids (the stop id, if any, left out).
  std::string joined;
  for (size_t i = 0; i + 1 < lines.size(); ++i) {
    const std::string chunk = lines[i]["text"];
    // Well-formed UTF-8. A U+FFFD is allowed: a random model may well
    // produce bytes that never form a character, which decode as U+FFFD (as
    // in HF); what must not happen is a chunk ending inside a character.
    EXPECT_TRUE(ftune::data::IsValidUtf8(chunk)) << i << ": " << chunk;
    joined += chunk;
  }
  EXPECT_EQ(joined, done["text"].get<std::string>());
  std::vector<int32_t> ids = done["ids"].get<std::vector<int32_t>>();
  if (done["stop_reason"] == "stop_id") ids.pop_back();
  EXPECT_EQ(done["text"].get<std::string>(), (*tok)->Decode(ids, true));

  // Text mode prints the same text (greedy), then a newline; the summary
  // goes to stderr.
  const RunResult t = RunRank(args);
  ASSERT_EQ(t.exit_code, 0) << t.err;
  EXPECT_EQ(t.out, done["text"].get<std::string>() + "\n");
  EXPECT_THAT(t.err, HasSubstr("tokens/s"));
}

TEST(GenerateCli, StopIdsIncludeTheTemplatesEndOfTurn) {
  auto tok = ftune::data::Tokenizer::Load(ChatModel());
  ASSERT_TRUE(tok.ok());
  auto chat = ftune::data::ResolveChatTemplate("auto", (*tok)->config(), ChatModel());
  ASSERT_TRUE(chat.ok());
  ASSERT_EQ(chat->kind, ftune::data::ChatTemplateKind::kLlama3);
  const int64_t eot = *(*tok)->TokenToId("<|eot_id|>");
  ftune::trainer::LlamaConfig config;
  config.eos_token_ids = {5};
  std::vector<int64_t> want = {5, 7, eot};
  if ((*tok)->eos_id()) want.push_back(*(*tok)->eos_id());
  std::sort(want.begin(), want.end());
  want.erase(std::unique(want.begin(), want.end()), want.end());
  EXPECT_EQ(ftune::trainer::GenerationStopIds(config, {7, 5}, tok->get(), *chat), want);
  // Without a template (plain text or ids) the end-of-turn token is not one.
  const std::vector<int64_t> plain =
      ftune::trainer::GenerationStopIds(config, {}, tok->get(), std::nullopt);
  EXPECT_EQ(std::count(plain.begin(), plain.end(), eot), (*tok)->eos_id() == eot ? 1 : 0);
}

// generation_config.json's eos ends the run right after that id: kept in
// `ids`, left out of the text.
TEST(GenerateCli, StopsAtGenerationConfigEos) {
  const std::string args = " --prompt 'Tell me about llamas' --max-new-tokens 12 -o json";
  const RunResult free = RunRank("generate --model '" + ChatModel() + "'" + args + " --ignore-eos");
  ASSERT_EQ(free.exit_code, 0) << free.err;
  const std::vector<int64_t> ids = JsonLines(free.out).back()["ids"];
  ASSERT_EQ(ids.size(), 12u);
  const int64_t stop = ids[4];
  const size_t first = std::find(ids.begin(), ids.end(), stop) - ids.begin();
  // A copy of the model directory with a generation_config.json.
  const std::string dir = TempPath("chat_model_stop");
  ASSERT_EQ(std::system(("mkdir -p '" + dir + "' && cp '" + ChatModel() + "'/* '" + dir + "'/")
                            .c_str()),
            0);
  std::ofstream(dir + "/generation_config.json") << "{\"eos_token_id\": [" << stop << "]}\n";
  const RunResult r = RunRank("generate --model '" + dir + "'" + args);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const json done = JsonLines(r.out).back();
  EXPECT_EQ(done["ids"].get<std::vector<int64_t>>(),
            std::vector<int64_t>(ids.begin(), ids.begin() + first + 1));
  EXPECT_EQ(done["stop_reason"], "stop_id");
  EXPECT_EQ(done["stop_id"], stop);
  auto tok = ftune::data::Tokenizer::Load(dir);
  ASSERT_TRUE(tok.ok());
  EXPECT_EQ(done["text"].get<std::string>(),
            (*tok)->Decode(std::vector<int32_t>(ids.begin(), ids.begin() + first), true));
}

TEST(GenerateCli, SeedReproducesASampledRun) {
  const std::string args = "generate --model '" + ChatModel() +
                           "' --prompt 'Tell me about llamas' --max-new-tokens 20 --ignore-eos "
                           "--temperature 1.2 --top-k 100 --top-p 0.95 -o json";
  const RunResult a = RunRank(args + " --seed 3");
  const RunResult b = RunRank(args + " --seed 3");
  const RunResult c = RunRank(args + " --seed 4");
  ASSERT_EQ(a.exit_code, 0) << a.err;
  ASSERT_EQ(c.exit_code, 0) << c.err;
  const json ia = JsonLines(a.out).back()["ids"];
  EXPECT_EQ(ia.size(), 20u);
  EXPECT_EQ(JsonLines(b.out).back()["ids"], ia);
  EXPECT_NE(JsonLines(c.out).back()["ids"], ia);
}

TEST(GenerateCli, BadInputExitsWithUsageCodeAndSaysWhy) {
  const std::string model = "--model '" + ChatModel() + "'";
  RunResult r = RunRank("generate --model /nonexistent/model --prompt hi");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("--model /nonexistent/model: no such directory"));

  const std::string not_json = TempPath("not_json.jsonl");
  std::ofstream(not_json) << "{\"role\": \"user\", \"content\": \"hi\"}\nrole: user\n";
  r = RunRank("generate " + model + " --messages '" + not_json + "'");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr(not_json + " line 2: not valid JSON"));
  EXPECT_EQ(r.out, "");

  const std::string bad_role = TempPath("bad_role.jsonl");
  std::ofstream(bad_role) << "{\"role\": \"bot\", \"content\": \"hi\"}\n";
  r = RunRank("generate " + model + " --messages '" + bad_role + "'");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("line 1: unknown role \"bot\""));

  r = RunRank("generate " + model + " --prompt hi --max-new-tokens 0");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("--max-new-tokens (0) must be >= 1"));
  r = RunRank("generate " + model + " --prompt hi --max-new-tokens -5");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("--max-new-tokens (-5) must be >= 1"));

  for (const char* p : {"0", "1.5", "-0.2"}) {
    r = RunRank("generate " + model + " --prompt hi --temperature 1 --top-p " + p);
    EXPECT_EQ(r.exit_code, 2) << p;
    EXPECT_THAT(r.err, HasSubstr(std::string("--top-p (") + p + ") must be in (0, 1]"));
  }

  r = RunRank("generate " + model + " --prompt hi --messages '" + bad_role + "'");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("exclude each other"));
  r = RunRank("generate --model '" + kGolden + "/llama2_tiny' --prompt hi");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("has no tokenizer.json"));
  r = RunRank("generate --model '" + kGolden + "/llama2_tiny' --input-ids 5,x -o json");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("\"x\" (entry 1) is not a token id"));
}

}  // namespace
