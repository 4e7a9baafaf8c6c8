#include "event_bus.h"

namespace ftune::server {

bool EventBus::Subscribe(const std::string& job_id, Listener* listener) {
  std::lock_guard<std::mutex> lock(mu_);
  if (max_per_job_ > 0 && subs_.count(job_id) >= max_per_job_) return false;
  subs_.emplace(job_id, listener);
  return true;
}

void EventBus::Unsubscribe(const std::string& job_id, Listener* listener) {
  std::lock_guard<std::mutex> lock(mu_);
  auto range = subs_.equal_range(job_id);
  for (auto it = range.first; it != range.second; ++it) {
    if (it->second == listener) {
      subs_.erase(it);
      return;
    }
  }
}

void EventBus::Publish(const std::vector<v1::JobEvent>& events) {
  // Group by job, keeping seq order within each job.
  std::map<std::string, std::vector<SharedEvent>> by_job;
  for (const auto& e : events) by_job[e.job_id()].push_back(std::make_shared<v1::JobEvent>(e));
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& [job, list] : by_job) {
    auto range = subs_.equal_range(job);
    for (auto it = range.first; it != range.second; ++it) it->second->OnEvents(list);
  }
}

size_t EventBus::num_subscribers() const {
  std::lock_guard<std::mutex> lock(mu_);
  return subs_.size();
}

}  // namespace ftune::server
