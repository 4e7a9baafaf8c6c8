// See fake_job_service.h.
#include "fake_job_service.h"

#include <algorithm>
#include <stdexcept>

namespace ftune::testing {
namespace {

bool Final(v1::JobState s) {
  return s == v1::SUCCEEDED || s == v1::FAILED || s == v1::CANCELLED;
}

}  // namespace

grpc::Status FakeJobService::Admit(grpc::ServerContext* context) {
  ++num_calls;
  std::string auth;
  const auto& metadata = context->client_metadata();
  auto it = metadata.find("authorization");
  if (it != metadata.end()) auth.assign(it->second.data(), it->second.size());
  authorization.push_back(auth);
  if (!required_token.empty() && auth != "Bearer " + required_token) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "missing or wrong client token");
  }
  return grpc::Status::OK;
}

grpc::Status FakeJobService::CreateJob(grpc::ServerContext* context,
                                       const v1::CreateJobRequest* request, v1::Job* response) {
  std::lock_guard<std::mutex> lock(mu);
  if (grpc::Status s = Admit(context); !s.ok()) return s;
  create_requests.push_back(*request);
  if (fail_create_calls > 0) {
    --fail_create_calls;
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, "coordinator restarting");
  }
  for (const auto& [id, job] : jobs) {
    if (!request->request_id().empty() && job.request_id() == request->request_id()) {
      *response = job;
      return grpc::Status::OK;
    }
  }
  v1::Job job;
  job.set_id("job-" + std::to_string(create_requests.size()));
  *job.mutable_spec() = request->spec();
  job.set_state(v1::QUEUED);
  job.set_state_reason("waiting for 2 free slots");
  job.set_request_id(request->request_id());
  job.set_create_time_unix_ms(1714564800000);
  jobs[job.id()] = job;
  *response = job;
  return grpc::Status::OK;
}

grpc::Status FakeJobService::GetJob(grpc::ServerContext* context,
                                    const v1::GetJobRequest* request, v1::Job* response) {
  std::lock_guard<std::mutex> lock(mu);
  if (grpc::Status s = Admit(context); !s.ok()) return s;
  auto it = jobs.find(request->job_id());
  if (it == jobs.end()) {
    return grpc::Status(grpc::StatusCode::NOT_FOUND, "job " + request->job_id() + " not found");
  }
  *response = it->second;
  return grpc::Status::OK;
}

grpc::Status FakeJobService::ListJobs(grpc::ServerContext* context,
                                      const v1::ListJobsRequest* request,
                                      v1::ListJobsResponse* response) {
  std::lock_guard<std::mutex> lock(mu);
  if (grpc::Status s = Admit(context); !s.ok()) return s;
  list_requests.push_back(*request);
  std::vector<const v1::Job*> matching;
  for (const auto& [id, job] : jobs) {
    if (request->states_size() > 0 &&
        std::find(request->states().begin(), request->states().end(), job.state()) ==
            request->states().end()) {
      continue;
    }
    bool labels_match = true;
    for (const auto& [key, value] : request->labels()) {
      auto l = job.spec().labels().find(key);
      if (l == job.spec().labels().end() || l->second != value) labels_match = false;
    }
    if (labels_match) matching.push_back(&job);
  }
  size_t start = 0;
  if (!request->page_token().empty()) {
    try {
      start = std::stoul(request->page_token());
    } catch (const std::exception&) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "bad page_token");
    }
  }
  const size_t page = std::min<size_t>(request->page_size() > 0 ? request->page_size() : 50,
                                       max_page_size);
  size_t end = std::min(matching.size(), start + page);
  for (size_t i = start; i < end; ++i) *response->add_jobs() = *matching[i];
  if (end < matching.size()) response->set_next_page_token(std::to_string(end));
  return grpc::Status::OK;
}

grpc::Status FakeJobService::CancelJob(grpc::ServerContext* context,
                                       const v1::CancelJobRequest* request, v1::Job* response) {
  std::lock_guard<std::mutex> lock(mu);
  if (grpc::Status s = Admit(context); !s.ok()) return s;
  cancel_requests.push_back(request->job_id());
  auto it = jobs.find(request->job_id());
  if (it == jobs.end()) {
    return grpc::Status(grpc::StatusCode::NOT_FOUND, "job " + request->job_id() + " not found");
  }
  if (Final(it->second.state())) {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                        "job " + it->first + " already ended (" +
                            v1::JobState_Name(it->second.state()) + ")");
  }
  it->second.set_state(v1::CANCELLING);
  it->second.set_state_reason("cancelled by user");
  *response = it->second;
  return grpc::Status::OK;
}

grpc::Status FakeJobService::WatchJob(grpc::ServerContext* context,
                                      const v1::WatchJobRequest* request,
                                      grpc::ServerWriter<v1::WatchJobResponse>* writer) {
  std::vector<v1::JobEvent> to_send;
  int drop_after = -1;
  {
    std::lock_guard<std::mutex> lock(mu);
    if (grpc::Status s = Admit(context); !s.ok()) return s;
    watch_requests.push_back(*request);
    if (jobs.count(request->job_id()) == 0) {
      return grpc::Status(grpc::StatusCode::NOT_FOUND, "job " + request->job_id() + " not found");
    }
    const bool resumed = watch_requests.size() > 1;
    const int64_t after = resumed && replay_from_start_on_resume ? 0 : request->after_seq();
    for (const v1::JobEvent& e : events[request->job_id()]) {
      if (e.seq() > after) to_send.push_back(e);
    }
    if (watch_requests.size() == 1) drop_after = drop_first_watch_after;
  }
  int sent = 0;
  for (const v1::JobEvent& e : to_send) {
    if (sent == drop_after) {
      return grpc::Status(grpc::StatusCode::UNAVAILABLE, "stream dropped by the test");
    }
    v1::WatchJobResponse one;
    *one.add_events() = e;
    if (!writer->Write(one)) return grpc::Status(grpc::StatusCode::CANCELLED, "client went away");
    ++sent;
  }
  if (sent == drop_after) {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, "stream dropped by the test");
  }
  std::lock_guard<std::mutex> lock(mu);
  auto finish = finish_on_watch_end.find(request->job_id());
  if (request->follow() && finish != finish_on_watch_end.end()) {
    v1::Job& job = jobs[request->job_id()];
    job.set_state(finish->second.first);
    job.set_state_reason(finish->second.second);
  }
  return grpc::Status::OK;
}

grpc::Status FakeJobService::ListCheckpoints(grpc::ServerContext* context,
                                             const v1::ListCheckpointsRequest* request,
                                             v1::ListCheckpointsResponse* response) {
  std::lock_guard<std::mutex> lock(mu);
  if (grpc::Status s = Admit(context); !s.ok()) return s;
  if (jobs.count(request->job_id()) == 0) {
    return grpc::Status(grpc::StatusCode::NOT_FOUND, "job " + request->job_id() + " not found");
  }
  for (const v1::Checkpoint& c : checkpoints[request->job_id()]) *response->add_checkpoints() = c;
  return grpc::Status::OK;
}

grpc::Status FakeJobService::ListAgents(grpc::ServerContext* context,
                                        const v1::ListAgentsRequest* /*request*/,
                                        v1::ListAgentsResponse* response) {
  std::lock_guard<std::mutex> lock(mu);
  if (grpc::Status s = Admit(context); !s.ok()) return s;
  for (const v1::Agent& a : agents) *response->add_agents() = a;
  return grpc::Status::OK;
}

FakeCoordinator::FakeCoordinator(std::shared_ptr<grpc::ServerCredentials> credentials) {
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", std::move(credentials), &port);
  builder.RegisterService(&service_);
  server_ = builder.BuildAndStart();
  if (server_ == nullptr || port == 0) throw std::runtime_error("fake coordinator did not start");
  address_ = "127.0.0.1:" + std::to_string(port);
}

FakeCoordinator::~FakeCoordinator() {
  // Bounded: a stuck stream must not hang the test binary.
  server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
}

}  // namespace ftune::testing
