// Fan-out of stored job events to WatchJob subscribers.
//
// EventManager::Publish hands events over after their transaction commits,
// in seq order. A watcher subscribes BEFORE reading stored events, then drops
// live events it has already seen by seq: that ordering is what makes "stored
// events, then live ones" gap-free and duplicate-free.
//
// Each published event is wrapped once in a shared_ptr and handed to every
// listener of its job, one call per listener per Publish, so 1000 watchers
// cost 1000 cheap calls per batch rather than 1000 copies per event.
//
// Thread-safe. Listeners are called with the bus lock held: OnEvents must not
// block (queue and return) and must not call back into the bus. Once
// Unsubscribe returns, the listener is never called again.
#ifndef FTUNE_SERVER_EVENT_BUS_H_
#define FTUNE_SERVER_EVENT_BUS_H_

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "ftune/v1/job_service.pb.h"

namespace ftune::server {

using SharedEvent = std::shared_ptr<const v1::JobEvent>;

class EventBus {
 public:
  class Listener {
   public:
    virtual ~Listener() = default;
    // Events of the subscribed job, in seq order.
    virtual void OnEvents(const std::vector<SharedEvent>& events) = 0;
  };

  // 0: no cap on listeners per job.
  explicit EventBus(size_t max_listeners_per_job = 0)
      : max_per_job_(max_listeners_per_job) {}

  // False (and not subscribed) when the job already has
  // max_listeners_per_job listeners.
  bool Subscribe(const std::string& job_id, Listener* listener);
  void Unsubscribe(const std::string& job_id, Listener* listener);
  void Publish(const std::vector<v1::JobEvent>& events);
  size_t num_subscribers() const;
  size_t max_listeners_per_job() const { return max_per_job_; }

 private:
  const size_t max_per_job_;
  mutable std::mutex mu_;
  std::multimap<std::string, Listener*> subs_;
};

}  // namespace ftune::server

#endif  // FTUNE_SERVER_EVENT_BUS_H_
