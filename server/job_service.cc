#include "job_service.h"

#include <chrono>

#include "grpc_util.h"
#include "job_state.h"

namespace ftune::server {
namespace {

class RpcTimer {
 public:
  RpcTimer(Metrics* m, const char* method)
      : m_(m), method_(method), start_(std::chrono::steady_clock::now()) {}
  ~RpcTimer() {
    if (m_)
      m_->RpcLatency(method_, std::chrono::duration<double>(std::chrono::steady_clock::now() -
                                                            start_)
                                  .count());
  }

 private:
  Metrics* m_;
  const char* method_;
  std::chrono::steady_clock::time_point start_;
};

bool IsTerminalEvent(const v1::JobEvent& e) {
  return e.has_state_change() && IsTerminal(e.state_change().to());
}

}  // namespace

JobServiceImpl::JobServiceImpl(JobManager* manager, Metrics* metrics, std::string client_token)
    : manager_(manager), metrics_(metrics), token_(std::move(client_token)) {}

#define FTUNE_AUTH()                                                   \
  if (auto auth = CheckBearer(*ctx, token_, "client"); !auth.ok()) return auth

grpc::Status JobServiceImpl::CreateJob(grpc::ServerContext* ctx, const v1::CreateJobRequest* req,
                                       v1::Job* resp) {
  RpcTimer t(metrics_, "CreateJob");
  FTUNE_AUTH();
  auto job = manager_->CreateJob(req->spec(), req->request_id());
  if (!job.ok()) return ToGrpc(job.status());
  *resp = *job;
  return grpc::Status::OK;
}

grpc::Status JobServiceImpl::GetJob(grpc::ServerContext* ctx, const v1::GetJobRequest* req,
                                    v1::Job* resp) {
  RpcTimer t(metrics_, "GetJob");
  FTUNE_AUTH();
  auto job = manager_->GetJob(req->job_id());
  if (!job.ok()) return ToGrpc(job.status());
  *resp = *job;
  return grpc::Status::OK;
}

grpc::Status JobServiceImpl::ListJobs(grpc::ServerContext* ctx, const v1::ListJobsRequest* req,
                                      v1::ListJobsResponse* resp) {
  RpcTimer t(metrics_, "ListJobs");
  FTUNE_AUTH();
  auto r = manager_->ListJobs(*req);
  if (!r.ok()) return ToGrpc(r.status());
  for (auto& j : r->jobs) *resp->add_jobs() = std::move(j);
  resp->set_next_page_token(r->next_page_token);
  return grpc::Status::OK;
}

grpc::Status JobServiceImpl::CancelJob(grpc::ServerContext* ctx, const v1::CancelJobRequest* req,
                                       v1::Job* resp) {
  RpcTimer t(metrics_, "CancelJob");
  FTUNE_AUTH();
  auto job = manager_->CancelJob(req->job_id());
  if (!job.ok()) return ToGrpc(job.status());
  *resp = *job;
  return grpc::Status::OK;
}

grpc::Status JobServiceImpl::WatchJob(grpc::ServerContext* ctx, const v1::WatchJobRequest* req,
                                      grpc::ServerWriter<v1::JobEvent>* writer) {
  FTUNE_AUTH();
  if (req->after_seq() < 0)
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "after_seq must be >= 0");
  // Subscribe before reading the store: see event_bus.h for why.
  auto sub = manager_->bus()->Subscribe(req->job_id());
  struct Unsub {
    EventBus* bus;
    std::string id;
    std::shared_ptr<EventBus::Subscription> sub;
    ~Unsub() { bus->Unsubscribe(id, sub); }
  } unsub{manager_->bus(), req->job_id(), sub};

  auto job = manager_->GetJob(req->job_id());
  if (!job.ok()) return ToGrpc(job.status());
  int64_t last = req->after_seq();
  bool ended = false;
  auto catch_up = [&]() -> grpc::Status {
    for (;;) {
      auto events = manager_->ReadEvents(req->job_id(), last, 1000);
      if (!events.ok()) return ToGrpc(events.status());
      if (events->empty()) return grpc::Status::OK;
      for (size_t i = 0; i < events->size(); ++i) {
        const auto& e = (*events)[i];
        if (!writer->Write(e)) return grpc::Status(grpc::StatusCode::CANCELLED, "watcher left");
        last = e.seq();
        if (IsTerminalEvent(e)) ended = true;
      }
    }
  };
  if (auto st = catch_up(); !st.ok()) return st;
  if (!req->follow() || ended) return grpc::Status::OK;
  while (!ctx->IsCancelled() && !shutting_down_) {
    bool overflowed = false;
    auto events = sub->Wait(std::chrono::milliseconds(500), &overflowed);
    bool gap = overflowed;
    for (size_t i = 0; i < events.size(); ++i) {
      const auto& e = events[i];
      if (e.seq() <= last) continue;
      if (e.seq() != last + 1) {
        gap = true;
        break;
      }
      if (!writer->Write(e)) return grpc::Status(grpc::StatusCode::CANCELLED, "watcher left");
      last = e.seq();
      if (IsTerminalEvent(e)) return grpc::Status::OK;
    }
    if (gap) {
      if (auto st = catch_up(); !st.ok()) return st;
      if (ended) return grpc::Status::OK;
    }
  }
  return grpc::Status(grpc::StatusCode::UNAVAILABLE, "coordinator shutting down; watch again with after_seq");
}

grpc::Status JobServiceImpl::ListCheckpoints(grpc::ServerContext* ctx,
                                             const v1::ListCheckpointsRequest* req,
                                             v1::ListCheckpointsResponse* resp) {
  RpcTimer t(metrics_, "ListCheckpoints");
  FTUNE_AUTH();
  auto r = manager_->ListCheckpoints(req->job_id());
  if (!r.ok()) return ToGrpc(r.status());
  for (auto& c : *r) *resp->add_checkpoints() = std::move(c);
  return grpc::Status::OK;
}

grpc::Status JobServiceImpl::ListAgents(grpc::ServerContext* ctx,
                                        const v1::ListAgentsRequest* /*req*/,
                                        v1::ListAgentsResponse* resp) {
  RpcTimer t(metrics_, "ListAgents");
  FTUNE_AUTH();
  for (auto& a : manager_->ListAgents()) *resp->add_agents() = std::move(a);
  return grpc::Status::OK;
}

}  // namespace ftune::server
