#include "worker/trainer/events.h"

#if defined(FTUNE_EVENTS_CUDA)
#include <c10/cuda/CUDACachingAllocator.h>
#include <cuda_runtime_api.h>
#endif

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <iomanip>
#include <ostream>
#include <sstream>

#include <google/protobuf/util/json_util.h>

#include "channel.h"
#include "ftune/file_util.h"
#include "worker/trainer/tensorboard.h"

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
           << "  epoch " << s.epoch() << std::setprecision(3) << "  fwd " << s.forward_seconds()
           << "s  bwd " << s.backward_seconds() << "s  opt " << s.optimizer_seconds()
           << "s  comm_exposed " << s.exposed_comm_seconds() << "s";
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

TensorBoardEventSink::TensorBoardEventSink(EventSink* forward,
                                           std::unique_ptr<TensorBoardWriter> writer,
                                           const c10::Device& device)
    : forward_(forward), writer_(std::move(writer)), device_(device) {}

TensorBoardEventSink::~TensorBoardEventSink() = default;

void TensorBoardEventSink::Emit(const v1::RankMessage& m) {
  forward_->Emit(m);
  std::vector<Scalar> scalars;
  int64_t step = 0;
  if (m.has_step()) {
    const v1::StepMetrics& s = m.step();
    step = s.step();
    const MemoryNow memory = DeviceMemory(device_);
    const double gib = 1.0 / (1ull << 30);
    scalars = {{"train/loss", s.loss()},
               {"train/learning_rate", s.learning_rate()},
               {"train/grad_norm", s.grad_norm()},
               {"train/epoch", s.epoch()},
               {"train/tokens_per_second", s.tokens_per_second()},
               {"memory/device_allocated_gib", memory.allocated * gib},
               {"memory/device_peak_gib", memory.peak * gib},
               {"memory/host_rss_gib", CurrentRssBytes() * gib}};
  } else if (m.has_eval()) {
    step = m.eval().step();
    scalars = {{"eval/loss", m.eval().eval_loss()}};
  } else {
    return;
  }
  const double now =
      std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  std::lock_guard<std::mutex> lock(mu_);
  if (failed_) return;
  const Status written = writer_->WriteScalars(step, scalars, now);
  if (!written.ok()) {
    failed_ = true;
    forward_->Log("WARNING", "TensorBoard reporting stopped: " + written.message());
  }
}

Result<std::unique_ptr<EventSink>> OpenTensorBoardSink(EventSink* forward,
                                                       const std::string& log_dir,
                                                       const c10::Device& device) {
  const double now =
      std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  FTUNE_ASSIGN_OR_RETURN(std::unique_ptr<TensorBoardWriter> writer,
                         TensorBoardWriter::Open(log_dir, now));
  forward->Info("TensorBoard scalars: " + writer->path());
  return std::unique_ptr<EventSink>(
      std::make_unique<TensorBoardEventSink>(forward, std::move(writer), device));
}

void StopFlag::Request(bool save_checkpoint) {
  if (save_checkpoint) save_.store(true, std::memory_order_release);
  requested_.store(true, std::memory_order_release);
}

void EmitHello(EventSink& events, int rank, int world_size, const std::string& device,
               int64_t start_step) {
  v1::RankMessage m;
  auto* h = m.mutable_hello();
  h->set_rank(rank);
  h->set_world_size(world_size);
  h->set_pid(::getpid());
  h->set_device(device);
  h->set_start_step(start_step);
  events.Emit(m);
}

MemoryNow DeviceMemory(const c10::Device& device) {
  MemoryNow m;
  if (device.is_cuda()) {
#if defined(FTUNE_EVENTS_CUDA)
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
    // StatType::AGGREGATE is 0; the enum moved namespaces across LibTorch
    // versions, the index did not.
    const size_t aggregate = 0;
    m.allocated = stats.allocated_bytes[aggregate].current;
    m.reserved = stats.reserved_bytes[aggregate].current;
    m.peak = stats.allocated_bytes[aggregate].peak;
    m.reserved_peak = stats.reserved_bytes[aggregate].peak;
    size_t free_bytes = 0, total_bytes = 0;
    if (cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess) {
      m.device_used = static_cast<int64_t>(total_bytes - free_bytes);
      m.device_total = static_cast<int64_t>(total_bytes);
    }
#endif
    return m;
  }
  m.allocated = CurrentRssBytes();
  m.reserved = m.allocated;
  m.peak = PeakRssBytes();
  return m;
}

void EmitMemory(EventSink& events, const c10::Device& device, const std::string& device_name,
                const std::string& phase) {
  const MemoryNow now = DeviceMemory(device);
  v1::RankMessage m;
  auto* mem = m.mutable_memory();
  mem->set_allocated_bytes(now.allocated);
  mem->set_reserved_bytes(now.reserved);
  mem->set_peak_bytes(now.peak);
  if (device.is_cuda()) {
    mem->set_reserved_peak_bytes(now.reserved_peak);
    mem->set_device_used_bytes(now.device_used);
    mem->set_device_peak_total_bytes(now.reserved_peak +
                                     std::max<int64_t>(0, now.device_used - now.reserved));
  }
  // A CPU rank's device memory is its RSS, already read.
  mem->set_host_rss_bytes(device.is_cuda() ? CurrentRssBytes() : now.allocated);
  mem->set_host_peak_rss_bytes(device.is_cuda() ? PeakRssBytes() : now.peak);
  mem->set_device(device_name);
  mem->set_phase(phase);
  events.Emit(m);
}

std::string DescribeCollectives(const CollectiveTotals& base, const CollectiveTotals& now) {
  const double wall = now.seconds - base.seconds;
  const double gather = now.gather - base.gather;
  const double exposed = now.gather_exposed - base.gather_exposed;
  const double reduce = now.reduce_scatter - base.reduce_scatter;
  const double reduce_exposed = now.reduce_exposed - base.reduce_exposed;
  const double gib = static_cast<double>(now.gathered_bytes - base.gathered_bytes) / (1LL << 30);
  std::ostringstream s;
  s << std::fixed << std::setprecision(2) << "collectives after the first step (" << wall
    << " s of training, rank 0): all-gather " << gather << " s (" << gib << " GiB received), "
    << gather - exposed << " s of it hidden behind compute ("
    << std::setprecision(0) << (gather > 0 ? 100 * (gather - exposed) / gather : 0)
    << "%), " << std::setprecision(2) << exposed << " s exposed; gradient reduce-scatter "
    << reduce << " s, " << reduce_exposed << " s exposed; communication exposed "
    << std::setprecision(1) << (wall > 0 ? 100 * (exposed + reduce_exposed) / wall : 0)
    << "% of the time";
  return s.str();
}

}  // namespace ftune::trainer
