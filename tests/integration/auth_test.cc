// Identity and authorization on loopback, through real processes: a
// coordinator with users (alice, bob, the admin root) and per-agent tokens
// (host-a, host-b), the real agent for host-a, and hand-driven agent streams
// for the parties that misbehave.
//   * the auth matrix: every RPC (JobService, AgentService, health,
//     reflection) x {no credential, alice, bob, root, an agent's token}, each
//     cell's exact status code;
//   * an agent token registering another agent's id, and a second live
//     registration of one id, are refused;
//   * an agent cannot move a job placed on another agent (checkpoint, rank
//     exit, rendezvous);
//   * secure by default: what the coordinator, agent and CLI refuse off
//     loopback;
//   * /metrics behind HTTP basic auth (--metrics-auth), scraped over a
//     socket, and refused off loopback without it;
//   * SIGHUP reloads the credential files: revoked tokens refused, new ones
//     taken, an agent stream of a revoked token ended, a bad file ignored;
//     an open WatchJob of a removed user, or of a demoted admin on another's
//     job, ended while the others keep streaming.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <climits>
#include <csignal>
#include <fstream>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <grpcpp/generic/generic_stub.h>

#include "cluster.h"
#include "ftune/v1/agent_service.grpc.pb.h"
#include "grpc/reflection/v1alpha/reflection.grpc.pb.h"

namespace ftune::testing {
namespace {

using grpc::StatusCode;
using std::chrono::milliseconds;
using std::chrono::seconds;

constexpr char kAlice[] = "alice-token-0123456789abcdef";
constexpr char kBob[] = "bob-token-0123456789abcdef";
constexpr char kRoot[] = "root-token-0123456789abcdef";
constexpr char kAgentA[] = "host-a-agent-token-0123456789";
constexpr char kAgentB[] = "host-b-agent-token-0123456789";
constexpr char kPromPassword[] = "prom-password-0123456789";

// Credentials, in the order of the matrix's columns; "" sends none.
const std::vector<std::pair<std::string, std::string>> kCallers = {
    {"none", ""}, {"alice", kAlice}, {"bob", kBob}, {"root", kRoot}, {"agent", kAgentB}};

void UseTestCredentials(Cluster* c) {
  c->UseCredentials(std::string(kAlice) + " alice\n" + kBob + " bob\n" + kRoot + " root admin\n",
                    {{"host-a", kAgentA}, {"host-b", kAgentB}}, kRoot);
}

void Auth(grpc::ClientContext* ctx, const std::string& token) {
  if (!token.empty()) ctx->AddMetadata("authorization", "Bearer " + token);
}

v1::Job CreateAs(Cluster& c, const std::string& token, const v1::JobSpec& spec,
                 grpc::Status* status = nullptr) {
  auto stub = c.Client();
  grpc::ClientContext ctx;
  Auth(&ctx, token);
  v1::CreateJobRequest req;
  *req.mutable_spec() = spec;
  v1::Job job;
  grpc::Status st = stub->CreateJob(&ctx, req, &job);
  if (status) *status = st;
  else EXPECT_TRUE(st.ok()) << st.error_message();
  return job;
}

// Opens an agent stream with `token` and registers `agent_id`. OK once the
// coordinator answers Registered; else the stream's status.
struct AgentStream {
  grpc::ClientContext ctx;
  std::unique_ptr<v1::AgentService::Stub> stub;
  std::unique_ptr<grpc::ClientReaderWriter<v1::AgentToCoordinator, v1::CoordinatorToAgent>> rw;

  grpc::Status Open(Cluster& c, const std::string& token, const std::string& agent_id) {
    stub = v1::AgentService::NewStub(c.Channel());
    Auth(&ctx, token);
    rw = stub->Connect(&ctx);
    v1::AgentToCoordinator reg;
    reg.mutable_register_()->set_agent_id(agent_id);
    reg.mutable_register_()->set_host("intruder");
    auto* slot = reg.mutable_register_()->add_slots();
    slot->set_index(0);
    slot->set_name("CPU");
    slot->set_device_uuid("cpu-0");
    rw->Write(reg);
    v1::CoordinatorToAgent first;
    if (rw->Read(&first) && first.has_registered()) return grpc::Status::OK;
    rw->WritesDone();
    return rw->Finish();
  }
  // Reads until an Ack of at least seq.
  bool WaitAck(int64_t seq) {
    v1::CoordinatorToAgent msg;
    while (rw->Read(&msg))
      if (msg.has_ack() && msg.ack().agent_seq() >= seq) return true;
    return false;
  }
  void Close() {
    ctx.TryCancel();
    rw->Finish();
  }
};

grpc::Status Health(Cluster& c, const std::string& token) {
  grpc::GenericStub stub(c.Channel());
  grpc::CompletionQueue cq;
  grpc::ClientContext ctx;
  Auth(&ctx, token);
  grpc::Slice empty("");
  auto call =
      stub.PrepareUnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::ByteBuffer(&empty, 1), &cq);
  call->StartCall();
  grpc::ByteBuffer resp;
  grpc::Status st;
  call->Finish(&resp, &st, reinterpret_cast<void*>(1));
  void* tag;
  bool ok;
  cq.Next(&tag, &ok);
  return st;
}

grpc::Status Reflection(Cluster& c, const std::string& token) {
  auto stub = grpc::reflection::v1alpha::ServerReflection::NewStub(c.Channel());
  grpc::ClientContext ctx;
  Auth(&ctx, token);
  auto rw = stub->ServerReflectionInfo(&ctx);
  grpc::reflection::v1alpha::ServerReflectionRequest req;
  req.set_list_services("*");
  rw->Write(req);
  grpc::reflection::v1alpha::ServerReflectionResponse listing;
  const bool listed = rw->Read(&listing);
  // Then a service's file by symbol, as grpcurl asks for it.
  req.set_file_containing_symbol("ftune.v1.JobService");
  rw->Write(req);
  grpc::reflection::v1alpha::ServerReflectionResponse file;
  const bool described = rw->Read(&file);
  rw->WritesDone();
  grpc::Status st = rw->Finish();
  if (st.ok()) {
    EXPECT_TRUE(listed && described);
    std::string names;
    for (const auto& s : listing.list_services_response().service()) names += s.name() + " ";
    EXPECT_NE(names.find("ftune.v1.JobService"), std::string::npos) << names;
    // job_service.proto and the files it imports.
    EXPECT_GE(file.file_descriptor_response().file_descriptor_proto_size(), 2)
        << file.ShortDebugString().substr(0, 300);
  }
  return st;
}

std::string Code(const grpc::Status& st) {
  static const char* kNames[] = {"OK",
                                 "CANCELLED",
                                 "UNKNOWN",
                                 "INVALID_ARGUMENT",
                                 "DEADLINE_EXCEEDED",
                                 "NOT_FOUND",
                                 "ALREADY_EXISTS",
                                 "PERMISSION_DENIED",
                                 "RESOURCE_EXHAUSTED",
                                 "FAILED_PRECONDITION",
                                 "ABORTED",
                                 "OUT_OF_RANGE",
                                 "UNIMPLEMENTED",
                                 "INTERNAL",
                                 "UNAVAILABLE",
                                 "DATA_LOSS",
                                 "UNAUTHENTICATED"};
  const int c = st.error_code();
  return c >= 0 && c <= 16 ? kNames[c] : std::to_string(c);
}

TEST(Auth, MatrixOverEveryRpc) {
  Cluster c;
  UseTestCredentials(&c);
  c.StartCoordinator({"--max-user-priority=5"});
  c.StartAgent("host-a", 1);
  ASSERT_TRUE(c.WaitAgents(1));
  // alice's job runs on host-a; bob's waits behind it.
  const v1::Job alices = CreateAs(c, kAlice, c.Spec(1, 100000, 0));
  const v1::Job bobs = CreateAs(c, kBob, c.Spec(1, 5, 0));
  ASSERT_FALSE(alices.id().empty());
  EXPECT_EQ(alices.owner(), "alice");
  EXPECT_EQ(bobs.owner(), "bob");
  ASSERT_TRUE(c.WaitFor_Step(alices.id(), 1));
  auto stub = c.Client();
  // The admin cancels anyone's job (bob's, still queued).
  {
    grpc::ClientContext ctx;
    Auth(&ctx, kRoot);
    v1::CancelJobRequest req;
    req.set_job_id(bobs.id());
    v1::Job job;
    EXPECT_TRUE(stub->CancelJob(&ctx, req, &job).ok());
    EXPECT_EQ(job.state(), v1::CANCELLED);
  }

  using Call = std::function<grpc::Status(const std::string& token)>;
  const std::vector<std::pair<std::string, Call>> rpcs = {
      {"CreateJob",
       [&](const std::string& t) {
         grpc::Status st;
         CreateAs(c, t, c.Spec(1, 5, 0), &st);
         return st;
       }},
      {"CreateJob(priority 6 > cap 5)",
       [&](const std::string& t) {
         v1::JobSpec spec = c.Spec(1, 5, 0);
         spec.set_priority(6);
         grpc::Status st;
         CreateAs(c, t, spec, &st);
         return st;
       }},
      {"GetJob(alice's)",
       [&](const std::string& t) {
         grpc::ClientContext ctx;
         Auth(&ctx, t);
         v1::GetJobRequest req;
         req.set_job_id(alices.id());
         v1::Job job;
         return stub->GetJob(&ctx, req, &job);
       }},
      {"ListJobs",
       [&](const std::string& t) {
         grpc::ClientContext ctx;
         Auth(&ctx, t);
         v1::ListJobsResponse r;
         return stub->ListJobs(&ctx, {}, &r);
       }},
      {"ListJobs(owner alice)",
       [&](const std::string& t) {
         grpc::ClientContext ctx;
         Auth(&ctx, t);
         v1::ListJobsRequest req;
         req.set_owner("alice");
         v1::ListJobsResponse r;
         return stub->ListJobs(&ctx, req, &r);
       }},
      {"WatchJob(alice's)",
       [&](const std::string& t) {
         grpc::ClientContext ctx;
         Auth(&ctx, t);
         v1::WatchJobRequest req;
         req.set_job_id(alices.id());
         auto reader = stub->WatchJob(&ctx, req);
         v1::WatchJobResponse r;
         while (reader->Read(&r)) {
         }
         return reader->Finish();
       }},
      {"ListCheckpoints(alice's)",
       [&](const std::string& t) {
         grpc::ClientContext ctx;
         Auth(&ctx, t);
         v1::ListCheckpointsRequest req;
         req.set_job_id(alices.id());
         v1::ListCheckpointsResponse r;
         return stub->ListCheckpoints(&ctx, req, &r);
       }},
      {"CancelJob(alice's)",
       [&](const std::string& t) {
         grpc::ClientContext ctx;
         Auth(&ctx, t);
         v1::CancelJobRequest req;
         req.set_job_id(alices.id());
         v1::Job job;
         // Only refusals are tried on alice's running job: her own cancel
         // comes after the matrix, root's was tried on bob's job.
         if (t == kAlice || t == kRoot) return grpc::Status(StatusCode::OK, "skipped");
         return stub->CancelJob(&ctx, req, &job);
       }},
      {"ListAgents",
       [&](const std::string& t) {
         grpc::ClientContext ctx;
         Auth(&ctx, t);
         v1::ListAgentsResponse r;
         return stub->ListAgents(&ctx, {}, &r);
       }},
      {"AgentService.Connect(as host-b)",
       [&](const std::string& t) {
         AgentStream s;
         grpc::Status st = s.Open(c, t, "host-b");
         if (st.ok()) s.Close();
         return st;
       }},
      {"Health.Check", [&](const std::string& t) { return Health(c, t); }},
      {"ServerReflectionInfo", [&](const std::string& t) { return Reflection(c, t); }},
  };
  // Columns: none, alice, bob, root (admin), agent (host-b's token).
  const std::vector<std::vector<std::string>> want = {
      {"UNAUTHENTICATED", "OK", "OK", "OK", "PERMISSION_DENIED"},
      {"UNAUTHENTICATED", "PERMISSION_DENIED", "PERMISSION_DENIED", "OK", "PERMISSION_DENIED"},
      {"UNAUTHENTICATED", "OK", "NOT_FOUND", "OK", "PERMISSION_DENIED"},
      {"UNAUTHENTICATED", "OK", "OK", "OK", "PERMISSION_DENIED"},
      {"UNAUTHENTICATED", "OK", "PERMISSION_DENIED", "OK", "PERMISSION_DENIED"},
      {"UNAUTHENTICATED", "OK", "NOT_FOUND", "OK", "PERMISSION_DENIED"},
      {"UNAUTHENTICATED", "OK", "NOT_FOUND", "OK", "PERMISSION_DENIED"},
      {"UNAUTHENTICATED", "OK", "NOT_FOUND", "OK", "PERMISSION_DENIED"},
      {"UNAUTHENTICATED", "OK", "OK", "OK", "PERMISSION_DENIED"},
      {"UNAUTHENTICATED", "PERMISSION_DENIED", "PERMISSION_DENIED", "PERMISSION_DENIED", "OK"},
      {"OK", "OK", "OK", "OK", "OK"},
      {"UNAUTHENTICATED", "OK", "OK", "OK", "PERMISSION_DENIED"},
  };
  ASSERT_EQ(want.size(), rpcs.size());
  for (size_t r = 0; r < rpcs.size(); ++r)
    for (size_t k = 0; k < kCallers.size(); ++k) {
      const grpc::Status st = rpcs[r].second(kCallers[k].second);
      EXPECT_EQ(Code(st), want[r][k]) << rpcs[r].first << " by " << kCallers[k].first << ": "
                                      << st.error_message();
    }

  // What each user's listing holds.
  auto owners = [&](const std::string& t) {
    grpc::ClientContext ctx;
    Auth(&ctx, t);
    v1::ListJobsResponse r;
    EXPECT_TRUE(stub->ListJobs(&ctx, {}, &r).ok());
    std::set<std::string> out;
    for (const auto& j : r.jobs()) out.insert(j.owner());
    return out;
  };
  EXPECT_EQ(owners(kAlice), std::set<std::string>{"alice"});
  EXPECT_EQ(owners(kBob), std::set<std::string>{"bob"});
  EXPECT_EQ(owners(kRoot), (std::set<std::string>{"alice", "bob", "root"}));
  // Bob's refusal reads as for a job that does not exist.
  {
    grpc::ClientContext ctx;
    Auth(&ctx, kBob);
    v1::GetJobRequest req;
    req.set_job_id(alices.id());
    v1::Job job;
    EXPECT_EQ(stub->GetJob(&ctx, req, &job).error_message(),
              "job '" + alices.id() + "' not found");
  }
  // Nothing bob tried touched alice's job; she cancels it herself.
  EXPECT_EQ(c.GetJob(alices.id()).state(), v1::RUNNING);
  {
    grpc::ClientContext ctx;
    Auth(&ctx, kAlice);
    v1::CancelJobRequest req;
    req.set_job_id(alices.id());
    v1::Job job;
    ASSERT_TRUE(stub->CancelJob(&ctx, req, &job).ok());
  }
}

TEST(Auth, AnAgentTokenRegistersOnlyItsOwnIdAndOnlyOnce) {
  Cluster c;
  UseTestCredentials(&c);
  c.StartCoordinator();
  const int agent = c.StartAgent("host-a", 1);
  ASSERT_TRUE(c.WaitAgents(1));

  // An outsider holding host-b's token claims host-a: refused, named.
  AgentStream impostor;
  grpc::Status st = impostor.Open(c, kAgentB, "host-a");
  EXPECT_EQ(st.error_code(), StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(st.error_message(),
            "this credential is agent host-b's; it may not register as agent host-a");
  // host-a's own token, while host-a is connected: a second live
  // registration of one id is refused.
  AgentStream twin;
  st = twin.Open(c, kAgentA, "host-a");
  EXPECT_EQ(st.error_code(), StatusCode::ALREADY_EXISTS);
  EXPECT_NE(st.error_message().find("agent host-a is already connected (host host-a"),
            std::string::npos)
      << st.error_message();

  // The real host-a kept its link and slots.
  auto stub = c.Client();
  grpc::ClientContext ctx;
  c.AddAuth(&ctx);
  v1::ListAgentsResponse agents;
  ASSERT_TRUE(stub->ListAgents(&ctx, {}, &agents).ok());
  ASSERT_EQ(agents.agents_size(), 1);
  EXPECT_EQ(agents.agents(0).agent_id(), "host-a");
  EXPECT_EQ(agents.agents(0).host(), "host-a");
  const v1::Job job = c.Submit(c.Spec(1, 5, 0));
  EXPECT_TRUE(c.WaitState(job.id(), v1::SUCCEEDED)) << v1::JobState_Name(c.GetJob(job.id()).state());

  // The real agent started with another agent's token says why it is refused.
  c.StartAgent("host-c", 1, {"--token-file=" + c.dir() + "/agent-host-b.token",
                             "--agent-id=host-c"});
  EXPECT_TRUE(WaitFor(
      [&] {
        return ReadFile(c.agent(1).log_path()).find("rejected agent host-c (PERMISSION_DENIED") !=
               std::string::npos;
      },
      seconds(20)))
      << ReadFile(c.agent(1).log_path());
  (void)agent;
}

TEST(Auth, AnAgentCannotMoveAJobPlacedOnAnotherAgent) {
  Cluster c;
  UseTestCredentials(&c);
  c.StartCoordinator();
  c.StartAgent("host-a", 1);
  ASSERT_TRUE(c.WaitAgents(1));
  v1::JobSpec spec = c.Spec(1, 150, 5);
  spec.set_max_restarts(2);
  const v1::Job job = CreateAs(c, kAlice, spec);
  ASSERT_TRUE(c.WaitFor_Step(job.id(), 3));

  // host-b, with its own valid token, forges rank 0's checkpoint and exit
  // and a rendezvous for alice's job, which runs on host-a.
  AgentStream b;
  ASSERT_TRUE(b.Open(c, kAgentB, "host-b").ok());
  v1::AgentToCoordinator batch;
  auto add = [&](int64_t seq) {
    auto* e = batch.mutable_events()->add_events();
    e->set_agent_seq(seq);
    e->set_job_id(job.id());
    e->set_attempt(0);
    e->set_rank(0);
    return e;
  };
  auto* ckpt = add(1)->mutable_message()->mutable_checkpoint();
  ckpt->set_step(1000);
  ckpt->set_path("/forged/checkpoint-1000");
  ckpt->set_complete(true);
  add(2)->mutable_exit()->set_exit_code(1);
  ASSERT_TRUE(b.rw->Write(batch));
  v1::AgentToCoordinator rdzv;
  rdzv.mutable_rendezvous()->set_job_id(job.id());
  rdzv.mutable_rendezvous()->set_attempt(0);
  rdzv.mutable_rendezvous()->set_data("tcp://forged:1");
  ASSERT_TRUE(b.rw->Write(rdzv));
  EXPECT_TRUE(b.WaitAck(2));  // taken off its hands, and dropped

  const std::string metrics = Scrape(c.metrics_port());
  EXPECT_NE(metrics.find("ftune_events_dropped_total{reason=\"not_placed\"} 2"), std::string::npos)
      << metrics.substr(0, 4000);
  ASSERT_TRUE(WaitFor(
      [&] {
        return Scrape(c.metrics_port())
                   .find("ftune_events_dropped_total{reason=\"rendezvous_not_placed\"} 1") !=
               std::string::npos;
      },
      seconds(10)));
  b.Close();

  ASSERT_TRUE(c.WaitState(job.id(), v1::SUCCEEDED, seconds(60)))
      << v1::JobState_Name(c.GetJob(job.id()).state());
  const v1::Job done = c.GetJob(job.id());
  EXPECT_EQ(done.restarts(), 0);
  EXPECT_EQ(done.resume_checkpoint().find("/forged"), std::string::npos);
  for (const auto& e : c.Events(job.id()))
    EXPECT_EQ(e.ShortDebugString().find("forged"), std::string::npos) << e.ShortDebugString();
}

// Secure by default, for each process.
TEST(Auth, NothingServesOrSendsCredentialsOffLoopbackUnprotected) {
  Cluster c;
  const std::string dir = c.dir();
  auto run = [&](std::vector<std::string> argv, const std::string& log) {
    Process p(std::move(argv), dir + "/" + log);
    const int code = p.Wait(seconds(20));
    if (code == INT_MIN) p.Signal(SIGKILL);
    return std::make_pair(code, ReadFile(dir + "/" + log));
  };
  const std::string port = std::to_string(FreePort());
  const std::string metrics = "--metrics-listen=127.0.0.1:" + std::to_string(FreePort());

  // A coordinator on every interface without credentials and TLS: refused,
  // every missing piece named.
  auto [code, log] = run({FTUNE_COORDINATOR_BIN, "--state-dir=" + dir + "/s1",
                          "--listen=0.0.0.0:" + port, metrics},
                         "open.log");
  EXPECT_EQ(code, 2) << log;
  for (const char* missing : {"refusing to listen on 0.0.0.0:" , "user credentials (--user-tokens",
                              "agent credentials (--agent-tokens", "TLS (--tls-cert"})
    EXPECT_NE(log.find(missing), std::string::npos) << missing << "\n" << log;
  // The shared agent token is not enough either.
  std::tie(code, log) =
      run({FTUNE_COORDINATOR_BIN, "--state-dir=" + dir + "/s1", "--listen=0.0.0.0:" + port,
           metrics, "--agent-token-file=" + dir + "/agent.token"},
          "shared.log");
  EXPECT_EQ(code, 2) << log;
  EXPECT_NE(log.find("the shared --agent-token-file lets any holder register as any agent"),
            std::string::npos)
      << log;

  // One token for clients and agents: refused, on loopback too.
  std::tie(code, log) =
      run({FTUNE_COORDINATOR_BIN, "--state-dir=" + dir + "/s2", "--listen=127.0.0.1:" + port,
           metrics, "--client-token-file=" + dir + "/client.token",
           "--agent-token-file=" + dir + "/client.token"},
          "same.log");
  EXPECT_EQ(code, 2) << log;
  EXPECT_NE(log.find("one token is configured for both user admin and the shared agent token"),
            std::string::npos)
      << log;

  // --insecure serves, and says so loudly.
  {
    Process p({FTUNE_COORDINATOR_BIN, "--state-dir=" + dir + "/s3", "--listen=0.0.0.0:" + port,
               metrics, "--insecure"},
              dir + "/insecure.log");
    EXPECT_TRUE(WaitFor(
        [&] { return ReadFile(dir + "/insecure.log").find("serving on") != std::string::npos; },
        seconds(20)))
        << ReadFile(dir + "/insecure.log");
    const std::string said = ReadFile(dir + "/insecure.log");
    EXPECT_NE(said.find("WARNING: --insecure: serving 0.0.0.0:" + port +
                        " without user credentials"),
              std::string::npos)
        << said;
    p.Signal(SIGTERM);
    p.Wait(seconds(10));
  }

  // The agent does not send its token in plaintext off this host.
  std::tie(code, log) = run({FTUNE_AGENT_BIN, "--coordinator=10.1.2.3:7450",
                             "--token-file=" + dir + "/agent.token", "--work-dir=" + dir + "/ag",
                             "--cpu-slots=1"},
                            "agent.log");
  EXPECT_EQ(code, 1) << log;
  EXPECT_NE(log.find("refusing to send the agent token in plaintext to 10.1.2.3:7450"),
            std::string::npos)
      << log;
}

// /metrics with --metrics-auth: only a configured user with its password
// reads a metric; everything else is 401 with a basic auth challenge.
TEST(Auth, MetricsNeedAConfiguredUserAndPassword) {
  Cluster c;
  UseTestCredentials(&c);
  const std::string file = c.dir() + "/metrics.auth";
  std::ofstream(file) << "# Prometheus\nprom:" << kPromPassword << "\n";
  c.StartCoordinator({"--metrics-auth=" + file});
  const int port = c.metrics_port();

  const std::vector<std::pair<std::string, std::string>> refused = {
      {"no credentials", ""},
      {"a wrong password", Basic("prom", "wrong-password-0123456789")},
      {"a prefix of the password", Basic("prom", std::string(kPromPassword).substr(0, 20))},
      {"an unknown user", Basic("grafana", kPromPassword)},
      {"an empty password", Basic("prom", "")},
      {"a user token", "Bearer " + std::string(kRoot)},
      {"a malformed basic value", "Basic %%%not-base64%%%"},
  };
  for (const auto& [what, authorization] : refused) {
    const std::string r = Scrape(port, authorization);
    EXPECT_EQ(StatusLine(r), "HTTP/1.1 401 Unauthorized") << what << "\n" << r;
    EXPECT_NE(r.find("WWW-Authenticate: Basic realm=\"ftune-coordinator\""), std::string::npos)
        << what << "\n" << r;
    EXPECT_EQ(r.find("ftune_"), std::string::npos) << what << "\n" << r;
  }
  const std::string r = Scrape(port, Basic("prom", kPromPassword));
  EXPECT_EQ(StatusLine(r), "HTTP/1.1 200 OK") << r;
  EXPECT_NE(r.find("ftune_build_info{version=\""), std::string::npos) << r;
  EXPECT_NE(r.find("ftune_store_errors_total 0"), std::string::npos) << r;
  EXPECT_NE(ReadFile(c.coordinator().log_path()).find(" with basic auth, state "),
            std::string::npos)
      << ReadFile(c.coordinator().log_path());
}

// /metrics reachable from other hosts needs --metrics-auth and TLS (or
// --insecure); on loopback it needs nothing (every other test). Over TLS:
// metrics_tls_integration_test.
TEST(Auth, MetricsOffLoopbackNeedAuth) {
  Cluster c;
  const std::string dir = c.dir();
  const std::string listen = "--listen=127.0.0.1:" + std::to_string(FreePort());
  const std::string mport = std::to_string(FreePort());
  const std::string open_metrics = "--metrics-listen=0.0.0.0:" + mport;
  auto run = [&](std::vector<std::string> argv, const std::string& log) {
    Process p(std::move(argv), dir + "/" + log);
    const int code = p.Wait(seconds(20));
    if (code == INT_MIN) p.Signal(SIGKILL);
    return std::make_pair(code, ReadFile(dir + "/" + log));
  };
  auto [code, log] =
      run({FTUNE_COORDINATOR_BIN, "--state-dir=" + dir + "/s1", listen, open_metrics}, "open.log");
  EXPECT_EQ(code, 2) << log;
  EXPECT_NE(log.find("refusing to serve /metrics on 0.0.0.0:" + mport +
                     ", which other hosts can reach, without:\n  - scrape credentials "
                     "(--metrics-auth FILE"),
            std::string::npos)
      << log;
  EXPECT_NE(log.find("\n  - TLS (--metrics-tls-cert FILE and --metrics-tls-key FILE"),
            std::string::npos)
      << log;

  // A file that does not parse: refused, naming the file and line.
  std::ofstream(dir + "/bad.auth") << "prom:" << kPromPassword << "\nops:short\n";
  std::tie(code, log) = run({FTUNE_COORDINATOR_BIN, "--state-dir=" + dir + "/s1", listen,
                             open_metrics, "--metrics-auth=" + dir + "/bad.auth"},
                            "bad.log");
  EXPECT_EQ(code, 2) << log;
  EXPECT_NE(log.find(dir + "/bad.auth:2: the password of metrics user ops has 5 characters"),
            std::string::npos)
      << log;

  auto serve = [&](std::vector<std::string> argv, const std::string& log) {
    auto p = std::make_unique<Process>(std::move(argv), dir + "/" + log);
    EXPECT_TRUE(WaitFor(
        [&] { return ReadFile(dir + "/" + log).find("serving on") != std::string::npos; },
        seconds(20)))
        << ReadFile(dir + "/" + log);
    return p;
  };
  // --insecure serves it open, and says so.
  {
    auto p = serve({FTUNE_COORDINATOR_BIN, "--state-dir=" + dir + "/s2", listen, open_metrics,
                    "--insecure"},
                   "insecure.log");
    EXPECT_NE(ReadFile(dir + "/insecure.log")
                  .find("WARNING: --insecure: serving /metrics on 0.0.0.0:" + mport +
                        " without --metrics-auth"),
              std::string::npos)
        << ReadFile(dir + "/insecure.log");
    EXPECT_EQ(StatusLine(Scrape(std::stoi(mport))), "HTTP/1.1 200 OK");
    p->Signal(SIGTERM);
    p->Wait(seconds(10));
  }
  // With --metrics-auth it serves on every interface, behind the password
  // (in plaintext only with --insecure: without TLS the password crosses
  // the network in clear).
  std::ofstream(dir + "/metrics.auth") << "prom:" << kPromPassword << "\n";
  {
    auto p = serve({FTUNE_COORDINATOR_BIN, "--state-dir=" + dir + "/s3", listen, open_metrics,
                    "--metrics-auth=" + dir + "/metrics.auth", "--insecure"},
                   "auth.log");
    EXPECT_NE(ReadFile(dir + "/auth.log").find("(metrics 0.0.0.0:" + mport + " with basic auth"),
              std::string::npos)
        << ReadFile(dir + "/auth.log");
    EXPECT_EQ(StatusLine(Scrape(std::stoi(mport))), "HTTP/1.1 401 Unauthorized");
    EXPECT_EQ(StatusLine(Scrape(std::stoi(mport), Basic("prom", kPromPassword))),
              "HTTP/1.1 200 OK");
    p->Signal(SIGTERM);
    p->Wait(seconds(10));
  }
}

grpc::Status ListJobsAs(Cluster& c, const std::string& token) {
  auto stub = c.Client();
  grpc::ClientContext ctx;
  Auth(&ctx, token);
  v1::ListJobsResponse r;
  return stub->ListJobs(&ctx, {}, &r);
}

// SIGHUP re-reads --user-tokens, --agent-tokens and --metrics-auth: the next
// call with a removed token is refused, a new one works, the open stream of
// an agent whose token changed is ended; a file that does not parse changes
// nothing.
TEST(Auth, SighupReloadsTheCredentialFiles) {
  constexpr char kCarol[] = "carol-token-0123456789abcdef";
  constexpr char kAgentB2[] = "host-b-new-agent-token-01234";
  constexpr char kNewPromPassword[] = "prom-new-password-0123456789";
  Cluster c;
  UseTestCredentials(&c);
  const std::string metrics_file = c.dir() + "/metrics.auth";
  std::ofstream(metrics_file) << "prom:" << kPromPassword << "\n";
  c.StartCoordinator({"--metrics-auth=" + metrics_file});
  c.StartAgent("host-a", 1);
  ASSERT_TRUE(c.WaitAgents(1));
  AgentStream b;
  b.ctx.set_deadline(std::chrono::system_clock::now() + seconds(20));
  ASSERT_TRUE(b.Open(c, kAgentB, "host-b").ok());
  // host-b heartbeats, so nothing but the reload ends its stream (the
  // coordinator would end a silent one after --agent-timeout).
  std::atomic<bool> stop_heartbeats{false};
  std::thread heartbeats([&] {
    v1::AgentToCoordinator beat;
    beat.mutable_heartbeat();
    while (!stop_heartbeats && b.rw->Write(beat)) std::this_thread::sleep_for(milliseconds(200));
  });
  struct Join {
    std::atomic<bool>& stop;
    std::thread& thread;
    ~Join() {
      stop = true;
      if (thread.joinable()) thread.join();
    }
  } join_heartbeats{stop_heartbeats, heartbeats};
  ASSERT_TRUE(ListJobsAs(c, kAlice).ok());
  ASSERT_EQ(ListJobsAs(c, kCarol).error_code(), StatusCode::UNAUTHENTICATED);

  // alice removed, carol added; host-b gets a new token; prom a new password.
  auto rewrite = [](const std::string& path, const std::string& text) {
    std::ofstream(path, std::ios::trunc) << text;
  };
  rewrite(c.dir() + "/users.tokens",
          std::string(kBob) + " bob\n" + kRoot + " root admin\n" + kCarol + " carol\n");
  rewrite(c.dir() + "/agents.tokens",
          std::string("host-a ") + kAgentA + "\nhost-b " + kAgentB2 + "\n");
  rewrite(metrics_file, std::string("prom:") + kNewPromPassword + "\n");
  const std::string log = c.coordinator().log_path();
  c.coordinator().Signal(SIGHUP);
  ASSERT_TRUE(WaitFor(
      [&] { return ReadFile(log).find("SIGHUP: credentials reloaded") != std::string::npos; },
      seconds(10)))
      << ReadFile(log);
  EXPECT_NE(ReadFile(log).find("credentials reloaded (3 user tokens, 2 agent tokens, 1 metrics "
                               "users); streams ended for a revoked token: agent host-b\n"),
            std::string::npos)
      << ReadFile(log);

  const grpc::Status alice = ListJobsAs(c, kAlice);
  EXPECT_EQ(alice.error_code(), StatusCode::UNAUTHENTICATED) << alice.error_message();
  EXPECT_EQ(alice.error_message(), "invalid user token");
  EXPECT_TRUE(ListJobsAs(c, kCarol).ok());
  EXPECT_TRUE(ListJobsAs(c, kBob).ok());
  // host-b's stream, opened with its old token, was ended by the coordinator.
  v1::CoordinatorToAgent msg;
  while (b.rw->Read(&msg)) {
  }
  stop_heartbeats = true;
  heartbeats.join();
  EXPECT_EQ(b.rw->Finish().error_code(), StatusCode::CANCELLED);
  AgentStream old_b;
  EXPECT_EQ(old_b.Open(c, kAgentB, "host-b").error_code(), StatusCode::UNAUTHENTICATED);
  AgentStream new_b;
  EXPECT_TRUE(new_b.Open(c, kAgentB2, "host-b").ok());
  new_b.Close();
  // host-a's token did not change: its agent kept its stream and runs carol's job.
  const v1::Job job = CreateAs(c, kCarol, c.Spec(1, 5, 0));
  EXPECT_EQ(job.owner(), "carol");
  EXPECT_TRUE(c.WaitState(job.id(), v1::SUCCEEDED)) << v1::JobState_Name(c.GetJob(job.id()).state());
  EXPECT_EQ(ReadFile(c.agent(0).log_path()).find("rejected agent"), std::string::npos)
      << ReadFile(c.agent(0).log_path());
  // The scrape password changed with the file.
  EXPECT_EQ(StatusLine(Scrape(c.metrics_port(), Basic("prom", kPromPassword))),
            "HTTP/1.1 401 Unauthorized");
  EXPECT_EQ(StatusLine(Scrape(c.metrics_port(), Basic("prom", kNewPromPassword))),
            "HTTP/1.1 200 OK");

  // A line that does not parse: the error names the file and line, and the
  // credentials in force stay as they were.
  rewrite(c.dir() + "/users.tokens", std::string(kRoot) + " root admin\nshort dave\n");
  c.coordinator().Signal(SIGHUP);
  ASSERT_TRUE(WaitFor(
      [&] { return ReadFile(log).find("credentials not reloaded") != std::string::npos; },
      seconds(10)))
      << ReadFile(log);
  EXPECT_NE(ReadFile(log).find("SIGHUP: credentials not reloaded, the previous ones stay in "
                               "force: " +
                               c.dir() + "/users.tokens:2: the token of user dave has 5 characters"),
            std::string::npos)
      << ReadFile(log);
  EXPECT_TRUE(ListJobsAs(c, kCarol).ok());
  EXPECT_TRUE(ListJobsAs(c, kBob).ok());
  EXPECT_EQ(ListJobsAs(c, kAlice).error_code(), StatusCode::UNAUTHENTICATED);
  EXPECT_TRUE(c.coordinator().Running());
}

// A follow WatchJob on its own thread: the stored events come first, then
// the stream blocks until the job moves or the coordinator ends it.
class Watcher {
 public:
  Watcher(Cluster& c, const std::string& token, const std::string& job_id)
      : stub_(c.Client()) {
    Auth(&ctx_, token);
    // Bounds a stream the coordinator never ends (the bug this guards).
    ctx_.set_deadline(std::chrono::system_clock::now() + seconds(120));
    v1::WatchJobRequest req;
    req.set_job_id(job_id);
    req.set_follow(true);
    reader_ = stub_->WatchJob(&ctx_, req);
    done_ = std::async(std::launch::async, [this] {
      v1::WatchJobResponse r;
      while (reader_->Read(&r)) {
        std::lock_guard<std::mutex> lock(mu_);
        for (const auto& e : r.events()) events_.push_back(e);
      }
      return reader_->Finish();
    });
  }
  ~Watcher() {
    ctx_.TryCancel();
    if (done_.valid()) done_.wait();
  }
  // Whether the watcher has received an event satisfying `pred`.
  bool Seen(const std::function<bool(const v1::JobEvent&)>& pred) {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& e : events_)
      if (pred(e)) return true;
    return false;
  }
  bool SeenState(v1::JobState to) {
    return Seen([&](const v1::JobEvent& e) {
      return e.has_state_change() && e.state_change().to() == to;
    });
  }
  // The stream's status once it ends within `timeout`; nullopt while open.
  std::optional<grpc::Status> Ended(std::chrono::milliseconds timeout) {
    if (done_.wait_for(timeout) != std::future_status::ready) return std::nullopt;
    return done_.get();  // once: valid() is false after
  }
  bool Open() {
    return done_.valid() && done_.wait_for(milliseconds(0)) != std::future_status::ready;
  }

 private:
  std::unique_ptr<v1::JobService::Stub> stub_;
  grpc::ClientContext ctx_;
  std::unique_ptr<grpc::ClientReader<v1::WatchJobResponse>> reader_;
  std::mutex mu_;
  std::vector<v1::JobEvent> events_;
  std::future<grpc::Status> done_;
};

grpc::Status CancelAs(Cluster& c, const std::string& token, const std::string& id) {
  auto stub = c.Client();
  grpc::ClientContext ctx;
  Auth(&ctx, token);
  v1::CancelJobRequest req;
  req.set_job_id(id);
  v1::Job resp;
  return stub->CancelJob(&ctx, req, &resp);
}

// A reload ends the open WatchJob streams its new credentials no longer
// allow: alice's (her token removed) and root's of bob's job (root is no
// longer an admin), each UNAUTHENTICATED. bob's watch of his job and root's
// of root's own stay open and receive the job's next event. The one agent's
// one slot runs a long job, so the watched jobs stay queued: only the
// reload or a cancel moves their streams.
TEST(Auth, SighupEndsTheWatchesOfARevokedCredential) {
  Cluster c;
  UseTestCredentials(&c);
  c.StartCoordinator();
  c.StartAgent("host-a", 1);
  ASSERT_TRUE(c.WaitAgents(1));
  const v1::Job blocker = CreateAs(c, kRoot, c.Spec(1, 1000000, 0));
  const v1::Job alices = CreateAs(c, kAlice, c.Spec(1, 5, 0));
  const v1::Job bobs = CreateAs(c, kBob, c.Spec(1, 5, 0));
  const v1::Job roots = CreateAs(c, kRoot, c.Spec(1, 5, 0));
  Watcher alice(c, kAlice, alices.id());
  Watcher bob(c, kBob, bobs.id());
  Watcher root_of_bobs(c, kRoot, bobs.id());
  Watcher root_of_roots(c, kRoot, roots.id());
  // Each stream is open on the coordinator once its stored "submitted"
  // event arrived.
  for (Watcher* w : {&alice, &bob, &root_of_bobs, &root_of_roots})
    ASSERT_TRUE(WaitFor([&] { return w->SeenState(v1::QUEUED); }, seconds(30)));

  // alice removed; root no longer an admin; bob as he was.
  std::ofstream(c.dir() + "/users.tokens", std::ios::trunc)
      << kBob << " bob\n" << kRoot << " root\n";
  const std::string log = c.coordinator().log_path();
  c.coordinator().Signal(SIGHUP);
  ASSERT_TRUE(WaitFor(
      [&] { return ReadFile(log).find("SIGHUP: credentials reloaded") != std::string::npos; },
      seconds(30)))
      << ReadFile(log);

  const std::optional<grpc::Status> a = alice.Ended(seconds(30));
  ASSERT_TRUE(a.has_value()) << "alice's watch still open after the reload";
  EXPECT_EQ(a->error_code(), StatusCode::UNAUTHENTICATED) << a->error_message();
  EXPECT_EQ(a->error_message(), "the credential this watch of job " + alices.id() +
                                    " was opened with was revoked: it is no longer a user's");
  const std::optional<grpc::Status> r = root_of_bobs.Ended(seconds(30));
  ASSERT_TRUE(r.has_value()) << "the demoted root's watch of bob's job still open";
  EXPECT_EQ(r->error_code(), StatusCode::UNAUTHENTICATED) << r->error_message();
  EXPECT_EQ(r->error_message(), "the credential this watch of job " + bobs.id() +
                                    " was opened with was revoked: user root is no longer an "
                                    "admin, and the job is bob's");
  EXPECT_NE(ReadFile(log).find("watch of job " + alices.id() + " by alice"), std::string::npos)
      << ReadFile(log);
  EXPECT_NE(ReadFile(log).find("watch of job " + bobs.id() + " by root"), std::string::npos)
      << ReadFile(log);
  EXPECT_EQ(ReadFile(log).find("watch of job " + bobs.id() + " by bob"), std::string::npos)
      << ReadFile(log);

  // The others were left alone: each gets its job's next event, the cancel,
  // on the stream it had, which then ends as a finished watch does.
  EXPECT_TRUE(bob.Open());
  EXPECT_TRUE(root_of_roots.Open());
  ASSERT_TRUE(CancelAs(c, kBob, bobs.id()).ok());
  ASSERT_TRUE(CancelAs(c, kRoot, roots.id()).ok());
  for (Watcher* w : {&bob, &root_of_roots}) {
    EXPECT_TRUE(WaitFor([&] { return w->SeenState(v1::CANCELLED); }, seconds(30)));
    const std::optional<grpc::Status> st = w->Ended(seconds(30));
    ASSERT_TRUE(st.has_value());
    EXPECT_TRUE(st->ok()) << Code(*st) << ": " << st->error_message();
  }
  EXPECT_TRUE(c.coordinator().Running());
  EXPECT_TRUE(CancelAs(c, kRoot, blocker.id()).ok());
}

}  // namespace
}  // namespace ftune::testing
