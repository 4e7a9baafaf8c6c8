// JobClient: the CLI's one connection to the coordinator's JobService.
//
// Wraps the generated stub so commands see absl::Status instead of
// grpc::Status (the gRPC-to-abseil translation happens here and nowhere
// else), attaches the bearer token to every call, bounds every unary call
// with a deadline so a wedged coordinator cannot hang a script, and creates
// TLS channels when a CA bundle is given.
//
// The token travels as plain `authorization` metadata rather than as gRPC
// call credentials because call credentials are refused on insecure
// channels, and a loopback coordinator without TLS but with a token is the
// common development setup.
//
// Thread-safety: JobClient is thread-compatible; the underlying channel is
// thread-safe, so separate JobClients may share nothing and run in parallel.
#ifndef FTUNE_CLI_CLIENT_H_
#define FTUNE_CLI_CLIENT_H_

#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "ftune/v1/job_service.grpc.pb.h"

namespace ftune::cli {

struct ConnectionOptions {
  // host:port of ftune-coordinator.
  std::string coordinator = "127.0.0.1:7450";
  // Bearer token; empty sends no authorization metadata.
  std::string token;
  // PEM CA bundle; non-empty switches the channel to TLS.
  std::string tls_ca_pem;
  // Deadline of every unary call.
  std::chrono::milliseconds rpc_timeout{30000};
};

class JobClient {
 public:
  explicit JobClient(ConnectionOptions options);

  const ConnectionOptions& options() const { return options_; }

  absl::StatusOr<v1::Job> CreateJob(const v1::CreateJobRequest& request);
  absl::StatusOr<v1::Job> GetJob(const std::string& job_id);
  absl::StatusOr<v1::ListJobsResponse> ListJobs(const v1::ListJobsRequest& request);
  absl::StatusOr<v1::Job> CancelJob(const std::string& job_id);
  absl::StatusOr<v1::ListCheckpointsResponse> ListCheckpoints(const std::string& job_id);
  absl::StatusOr<v1::ListAgentsResponse> ListAgents();

  // Streams events to `on_event` until the server ends the stream; returns
  // the stream's final status. No deadline: a followed job may run for days.
  absl::Status WatchJob(const v1::WatchJobRequest& request,
                        const std::function<void(const v1::JobEvent&)>& on_event);

 private:
  void Prepare(grpc::ClientContext* context, bool unary) const;

  ConnectionOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::JobService::Stub> stub_;
};

// grpc::Status -> absl::Status; the canonical codes share their numbers.
absl::Status FromGrpcStatus(const grpc::Status& status);

// Whether a call that failed this way may succeed when simply tried again
// (the coordinator restarting, a dropped connection).
bool IsTransient(const absl::Status& status);

// The one line the CLI prints for a failed call, without the "ftune: " prefix:
//   "cannot list jobs: <message>"
// An unreachable coordinator, a missing token and a timeout get a line that
// says what to do about them instead of only what gRPC saw.
std::string DescribeRpcError(const std::string& what, const ConnectionOptions& options,
                             const absl::Status& status);

}  // namespace ftune::cli

#endif  // FTUNE_CLI_CLIENT_H_
