#include "job_service.h"

#include <algorithm>
#include <chrono>
#include <deque>
#include <mutex>

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

}  // namespace

JobServiceImpl::JobServiceImpl(JobManager* jobs, AgentManager* agents, EventManager* events,
                               Metrics* metrics, const Authenticator* auth)
    : jobs_(jobs), agents_(agents), events_(events), metrics_(metrics), auth_(auth) {}

absl::StatusOr<v1::Job> JobServiceImpl::VisibleJob(const User& user, const std::string& job_id) {
  auto job = jobs_->GetJob(job_id);
  if (!job.ok()) return job.status();
  if (auto st = CheckCanSeeJob(user, *job); !st.ok()) return st;
  return job;
}

// Declares `user`, the caller, or returns the call's UNAUTHENTICATED or
// PERMISSION_DENIED.
#define FTUNE_AUTH()                                         \
  auto user = auth_->AuthenticateUser(Authorization(*ctx)); \
  if (!user.ok()) return ToGrpc(user.status())

grpc::Status JobServiceImpl::CreateJob(grpc::ServerContext* ctx, const v1::CreateJobRequest* req,
                                       v1::Job* resp) {
  RpcTimer t(metrics_, "CreateJob");
  FTUNE_AUTH();
  if (auto st = CheckPriority(*user, req->spec().priority(), auth_->max_user_priority());
      !st.ok())
    return ToGrpc(st);
  auto job = jobs_->CreateJob(req->spec(), req->request_id(), user->name);
  if (!job.ok()) return ToGrpc(job.status());
  *resp = *job;
  return grpc::Status::OK;
}

grpc::Status JobServiceImpl::GetJob(grpc::ServerContext* ctx, const v1::GetJobRequest* req,
                                    v1::Job* resp) {
  RpcTimer t(metrics_, "GetJob");
  FTUNE_AUTH();
  auto job = VisibleJob(*user, req->job_id());
  if (!job.ok()) return ToGrpc(job.status());
  *resp = *job;
  return grpc::Status::OK;
}

grpc::Status JobServiceImpl::ListJobs(grpc::ServerContext* ctx, const v1::ListJobsRequest* req,
                                      v1::ListJobsResponse* resp) {
  RpcTimer t(metrics_, "ListJobs");
  FTUNE_AUTH();
  auto owner = ListOwnerFilter(*user, req->owner());
  if (!owner.ok()) return ToGrpc(owner.status());
  v1::ListJobsRequest scoped = *req;
  scoped.set_owner(*owner);
  auto r = jobs_->ListJobs(scoped);
  if (!r.ok()) return ToGrpc(r.status());
  for (auto& j : r->jobs) *resp->add_jobs() = std::move(j);
  resp->set_next_page_token(r->next_page_token);
  return grpc::Status::OK;
}

grpc::Status JobServiceImpl::CancelJob(grpc::ServerContext* ctx, const v1::CancelJobRequest* req,
                                       v1::Job* resp) {
  RpcTimer t(metrics_, "CancelJob");
  FTUNE_AUTH();
  if (auto seen = VisibleJob(*user, req->job_id()); !seen.ok()) return ToGrpc(seen.status());
  auto job = jobs_->CancelJob(req->job_id());
  if (!job.ok()) return ToGrpc(job.status());
  *resp = *job;
  return grpc::Status::OK;
}

// One WatchJob stream. Sends stored events after `after_seq`, then live ones
// from the bus, one write in flight at a time, each write carrying every
// event ready by then (up to kMaxBatch); falls back to reading the store
// whenever a live event does not follow the last one sent (it was published
// before this watcher caught up, or the live queue overflowed). Deletes itself
// in OnDone, after leaving the bus and the service's open watches.
class JobServiceImpl::WatchReactor : public grpc::ServerWriteReactor<v1::WatchJobResponse>,
                                     public EventBus::Listener {
 public:
  static constexpr size_t kMaxLive = 10000;
  static constexpr int kPage = 256;
  static constexpr int kMaxBatch = 500;
  // Bytes of events per message (beyond the first event): a watcher with
  // gRPC's default 4 MiB receive limit takes every batch, since one event is
  // at most 1 MiB (the agent's limit, worker/agent/event_size.h).
  static constexpr size_t kMaxBatchBytes = 1 << 20;
  // What a watcher holds beyond the batch in flight is capped in bytes as
  // well as in events, so a thousand watchers that never read (their writes
  // stopped by flow control) cost a thousand batches, not a thousand pages
  // of large events: a store page is cut to kMaxBatchBytes (the next page
  // asks for no more events than fitted), and live events queued beyond
  // kMaxLiveBytes are dropped for a re-read from the store.
  static constexpr size_t kMaxLiveBytes = 4 << 20;

  WatchReactor(JobServiceImpl* service, JobManager* jobs, EventManager* events,
               const v1::WatchJobRequest& req, std::optional<std::string_view> authorization,
               const absl::StatusOr<User>& user)
      : service_(service),
        jobs_(jobs),
        events_(events),
        job_id_(req.job_id()),
        follow_(req.follow()),
        last_(req.after_seq()) {
    if (!user.ok()) {
      finished_ = true;
      Finish(ToGrpc(user.status()));
      return;
    }
    if (req.after_seq() < 0) {
      finished_ = true;
      Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "after_seq must be >= 0"));
      return;
    }
    // Subscribe before the first store read: see event_bus.h.
    if (!events_->bus()->Subscribe(job_id_, this)) {
      finished_ = true;
      Finish(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                          "job " + job_id_ + " already has " +
                              std::to_string(events_->bus()->max_listeners_per_job()) +
                              " watchers, the most the coordinator allows "
                              "(--max-watchers-per-job); try again later"));
      return;
    }
    subscribed_ = true;
    auto job = jobs_->GetJob(job_id_);
    absl::Status seen = job.ok() ? CheckCanSeeJob(*user, *job) : job.status();
    if (seen.ok()) {
      // Outside mu_ (lock order: job_service.h). From here on a reload
      // finds this watch; the check once more covers a reload between the
      // first authentication and here.
      OpenWatch open{authorization ? std::optional<std::string>(*authorization) : std::nullopt,
                     user->name, {}};
      open.job.set_id(job->id());
      open.job.set_owner(job->owner());
      service_->AddWatch(this, open);
      registered_ = true;
      seen = service_->Recheck(open);
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (!seen.ok()) {
      FinishLocked(ToGrpc(seen));
      return;
    }
    // An ended job's events are all stored: following it is a plain read,
    // which ends once they are sent, even when after_seq is at or past its
    // last event (its terminal state change is then never seen to end the
    // stream).
    if (IsTerminal(job->state())) follow_ = false;
    NextLocked();
  }

  void OnEvents(const std::vector<SharedEvent>& events) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (finished_ || !follow_) return;
    size_t bytes = 0;
    for (const SharedEvent& e : events) bytes += e->ByteSizeLong();
    if (live_.size() + events.size() > kMaxLive || live_bytes_ + bytes > kMaxLiveBytes) {
      live_.clear();
      live_bytes_ = 0;
      catching_up_ = true;  // re-read from the store instead of growing
    } else {
      live_.insert(live_.end(), events.begin(), events.end());
      live_bytes_ += bytes;
    }
    NextLocked();
  }

  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> lock(mu_);
    writing_ = false;
    if (!ok) return FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "watcher left"));
    if (ended_) return FinishLocked(grpc::Status::OK);
    NextLocked();
  }

  void OnCancel() override {
    std::lock_guard<std::mutex> lock(mu_);
    FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "watch cancelled"));
  }

  void OnDone() override {
    if (subscribed_) events_->bus()->Unsubscribe(job_id_, this);
    // Waits out a reload that is ending this watch (it holds watch_mu_).
    if (registered_) service_->RemoveWatch(this);
    delete this;
  }

  // Ends the stream with `status` (a revoked credential); false when it had
  // ended already. The caller holds watch_mu_, so OnDone has not run.
  bool EndRevoked(const grpc::Status& status) {
    std::lock_guard<std::mutex> lock(mu_);
    if (finished_) return false;
    FinishLocked(status);
    return true;
  }

 private:
  static bool Terminal(const v1::JobEvent& e) {
    return e.has_state_change() && IsTerminal(e.state_change().to());
  }

  // The next event after last_, or null when none is ready. mu_ held; may
  // finish the stream (then returns null with finished_ set).
  SharedEvent TakeNextLocked() {
    for (;;) {
      if (!stored_.empty()) {
        SharedEvent e = std::move(stored_.front());
        stored_.pop_front();
        if (e->seq() > last_) return e;
        continue;
      }
      if (catching_up_) {
        auto page = events_->ReadEvents(job_id_, last_, page_events_);
        if (!page.ok()) {
          FinishLocked(ToGrpc(page.status()));
          return nullptr;
        }
        if (page->empty()) {
          catching_up_ = false;
          page_events_ = kPage;
          continue;
        }
        size_t bytes = 0;
        int kept = 0;
        for (auto& e : *page) {
          bytes += e.ByteSizeLong();
          if (kept > 0 && bytes > kMaxBatchBytes) break;  // read again when needed
          stored_.push_back(std::make_shared<v1::JobEvent>(std::move(e)));
          ++kept;
        }
        page_events_ = kept < static_cast<int>(page->size()) ? kept : kPage;
        continue;
      }
      if (live_.empty()) return nullptr;
      SharedEvent e = std::move(live_.front());
      live_.pop_front();
      live_bytes_ -= std::min(live_bytes_, e->ByteSizeLong());
      if (e->seq() <= last_) continue;
      if (e->seq() != last_ + 1) {
        live_.clear();
        live_bytes_ = 0;
        catching_up_ = true;
        continue;
      }
      return e;
    }
  }

  // Gathers what is ready and starts writing it. mu_ held.
  void NextLocked() {
    if (writing_ || finished_) return;
    response_.clear_events();
    size_t bytes = 0;
    while (response_.events_size() < kMaxBatch && !ended_) {
      SharedEvent e = TakeNextLocked();
      if (finished_) return;
      if (!e) break;
      const size_t size = e->ByteSizeLong();
      if (response_.events_size() > 0 && bytes + size > kMaxBatchBytes) {
        stored_.push_front(std::move(e));  // first of the next message
        break;
      }
      bytes += size;
      last_ = e->seq();
      ended_ = Terminal(*e);
      *response_.add_events() = *e;
    }
    if (response_.events_size() == 0) {
      // Caught up: a plain read ends here, a follower waits for OnEvents.
      if (!follow_ && !catching_up_) FinishLocked(grpc::Status::OK);
      return;
    }
    writing_ = true;
    StartWrite(&response_);
  }

  void FinishLocked(const grpc::Status& status) {
    if (finished_) return;
    finished_ = true;
    live_.clear();
    live_bytes_ = 0;
    stored_.clear();
    Finish(status);
  }

  JobServiceImpl* const service_;
  JobManager* jobs_;
  EventManager* events_;
  const std::string job_id_;
  bool follow_;  // cleared for a job that has already ended
  bool subscribed_ = false;
  bool registered_ = false;  // in service_->watches_
  std::mutex mu_;
  int64_t last_;
  bool catching_up_ = true;  // start by sending what is stored
  bool writing_ = false;
  bool ended_ = false;
  bool finished_ = false;
  std::deque<SharedEvent> stored_;
  std::deque<SharedEvent> live_;
  size_t live_bytes_ = 0;     // of live_
  int page_events_ = kPage;  // events asked of the next store read
  v1::WatchJobResponse response_;
};

grpc::ServerWriteReactor<v1::WatchJobResponse>* JobServiceImpl::WatchJob(
    grpc::CallbackServerContext* ctx, const v1::WatchJobRequest* req) {
  const std::optional<std::string_view> authorization = Authorization(*ctx);
  return new WatchReactor(this, jobs_, events_, *req, authorization,
                          auth_->AuthenticateUser(authorization));
}

absl::Status JobServiceImpl::Recheck(const OpenWatch& watch) const {
  auto user = auth_->AuthenticateUser(watch.authorization
                                          ? std::optional<std::string_view>(*watch.authorization)
                                          : std::nullopt);
  const std::string revoked =
      "the credential this watch of job " + watch.job.id() + " was opened with was revoked: ";
  if (!user.ok()) return absl::UnauthenticatedError(revoked + "it is no longer a user's");
  if (user->name != watch.user)
    return absl::UnauthenticatedError(revoked + "it is now user " + user->name + "'s, not " +
                                      watch.user + "'s");
  if (!CheckCanSeeJob(*user, watch.job).ok())
    return absl::UnauthenticatedError(
        revoked + "user " + watch.user + " is no longer an admin, and the job is " +
        (watch.job.owner().empty() ? "nobody's" : watch.job.owner() + "'s"));
  return absl::OkStatus();
}

void JobServiceImpl::AddWatch(WatchReactor* reactor, OpenWatch watch) {
  absl::MutexLock lock(&watch_mu_);
  watches_.emplace(reactor, std::move(watch));
}

void JobServiceImpl::RemoveWatch(WatchReactor* reactor) {
  absl::MutexLock lock(&watch_mu_);
  watches_.erase(reactor);
}

std::vector<std::string> JobServiceImpl::EndWatchesOfRevokedCredentials() {
  std::vector<std::string> ended;
  // The reactors are ended under watch_mu_: it keeps each alive (OnDone
  // waits for it to leave watches_), and they take only their own mutex.
  absl::MutexLock lock(&watch_mu_);
  for (auto& [reactor, watch] : watches_) {
    const absl::Status st = Recheck(watch);
    if (st.ok()) continue;
    if (reactor->EndRevoked(ToGrpc(st)))
      ended.push_back("watch of job " + watch.job.id() + " by " + watch.user);
  }
  return ended;
}

grpc::Status JobServiceImpl::ListCheckpoints(grpc::ServerContext* ctx,
                                             const v1::ListCheckpointsRequest* req,
                                             v1::ListCheckpointsResponse* resp) {
  RpcTimer t(metrics_, "ListCheckpoints");
  FTUNE_AUTH();
  if (auto seen = VisibleJob(*user, req->job_id()); !seen.ok()) return ToGrpc(seen.status());
  auto r = jobs_->ListCheckpoints(req->job_id());
  if (!r.ok()) return ToGrpc(r.status());
  for (auto& c : *r) *resp->add_checkpoints() = std::move(c);
  return grpc::Status::OK;
}

grpc::Status JobServiceImpl::ListAgents(grpc::ServerContext* ctx,
                                        const v1::ListAgentsRequest* /*req*/,
                                        v1::ListAgentsResponse* resp) {
  RpcTimer t(metrics_, "ListAgents");
  FTUNE_AUTH();
  for (auto& a : agents_->ListAgents()) *resp->add_agents() = std::move(a);
  return grpc::Status::OK;
}

}  // namespace ftune::server
