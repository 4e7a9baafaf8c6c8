// JobService: the public API. Handlers authenticate the user (auth.h),
// call a manager (jobs: JobManager; agents: AgentManager; WatchJob's stored
// and live events: EventManager), apply auth.h's ownership rules to what it
// returns, and translate its status; no other logic lives here. Jobs record
// the user who created them; a user sees, watches and cancels only those
// (another's are NOT_FOUND), an admin every job. ListAgents is open to every
// user.
//
// WatchJob uses gRPC's callback API (a ServerWriteReactor per watcher, no
// thread per stream), so thousands of watchers cost queued writes, not
// threads; the unary methods stay synchronous.
#ifndef FTUNE_SERVER_JOB_SERVICE_H_
#define FTUNE_SERVER_JOB_SERVICE_H_

#include <string>

#include "ftune/v1/job_service.grpc.pb.h"
#include "agent_manager.h"
#include "auth.h"
#include "event_manager.h"
#include "job_manager.h"
#include "metrics.h"

namespace ftune::server {

class JobServiceImpl final
    : public v1::JobService::WithCallbackMethod_WatchJob<v1::JobService::Service> {
 public:
  // metrics may be null; the managers must outlive the service.
  JobServiceImpl(JobManager* jobs, AgentManager* agents, EventManager* events, Metrics* metrics,
                 const Authenticator* auth);

  grpc::Status CreateJob(grpc::ServerContext* ctx, const v1::CreateJobRequest* req,
                         v1::Job* resp) override;
  grpc::Status GetJob(grpc::ServerContext* ctx, const v1::GetJobRequest* req,
                      v1::Job* resp) override;
  grpc::Status ListJobs(grpc::ServerContext* ctx, const v1::ListJobsRequest* req,
                        v1::ListJobsResponse* resp) override;
  grpc::Status CancelJob(grpc::ServerContext* ctx, const v1::CancelJobRequest* req,
                         v1::Job* resp) override;
  grpc::ServerWriteReactor<v1::WatchJobResponse>* WatchJob(
      grpc::CallbackServerContext* ctx, const v1::WatchJobRequest* req) override;
  grpc::Status ListCheckpoints(grpc::ServerContext* ctx, const v1::ListCheckpointsRequest* req,
                               v1::ListCheckpointsResponse* resp) override;
  grpc::Status ListAgents(grpc::ServerContext* ctx, const v1::ListAgentsRequest* req,
                          v1::ListAgentsResponse* resp) override;

 private:
  JobManager* jobs_;
  AgentManager* agents_;
  EventManager* events_;
  Metrics* metrics_;
  const Authenticator* auth_;
  // The job if `user` may see it; NOT_FOUND alike for missing and others' jobs.
  absl::StatusOr<v1::Job> VisibleJob(const User& user, const std::string& job_id);
};

}  // namespace ftune::server

#endif  // FTUNE_SERVER_JOB_SERVICE_H_
