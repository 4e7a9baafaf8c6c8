#include "cluster.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <fstream>
#include <sstream>
#include <thread>

#include <gtest/gtest.h>

#include "ftune/socket_util.h"

namespace ftune::testing {

int FreePort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  socklen_t len = sizeof(a);
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  close(fd);
  return ntohs(a.sin_port);
}

Process::Process(std::vector<std::string> argv, const std::string& log_path) : log_(log_path) {
  pid_ = fork();
  if (pid_ == 0) {
    int fd = open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    dup2(fd, 1);
    dup2(fd, 2);
    setpgid(0, 0);
    std::vector<char*> args;
    for (auto& a : argv) args.push_back(a.data());
    args.push_back(nullptr);
    execv(args[0], args.data());
    _exit(127);
  }
}

Process::~Process() {
  if (Running()) {
    kill(pid_, SIGKILL);
    Wait(std::chrono::seconds(5));
  }
}

void Process::Signal(int sig) {
  if (!reaped_) kill(pid_, sig);
}

bool Process::Running() {
  if (reaped_) return false;
  int st = 0;
  pid_t r = waitpid(pid_, &st, WNOHANG);
  if (r == pid_) {
    reaped_ = true;
    status_ = st;
    return false;
  }
  return true;
}

int Process::Wait(std::chrono::milliseconds timeout) {
  if (!WaitFor([&] { return !Running(); }, timeout)) return INT_MIN;
  if (WIFSIGNALED(status_)) return -WTERMSIG(status_);
  return WEXITSTATUS(status_);
}

bool WaitFor(const std::function<bool()>& pred, std::chrono::milliseconds timeout) {
  const auto end = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    if (pred()) return true;
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream b;
  b << in.rdbuf();
  return b.str();
}

std::string Basic(const std::string& user, const std::string& password) {
  static const char kB64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  const std::string in = user + ":" + password;
  std::string out;
  for (size_t i = 0; i < in.size(); i += 3) {
    uint32_t v = static_cast<unsigned char>(in[i]) << 16;
    if (i + 1 < in.size()) v |= static_cast<unsigned char>(in[i + 1]) << 8;
    if (i + 2 < in.size()) v |= static_cast<unsigned char>(in[i + 2]);
    out += kB64[(v >> 18) & 63];
    out += kB64[(v >> 12) & 63];
    out += i + 1 < in.size() ? kB64[(v >> 6) & 63] : '=';
    out += i + 2 < in.size() ? kB64[v & 63] : '=';
  }
  return "Basic " + out;
}

std::string StatusLine(const std::string& response) {
  return response.substr(0, response.find("\r\n"));
}

std::string Scrape(int port, const std::string& authorization) {
  const int fd = ConnectLoopback(port);
  std::string out;
  if (fd >= 0) {
    std::string req = "GET /metrics HTTP/1.0\r\nHost: localhost\r\n";
    if (!authorization.empty()) req += "Authorization: " + authorization + "\r\n";
    req += "\r\n";
    (void)!write(fd, req.data(), req.size());
    char buf[65536];
    ssize_t n;
    while ((n = read(fd, buf, sizeof(buf))) > 0) out.append(buf, static_cast<size_t>(n));
    close(fd);
  }
  return out;
}

namespace {

// argv, less the --flags that `extra` gives again, then extra.
std::vector<std::string> WithFlags(const std::vector<std::string>& argv,
                                   const std::vector<std::string>& extra) {
  const auto name = [](const std::string& arg) { return arg.substr(0, arg.find('=')); };
  std::vector<std::string> out;
  for (const std::string& a : argv) {
    const bool replaced = a.rfind("--", 0) == 0 &&
                          std::any_of(extra.begin(), extra.end(),
                                      [&](const std::string& e) { return name(e) == name(a); });
    if (!replaced) out.push_back(a);
  }
  out.insert(out.end(), extra.begin(), extra.end());
  return out;
}

// The current test's name, fit for a file name (a parameterized test's has
// a '/').
std::string TestFileName() {
  std::string name = ::testing::UnitTest::GetInstance()->current_test_info()->name();
  std::replace(name.begin(), name.end(), '/', '.');
  return name;
}

}  // namespace

Cluster::Cluster() : tmp_("ftune-it-" + TestFileName()), dir_(tmp_.path()) {
  std::ofstream(dir_ + "/client.token") << client_token() << "\n";
  std::ofstream(dir_ + "/agent.token") << agent_token() << "\n";
  grpc_port_ = FreePort();
  metrics_port_ = FreePort();
  auth_flags_ = {"--client-token-file=" + dir_ + "/client.token",
                 "--agent-token-file=" + dir_ + "/agent.token"};
}

void Cluster::UseCredentials(const std::string& user_lines,
                             const std::map<std::string, std::string>& agent_tokens,
                             const std::string& default_token) {
  std::ofstream(dir_ + "/users.tokens") << user_lines;
  std::ofstream agents(dir_ + "/agents.tokens");
  for (const auto& [host, token] : agent_tokens) {
    agents << host << " " << token << "\n";
    std::ofstream(dir_ + "/agent-" + host + ".token") << token << "\n";
  }
  agent_tokens_ = agent_tokens;
  client_token_ = default_token;
  auth_flags_ = {"--user-tokens=" + dir_ + "/users.tokens",
                 "--agent-tokens=" + dir_ + "/agents.tokens"};
}

Cluster::~Cluster() {
  agents_.clear();
  coordinator_.reset();
  if (::testing::Test::HasFailure()) {
    tmp_.Keep();
    std::fprintf(stderr, "logs kept in %s\n", dir_.c_str());
  }
}

void Cluster::StartCoordinator(std::vector<std::string> extra) {
  std::vector<std::string> argv = {FTUNE_COORDINATOR_BIN,
                                   "--state-dir=" + dir_ + "/state",
                                   "--listen=" + address(),
                                   "--metrics-listen=127.0.0.1:" + std::to_string(metrics_port_),
                                   "--agent-timeout=3",
                                   "--grace-seconds=2",
                                   "--heartbeat-ms=300",
                                   "--tick-ms=50"};
  for (auto& f : auth_flags_) argv.push_back(f);
  coordinator_ = std::make_unique<Process>(
      WithFlags(argv, extra),
      dir_ + "/coordinator-" + std::to_string(coordinator_starts_++) + ".log");
  ASSERT_TRUE(WaitFor(
      [&] {
        // A fresh channel per try: a reused one backs off for seconds after
        // its first refused connection.
        auto stub = Client();
        grpc::ClientContext ctx;
        AddAuth(&ctx);
        v1::ListAgentsResponse r;
        return stub->ListAgents(&ctx, {}, &r).ok();
      },
      std::chrono::seconds(20)))
      << "coordinator did not come up; log: " << ReadFile(coordinator_->log_path());
}

void Cluster::KillCoordinator(int sig) {
  coordinator_->Signal(sig);
  coordinator_->Wait(std::chrono::seconds(10));
}

int Cluster::StartAgent(const std::string& host, int cpu_slots, std::vector<std::string> extra,
                        const std::string& rank_binary) {
  const bool own_token = agent_tokens_.count(host) > 0;
  std::vector<std::string> argv = {FTUNE_AGENT_BIN,
                                   "--coordinator=" + address(),
                                   "--work-dir=" + dir_ + "/agent-" + host,
                                   "--cpu-slots=" + std::to_string(cpu_slots),
                                   "--host=" + host,
                                   "--rank-binary=" + (rank_binary.empty()
                                                           ? std::string(FTUNE_TEST_RANK_BIN)
                                                           : rank_binary),
                                   "--grace-seconds=2",
                                   "--token-file=" + dir_ +
                                       (own_token ? "/agent-" + host + ".token"
                                                  : "/agent.token")};
  if (own_token) argv.push_back("--agent-id=" + host);
  agents_.push_back(
      std::make_unique<Process>(WithFlags(argv, extra), dir_ + "/agent-" + host + ".log"));
  return static_cast<int>(agents_.size()) - 1;
}

std::shared_ptr<grpc::Channel> Cluster::Channel() {
  return grpc::CreateChannel(address(), grpc::InsecureChannelCredentials());
}

std::unique_ptr<v1::JobService::Stub> Cluster::Client() {
  return v1::JobService::NewStub(Channel());
}

void Cluster::AddAuth(grpc::ClientContext* ctx, const std::string& token) {
  ctx->AddMetadata("authorization",
                   "Bearer " + (token == "\x01" ? client_token() : token));
}

bool Cluster::WaitAgents(int n, std::chrono::milliseconds timeout) {
  auto stub = Client();
  return WaitFor(
      [&] {
        grpc::ClientContext ctx;
        AddAuth(&ctx);
        v1::ListAgentsResponse r;
        if (!stub->ListAgents(&ctx, {}, &r).ok()) return false;
        int alive = 0;
        for (const auto& a : r.agents()) alive += a.alive();
        return alive >= n;
      },
      timeout);
}

v1::Job Cluster::GetJob(const std::string& id) {
  auto stub = Client();
  grpc::ClientContext ctx;
  AddAuth(&ctx);
  v1::GetJobRequest req;
  req.set_job_id(id);
  v1::Job job;
  stub->GetJob(&ctx, req, &job);
  return job;
}

bool Cluster::WaitState(const std::string& id, v1::JobState state,
                        std::chrono::milliseconds timeout) {
  return WaitFor([&] { return GetJob(id).state() == state; }, timeout);
}

std::vector<v1::JobEvent> Cluster::Events(const std::string& id, int64_t after_seq) {
  auto stub = Client();
  grpc::ClientContext ctx;
  AddAuth(&ctx);
  v1::WatchJobRequest req;
  req.set_job_id(id);
  req.set_after_seq(after_seq);
  auto reader = stub->WatchJob(&ctx, req);
  std::vector<v1::JobEvent> out;
  v1::WatchJobResponse r;
  while (reader->Read(&r))
    for (const auto& e : r.events()) out.push_back(e);
  reader->Finish();
  return out;
}

grpc::Status Cluster::Cancel(const std::string& id) {
  auto stub = Client();
  grpc::ClientContext ctx;
  AddAuth(&ctx);
  v1::CancelJobRequest req;
  req.set_job_id(id);
  v1::Job resp;
  return stub->CancelJob(&ctx, req, &resp);
}

std::vector<v1::Checkpoint> Cluster::Checkpoints(const std::string& id) {
  auto stub = Client();
  grpc::ClientContext ctx;
  AddAuth(&ctx);
  v1::ListCheckpointsRequest req;
  req.set_job_id(id);
  v1::ListCheckpointsResponse resp;
  grpc::Status st = stub->ListCheckpoints(&ctx, req, &resp);
  EXPECT_TRUE(st.ok()) << st.error_message();
  return {resp.checkpoints().begin(), resp.checkpoints().end()};
}

bool Cluster::WaitFor_Step(const std::string& id, int64_t step,
                           std::chrono::milliseconds timeout) {
  return WaitFor([&] { return GetJob(id).last_step() >= step; }, timeout);
}

v1::JobSpec Cluster::Spec(int ranks, int steps, int save_steps) {
  v1::JobSpec s;
  s.set_name("it");
  s.mutable_model()->set_model_name_or_path(dir_ + "/model");
  s.mutable_dataset()->add_data_files(dir_ + "/train.jsonl");
  s.mutable_resources()->set_num_ranks(ranks);
  s.mutable_training()->set_save_steps(save_steps);
  s.mutable_training()->set_max_steps(steps);
  (*s.mutable_labels())["test.steps"] = std::to_string(steps);
  (*s.mutable_labels())["test.step_ms"] = "40";
  s.set_output_dir(dir_ + "/out-" + std::to_string(FreePort()));
  return s;
}

v1::Job Cluster::Submit(const v1::JobSpec& spec) {
  auto stub = Client();
  grpc::ClientContext ctx;
  AddAuth(&ctx);
  v1::CreateJobRequest req;
  *req.mutable_spec() = spec;
  v1::Job job;
  auto st = stub->CreateJob(&ctx, req, &job);
  EXPECT_TRUE(st.ok()) << st.error_message();
  return job;
}

}  // namespace ftune::testing
