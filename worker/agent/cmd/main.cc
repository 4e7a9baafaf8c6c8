// ftune-agent: the host agent. Parses flags, opens the spool, finds the
// host's slots and runs the agent until SIGTERM/SIGINT (a second signal
// exits at once, leaving ranks to notice their closed channel).
#include <signal.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "worker/agent/agent.h"
#include "ftune/absl_status.h"
#include "ftune/address.h"
#include "ftune/file_util.h"
#include "worker/agent/log.h"
#include "worker/agent/process_launcher.h"
#include "worker/agent/slots.h"
#include "worker/agent/spool.h"

#ifndef FTUNE_VERSION
#define FTUNE_VERSION "dev"
#endif

namespace {

std::string DefaultHost() {
  char name[256] = {0};
  if (::gethostname(name, sizeof(name) - 1) != 0) return "localhost";
  return name;
}

std::string DefaultRankBinary() {
  char self[4096];
  ssize_t n = ::readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (n <= 0) return "ftune-rank";
  self[n] = '\0';
  return ftune::Dirname(self) + "/ftune-rank";
}

int Fail(const std::string& message) {
  std::fprintf(stderr, "ftune-agent: %s\n", message.c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  // Block the stop signals before any thread exists, so that every thread
  // inherits the mask and only the sigwait thread below receives them.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  // A write past the file size limit (RLIMIT_FSIZE) must fail with EFBIG,
  // so that the spool holds events as on a full disk, not kill the agent
  // with SIGXFSZ's default action. Ranks get the default back (the launcher
  // resets every signal).
  signal(SIGXFSZ, SIG_IGN);

  CLI::App app{"ftune host agent: registers this host's slots with the coordinator and runs ranks"};
  std::string coordinator = "127.0.0.1:7450";
  std::string token_file;
  std::string agent_id;
  std::string tls_ca;
  bool insecure = false;
  std::string work_dir = "./ftune-agent";
  int cpu_slots = 0;
  std::string host = DefaultHost();
  std::string rank_binary;
  int silence_timeout_s = 600;
  int grace_seconds = 30;
  int heartbeat_ms = 0;
  std::vector<std::string> allowed_roots;
  std::vector<std::string> rank_env;
  app.add_option("--coordinator", coordinator, "coordinator address HOST:PORT")
      ->envname("FTUNE_COORDINATOR")
      ->capture_default_str();
  app.add_option("--token-file", token_file,
                 "file holding this agent's bearer token (its line in the coordinator's "
                 "--agent-tokens)")
      ->check(CLI::ExistingFile);
  app.add_option("--agent-id", agent_id,
                 "this agent's id, the one its token is issued for (default: a random id kept "
                 "in the work dir)");
  app.add_flag("--insecure", insecure,
               "send the token to a non-loopback coordinator without TLS (--tls-ca)");
  app.add_option("--tls-ca", tls_ca, "PEM CA certificate of the coordinator; enables TLS")
      ->check(CLI::ExistingFile);
  app.add_option("--work-dir", work_dir, "spool and job directories")->capture_default_str();
  app.add_option("--cpu-slots", cpu_slots, "offer N CPU slots instead of the GPUs NVML reports")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--host", host, "host name to register")->capture_default_str();
  app.add_option("--rank-binary", rank_binary,
                 "rank executable (default: ftune-rank next to ftune-agent)");
  app.add_option("--rank-silence-timeout", silence_timeout_s,
                 "kill a rank that sends nothing for SEC seconds")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--grace-seconds", grace_seconds,
                 "seconds between StopRank, SIGTERM and SIGKILL when the coordinator gives none")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--heartbeat-ms", heartbeat_ms,
                 "heartbeat period (default: what the coordinator asks)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--allowed-root", allowed_roots,
                 "directory a job's model, data files and output_dir must lie under, symlinks "
                 "resolved (repeatable; --work-dir always is one). None: any path")
      ->check(CLI::ExistingDirectory);
  app.add_option("--rank-env", rank_env,
                 "environment variable ranks get besides the built-in allowlist (repeatable)");
  CLI11_PARSE(app, argc, argv);

  using namespace ftune;
  using namespace ftune::agent;
  Agent::Options options;
  options.coordinator = coordinator;
  options.host = host;
  options.version = FTUNE_VERSION;
  options.heartbeat_ms = heartbeat_ms;
  options.shutdown_grace = absl::Seconds(grace_seconds);
  if (!token_file.empty()) {
    absl::StatusOr<std::string> token = ToAbsl(ReadFileToString(token_file, kMaxSmallFileBytes));
    if (!token.ok()) return Fail(std::string(token.status().message()));
    options.token = std::string(absl::StripAsciiWhitespace(*token));
    if (options.token.empty())
      return Fail(
          absl::StrCat("--token-file ", token_file, " is empty; put the agent token in it"));
  }
  if (!tls_ca.empty()) {
    absl::StatusOr<std::string> pem = ToAbsl(ReadFileToString(tls_ca, kMaxSmallFileBytes));
    if (!pem.ok()) return Fail(std::string(pem.status().message()));
    if (pem->find("-----BEGIN CERTIFICATE-----") == std::string::npos) {
      return Fail(absl::StrCat("--tls-ca ", tls_ca, " holds no PEM certificate"));
    }
    options.tls_ca_pem = *pem;
  }

  // The token is the agent's identity: never in plaintext off this host.
  if (!options.token.empty() && options.tls_ca_pem.empty() && !IsLoopbackAddress(coordinator)) {
    if (!insecure) {
      return Fail(absl::StrCat("refusing to send the agent token in plaintext to ", coordinator,
                               ", which is not on this host: pass --tls-ca (the coordinator "
                               "serves TLS), or --insecure on a network you trust"));
    }
    LogWarning(absl::StrCat("--insecure: the agent token goes to ", coordinator,
                            " in plaintext; anyone on the path can take it"));
  }

  const std::string abs_work_dir = AbsolutePath(work_dir);
  if (absl::Status s = ToAbsl(MakeDirectories(abs_work_dir)); !s.ok()) {
    return Fail(absl::StrCat(s.message(), "; pass a writable --work-dir"));
  }
  Spool::Options spool_options;
  spool_options.dir = abs_work_dir + "/spool";
  spool_options.agent_id = agent_id;
  absl::StatusOr<std::unique_ptr<Spool>> spool = Spool::Open(spool_options);
  if (!spool.ok()) return Fail(std::string(spool.status().message()));

  absl::StatusOr<std::vector<HostSlot>> slots = DiscoverSlots(cpu_slots);
  if (!slots.ok()) return Fail(std::string(slots.status().message()));
  for (const HostSlot& s : *slots) {
    LogInfo(absl::StrCat("slot ", s.slot.index(), ": ", s.slot.name(), " ", s.slot.device_uuid(),
                         ", ", s.slot.memory_bytes() >> 20, " MiB"));
  }

  RankSupervisor::Options supervisor;
  supervisor.work_dir = abs_work_dir;
  supervisor.rank_binary = AbsolutePath(rank_binary.empty() ? DefaultRankBinary() : rank_binary);
  supervisor.silence_timeout = absl::Seconds(silence_timeout_s);
  supervisor.default_grace = absl::Seconds(grace_seconds);
  for (const std::string& root : allowed_roots)
    supervisor.allowed_roots.push_back(AbsolutePath(root));
  supervisor.extra_env = rank_env;
  if (allowed_roots.empty()) {
    LogWarning("no --allowed-root: jobs may read and write any path this agent's user can; "
               "pass --allowed-root DIR (repeatable) on a shared cluster");
  } else {
    std::string roots = abs_work_dir;
    for (const std::string& r : supervisor.allowed_roots) roots += ", " + r;
    LogInfo(absl::StrCat("jobs may use paths under: ", roots));
  }
  if (::access(supervisor.rank_binary.c_str(), X_OK) != 0) {
    LogWarning(absl::StrCat(
        "rank binary ", supervisor.rank_binary,
        " is not executable; ranks will fail to launch until it is (pass --rank-binary PATH)"));
  }

  std::unique_ptr<ProcessLauncher> launcher = NewForkExecLauncher();
  Agent agent(options, *std::move(slots), spool->get(), launcher.get(), supervisor);

  std::atomic<bool> done{false};
  std::thread signals([&agent, &done, stop_signals] {
    int sig = 0;
    sigwait(&stop_signals, &sig);
    if (done) return;
    LogInfo(
        absl::StrCat("signal ", sig, ": stopping ranks and shutting down (again to exit at once)"));
    agent.Shutdown();
    sigwait(&stop_signals, &sig);
    if (done) return;
    LogWarning("second signal: exiting now");
    std::_Exit(1);
  });

  agent.Run();
  // Wake the signal thread so that it ends before the agent is destroyed.
  done = true;
  pthread_kill(signals.native_handle(), SIGTERM);
  signals.join();
  return 0;
}
