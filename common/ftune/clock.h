// The time source of the control plane: the coordinator's heartbeats,
// timeouts and event times, and the agent's rank timers (silence, stop
// escalation). An interface, so tests move time by hand instead of sleeping.
//
// Header-only and built on abseil (absl::Time): only control-plane code (the
// coordinator, the agent and their tests) includes it. The trainer must not:
// it never links abseil.
//
// Thread-safety: Now() may be called from any thread; FakeClock::Advance too.
#ifndef FTUNE_COMMON_CLOCK_H_
#define FTUNE_COMMON_CLOCK_H_

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace ftune {

class Clock {
 public:
  virtual ~Clock() = default;
  virtual absl::Time Now() = 0;
};

// absl::Now(). The returned object lives forever.
inline Clock* RealClock() {
  class Real final : public Clock {
   public:
    absl::Time Now() override { return absl::Now(); }
  };
  static Real* const clock = new Real;
  return clock;
}

// A clock that moves only when told to.
class FakeClock final : public Clock {
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

}  // namespace ftune

#endif  // FTUNE_COMMON_CLOCK_H_
