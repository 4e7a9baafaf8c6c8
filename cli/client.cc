// See client.h.
#include "cli/client.h"

#include <utility>

namespace ftune::cli {

JobClient::JobClient(ConnectionOptions options) : options_(std::move(options)) {
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  if (options_.tls_ca_pem.empty()) {
    credentials = grpc::InsecureChannelCredentials();
  } else {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = options_.tls_ca_pem;
    credentials = grpc::SslCredentials(ssl);
  }
  grpc::ChannelArguments args;
  // `watch` reconnects itself after a coordinator restart; gRPC's default
  // reconnect backoff (up to two minutes) would leave the channel refusing
  // calls long after the coordinator is back.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 200);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 200);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 2000);
  channel_ = grpc::CreateCustomChannel(options_.coordinator, credentials, args);
  stub_ = v1::JobService::NewStub(channel_);
}

void JobClient::Prepare(grpc::ClientContext* context, bool unary) const {
  if (!options_.token.empty()) context->AddMetadata("authorization", "Bearer " + options_.token);
  if (unary) context->set_deadline(std::chrono::system_clock::now() + options_.rpc_timeout);
}

absl::StatusOr<v1::Job> JobClient::CreateJob(const v1::CreateJobRequest& request) {
  grpc::ClientContext context;
  Prepare(&context, true);
  v1::Job job;
  grpc::Status status = stub_->CreateJob(&context, request, &job);
  if (!status.ok()) return FromGrpcStatus(status);
  return job;
}

absl::StatusOr<v1::Job> JobClient::GetJob(const std::string& job_id) {
  grpc::ClientContext context;
  Prepare(&context, true);
  v1::GetJobRequest request;
  request.set_job_id(job_id);
  v1::Job job;
  grpc::Status status = stub_->GetJob(&context, request, &job);
  if (!status.ok()) return FromGrpcStatus(status);
  return job;
}

absl::StatusOr<v1::ListJobsResponse> JobClient::ListJobs(const v1::ListJobsRequest& request) {
  grpc::ClientContext context;
  Prepare(&context, true);
  v1::ListJobsResponse response;
  grpc::Status status = stub_->ListJobs(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

absl::StatusOr<v1::Job> JobClient::CancelJob(const std::string& job_id) {
  grpc::ClientContext context;
  Prepare(&context, true);
  v1::CancelJobRequest request;
  request.set_job_id(job_id);
  v1::Job job;
  grpc::Status status = stub_->CancelJob(&context, request, &job);
  if (!status.ok()) return FromGrpcStatus(status);
  return job;
}

absl::StatusOr<v1::ListCheckpointsResponse> JobClient::ListCheckpoints(
    const std::string& job_id) {
  grpc::ClientContext context;
  Prepare(&context, true);
  v1::ListCheckpointsRequest request;
  request.set_job_id(job_id);
  v1::ListCheckpointsResponse response;
  grpc::Status status = stub_->ListCheckpoints(&context, request, &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

absl::StatusOr<v1::ListAgentsResponse> JobClient::ListAgents() {
  grpc::ClientContext context;
  Prepare(&context, true);
  v1::ListAgentsResponse response;
  grpc::Status status = stub_->ListAgents(&context, v1::ListAgentsRequest(), &response);
  if (!status.ok()) return FromGrpcStatus(status);
  return response;
}

absl::Status JobClient::WatchJob(const v1::WatchJobRequest& request,
                                 const std::function<void(const v1::JobEvent&)>& on_event) {
  grpc::ClientContext context;
  Prepare(&context, false);
  std::unique_ptr<grpc::ClientReader<v1::WatchJobResponse>> reader =
      stub_->WatchJob(&context, request);
  v1::WatchJobResponse response;
  while (reader->Read(&response))
    for (const v1::JobEvent& event : response.events()) on_event(event);
  return FromGrpcStatus(reader->Finish());
}

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                      status.error_message());
}

bool IsTransient(const absl::Status& status) {
  // UNAVAILABLE: no connection or the server went away. ABORTED: the server
  // gave up mid-stream (e.g. shutting down). Not DEADLINE_EXCEEDED: a unary
  // call that timed out after 30s is reported, not silently retried.
  return absl::IsUnavailable(status) || absl::IsAborted(status);
}

std::string DescribeRpcError(const std::string& what, const ConnectionOptions& options,
                             const absl::Status& status) {
  const std::string message(status.message());
  if (absl::IsUnavailable(status)) {
    return "cannot reach coordinator at " + options.coordinator + ": " + message +
           " (start ftune-coordinator or set --coordinator)";
  }
  if (absl::IsUnauthenticated(status)) {
    return what + ": " + message +
           (options.token.empty() ? " (the coordinator wants a token: pass --token-file)"
                                  : " (check the token in --token-file)");
  }
  if (absl::IsDeadlineExceeded(status)) {
    return what + ": coordinator at " + options.coordinator + " did not answer within " +
           std::to_string(options.rpc_timeout.count() / 1000) + "s" +
           (message.empty() ? "" : " (" + message + ")");
  }
  return what + ": " + message;
}

}  // namespace ftune::cli
