// Where a rank's events go: the agent's channel (`ftune-rank run`), the
// terminal (`ftune-rank train`), or memory (tests); on rank 0 of a job with
// training.report_to: [tensorboard], also a TensorBoard event file.
//
// Events are the RankMessages of proto/ftune/v1/rank_channel.proto (hello,
// step, memory, checkpoint, log, error, done): one vocabulary whether a rank
// runs under an agent or alone, so a standalone run prints exactly what a
// job would stream to `ftune watch`.
//
// Stop requests travel the other way: the agent's StopRank (or SIGTERM/
// SIGINT in a standalone run) sets a StopFlag that the training loop polls
// between optimizer steps. Ranks agree on stopping through a collective
// (train.cc), since each rank's agent may deliver the request at a
// different step.
//
// Telemetry (EmitMemory, DescribeCollectives) turns the rank's counters into
// those events and log lines, so the training loop only says when.
//
// Thread-safety: Emit may be called from any thread (implementations
// serialize); StopFlag is lock-free.
#ifndef FTUNE_WORKER_TRAINER_EVENTS_H_
#define FTUNE_WORKER_TRAINER_EVENTS_H_

#include <atomic>
#include <iosfwd>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <c10/core/Device.h>

#include "ftune/status.h"
#include "ftune/v1/rank_channel.pb.h"

namespace ftune {
class Channel;
}

namespace ftune::trainer {

class TensorBoardWriter;

class EventSink {
 public:
  virtual ~EventSink() = default;
  virtual void Emit(const v1::RankMessage& message) = 0;

  // Convenience wrappers.
  void Log(const std::string& level, const std::string& text);
  void Info(const std::string& text) { Log("INFO", text); }
};

// Writes every event to the agent channel. A write that fails (the agent is
// gone) is remembered: the rank keeps training to its next checkpoint or
// stop only if its agent comes back, which it cannot, so the loop checks
// broken() and exits.
class ChannelEventSink final : public EventSink {
 public:
  explicit ChannelEventSink(Channel* channel) : channel_(channel) {}
  void Emit(const v1::RankMessage& message) override;
  bool broken() const { return broken_.load(); }

 private:
  Channel* channel_;  // not owned
  std::mutex mu_;
  std::atomic<bool> broken_{false};
};

// Human-readable lines for a standalone run (steps, checkpoints, memory);
// with json = true, one JSON object per event instead (jq-friendly).
class ConsoleEventSink final : public EventSink {
 public:
  ConsoleEventSink(std::ostream& out, bool json, int rank);
  void Emit(const v1::RankMessage& message) override;

 private:
  std::ostream& out_;
  bool json_;
  int rank_;
  std::mutex mu_;
};

// Keeps every event (tests), optionally forwarding to another sink.
class RecordingEventSink final : public EventSink {
 public:
  explicit RecordingEventSink(EventSink* forward = nullptr) : forward_(forward) {}
  void Emit(const v1::RankMessage& message) override;
  std::vector<v1::RankMessage> events() const;

 private:
  EventSink* forward_;
  mutable std::mutex mu_;
  std::vector<v1::RankMessage> events_;
};

// Rank 0's scalars for TensorBoard (training.report_to): forwards every
// event unchanged and writes the step, eval and memory values it carries as
// scalars under HF Trainer's tags where HF has one:
//   step event  train/loss, train/learning_rate, train/grad_norm,
//               train/epoch, train/tokens_per_second (this rank's), and the
//               memory measured then: memory/device_allocated_gib,
//               memory/device_peak_gib, memory/host_rss_gib
//   eval event  eval/loss
// A write that fails is reported once as a WARNING log and ends the
// reporting; training goes on. OpenTensorBoardSink makes one writing a new
// event file in `log_dir` and says where in an INFO log.
class TensorBoardEventSink final : public EventSink {
 public:
  TensorBoardEventSink(EventSink* forward, std::unique_ptr<TensorBoardWriter> writer,
                       const c10::Device& device);
  ~TensorBoardEventSink() override;
  void Emit(const v1::RankMessage& message) override;

 private:
  EventSink* forward_;  // not owned
  std::unique_ptr<TensorBoardWriter> writer_;
  c10::Device device_;
  std::mutex mu_;
  bool failed_ = false;
};
Result<std::unique_ptr<EventSink>> OpenTensorBoardSink(EventSink* forward,
                                                       const std::string& log_dir,
                                                       const c10::Device& device);

class StopFlag {
 public:
  // Async-signal-safe (only atomics): a SIGTERM handler may call it.
  void Request(bool save_checkpoint);
  bool requested() const { return requested_.load(std::memory_order_acquire); }
  bool save_checkpoint() const { return save_.load(std::memory_order_acquire); }

 private:
  std::atomic<bool> requested_{false};
  std::atomic<bool> save_{false};
};

// --- Telemetry.

// The rank's hello: who it is, its process and device, the step it starts
// from. The agent counts a rank as started from it.
void EmitHello(EventSink& events, int rank, int world_size, const std::string& device,
               int64_t start_step);

// Device memory of a rank: the CUDA caching allocator's counters and the
// device's memory in use, or for CPU ranks (whose device is host RAM) the
// process's RSS.
struct MemoryNow {
  int64_t allocated = 0, reserved = 0, peak = 0;
  int64_t reserved_peak = 0, device_used = 0;  // CUDA only
  int64_t device_total = 0;                     // CUDA only: the device's memory
};
MemoryNow DeviceMemory(const c10::Device& device);

// A memory event: device counters, host RSS and its peak, tagged with the
// phase ("load", "train", "end").
void EmitMemory(EventSink& events, const c10::Device& device, const std::string& device_name,
                const std::string& phase);

// Cumulative time in collectives (fsdp.h, "Timing") at one moment.
struct CollectiveTotals {
  bool taken = false;
  double gather = 0, gather_exposed = 0, reduce_scatter = 0, reduce_exposed = 0, seconds = 0;
  int64_t gathered_bytes = 0;
};

// "collectives after the first step (52.1 s of training, rank 0): all-gather
// ... hidden behind compute (98%) ...": what happened between two moments.
std::string DescribeCollectives(const CollectiveTotals& base, const CollectiveTotals& now);

}  // namespace ftune::trainer

#endif  // FTUNE_WORKER_TRAINER_EVENTS_H_
