// ftune-coordinator: job API, agent streams, scheduler, metrics.
#include <csignal>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include "agent_service.h"
#include "auth.h"
#include "grpc_util.h"
#include "coordinator.h"
#include "job_service.h"
#include "metrics.h"
#include "reflection_service.h"
#include "store.h"
#include "tls_identity.h"
#include "ftune/address.h"
#include "ftune/file_util.h"
#include "ftune/path_policy.h"
#include "worker/config/plan_spec.h"

namespace {

constexpr int kMaxReceiveBytes = 8 << 20;

std::atomic<bool> g_stop{false};
std::atomic<bool> g_reload{false};
void OnSignal(int) { g_stop = true; }
void OnHangup(int) { g_reload = true; }

// "90", "90s", "15m", "12h", "30d" -> milliseconds; false if not one.
bool ParseDurationMs(const std::string& text, int64_t* ms) {
  if (text.empty()) return false;
  size_t used = 0;
  double v = 0;
  try {
    v = std::stod(text, &used);
  } catch (const std::exception&) {
    return false;
  }
  const std::string unit = text.substr(used);
  const double scale = unit.empty() || unit == "s" ? 1e3
                       : unit == "m"               ? 60e3
                       : unit == "h"               ? 3600e3
                       : unit == "d"               ? 86400e3
                                                   : -1;
  if (scale < 0 || !(v >= 0) || v * scale > 1e15) return false;
  *ms = static_cast<int64_t>(v * scale);
  return true;
}

bool ReadFile(const std::string& path, std::string* out) {
  ftune::Result<std::string> contents = ftune::ReadFileToString(path, ftune::kMaxSmallFileBytes);
  if (!contents.ok()) return false;
  *out = std::move(*contents);
  return true;
}

// What a coordinator reachable from other hosts lacks; empty when nothing.
std::vector<std::string> MissingProtection(const ftune::server::Authenticator& auth, bool tls) {
  std::vector<std::string> missing;
  if (!auth.users_configured()) missing.push_back("user credentials (--user-tokens FILE)");
  if (!auth.per_agent_tokens())
    missing.push_back(auth.agents_configured()
                          ? "per-agent credentials (--agent-tokens FILE; the shared "
                            "--agent-token-file lets any holder register as any agent)"
                          : "agent credentials (--agent-tokens FILE)");
  if (!tls) missing.push_back("TLS (--tls-cert and --tls-key)");
  return missing;
}

// What a /metrics other hosts can reach lacks, and what --insecure then
// warns about; empty when nothing.
struct MetricsGap {
  std::string missing;
  std::string warning;
};
std::vector<MetricsGap> MissingMetricsProtection(bool scrape_auth, bool tls) {
  std::vector<MetricsGap> gaps;
  if (!scrape_auth)
    gaps.push_back({"scrape credentials (--metrics-auth FILE: `USER:PASSWORD` lines, sent by "
                    "Prometheus' basic_auth)",
                    "without --metrics-auth: anyone who can reach it reads job ids, losses and "
                    "host names"});
  if (!tls)
    gaps.push_back({"TLS (--metrics-tls-cert FILE and --metrics-tls-key FILE; Prometheus then "
                    "scrapes with `scheme: https`): over plain HTTP the basic auth password "
                    "crosses the network in clear with every scrape",
                    std::string("over plain HTTP, without --metrics-tls-cert and "
                                "--metrics-tls-key: ") +
                        (scrape_auth ? "the basic auth password crosses the network in clear "
                                       "with every scrape"
                                     : "the metrics cross the network in clear")});
  return gaps;
}

// The /metrics TLS identity of --metrics-tls-cert and --metrics-tls-key;
// nullptr when neither is given. Errors name the flags and files. Warns of
// an expired certificate, which is still served (clocks differ; the
// operator decides).
absl::StatusOr<std::shared_ptr<const ftune::server::TlsIdentity>> LoadMetricsTls(
    const ftune::server::PemFile& cert, const ftune::server::PemFile& key,
    const std::string& metrics_listen) {
  if (cert.path.empty() && key.path.empty()) return nullptr;
  if (cert.path.empty() || key.path.empty()) {
    const auto& given = cert.path.empty() ? key : cert;
    return absl::InvalidArgumentError(cert.flag + " and " + key.flag +
                                      " go together: got only " + given.flag + " " + given.path);
  }
  if (metrics_listen.empty())
    return absl::InvalidArgumentError(cert.flag + " and " + key.flag +
                                      " need --metrics-listen (it is empty: /metrics is off)");
  auto identity = ftune::server::TlsIdentity::Load(cert, key);
  if (identity.ok() && (*identity)->expired())
    std::fprintf(stderr,
                 "ftune-coordinator: WARNING: %s %s has expired (%s): Prometheus will refuse "
                 "it\n",
                 cert.flag.c_str(), cert.path.c_str(), (*identity)->summary().c_str());
  return identity;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace ftune::server;
  // A write past the file size limit (RLIMIT_FSIZE) must fail with EFBIG,
  // which the store reports as a full disk, not kill the coordinator with
  // SIGXFSZ's default action.
  std::signal(SIGXFSZ, SIG_IGN);
  CLI::App app{"ftune-coordinator: accepts fine-tuning jobs, schedules them onto agents, "
               "streams their events and exports metrics"};
  std::string state_dir = "ftune-state";
  std::string listen = "127.0.0.1:7450";
  std::string metrics_listen = "127.0.0.1:9464";
  AuthFiles auth_files;
  bool insecure = false;
  std::string tls_cert, tls_key;
  std::string metrics_tls_cert, metrics_tls_key;
  double agent_timeout_s = 15;
  int grace_seconds = 30;
  int heartbeat_ms = 2000;
  int tick_ms = 200;
  std::vector<std::string> allowed_roots;
  int64_t max_queued_jobs = 10000;
  size_t max_watchers_per_job = 1000;
  std::string event_retention = "0";
  double plan_timeout_s = 5;
  std::string store_sync = "full";
  app.add_option("--state-dir", state_dir, "directory of the SQLite state (ftune.db)");
  app.add_option("--store-sync", store_sync,
                 "durability of each acknowledged change: full (an fdatasync per commit: "
                 "survives power loss and OS crashes) or normal (no sync per commit: survives a "
                 "coordinator crash or kill -9, but the last changes acknowledged before an OS "
                 "crash or power loss can be lost; the database is never corrupted)")
      ->check(CLI::IsMember({"full", "normal"}))
      ->capture_default_str();
  app.add_option("--listen", listen, "gRPC address (JobService, AgentService, health, reflection)");
  app.add_option("--metrics-listen", metrics_listen, "Prometheus /metrics address; empty: off");
  app.add_option("--user-tokens", auth_files.user_tokens,
                 "file of `TOKEN USER [admin]` lines: the users and their bearer tokens");
  app.add_option("--client-token-file", auth_files.client_token_file,
                 "file holding one client token: the user `admin` (an admin)");
  app.add_option("--agent-tokens", auth_files.agent_tokens,
                 "file of `AGENT_ID TOKEN` lines: each agent's own bearer token");
  app.add_option("--agent-token-file", auth_files.agent_token_file,
                 "file holding one agent token shared by all agents, any of which may claim "
                 "any agent id (development only)");
  app.add_option("--metrics-auth", auth_files.metrics_auth,
                 "file of `USER:PASSWORD` lines: HTTP basic auth /metrics requires (Prometheus' "
                 "basic_auth); needed when --metrics-listen is not a loopback address");
  app.add_option("--metrics-tls-cert", metrics_tls_cert,
                 "PEM certificate (then any intermediates): serve /metrics over HTTPS only "
                 "(with --metrics-tls-key); needed when --metrics-listen is not a loopback "
                 "address. Re-read on SIGHUP");
  app.add_option("--metrics-tls-key", metrics_tls_key,
                 "PEM private key of --metrics-tls-cert, unencrypted");
  app.add_option("--max-user-priority", auth_files.max_user_priority,
                 "highest job priority a non-admin user may set")
      ->capture_default_str();
  app.add_flag("--insecure", insecure,
               "serve a non-loopback --listen without user and per-agent credentials or TLS, "
               "and a non-loopback --metrics-listen without --metrics-auth or without TLS");
  app.add_option("--tls-cert", tls_cert, "PEM certificate: serve TLS (with --tls-key)");
  app.add_option("--tls-key", tls_key, "PEM private key of --tls-cert");
  app.add_option("--agent-timeout", agent_timeout_s,
                 "seconds without a heartbeat after which an agent is dead");
  app.add_option("--grace-seconds", grace_seconds,
                 "seconds a stopping rank gets before SIGTERM, and again before SIGKILL");
  app.add_option("--heartbeat-ms", heartbeat_ms, "heartbeat interval asked of agents");
  app.add_option("--tick-ms", tick_ms, "how often liveness and the scheduler run");
  app.add_option("--allowed-root", allowed_roots,
                 "directory a job's model, data and output_dir paths must lie under "
                 "(repeatable; symlinks resolved). None: any absolute path (agents check "
                 "their own --allowed-root again)");
  app.add_option("--max-queued-jobs", max_queued_jobs,
                 "jobs one user (admins too) may have QUEUED at once; more are refused (0: no cap)")
      ->capture_default_str();
  app.add_option("--max-watchers-per-job", max_watchers_per_job,
                 "WatchJob streams open on one job at once (0: no cap)")
      ->capture_default_str();
  app.add_option("--event-retention", event_retention,
                 "delete the events (all but the last) of jobs ended longer ago than this, "
                 "e.g. 30d, 12h (0: keep forever)")
      ->capture_default_str();
  app.add_option("--plan-timeout", plan_timeout_s,
                 "seconds CreateJob waits for a job's memory plan (reading its config.json)")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  // From here on a SIGHUP is a reload, taken up once serving.
  std::signal(SIGHUP, OnHangup);

  auto paths = ftune::PathPolicy::Create(allowed_roots);
  if (!paths.ok()) {
    std::fprintf(stderr, "ftune-coordinator: --allowed-root: %s\n",
                 paths.status().message().c_str());
    return 2;
  }
  int64_t event_retention_ms = 0;
  if (!ParseDurationMs(event_retention, &event_retention_ms)) {
    std::fprintf(stderr,
                 "ftune-coordinator: --event-retention '%s' is not a duration (e.g. 30d, 12h, "
                 "90m, 3600s; 0 keeps events forever)\n",
                 event_retention.c_str());
    return 2;
  }
  auto auth_config = LoadAuthConfig(auth_files);
  auto auth = auth_config.ok() ? Authenticator::Create(*std::move(auth_config))
                              : absl::StatusOr<Authenticator>(auth_config.status());
  if (!auth.ok()) {
    std::fprintf(stderr, "ftune-coordinator: %s\n", std::string(auth.status().message()).c_str());
    return 2;
  }
  // /metrics over TLS: both files, checked now (exit 2 naming the flag and
  // the file), and again on each SIGHUP.
  const PemFile metrics_cert_file{"--metrics-tls-cert", metrics_tls_cert};
  const PemFile metrics_key_file{"--metrics-tls-key", metrics_tls_key};
  auto loaded_tls = LoadMetricsTls(metrics_cert_file, metrics_key_file, metrics_listen);
  if (!loaded_tls.ok()) {
    std::fprintf(stderr, "ftune-coordinator: %s\n",
                 std::string(loaded_tls.status().message()).c_str());
    return 2;
  }
  std::shared_ptr<const TlsIdentity> metrics_tls = *std::move(loaded_tls);
  // Secure by default: off this host, every party proves who it is, over TLS,
  // and /metrics asks Prometheus for its password, over TLS too: basic auth
  // sends the password with every scrape, readable by anyone on the path.
  const bool tls = !tls_cert.empty() || !tls_key.empty();
  const std::vector<std::string> missing = MissingProtection(*auth, tls);
  const bool metrics_off_host =
      !metrics_listen.empty() && !ftune::IsLoopbackAddress(metrics_listen);
  bool refused = false;
  if (!missing.empty() && !ftune::IsLoopbackAddress(listen)) {
    if (!insecure) {
      std::fprintf(stderr,
                   "ftune-coordinator: refusing to listen on %s, which other hosts can reach, "
                   "without:\n",
                   listen.c_str());
      for (const auto& m : missing) std::fprintf(stderr, "  - %s\n", m.c_str());
      std::fprintf(stderr,
                   "Give them (docs/security.md shows a secure start), listen on 127.0.0.1, "
                   "or pass --insecure on a network you trust.\n");
      refused = true;
    } else {
      for (const auto& m : missing)
        std::fprintf(stderr, "ftune-coordinator: WARNING: --insecure: serving %s without %s\n",
                     listen.c_str(), m.c_str());
      std::fprintf(stderr,
                   "ftune-coordinator: WARNING: --insecure: anyone who can reach %s may act as "
                   "any user or agent the missing credentials would have stopped\n",
                   listen.c_str());
    }
  } else if (!auth->users_configured() || !auth->agents_configured()) {
    std::printf("ftune-coordinator: loopback only, %s%s%s\n",
                auth->users_configured() ? "" : "no user tokens: every client is the admin 'local'",
                !auth->users_configured() && !auth->agents_configured() ? "; " : "",
                auth->agents_configured() ? "" : "no agent tokens: any local agent may register");
  }
  const std::vector<MetricsGap> metrics_gaps =
      metrics_off_host
          ? MissingMetricsProtection(auth->metrics_auth_configured(), metrics_tls != nullptr)
          : std::vector<MetricsGap>();
  if (!metrics_gaps.empty()) {
    if (!insecure) {
      std::fprintf(stderr,
                   "ftune-coordinator: refusing to serve /metrics on %s, which other hosts can "
                   "reach, without:\n",
                   metrics_listen.c_str());
      for (const auto& gap : metrics_gaps) std::fprintf(stderr, "  - %s\n", gap.missing.c_str());
      std::fprintf(stderr,
                   "Give them (docs/security.md shows a secure start), use --metrics-listen "
                   "127.0.0.1:9464, or pass --insecure on a network you trust.\n");
      refused = true;
    } else {
      for (const auto& gap : metrics_gaps)
        std::fprintf(stderr, "ftune-coordinator: WARNING: --insecure: serving /metrics on %s %s\n",
                     metrics_listen.c_str(), gap.warning.c_str());
    }
  }
  if (refused) return 2;
  const StoreSync sync = store_sync == "normal" ? StoreSync::kNormal : StoreSync::kFull;
  if (sync == StoreSync::kNormal)
    std::printf("ftune-coordinator: --store-sync=normal: commits are not flushed to disk one by "
                "one; the last jobs and events acknowledged before a power loss or OS crash can "
                "be lost (a coordinator crash loses nothing)\n");
  Metrics metrics;  // before the store, which reports its errors to it
  auto store = Store::Open(state_dir, sync);
  if (!store.ok()) {
    std::fprintf(stderr, "ftune-coordinator: %s\n", std::string(store.status().message()).c_str());
    return 1;
  }
  (*store)->SetErrorListener([&metrics](const absl::Status&) { metrics.StoreError(); });
  if (!metrics_listen.empty()) {
    Metrics::ScrapeAuth scrape_auth;
    if (auth->metrics_auth_configured())
      scrape_auth = [&auth](const std::string& user, const std::string& password) {
        return auth->AuthenticateScrape(user, password);
      };
    if (auto err = metrics.Serve(metrics_listen, std::move(scrape_auth), metrics_tls);
        !err.empty()) {
      std::fprintf(stderr, "ftune-coordinator: %s (choose another --metrics-listen)\n",
                   err.c_str());
      return 1;
    }
  }
  EventBus bus(max_watchers_per_job);
  ManagerOptions opts;
  opts.paths = *paths;
  opts.max_queued_jobs = max_queued_jobs;
  opts.event_retention_ms = event_retention_ms;
  opts.plan_timeout_ms = static_cast<int64_t>(plan_timeout_s * 1000);
  opts.agent_timeout_ms = static_cast<int64_t>(agent_timeout_s * 1000);
  opts.grace_seconds = grace_seconds;
  opts.heartbeat_interval_ms = heartbeat_ms;
  // Jobs whose model config this host can read are placed by their memory
  // plan (worker/modelio/memory_plan.h); others by resources.min_gpu_memory.
  opts.plan_device_bytes = [](const ftune::v1::JobSpec& spec) -> absl::StatusOr<int64_t> {
    ftune::Result<ftune::trainer::MemoryPlan> plan = ftune::trainer::PlanJob(spec, 0);
    if (!plan.ok()) return absl::NotFoundError(plan.status().ToString());
    return plan->device_peak_bytes;
  };
  Coordinator coordinator(store->get(), ftune::RealClock(), &bus, &metrics, opts);
  if (auto st = coordinator.Recover(); !st.ok()) {
    std::fprintf(stderr, "ftune-coordinator: recovering state: %s\n",
                 std::string(st.message()).c_str());
    return 1;
  }
  JobServiceImpl job_service(&coordinator.jobs(), &coordinator.agents(), &coordinator.events(),
                             &metrics, &*auth);
  AgentServiceImpl agent_service(&coordinator.agents(), &coordinator.events(), &coordinator.jobs(),
                                 &*auth);
  ReflectionServiceImpl reflection(
      &*auth, {ftune::v1::JobService::service_full_name(),
               ftune::v1::AgentService::service_full_name(), "grpc.health.v1.Health",
               grpc::reflection::v1alpha::ServerReflection::service_full_name()});

  grpc::EnableDefaultHealthCheckService(true);
  std::shared_ptr<grpc::ServerCredentials> creds = grpc::InsecureServerCredentials();
  if (!tls_cert.empty() || !tls_key.empty()) {
    grpc::SslServerCredentialsOptions ssl;
    grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
    if (!ReadFile(tls_cert, &pair.cert_chain) || !ReadFile(tls_key, &pair.private_key)) {
      std::fprintf(stderr, "ftune-coordinator: cannot read --tls-cert '%s' or --tls-key '%s'\n",
                   tls_cert.c_str(), tls_key.c_str());
      return 2;
    }
    ssl.pem_key_cert_pairs.push_back(pair);
    creds = grpc::SslServerCredentials(ssl);
  }
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(listen, creds, &port);
  builder.RegisterService(&job_service);
  builder.RegisterService(&agent_service);
  builder.RegisterService(&reflection);
  // Many WatchJob streams each hold a thread of the sync server.
  builder.SetSyncServerOption(grpc::ServerBuilder::SyncServerOption::MAX_POLLERS, 4);
  // Above the largest message an agent sends: a batch of events is at most
  // its max_batch_bytes (1 MiB) or one event (at most 1 MiB:
  // worker/agent/event_size.h). A refused batch would be resent forever.
  builder.SetMaxReceiveMessageSize(kMaxReceiveBytes);
  auto server = builder.BuildAndStart();
  if (!server || port == 0) {
    std::fprintf(stderr, "ftune-coordinator: cannot listen on %s (in use? choose another --listen)\n",
                 listen.c_str());
    return 1;
  }
  if (metrics_tls)
    std::printf("ftune-coordinator: /metrics TLS certificate: %s\n",
                metrics_tls->summary().c_str());
  std::printf("ftune-coordinator: serving on %s (metrics %s%s%s, state %s)\n", listen.c_str(),
              metrics_listen.empty() ? "off" : metrics_listen.c_str(),
              metrics_tls ? " over TLS" : "",
              auth->metrics_auth_configured() ? " with basic auth" : "", state_dir.c_str());
  std::fflush(stdout);

  // SIGHUP re-reads the credential files and the /metrics certificate and
  // key (as Prometheus and nginx do): all of them are checked as at start
  // and swapped in together, or the old ones stay. The main loop does it,
  // not the handler (nothing there is async-signal-safe).
  auto reload_credentials = [&] {
    absl::StatusOr<std::shared_ptr<const TlsIdentity>> new_tls =
        LoadMetricsTls(metrics_cert_file, metrics_key_file, metrics_listen);
    absl::StatusOr<AuthConfig> config = LoadAuthConfig(auth_files);
    const absl::Status st = !new_tls.ok()  ? new_tls.status()
                            : config.ok() ? auth->Reload(*std::move(config))
                                          : config.status();
    if (!st.ok()) {
      std::fprintf(stderr,
                   "ftune-coordinator: SIGHUP: credentials not reloaded, the previous ones stay "
                   "in force: %s\n",
                   std::string(st.message()).c_str());
      return;
    }
    std::string ended;
    for (const auto& id : agent_service.EndStreamsOfRevokedCredentials())
      ended += (ended.empty() ? "agent " : ", agent ") + id;
    for (const auto& watch : job_service.EndWatchesOfRevokedCredentials())
      ended += (ended.empty() ? "" : ", ") + watch;
    std::printf("ftune-coordinator: SIGHUP: credentials reloaded (%zu user tokens, %zu agent "
                "tokens, %zu metrics users); streams ended for a revoked token: %s\n",
                auth->num_users(), auth->num_agents(), auth->num_metrics_users(),
                ended.empty() ? "none" : ended.c_str());
    if (metrics_tls) {
      metrics_tls = *std::move(new_tls);
      metrics.SetTlsIdentity(metrics_tls);
      std::printf("ftune-coordinator: SIGHUP: /metrics TLS certificate for new connections: %s\n",
                  metrics_tls->summary().c_str());
    }
    std::fflush(stdout);
  };
  std::signal(SIGINT, OnSignal);
  std::signal(SIGTERM, OnSignal);
  while (!g_stop) {
    if (g_reload.exchange(false)) reload_credentials();
    coordinator.Tick();
    std::this_thread::sleep_for(std::chrono::milliseconds(tick_ms));
  }
  std::printf("ftune-coordinator: shutting down\n");
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  return 0;
}
