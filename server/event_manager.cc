#include "event_manager.h"

#include <cstdint>
#include <utility>

namespace ftune::server {

v1::JobEvent JobEventFor(const v1::RankEvent& ev, const std::string& host) {
  v1::JobEvent je;
  je.set_rank(ev.rank());
  je.set_attempt(ev.attempt());
  je.set_time_unix_ms(ev.time_unix_ms());
  const std::string rank = "rank " + std::to_string(ev.rank());
  switch (ev.payload_case()) {
    case v1::RankEvent::kMessage: {
      const v1::RankMessage& m = ev.message();
      switch (m.payload_case()) {
        case v1::RankMessage::kHello: {
          const auto& h = m.hello();
          je.mutable_log()->set_level("INFO");
          je.mutable_log()->set_text(
              rank + " started on " + host + " (" + h.device() + ", pid " +
              std::to_string(h.pid()) +
              (h.start_step() > 0 ? ", resuming at step " + std::to_string(h.start_step()) : "") +
              ")");
          break;
        }
        case v1::RankMessage::kStep:
          *je.mutable_step() = m.step();
          break;
        case v1::RankMessage::kMemory:
          *je.mutable_memory() = m.memory();
          break;
        case v1::RankMessage::kCheckpoint:
          *je.mutable_checkpoint() = m.checkpoint();
          break;
        case v1::RankMessage::kEval:
          *je.mutable_eval() = m.eval();
          break;
        case v1::RankMessage::kLog:
          *je.mutable_log() = m.log();
          break;
        case v1::RankMessage::kError:
          *je.mutable_error() = m.error();
          break;
        case v1::RankMessage::kDone:
          *je.mutable_done() = m.done();
          break;
        default:
          je.mutable_log()->set_level("WARNING");
          je.mutable_log()->set_text("rank sent a message this coordinator does not know");
      }
      break;
    }
    case v1::RankEvent::kExit: {
      const auto& x = ev.exit();
      std::string what;
      if (x.hung()) what = "was silent too long and was killed";
      else if (x.exit_code() < 0) what = "was killed by signal " + std::to_string(-x.exit_code());
      else what = "exited with code " + std::to_string(x.exit_code());
      const std::string msg = rank + " on " + host + " " + what;
      if (x.exit_code() != 0 || x.hung()) {
        je.mutable_error()->set_message(msg);
        *je.mutable_error()->mutable_stderr_tail() = x.stderr_tail();
      } else {
        je.mutable_log()->set_level("INFO");
        je.mutable_log()->set_text(msg);
      }
      break;
    }
    case v1::RankEvent::kLaunchFailed:
      *je.mutable_error() = ev.launch_failed();
      je.mutable_error()->set_message(rank + " could not start on " + host + ": " +
                                      ev.launch_failed().message());
      break;
    default:
      break;
  }
  return je;
}

EventManager::EventManager(Store* store, EventBus* bus, MetricsSink* metrics,
                           AgentManager* agents)
    : store_(store), bus_(bus), metrics_(metrics), agents_(agents) {}

absl::StatusOr<int64_t> EventManager::IngestEvents(const std::string& agent_id,
                                                   const v1::RankEventBatch& batch) {
  std::lock_guard<std::mutex> lock(ingest_mu_);
  absl::StatusOr<AgentManager::EventSource> source = agents_->EventsArrived(agent_id);
  if (!source.ok()) return source.status();
  const int64_t before = source->acked_seq;
  int64_t acked = before;
  std::vector<IngestedEvent> fresh;
  for (const auto& ev : batch.events()) {
    if (ev.agent_seq() <= acked) continue;  // a resend of something stored
    acked = ev.agent_seq();
    fresh.push_back({&ev, agent_id, JobEventFor(ev, source->host)});
  }
  if (!fresh.empty()) {
    auto applied = handler_->ApplyRankEvents(std::move(fresh), [&]() -> absl::Status {
      return store_->SetAgentAck(agent_id, acked);
    });
    if (!applied.ok()) return applied.status();
    if (metrics_ && *applied > 0) metrics_->EventsIngested(*applied);
  }
  agents_->EventsAcked(agent_id, acked);
  return acked;
}

absl::StatusOr<std::vector<v1::JobEvent>> EventManager::ReadEvents(const std::string& job_id,
                                                                   int64_t after_seq,
                                                                   int limit) {
  return store_->ReadEvents(job_id, after_seq, INT64_MAX, limit);
}

absl::Status EventManager::Append(const std::vector<v1::JobEvent>& events) {
  for (const auto& e : events)
    if (auto st = store_->AppendEvent(e); !st.ok()) return st;
  return absl::OkStatus();
}

void EventManager::Publish(const std::vector<v1::JobEvent>& events) {
  if (events.empty()) return;
  bus_->Publish(events);
  if (!metrics_) return;
  for (const auto& e : events) {
    if (e.has_step()) metrics_->Step(e.job_id(), e.rank(), e.step());
    if (e.has_memory()) metrics_->Memory(e.job_id(), e.rank(), e.memory());
    if (e.has_checkpoint() && e.checkpoint().complete() && e.rank() == 0)
      metrics_->CheckpointSaved(e.job_id(), e.time_unix_ms());
  }
}

}  // namespace ftune::server
