// An in-process JobService for driving the real `ftune` binary in tests.
//
// It serves canned jobs, events, checkpoints and agents, records every
// request it receives, and can misbehave on purpose: fail the first CreateJob
// calls with UNAVAILABLE, drop the first WatchJob stream part-way, replay
// already-sent events on resume, and insist on a bearer token. A followed
// stream that runs to its end moves the job to the state queued for it in
// `finish_on_watch_end`, which is how a real coordinator ends a job's watch.
//
// Thread-safety: handlers run on gRPC threads; every field is guarded by mu.
// Tests configure it before starting the server (or under mu) and read the
// recorded requests after the ftune process has exited.
#ifndef FTUNE_TESTS_CLI_FAKE_JOB_SERVICE_H_
#define FTUNE_TESTS_CLI_FAKE_JOB_SERVICE_H_

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "ftune/v1/job_service.grpc.pb.h"

namespace ftune::testing {

class FakeJobService final : public v1::JobService::Service {
 public:
  // --- configuration
  std::mutex mu;
  // Non-empty: every call must carry "authorization: Bearer <token>".
  std::string required_token;
  // The first this-many CreateJob calls fail with UNAVAILABLE.
  int fail_create_calls = 0;
  // >= 0: the first WatchJob stream ends with UNAVAILABLE after this many events.
  int drop_first_watch_after = -1;
  // On every WatchJob after the first, start from seq 1 whatever after_seq
  // says, as a confused server might: the client must not show events twice.
  bool replay_from_start_on_resume = false;
  // The most jobs one ListJobs page holds, whatever page_size asks.
  int max_page_size = 1000;
  std::map<std::string, v1::Job> jobs;
  std::map<std::string, std::vector<v1::JobEvent>> events;
  std::map<std::string, std::pair<v1::JobState, std::string>> finish_on_watch_end;
  std::map<std::string, std::vector<v1::Checkpoint>> checkpoints;
  std::vector<v1::Agent> agents;

  // --- recorded
  int num_calls = 0;
  std::vector<std::string> authorization;  // one per call, "" when absent
  std::vector<v1::CreateJobRequest> create_requests;
  std::vector<v1::ListJobsRequest> list_requests;
  std::vector<v1::WatchJobRequest> watch_requests;
  std::vector<std::string> cancel_requests;

  grpc::Status CreateJob(grpc::ServerContext* context, const v1::CreateJobRequest* request,
                         v1::Job* response) override;
  grpc::Status GetJob(grpc::ServerContext* context, const v1::GetJobRequest* request,
                      v1::Job* response) override;
  grpc::Status ListJobs(grpc::ServerContext* context, const v1::ListJobsRequest* request,
                        v1::ListJobsResponse* response) override;
  grpc::Status CancelJob(grpc::ServerContext* context, const v1::CancelJobRequest* request,
                         v1::Job* response) override;
  grpc::Status WatchJob(grpc::ServerContext* context, const v1::WatchJobRequest* request,
                        grpc::ServerWriter<v1::WatchJobResponse>* writer) override;
  grpc::Status ListCheckpoints(grpc::ServerContext* context,
                               const v1::ListCheckpointsRequest* request,
                               v1::ListCheckpointsResponse* response) override;
  grpc::Status ListAgents(grpc::ServerContext* context, const v1::ListAgentsRequest* request,
                          v1::ListAgentsResponse* response) override;

 private:
  // Records the call and checks the token; call with mu held.
  grpc::Status Admit(grpc::ServerContext* context);
};

// The fake served on 127.0.0.1 at a port the kernel picks.
class FakeCoordinator {
 public:
  // Plaintext unless credentials are given (TLS tests pass SslServerCredentials).
  explicit FakeCoordinator(
      std::shared_ptr<grpc::ServerCredentials> credentials = grpc::InsecureServerCredentials());
  ~FakeCoordinator();

  FakeJobService& service() { return service_; }
  // "127.0.0.1:<port>"
  const std::string& address() const { return address_; }

 private:
  FakeJobService service_;
  std::unique_ptr<grpc::Server> server_;
  std::string address_;
};

}  // namespace ftune::testing

#endif  // FTUNE_TESTS_CLI_FAKE_JOB_SERVICE_H_
