// Fan-out of stored job events to WatchJob subscribers.
//
// The job manager publishes events after their transaction commits, in seq
// order. A watcher subscribes BEFORE reading stored events, then drops live
// events it has already seen by seq: that ordering is what makes "stored
// events, then live ones" gap-free and duplicate-free. A subscriber that
// falls more than kMaxQueued events behind is marked overflowed; its watcher
// then re-reads from the store instead of growing memory without bound.
//
// Thread-safe.
#ifndef FTUNE_SERVER_EVENT_BUS_H_
#define FTUNE_SERVER_EVENT_BUS_H_

#include <chrono>
#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "ftune/v1/job_service.pb.h"

namespace ftune::server {

class EventBus {
 public:
  static constexpr size_t kMaxQueued = 10000;

  class Subscription {
   public:
    // Waits up to `timeout` for events; returns what arrived (maybe nothing).
    // *overflowed tells the caller to catch up from the store.
    std::vector<v1::JobEvent> Wait(std::chrono::milliseconds timeout, bool* overflowed);

   private:
    friend class EventBus;
    std::mutex mu_;
    std::condition_variable cv_;
    std::deque<v1::JobEvent> queue_;
    bool overflowed_ = false;
  };

  std::shared_ptr<Subscription> Subscribe(const std::string& job_id);
  void Unsubscribe(const std::string& job_id, const std::shared_ptr<Subscription>& sub);
  void Publish(const std::vector<v1::JobEvent>& events);
  size_t num_subscribers() const;

 private:
  mutable std::mutex mu_;
  std::multimap<std::string, std::shared_ptr<Subscription>> subs_;
};

}  // namespace ftune::server

#endif  // FTUNE_SERVER_EVENT_BUS_H_
