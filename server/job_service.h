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
//
// Reloaded credentials (Authenticator::Reload): every open WatchJob is
// recorded with the credential it was opened with, the user it proved and
// the job it watches. EndWatchesOfRevokedCredentials authenticates each
// again and ends, with UNAUTHENTICATED, those whose token no longer proves
// the same user, or no longer lets that user see the job (an admin demoted
// while watching another user's job); the others are untouched.
//
// Thread-safety: the handlers run on gRPC's threads;
// EndWatchesOfRevokedCredentials may be called from any thread. Lock order:
// watch_mu_, then a watcher's own mutex (never the other way: a watcher
// enters and leaves watch_mu_ holding nothing).
#ifndef FTUNE_SERVER_JOB_SERVICE_H_
#define FTUNE_SERVER_JOB_SERVICE_H_

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"

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

  // Authenticates every open WatchJob's credential again and ends those it
  // no longer allows (above). Returns "watch of job ID by USER" for each.
  std::vector<std::string> EndWatchesOfRevokedCredentials() ABSL_LOCKS_EXCLUDED(watch_mu_);

 private:
  class WatchReactor;
  // What an open WatchJob was opened with.
  struct OpenWatch {
    std::optional<std::string> authorization;
    std::string user;  // the name it proved then
    v1::Job job;       // only its id and owner: what CheckCanSeeJob reads
  };
  // OK when `watch`'s credential still proves its user and lets them see its
  // job; else UNAUTHENTICATED saying the credential was revoked and how.
  absl::Status Recheck(const OpenWatch& watch) const;
  void AddWatch(WatchReactor* reactor, OpenWatch watch) ABSL_LOCKS_EXCLUDED(watch_mu_);
  void RemoveWatch(WatchReactor* reactor) ABSL_LOCKS_EXCLUDED(watch_mu_);

  JobManager* jobs_;
  AgentManager* agents_;
  EventManager* events_;
  Metrics* metrics_;
  const Authenticator* auth_;
  // The job if `user` may see it; NOT_FOUND alike for missing and others' jobs.
  absl::StatusOr<v1::Job> VisibleJob(const User& user, const std::string& job_id);

  absl::Mutex watch_mu_;
  std::map<WatchReactor*, OpenWatch> watches_ ABSL_GUARDED_BY(watch_mu_);
};

}  // namespace ftune::server

#endif  // FTUNE_SERVER_JOB_SERVICE_H_
