#include "worker/trainer/events.h"

#include <cstdio>
#include <cstring>
#include <iomanip>
#include <ostream>
#include <sstream>

#include <google/protobuf/util/json_util.h>

#include "channel.h"

namespace ftune::trainer {
namespace {

std::string GiB(int64_t bytes) {
  std::ostringstream s;
  s << std::fixed << std::setprecision(2) << static_cast<double>(bytes) / (1ull << 30) << " GiB";
  return s.str();
}

}  // namespace

void EventSink::Log(const std::string& level, const std::string& text) {
  v1::RankMessage m;
  m.mutable_log()->set_level(level);
  m.mutable_log()->set_text(text);
  Emit(m);
}

void ChannelEventSink::Emit(const v1::RankMessage& message) {
  std::lock_guard<std::mutex> lock(mu_);
  if (broken_.load()) return;
  if (!channel_->Write(message)) broken_.store(true);
}

ConsoleEventSink::ConsoleEventSink(std::ostream& out, bool json, int rank)
    : out_(out), json_(json), rank_(rank) {}

void ConsoleEventSink::Emit(const v1::RankMessage& m) {
  std::lock_guard<std::mutex> lock(mu_);
  if (json_) {
    std::string text;
    google::protobuf::util::JsonPrintOptions options;
    options.preserve_proto_field_names = true;
    (void)google::protobuf::util::MessageToJsonString(m, &text, options);
    out_ << text << "\n" << std::flush;
    return;
  }
  std::ostringstream line;
  line << "[rank " << rank_ << "] ";
  switch (m.payload_case()) {
    case v1::RankMessage::kHello:
      line << "started on " << m.hello().device() << " (rank " << m.hello().rank() << " of "
           << m.hello().world_size() << ", step " << m.hello().start_step() << ")";
      break;
    case v1::RankMessage::kStep: {
      const auto& s = m.step();
      line << "step " << s.step() << std::fixed << std::setprecision(4) << "  loss " << s.loss()
           << std::scientific << std::setprecision(3) << "  lr " << s.learning_rate()
           << std::fixed << std::setprecision(3) << "  grad_norm " << s.grad_norm()
           << std::setprecision(1) << "  tok/s " << s.tokens_per_second() << std::setprecision(2)
           << "  epoch " << s.epoch();
      break;
    }
    case v1::RankMessage::kMemory:
      line << "memory (" << m.memory().phase() << "): host rss " << GiB(m.memory().host_rss_bytes())
           << " (peak " << GiB(m.memory().host_peak_rss_bytes()) << ")"
           << ", device peak " << GiB(m.memory().peak_bytes()) << " on " << m.memory().device();
      if (m.memory().device_used_bytes() > 0) {
        line << " (reserved peak " << GiB(m.memory().reserved_peak_bytes()) << ", device in use "
             << GiB(m.memory().device_used_bytes()) << ", device peak with runtime "
             << GiB(m.memory().device_peak_total_bytes()) << ")";
      }
      break;
    case v1::RankMessage::kCheckpoint:
      line << "checkpoint step " << m.checkpoint().step() << " -> " << m.checkpoint().path()
           << " (" << m.checkpoint().bytes() << " bytes, " << std::fixed << std::setprecision(2)
           << m.checkpoint().duration_seconds() << " s"
           << (m.checkpoint().complete() ? ")" : ", incomplete)");
      break;
    case v1::RankMessage::kEval:
      line << "eval step " << m.eval().step() << "  eval_loss " << std::fixed
           << std::setprecision(4) << m.eval().eval_loss();
      break;
    case v1::RankMessage::kLog:
      line << m.log().level() << " " << m.log().text();
      break;
    case v1::RankMessage::kError:
      line << "ERROR " << m.error().message();
      break;
    case v1::RankMessage::kDone:
      line << "done at step " << m.done().final_step() << ", final loss " << std::fixed
           << std::setprecision(4) << m.done().final_loss()
           << (m.done().adapter_path().empty() ? "" : ", adapter " + m.done().adapter_path());
      break;
    default:
      return;  // rendezvous data is not for people
  }
  out_ << line.str() << "\n" << std::flush;
}

void RecordingEventSink::Emit(const v1::RankMessage& message) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    events_.push_back(message);
  }
  if (forward_ != nullptr) forward_->Emit(message);
}

std::vector<v1::RankMessage> RecordingEventSink::events() const {
  std::lock_guard<std::mutex> lock(mu_);
  return events_;
}

void StopFlag::Request(bool save_checkpoint) {
  if (save_checkpoint) save_.store(true, std::memory_order_release);
  requested_.store(true, std::memory_order_release);
}

}  // namespace ftune::trainer
