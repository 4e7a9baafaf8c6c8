// Command-line handling of `ftune`: what each command line means, which
// ones are usage errors (exit 2), and checks that happen before any RPC.
#include <cstdlib>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "cli/commands.h"
#include "temp_dir.h"

namespace ftune::cli {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

struct Parsed {
  std::optional<int> exit_code;
  Invocation inv;
  std::string out;
  std::string err;
};

Parsed Parse(std::vector<std::string> args) {
  args.insert(args.begin(), "ftune");
  Parsed p;
  std::ostringstream out, err;
  p.exit_code = ParseCommandLine(args, &p.inv, out, err);
  p.out = out.str();
  p.err = err.str();
  return p;
}

// Keeps FTUNE_* variables of the developer's shell out of the tests.
class CliArgsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    unsetenv("FTUNE_COORDINATOR");
    unsetenv("FTUNE_TOKEN_FILE");
  }
  void TearDown() override { SetUp(); }
};

TEST_F(CliArgsTest, SubmitWithDefaults) {
  Parsed p = Parse({"submit", "job.yaml"});
  ASSERT_FALSE(p.exit_code.has_value()) << p.err;
  EXPECT_EQ(p.inv.command, Command::kSubmit);
  EXPECT_EQ(p.inv.spec_file, "job.yaml");
  EXPECT_FALSE(p.inv.follow);
  EXPECT_EQ(p.inv.request_id, "");
  EXPECT_EQ(p.inv.coordinator, "127.0.0.1:7450");
  EXPECT_EQ(p.inv.token_file, "");
  EXPECT_EQ(p.inv.tls_ca_file, "");
  EXPECT_EQ(p.inv.output, OutputFormat::kText);
}

TEST_F(CliArgsTest, SubmitFollowRequestIdAndGlobalsOnEitherSide) {
  Parsed p = Parse({"--coordinator", "c:1", "submit", "j.yaml", "--follow", "--request-id", "r1",
                    "--output", "json", "--tls-ca", "ca.pem", "--token-file", "tok"});
  ASSERT_FALSE(p.exit_code.has_value()) << p.err;
  EXPECT_TRUE(p.inv.follow);
  EXPECT_EQ(p.inv.request_id, "r1");
  EXPECT_EQ(p.inv.coordinator, "c:1");
  EXPECT_EQ(p.inv.output, OutputFormat::kJson);
  EXPECT_EQ(p.inv.tls_ca_file, "ca.pem");
  EXPECT_EQ(p.inv.token_file, "tok");
}

TEST_F(CliArgsTest, EnvironmentSuppliesCoordinatorAndTokenFileButFlagsWin) {
  setenv("FTUNE_COORDINATOR", "env-host:9", 1);
  setenv("FTUNE_TOKEN_FILE", "/etc/ftune/client.token", 1);
  Parsed p = Parse({"agents"});
  ASSERT_FALSE(p.exit_code.has_value()) << p.err;
  EXPECT_EQ(p.inv.command, Command::kAgents);
  EXPECT_EQ(p.inv.coordinator, "env-host:9");
  EXPECT_EQ(p.inv.token_file, "/etc/ftune/client.token");
  p = Parse({"--coordinator", "flag-host:1", "agents"});
  EXPECT_EQ(p.inv.coordinator, "flag-host:1");
}

TEST_F(CliArgsTest, JobsFiltersRepeatAndParse) {
  Parsed p = Parse({"jobs", "--state", "running", "--state", "QUEUED", "--state", "Running",
                    "--label", "team=nlp", "--label", "expr=a=b", "--label", "empty=",
                    "--limit", "20"});
  ASSERT_FALSE(p.exit_code.has_value()) << p.err;
  EXPECT_EQ(p.inv.command, Command::kJobs);
  EXPECT_THAT(p.inv.states, ElementsAre(v1::RUNNING, v1::QUEUED));
  EXPECT_EQ(p.inv.labels.size(), 3u);
  EXPECT_EQ(p.inv.labels.at("team"), "nlp");
  EXPECT_EQ(p.inv.labels.at("expr"), "a=b");
  EXPECT_EQ(p.inv.labels.at("empty"), "");
  EXPECT_EQ(p.inv.limit, 20);
}

TEST_F(CliArgsTest, JobCommandsTakeTheJobId) {
  const std::vector<std::pair<std::string, Command>> commands = {
      {"describe", Command::kDescribe}, {"watch", Command::kWatch},
      {"cancel", Command::kCancel},     {"wait", Command::kWait},
      {"checkpoints", Command::kCheckpoints}};
  for (const auto& [name, command] : commands) {
    Parsed p = Parse({name, "job-9"});
    ASSERT_FALSE(p.exit_code.has_value()) << name << ": " << p.err;
    EXPECT_EQ(p.inv.command, command) << name;
    EXPECT_EQ(p.inv.job_id, "job-9") << name;
    p = Parse({name});
    EXPECT_EQ(p.exit_code, kExitUsage) << name;
    EXPECT_THAT(p.err, HasSubstr("job is required")) << name;
  }
  Parsed p = Parse({"watch", "job-9", "--after-seq", "41"});
  ASSERT_FALSE(p.exit_code.has_value()) << p.err;
  EXPECT_EQ(p.inv.after_seq, 41);
}

TEST_F(CliArgsTest, UsageErrorsExitTwo) {
  const std::vector<std::vector<std::string>> bad = {
      {},                                        // no command
      {"frobnicate"},                            // unknown command
      {"jobs", "--state", "DONE"},               // not a state
      {"jobs", "--state", "job_state_unspecified"},
      {"jobs", "--label", "novalue"},            // no '='
      {"jobs", "--label", "=v"},                 // empty key
      {"jobs", "--limit", "-1"},
      {"jobs", "--limit", "many"},
      {"watch", "j", "--after-seq", "-5"},
      {"jobs", "--output", "yaml"},
      {"submit"},                                // no spec file
      {"describe", "a", "b"},                    // two jobs
      {"--coordinator", "", "jobs"},
      {"agents", "--bogus"},
  };
  for (const auto& args : bad) {
    Parsed p = Parse(args);
    std::string joined;
    for (const auto& a : args) joined += a + " ";
    EXPECT_EQ(p.exit_code, kExitUsage) << joined;
    EXPECT_THAT(p.err, HasSubstr("ftune: ")) << joined;
    EXPECT_EQ(p.out, "") << joined;
  }
  EXPECT_THAT(Parse({"jobs", "--label", "novalue"}).err,
              HasSubstr("--label novalue: expected KEY=VALUE"));
  EXPECT_THAT(Parse({"jobs", "--state", "DONE"}).err, HasSubstr("--state DONE: not a job state"));
}

TEST_F(CliArgsTest, HelpListsCommandsAndExitCodes) {
  Parsed p = Parse({"--help"});
  EXPECT_EQ(p.exit_code, 0);
  for (const char* text : {"submit", "jobs", "describe", "watch", "cancel", "wait",
                           "checkpoints", "agents", "data", "--coordinator", "FTUNE_COORDINATOR",
                           "--token-file", "--tls-ca", "--output", "Exit codes:",
                           "1  the job FAILED", "2  usage error or invalid job spec",
                           "3  the job was CANCELLED", "4  the coordinator could not be reached"}) {
    EXPECT_THAT(p.out, HasSubstr(text));
  }
  p = Parse({"jobs", "--help"});
  EXPECT_EQ(p.exit_code, 0);
  EXPECT_THAT(p.out, HasSubstr("--limit"));
  p = Parse({"--version"});
  EXPECT_EQ(p.exit_code, 0);
  EXPECT_THAT(p.out, HasSubstr("ftune "));
}

TEST_F(CliArgsTest, DataHandsEverythingAfterItToTheDataTools) {
  Parsed p = Parse({"data", "tokenize", "--tokenizer", "dir", "--help"});
  ASSERT_FALSE(p.exit_code.has_value()) << p.err;
  EXPECT_EQ(p.inv.command, Command::kData);
  EXPECT_THAT(p.inv.data_args, ElementsAre("tokenize", "--tokenizer", "dir", "--help"));
  // Global options before `data` are still the CLI's; after it, the tools'.
  p = Parse({"--coordinator", "h:1", "data", "prepare", "job.yaml", "-o", "json"});
  ASSERT_FALSE(p.exit_code.has_value()) << p.err;
  EXPECT_EQ(p.inv.coordinator, "h:1");
  EXPECT_EQ(p.inv.output, OutputFormat::kText);
  EXPECT_THAT(p.inv.data_args, ElementsAre("prepare", "job.yaml", "-o", "json"));
  p = Parse({"data"});
  ASSERT_FALSE(p.exit_code.has_value()) << p.err;
  EXPECT_EQ(p.inv.command, Command::kData);
  EXPECT_TRUE(p.inv.data_args.empty());
}

TEST_F(CliArgsTest, LabelsAndRequestIds) {
  std::string key, value;
  EXPECT_TRUE(ParseLabel("a=b", &key, &value));
  EXPECT_EQ(key, "a");
  EXPECT_EQ(value, "b");
  EXPECT_FALSE(ParseLabel("ab", &key, &value));
  EXPECT_FALSE(ParseLabel("=b", &key, &value));

  std::set<std::string> ids;
  const std::regex uuid("[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}");
  for (int i = 0; i < 100; ++i) {
    const std::string id = RandomRequestId();
    EXPECT_TRUE(std::regex_match(id, uuid)) << id;
    ids.insert(id);
  }
  EXPECT_EQ(ids.size(), 100u);
}

// Runs a parsed command with captured streams; nothing here may reach the
// network, so the coordinator address points at nothing.
class CliRunTest : public CliArgsTest {
 protected:
  int Run(std::vector<std::string> args, const std::string& coordinator = "127.0.0.1:1") {
    args.insert(args.begin(), {"ftune", "--coordinator", coordinator});
    Invocation inv;
    std::optional<int> code = ParseCommandLine(args, &inv, out_, err_);
    if (code) return *code;
    Environment env;
    env.out = &out_;
    env.err = &err_;
    env.now_ms = [] { return int64_t{0}; };
    env.sleep = [](std::chrono::milliseconds) {};
    env.data = data_;
    return RunCommand(inv, env);
  }

  std::string Write(const std::string& name, const std::string& text) {
    const std::string path = dir_.path() + "/" + name;
    std::ofstream(path) << text;
    return path;
  }

  std::ostringstream out_, err_;
  testutil::TempDir dir_{"ftune_cli_args_test"};
  DataCommand data_;
};

TEST_F(CliRunTest, SpecErrorsComeBeforeTheConnection) {
  EXPECT_EQ(Run({"submit", "/nonexistent/job.yaml"}), kExitUsage);
  EXPECT_THAT(err_.str(), HasSubstr("ftune: /nonexistent/job.yaml: "));
  EXPECT_EQ(out_.str(), "");
}

TEST_F(CliRunTest, DataRunsTheDataToolsOrSaysTheyAreNotBuilt) {
  EXPECT_EQ(Run({"data", "inspect", "f.ftok"}), kExitUsage);
  EXPECT_THAT(err_.str(), HasSubstr("ftune: `ftune data` is not part of this build"));
  err_.str("");
  std::vector<std::string> seen;
  data_ = [&seen](const std::vector<std::string>& args) {
    seen = args;
    return 7;
  };
  // A token file that cannot be read does not matter: nothing connects.
  EXPECT_EQ(Run({"--token-file", "/nonexistent/token", "data", "inspect", "f.ftok"}), 7);
  EXPECT_THAT(seen, ElementsAre("inspect", "f.ftok"));
  EXPECT_EQ(err_.str(), "");
}

TEST_F(CliRunTest, UnreadableTokenOrCaFileIsAUsageError) {
  EXPECT_EQ(Run({"--token-file", "/nonexistent/token", "agents"}), kExitUsage);
  EXPECT_THAT(err_.str(),
              HasSubstr("ftune: cannot read token file /nonexistent/token: No such file"));
  err_.str("");
  EXPECT_EQ(Run({"--token-file", Write("blank", " \n"), "agents"}), kExitUsage);
  EXPECT_THAT(err_.str(), HasSubstr("is empty"));
  err_.str("");
  EXPECT_EQ(Run({"--tls-ca", "/nonexistent/ca.pem", "agents"}), kExitUsage);
  EXPECT_THAT(err_.str(), HasSubstr("ftune: cannot read TLS CA file /nonexistent/ca.pem"));
}

TEST_F(CliRunTest, ATokenIsNeverSentInPlaintextOffThisHost) {
  const std::string token = Write("token", "alice-token-0123456789\n");
  for (const char* remote : {"10.1.2.3:7450", "0.0.0.0:7450", "coordinator.example:7450"}) {
    err_.str("");
    EXPECT_EQ(Run({"--token-file", token, "jobs"}, remote), kExitUsage) << remote;
    EXPECT_THAT(err_.str(), HasSubstr(std::string("ftune: refusing to send the token in "
                                                  "plaintext to ") +
                                      remote + ", which is not on this host: pass --tls-ca"));
  }
}

}  // namespace
}  // namespace ftune::cli
