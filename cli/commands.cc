// See commands.h.
#include "cli/commands.h"

#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <memory>
#include <random>
#include <sstream>
#include <thread>
#include <utility>

#include <CLI/CLI.hpp>

#include "cli/format.h"
#include "ftune/address.h"
#include "ftune/file_util.h"
#include "jobspec.h"

#ifndef FTUNE_VERSION
#define FTUNE_VERSION "unknown"
#endif

namespace ftune::cli {
namespace {

constexpr int kPageSize = 100;
constexpr int kCreateAttempts = 3;
constexpr std::chrono::milliseconds kInitialBackoff{100};
constexpr std::chrono::milliseconds kMaxBackoff{2000};

constexpr char kFooter[] =
    "Exit codes:\n"
    "  0  success; for watch, wait and submit --follow: the job SUCCEEDED\n"
    "  1  the job FAILED\n"
    "  2  usage error or invalid job spec (nothing was sent to the coordinator)\n"
    "  3  the job was CANCELLED\n"
    "  4  the coordinator could not be reached or refused the request\n"
    "\n"
    "Environment: FTUNE_COORDINATOR (--coordinator), FTUNE_TOKEN_FILE (--token-file).";

// Reads a whole file; the error names the file and the reason.
absl::StatusOr<std::string> ReadFile(const std::string& what, const std::string& path) {
  errno = 0;
  Result<std::string> contents = ReadFileToString(path, kMaxSmallFileBytes);
  if (!contents.ok()) {
    // The OS's words ("No such file or directory"), not the path twice.
    const int err = errno;
    return absl::InvalidArgumentError("cannot read " + what + " " + path + ": " +
                                      (err != 0 ? ErrnoMessage(err) : contents.status().message()));
  }
  return std::move(*contents);
}

absl::StatusOr<ConnectionOptions> MakeConnectionOptions(const Invocation& inv) {
  ConnectionOptions options;
  options.coordinator = inv.coordinator;
  if (!inv.token_file.empty()) {
    absl::StatusOr<std::string> token = ReadFile("token file", inv.token_file);
    if (!token.ok()) return token.status();
    // Files written with `echo` end in a newline that is not part of the token.
    std::string t = *token;
    const auto is_space = [](unsigned char c) { return std::isspace(c) != 0; };
    t.erase(t.begin(), std::find_if_not(t.begin(), t.end(), is_space));
    t.erase(std::find_if_not(t.rbegin(), t.rend(), is_space).base(), t.end());
    if (t.empty()) return absl::InvalidArgumentError("token file " + inv.token_file + " is empty");
    options.token = t;
  }
  if (!inv.tls_ca_file.empty()) {
    absl::StatusOr<std::string> pem = ReadFile("TLS CA file", inv.tls_ca_file);
    if (!pem.ok()) return pem.status();
    if (pem->empty()) {
      return absl::InvalidArgumentError("TLS CA file " + inv.tls_ca_file + " is empty");
    }
    options.tls_ca_pem = *pem;
  }
  // A token is the user's identity: never in plaintext off this host.
  if (!options.token.empty() && options.tls_ca_pem.empty() && !inv.insecure &&
      !IsLoopbackAddress(options.coordinator)) {
    return absl::InvalidArgumentError(
        "refusing to send the token in plaintext to " + options.coordinator +
        ", which is not on this host: pass --tls-ca (the coordinator serves TLS), or --insecure "
        "on a network you trust");
  }
  return options;
}

int ReportRpcError(const Environment& env, const std::string& what, const JobClient& client,
                   const absl::Status& status) {
  *env.err << "ftune: " << DescribeRpcError(what, client.options(), status) << "\n";
  return kExitRpcError;
}

// Prints events as they arrive and, at the end, how the job ended.
class EventPrinter {
 public:
  EventPrinter(const Invocation& inv, const Environment& env) : inv_(inv), env_(env) {}

  void operator()(const v1::JobEvent& event) {
    summary_.Add(event);
    if (inv_.output == OutputFormat::kJson) {
      *env_.out << ToJsonLine(event) << "\n";
    } else {
      *env_.out << FormatEvent(event);
    }
    // Someone is watching live, possibly through a pipe: do not buffer.
    env_.out->flush();
  }

  void Finish(const v1::Job& job) {
    if (inv_.output == OutputFormat::kJson) {
      *env_.out << ToJsonLine(job) << "\n";
    } else {
      *env_.out << FormatOutcome(job) << "\n" << summary_.Format(job) << "\n";
    }
    env_.out->flush();
  }

 private:
  const Invocation& inv_;
  const Environment& env_;
  RunSummary summary_;
};

int FollowAndReport(JobClient& client, const Invocation& inv, const Environment& env,
                    const std::string& job_id, int64_t after_seq) {
  EventPrinter printer(inv, env);
  absl::StatusOr<v1::Job> job = FollowJob(
      client, job_id, after_seq, [&](const v1::JobEvent& e) { printer(e); }, env);
  if (!job.ok()) return ReportRpcError(env, "cannot watch job " + job_id, client, job.status());
  printer.Finish(*job);
  return ExitCodeForState(job->state());
}

int RunSubmit(JobClient& client, const Invocation& inv, const Environment& env,
              const v1::JobSpec& spec) {
  v1::CreateJobRequest request;
  request.set_request_id(inv.request_id.empty() ? RandomRequestId() : inv.request_id);
  *request.mutable_spec() = spec;

  absl::StatusOr<v1::Job> job;
  std::chrono::milliseconds backoff = kInitialBackoff;
  for (int attempt = 1;; ++attempt) {
    job = client.CreateJob(request);
    if (job.ok() || !IsTransient(job.status()) || attempt == kCreateAttempts) break;
    // Same request_id: if the first call did create the job, this returns it.
    env.sleep(backoff);
    backoff *= 2;
  }
  if (!job.ok()) return ReportRpcError(env, "cannot create job", client, job.status());

  if (inv.output == OutputFormat::kJson) {
    *env.out << ToJsonLine(*job) << "\n";
  } else {
    *env.out << job->id() << "\n";
  }
  env.out->flush();
  if (!inv.follow) return kExitOk;
  return FollowAndReport(client, inv, env, job->id(), 0);
}

int RunJobs(JobClient& client, const Invocation& inv, const Environment& env) {
  v1::ListJobsRequest request;
  for (v1::JobState s : inv.states) request.add_states(s);
  for (const auto& [key, value] : inv.labels) (*request.mutable_labels())[key] = value;
  request.set_owner(inv.owner);

  std::vector<v1::Job> jobs;
  std::string page_token;
  do {
    int64_t want = kPageSize;
    if (inv.limit > 0) want = std::min<int64_t>(want, inv.limit - jobs.size());
    request.set_page_size(static_cast<int32_t>(want));
    request.set_page_token(page_token);
    absl::StatusOr<v1::ListJobsResponse> page = client.ListJobs(request);
    if (!page.ok()) return ReportRpcError(env, "cannot list jobs", client, page.status());
    for (const v1::Job& job : page->jobs()) {
      if (inv.limit > 0 && static_cast<int64_t>(jobs.size()) >= inv.limit) break;
      jobs.push_back(job);
    }
    // A token that does not move would page forever.
    if (!page->next_page_token().empty() && page->next_page_token() == page_token) {
      return ReportRpcError(env, "cannot list jobs", client,
                            absl::InternalError("coordinator returned the same page token twice"));
    }
    page_token = page->next_page_token();
  } while (!page_token.empty() &&
           (inv.limit == 0 || static_cast<int64_t>(jobs.size()) < inv.limit));

  if (inv.output == OutputFormat::kJson) {
    v1::ListJobsResponse all;
    for (const v1::Job& job : jobs) *all.add_jobs() = job;
    *env.out << ToJsonLine(all) << "\n";
  } else if (jobs.empty()) {
    *env.out << "no jobs\n";
  } else {
    *env.out << FormatJobsTable(jobs, env.now_ms());
  }
  return kExitOk;
}

int RunDescribe(JobClient& client, const Invocation& inv, const Environment& env) {
  absl::StatusOr<v1::Job> job = client.GetJob(inv.job_id);
  if (!job.ok()) return ReportRpcError(env, "cannot get job " + inv.job_id, client, job.status());
  if (inv.output == OutputFormat::kJson) {
    *env.out << ToJsonLine(*job) << "\n";
  } else {
    *env.out << FormatJobDetails(*job, env.now_ms());
  }
  return kExitOk;
}

int RunCancel(JobClient& client, const Invocation& inv, const Environment& env) {
  absl::StatusOr<v1::Job> job = client.CancelJob(inv.job_id);
  if (!job.ok()) {
    return ReportRpcError(env, "cannot cancel job " + inv.job_id, client, job.status());
  }
  if (inv.output == OutputFormat::kJson) {
    *env.out << ToJsonLine(*job) << "\n";
  } else {
    *env.out << "job " << job->id() << " " << JobStateName(job->state()) << "\n";
  }
  return kExitOk;
}

int RunWait(JobClient& client, const Invocation& inv, const Environment& env) {
  absl::StatusOr<v1::Job> job = client.GetJob(inv.job_id);
  if (!job.ok()) return ReportRpcError(env, "cannot get job " + inv.job_id, client, job.status());
  if (!IsFinalState(job->state())) {
    // Only the end matters: start after the newest stored event so the
    // coordinator does not replay the job's history.
    job = FollowJob(client, inv.job_id, job->last_event_seq(), [](const v1::JobEvent&) {}, env);
    if (!job.ok()) {
      return ReportRpcError(env, "cannot wait for job " + inv.job_id, client, job.status());
    }
  }
  if (inv.output == OutputFormat::kJson) {
    *env.out << ToJsonLine(*job) << "\n";
  } else {
    *env.out << FormatOutcome(*job) << "\n";
  }
  return ExitCodeForState(job->state());
}

int RunCheckpoints(JobClient& client, const Invocation& inv, const Environment& env) {
  absl::StatusOr<v1::ListCheckpointsResponse> response = client.ListCheckpoints(inv.job_id);
  if (!response.ok()) {
    return ReportRpcError(env, "cannot list checkpoints of job " + inv.job_id, client,
                          response.status());
  }
  if (inv.output == OutputFormat::kJson) {
    *env.out << ToJsonLine(*response) << "\n";
  } else if (response->checkpoints_size() == 0) {
    *env.out << "no checkpoints\n";
  } else {
    std::vector<v1::Checkpoint> checkpoints(response->checkpoints().begin(),
                                            response->checkpoints().end());
    *env.out << FormatCheckpointsTable(checkpoints, env.now_ms());
  }
  return kExitOk;
}

int RunAgents(JobClient& client, const Invocation& inv, const Environment& env) {
  absl::StatusOr<v1::ListAgentsResponse> response = client.ListAgents();
  if (!response.ok()) return ReportRpcError(env, "cannot list agents", client, response.status());
  if (inv.output == OutputFormat::kJson) {
    *env.out << ToJsonLine(*response) << "\n";
  } else if (response->agents_size() == 0) {
    *env.out << "no agents\n";
  } else {
    std::vector<v1::Agent> agents(response->agents().begin(), response->agents().end());
    *env.out << FormatAgentsTable(agents, env.now_ms());
  }
  return kExitOk;
}

// LoadJobSpec (proto/jobspec.h): relative paths against the working
// directory, defaults, validation; prints every problem, one a line.
bool LoadSpecFile(const std::string& path, const Environment& env, v1::JobSpec* spec) {
  char cwd[4096];
  const std::string base = ::getcwd(cwd, sizeof(cwd)) != nullptr ? cwd : "";
  Result<v1::JobSpec> loaded = LoadJobSpec(path, base);
  if (loaded.ok()) {
    *spec = std::move(*loaded);
    return true;
  }
  // Each line already names the file.
  std::istringstream lines(loaded.status().message());
  for (std::string line; std::getline(lines, line);) *env.err << "ftune: " << line << "\n";
  return false;
}

}  // namespace

Environment SystemEnvironment() {
  Environment env;
  env.out = &std::cout;
  env.err = &std::cerr;
  env.now_ms = [] {
    return std::chrono::duration_cast<std::chrono::milliseconds>(
               std::chrono::system_clock::now().time_since_epoch())
        .count();
  };
  env.sleep = [](std::chrono::milliseconds d) { std::this_thread::sleep_for(d); };
  return env;
}

int ExitCodeForState(v1::JobState state) {
  switch (state) {
    case v1::SUCCEEDED:
      return kExitOk;
    case v1::FAILED:
      return kExitJobFailed;
    case v1::CANCELLED:
      return kExitJobCancelled;
    default:
      return kExitRpcError;
  }
}

bool ParseLabel(const std::string& text, std::string* key, std::string* value) {
  const size_t eq = text.find('=');
  if (eq == std::string::npos || eq == 0) return false;
  *key = text.substr(0, eq);
  *value = text.substr(eq + 1);
  return true;
}

std::string RandomRequestId() {
  std::random_device device;
  std::mt19937_64 rng((static_cast<uint64_t>(device()) << 32) ^ device());
  uint64_t hi = rng();
  uint64_t lo = rng();
  hi = (hi & ~0xF000ULL) | 0x4000ULL;                   // version 4
  lo = (lo & ~(0xC0ULL << 56)) | (0x80ULL << 56);       // variant 10
  char buf[37];
  std::snprintf(buf, sizeof(buf), "%08llx-%04llx-%04llx-%04llx-%012llx",
                static_cast<unsigned long long>(hi >> 32),
                static_cast<unsigned long long>((hi >> 16) & 0xFFFF),
                static_cast<unsigned long long>(hi & 0xFFFF),
                static_cast<unsigned long long>(lo >> 48),
                static_cast<unsigned long long>(lo & 0xFFFFFFFFFFFFULL));
  return buf;
}

absl::StatusOr<v1::Job> FollowJob(JobClient& client, const std::string& job_id,
                                  int64_t after_seq,
                                  const std::function<void(const v1::JobEvent&)>& on_event,
                                  const Environment& env) {
  int64_t last_seq = after_seq;
  std::chrono::milliseconds backoff = kInitialBackoff;
  int64_t failing_since_ms = env.now_ms();
  // One note per outage, not one per retry.
  bool outage_reported = false;
  for (;;) {
    v1::WatchJobRequest request;
    request.set_job_id(job_id);
    request.set_after_seq(last_seq);
    request.set_follow(true);
    bool progressed = false;
    absl::Status status = client.WatchJob(request, [&](const v1::JobEvent& event) {
      // A coordinator replaying from an older position must not make us
      // show an event twice.
      if (event.seq() <= last_seq) return;
      last_seq = event.seq();
      progressed = true;
      on_event(event);
    });

    absl::Status failure = status;
    if (status.ok()) {
      // The stream ends when the job does; the job record says how.
      absl::StatusOr<v1::Job> job = client.GetJob(job_id);
      if (job.ok() && IsFinalState(job->state())) return job;
      if (!job.ok() && !IsTransient(job.status())) return job.status();
      if (job.ok()) {
        // The coordinator closed a live job's stream (e.g. while shutting
        // down cleanly): not a failure, so the give-up clock restarts, but the
        // backoff keeps growing so such a server is not polled in a tight loop.
        failure = absl::OkStatus();
        failing_since_ms = env.now_ms();
      } else {
        failure = job.status();
      }
    } else if (!IsTransient(status)) {
      return status;
    }

    if (progressed) {
      backoff = kInitialBackoff;
      failing_since_ms = env.now_ms();
      outage_reported = false;
    } else if (env.now_ms() - failing_since_ms >
               std::chrono::duration_cast<std::chrono::milliseconds>(kReconnectWindow).count()) {
      return absl::UnavailableError(
          std::string(failure.message()) + " (gave up reconnecting after " +
          std::to_string(kReconnectWindow.count()) + "s)");
    }
    if (!failure.ok() && !outage_reported) {
      outage_reported = true;
      *env.err << "ftune: watch of job " << job_id << " interrupted (" << failure.message()
               << "); resuming after event " << last_seq << "\n";
    }
    env.sleep(backoff);
    backoff = std::min(backoff * 2, kMaxBackoff);
  }
}

std::optional<int> ParseCommandLine(const std::vector<std::string>& args, Invocation* inv,
                                    std::ostream& out, std::ostream& err) {
  CLI::App app("ftune: submit, follow and manage fine-tuning jobs on an ftune coordinator",
               "ftune");
  app.footer(kFooter);
  app.set_version_flag("--version", std::string("ftune ") + FTUNE_VERSION);
  app.require_subcommand(1);

  inv->coordinator = "127.0.0.1:7450";
  app.add_option("--coordinator", inv->coordinator, "Coordinator address host:port")
      ->envname("FTUNE_COORDINATOR")
      ->capture_default_str();
  app.add_option("--token-file", inv->token_file,
                 "File holding the client bearer token (sent as 'authorization: Bearer')")
      ->envname("FTUNE_TOKEN_FILE");
  app.add_option("--tls-ca", inv->tls_ca_file, "PEM CA bundle; connects with TLS when given");
  app.add_flag("--insecure", inv->insecure,
               "Send the token to a coordinator off this host without TLS");
  std::string output = "text";
  app.add_option("--output,-o", output, "Output format: text, or json (protobuf JSON, one object per line)")
      ->check(CLI::IsMember({"text", "json"}))
      ->capture_default_str();

  auto subcommand = [&](const char* name, const char* help, Command command) {
    CLI::App* sub = app.add_subcommand(name, help);
    // Global options may also follow the command: `ftune jobs -o json`.
    sub->fallthrough();
    sub->callback([inv, command] { inv->command = command; });
    return sub;
  };
  auto job_arg = [&](CLI::App* sub) {
    sub->add_option("job", inv->job_id, "Job id")->required();
  };

  CLI::App* submit = subcommand("submit", "Validate a job YAML file and create the job",
                                Command::kSubmit);
  submit->add_option("spec", inv->spec_file, "Job spec YAML file")->required();
  submit->add_flag("--follow,-f", inv->follow,
                   "Stream the job's events until it ends; exit with its outcome");
  submit->add_option("--request-id", inv->request_id,
                     "Idempotency key: resubmitting with the same id returns the first job "
                     "(default: random)");

  std::vector<std::string> states;
  std::vector<std::string> labels;
  CLI::App* jobs = subcommand("jobs", "List jobs", Command::kJobs);
  jobs->add_option("--state", states, "Only jobs in this state (repeatable)")
      ->expected(1)
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  jobs->add_option("--label", labels, "Only jobs with this label, KEY=VALUE (repeatable)")
      ->expected(1)
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  jobs->add_option("--limit", inv->limit, "Show at most N jobs (0: all)")
      ->check(CLI::NonNegativeNumber);
  jobs->add_option("--owner", inv->owner,
                   "Only this user's jobs (an admin sees everyone's; a user only their own)");

  job_arg(subcommand("describe", "Show a job: state, placement, spec", Command::kDescribe));
  CLI::App* watch = subcommand("watch", "Stream a job's events until it ends", Command::kWatch);
  job_arg(watch);
  watch->add_option("--after-seq", inv->after_seq, "Only events after this sequence number")
      ->check(CLI::NonNegativeNumber);
  job_arg(subcommand("cancel", "Cancel a job", Command::kCancel));
  job_arg(subcommand("wait", "Wait until a job ends; exit with its outcome", Command::kWait));
  job_arg(subcommand("checkpoints", "List a job's checkpoints", Command::kCheckpoints));
  subcommand("agents", "List host agents and their slots", Command::kAgents);

  // `ftune data` has its own parser (cli/data_commands.cc): everything after
  // `data`, --help included, is handed to it unparsed.
  CLI::App* data = app.add_subcommand(
      "data", "Local data tools, no coordinator: tokenize, detokenize, prepare, inspect");
  data->prefix_command();
  data->set_help_flag();
  data->callback([inv, data] {
    inv->command = Command::kData;
    inv->data_args = data->remaining();
  });

  std::vector<const char*> argv;
  for (const std::string& a : args) argv.push_back(a.c_str());
  try {
    app.parse(static_cast<int>(argv.size()), argv.data());
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e, out, err);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e, out, err);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e, out, err);
  } catch (const CLI::ParseError& e) {
    err << "ftune: " << e.what() << "\n";
    err << "Run 'ftune --help' for usage.\n";
    return kExitUsage;
  }

  inv->output = output == "json" ? OutputFormat::kJson : OutputFormat::kText;
  for (const std::string& s : states) {
    v1::JobState state;
    if (!ParseJobState(s, &state)) {
      err << "ftune: --state " << s
          << ": not a job state (QUEUED, SCHEDULED, RUNNING, RESTARTING, CANCELLING, "
             "SUCCEEDED, FAILED, CANCELLED)\n";
      return kExitUsage;
    }
    if (std::find(inv->states.begin(), inv->states.end(), state) == inv->states.end()) {
      inv->states.push_back(state);
    }
  }
  for (const std::string& l : labels) {
    std::string key, value;
    if (!ParseLabel(l, &key, &value)) {
      err << "ftune: --label " << l << ": expected KEY=VALUE\n";
      return kExitUsage;
    }
    inv->labels[key] = value;
  }
  if (inv->coordinator.empty()) {
    err << "ftune: --coordinator is empty\n";
    return kExitUsage;
  }
  return std::nullopt;
}

int RunCommand(const Invocation& inv, const Environment& env) {
  if (inv.command == Command::kData) {
    if (!env.data) {
      *env.err << "ftune: `ftune data` is not part of this build (it needs PCRE2 and "
                  "nlohmann-json when ftune is built)\n";
      return kExitUsage;
    }
    return env.data(inv.data_args);
  }
  // A bad spec is reported before anything touches the network: a typo
  // should not depend on the coordinator being up.
  v1::JobSpec spec;
  if (inv.command == Command::kSubmit && !LoadSpecFile(inv.spec_file, env, &spec)) {
    return kExitUsage;
  }

  absl::StatusOr<ConnectionOptions> options = MakeConnectionOptions(inv);
  if (!options.ok()) {
    *env.err << "ftune: " << options.status().message() << "\n";
    return kExitUsage;
  }
  JobClient client(*options);
  switch (inv.command) {
    case Command::kSubmit:
      return RunSubmit(client, inv, env, spec);
    case Command::kJobs:
      return RunJobs(client, inv, env);
    case Command::kDescribe:
      return RunDescribe(client, inv, env);
    case Command::kWatch:
      return FollowAndReport(client, inv, env, inv.job_id, inv.after_seq);
    case Command::kCancel:
      return RunCancel(client, inv, env);
    case Command::kWait:
      return RunWait(client, inv, env);
    case Command::kCheckpoints:
      return RunCheckpoints(client, inv, env);
    case Command::kAgents:
      return RunAgents(client, inv, env);
    case Command::kData:
      break;  // handled above
  }
  return kExitUsage;
}

int Main(int argc, char** argv, DataCommand data) {
  std::vector<std::string> args(argv, argv + argc);
  Invocation inv;
  if (std::optional<int> code = ParseCommandLine(args, &inv, std::cout, std::cerr)) return *code;
  Environment env = SystemEnvironment();
  env.data = std::move(data);
  return RunCommand(inv, env);
}

}  // namespace ftune::cli
