// Test harness: real ftune processes on loopback. Starts a coordinator and
// agents as child processes (logs under the test's temp dir), kills them
// with any signal, and gives typed gRPC stubs with the client token.
#ifndef FTUNE_TESTS_INTEGRATION_CLUSTER_H_
#define FTUNE_TESTS_INTEGRATION_CLUSTER_H_

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "ftune/v1/job_service.grpc.pb.h"
#include "temp_dir.h"

namespace ftune::testing {

int FreePort();

class Process {
 public:
  Process(std::vector<std::string> argv, const std::string& log_path);
  ~Process();  // SIGKILLs if still running
  void Signal(int sig);
  // Waits for exit; returns the exit code (-signal when killed), or
  // nullopt-like INT32_MIN on timeout.
  int Wait(std::chrono::milliseconds timeout);
  bool Running();
  pid_t pid() const { return pid_; }
  const std::string& log_path() const { return log_; }

 private:
  pid_t pid_ = -1;
  int status_ = -1;
  bool reaped_ = false;
  std::string log_;
};

// Polls pred every 20 ms until true or timeout; returns pred's last value.
bool WaitFor(const std::function<bool()>& pred, std::chrono::milliseconds timeout);

std::string ReadFile(const std::string& path);

// GET http://127.0.0.1:port/metrics, with an `Authorization` header when
// `authorization` is not empty; the whole response, headers included.
std::string Scrape(int port, const std::string& authorization = "");

// The `Authorization` value of HTTP basic auth, as Prometheus sends it.
std::string Basic(const std::string& user, const std::string& password);

// The status line of an HTTP response ("HTTP/1.1 401 Unauthorized").
std::string StatusLine(const std::string& response);

class Cluster {
 public:
  Cluster();  // makes a fresh temp dir and token files
  ~Cluster();

  // Users (`TOKEN USER [admin]` lines) and one token per agent host instead
  // of the shared client and agent tokens: the coordinator gets
  // --user-tokens and --agent-tokens, StartAgent gives each agent
  // --agent-id=<host> and its own token, and AddAuth's default token is
  // `default_token`. Call before StartCoordinator.
  void UseCredentials(const std::string& user_lines,
                      const std::map<std::string, std::string>& agent_tokens,
                      const std::string& default_token);

  // Flags in `extra` are appended; one the cluster passes itself
  // (--state-dir=DIR/state, an agent's --work-dir=DIR/agent-<host>,
  // --token-file, ...) is replaced by extra's of the same name, e.g. to put
  // the coordinator's database or an agent's spool on another filesystem.
  void StartCoordinator(std::vector<std::string> extra = {});
  void KillCoordinator(int sig);
  // Starts an agent with `cpu_slots` CPU slots; returns its index. Ranks are
  // the scripted ftune-test-rank unless `rank_binary` names another (the
  // real ftune-rank).
  int StartAgent(const std::string& host, int cpu_slots, std::vector<std::string> extra = {},
                 const std::string& rank_binary = "");
  Process& agent(int i) { return *agents_[i]; }
  Process& coordinator() { return *coordinator_; }

  // A stub on a fresh channel; calls add the token with AddAuth.
  std::unique_ptr<v1::JobService::Stub> Client();
  std::shared_ptr<grpc::Channel> Channel();
  void AddAuth(grpc::ClientContext* ctx, const std::string& token = "\x01");

  // Waits until ListAgents shows n live agents.
  bool WaitAgents(int n, std::chrono::milliseconds timeout = std::chrono::seconds(20));
  v1::Job GetJob(const std::string& id);
  bool WaitState(const std::string& id, v1::JobState state,
                 std::chrono::milliseconds timeout = std::chrono::seconds(60));
  // All stored events of a job (WatchJob without follow).
  std::vector<v1::JobEvent> Events(const std::string& id, int64_t after_seq = 0);
  // A small valid spec for the scripted test rank.
  v1::JobSpec Spec(int ranks, int steps, int save_steps);
  v1::Job Submit(const v1::JobSpec& spec);
  grpc::Status Cancel(const std::string& id);
  // The job's checkpoints; fails the test if the RPC fails.
  std::vector<v1::Checkpoint> Checkpoints(const std::string& id);
  // Waits until the job's rank 0 has reported step >= step.
  bool WaitFor_Step(const std::string& id, int64_t step,
                    std::chrono::milliseconds timeout = std::chrono::seconds(30));

  std::string dir() const { return dir_; }
  std::string address() const { return "127.0.0.1:" + std::to_string(grpc_port_); }
  int metrics_port() const { return metrics_port_; }
  std::string client_token() const { return client_token_; }
  std::string agent_token() const { return "agent-secret"; }

 private:
  testutil::TempDir tmp_;  // kept when the test failed, for the logs
  std::string dir_;
  int grpc_port_;
  int metrics_port_;
  std::unique_ptr<Process> coordinator_;
  std::vector<std::unique_ptr<Process>> agents_;
  int coordinator_starts_ = 0;
  std::string client_token_ = "client-secret";
  std::vector<std::string> auth_flags_;
  std::map<std::string, std::string> agent_tokens_;  // host (= agent id) -> token
};

}  // namespace ftune::testing

#endif  // FTUNE_TESTS_INTEGRATION_CLUSTER_H_
