// Time source of the agent's timers (rank silence, stop escalation), an
// interface so tests move time by hand instead of sleeping.
//
// Thread-safety: implementations must allow Now() from any thread.
#ifndef FTUNE_WORKER_AGENT_CLOCK_H_
#define FTUNE_WORKER_AGENT_CLOCK_H_

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace ftune::agent {

class Clock {
 public:
  virtual ~Clock() = default;
  virtual absl::Time Now() = 0;
};

// absl::Now(). The returned object lives forever.
Clock* RealClock();

// A clock that moves only when told to.
class FakeClock : public Clock {
 public:
  explicit FakeClock(absl::Time start = absl::FromUnixSeconds(1700000000)) : now_(start) {}
  absl::Time Now() override {
    absl::MutexLock lock(&mu_);
    return now_;
  }
  void Advance(absl::Duration d) {
    absl::MutexLock lock(&mu_);
    now_ += d;
  }

 private:
  absl::Mutex mu_;
  absl::Time now_ ABSL_GUARDED_BY(mu_);
};

}  // namespace ftune::agent

#endif  // FTUNE_WORKER_AGENT_CLOCK_H_
