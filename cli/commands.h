// The `ftune` commands: command-line parsing and one function per command,
// each mapping to one JobService RPC (plus GetJob where a command must learn
// how a job ended). `ftune data ...` is listed and parsed here like the
// others but runs locally (cli/data_commands.h), through Environment::data,
// because those tools need worker/data, which only the binary links.
//
// Parsing and running are split so tests can check what a command line means
// without a coordinator, and so main.cc only hands argv over. Commands write
// to the streams in Environment, never to std::cout directly, and read time
// and sleep through it, so tests pin relative times and skip backoff waits.
//
// Following a job (`watch`, `wait`, `submit --follow`) survives a dropped
// stream or a restarting coordinator: it reconnects with after_seq set to the
// last event it has shown, so no event is shown twice or lost, and gives up
// only after kReconnectWindow without a working stream.
//
// Thread-safety: none needed; the CLI is single-threaded.
#ifndef FTUNE_CLI_COMMANDS_H_
#define FTUNE_CLI_COMMANDS_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "cli/client.h"
#include "ftune/v1/job_service.pb.h"

namespace ftune::cli {

// Exit codes; `ftune --help` lists them.
inline constexpr int kExitOk = 0;
inline constexpr int kExitJobFailed = 1;
inline constexpr int kExitUsage = 2;
inline constexpr int kExitJobCancelled = 3;
inline constexpr int kExitRpcError = 4;

// How long a follower keeps reconnecting without ever getting a stream.
inline constexpr std::chrono::seconds kReconnectWindow{60};

enum class Command {
  kSubmit,
  kJobs,
  kDescribe,
  kWatch,
  kCancel,
  kWait,
  kCheckpoints,
  kAgents,
  kData,
};

enum class OutputFormat { kText, kJson };

// A parsed command line.
struct Invocation {
  Command command = Command::kJobs;
  // Global options.
  std::string coordinator;
  std::string token_file;
  std::string tls_ca_file;
  // Send the token to a non-loopback coordinator without TLS.
  bool insecure = false;
  OutputFormat output = OutputFormat::kText;
  // submit
  std::string spec_file;
  bool follow = false;
  std::string request_id;
  // jobs
  std::vector<v1::JobState> states;
  std::map<std::string, std::string> labels;
  int64_t limit = 0;  // 0: every job
  std::string owner;  // only this user's jobs (admins); empty: all visible
  // describe, watch, cancel, wait, checkpoints
  std::string job_id;
  int64_t after_seq = 0;
  // data: every argument after `data`, unparsed (`ftune data` parses them).
  std::vector<std::string> data_args;
};

// Runs `ftune data ARGS...` given the arguments after `data`; returns the
// exit code.
using DataCommand = std::function<int(const std::vector<std::string>& args)>;

// The world a command runs in.
struct Environment {
  std::ostream* out;
  std::ostream* err;
  std::function<int64_t()> now_ms;
  std::function<void(std::chrono::milliseconds)> sleep;
  // `ftune data`; empty when this build has no data tools.
  DataCommand data;
};

// std::cout, std::cerr, the system clock and a real sleep; no data tools.
Environment SystemEnvironment();

// Parses argv (args[0] is the program name). Returns std::nullopt when the
// command should run; otherwise the exit code to end with: 0 after --help or
// --version (printed to `out`), kExitUsage after a usage error (printed to
// `err`). Reads FTUNE_COORDINATOR and FTUNE_TOKEN_FILE from the environment.
std::optional<int> ParseCommandLine(const std::vector<std::string>& args, Invocation* invocation,
                                    std::ostream& out, std::ostream& err);

// Runs a parsed command and returns the process exit code.
int RunCommand(const Invocation& invocation, const Environment& env);

// main(): parse, then run with SystemEnvironment() and `data` as its data
// tools (empty: not built).
int Main(int argc, char** argv, DataCommand data = nullptr);

// 0 for SUCCEEDED, 1 for FAILED, 3 for CANCELLED; kExitRpcError for a state
// that is not final (a coordinator that ended the watch too early).
int ExitCodeForState(v1::JobState state);

// "k=v" -> {k, v}; false without '=' or with an empty key.
bool ParseLabel(const std::string& text, std::string* key, std::string* value);

// A random RFC 4122 version 4 UUID, used as CreateJob's request_id so a
// retried submit creates the job once.
std::string RandomRequestId();

// Follows a job's events after `after_seq`, calling `on_event` once per event
// in seq order, until the coordinator ends the stream and the job is final;
// returns the final job. Transient failures reconnect (with a note on
// env.err); anything else is returned.
absl::StatusOr<v1::Job> FollowJob(JobClient& client, const std::string& job_id,
                                  int64_t after_seq,
                                  const std::function<void(const v1::JobEvent&)>& on_event,
                                  const Environment& env);

}  // namespace ftune::cli

#endif  // FTUNE_CLI_COMMANDS_H_
