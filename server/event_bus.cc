#include "event_bus.h"

namespace ftune::server {

std::vector<v1::JobEvent> EventBus::Subscription::Wait(std::chrono::milliseconds timeout,
                                                       bool* overflowed) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait_for(lock, timeout, [&] { return !queue_.empty() || overflowed_; });
  std::vector<v1::JobEvent> out(std::make_move_iterator(queue_.begin()),
                                std::make_move_iterator(queue_.end()));
  queue_.clear();
  *overflowed = overflowed_;
  overflowed_ = false;
  return out;
}

std::shared_ptr<EventBus::Subscription> EventBus::Subscribe(const std::string& job_id) {
  auto sub = std::make_shared<Subscription>();
  std::lock_guard<std::mutex> lock(mu_);
  subs_.emplace(job_id, sub);
  return sub;
}

void EventBus::Unsubscribe(const std::string& job_id, const std::shared_ptr<Subscription>& sub) {
  std::lock_guard<std::mutex> lock(mu_);
  auto range = subs_.equal_range(job_id);
  for (auto it = range.first; it != range.second; ++it) {
    if (it->second == sub) {
      subs_.erase(it);
      return;
    }
  }
}

void EventBus::Publish(const std::vector<v1::JobEvent>& events) {
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& e : events) {
    auto range = subs_.equal_range(e.job_id());
    for (auto it = range.first; it != range.second; ++it) {
      Subscription& s = *it->second;
      std::lock_guard<std::mutex> sl(s.mu_);
      if (s.queue_.size() >= kMaxQueued) {
        s.queue_.clear();
        s.overflowed_ = true;
      } else if (!s.overflowed_) {
        s.queue_.push_back(e);
      }
      s.cv_.notify_one();
    }
  }
}

size_t EventBus::num_subscribers() const {
  std::lock_guard<std::mutex> lock(mu_);
  return subs_.size();
}

}  // namespace ftune::server
