#include "worker/agent/agent.h"

#include <random>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "worker/agent/log.h"

namespace ftune::agent {
namespace {

using Stream = grpc::ClientReaderWriter<v1::AgentToCoordinator, v1::CoordinatorToAgent>;

constexpr absl::Duration kDefaultHeartbeat = absl::Seconds(5);

const char* CodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK:
      return "OK";
    case grpc::StatusCode::CANCELLED:
      return "CANCELLED";
    case grpc::StatusCode::UNKNOWN:
      return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT:
      return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND:
      return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS:
      return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED:
      return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION:
      return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED:
      return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE:
      return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED:
      return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL:
      return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE:
      return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS:
      return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED:
      return "UNAUTHENTICATED";
    default:
      return "UNKNOWN_CODE";
  }
}

std::string StatusText(const grpc::Status& s) {
  return absl::StrCat(CodeName(s.error_code()), s.error_message().empty() ? "" : ": ",
                      s.error_message());
}

}  // namespace

Agent::Agent(Options options, std::vector<HostSlot> slots, Spool* spool, ProcessLauncher* launcher,
             RankSupervisor::Options supervisor_options)
    : options_(std::move(options)), slots_(std::move(slots)), spool_(spool) {
  supervisor_ = std::make_unique<RankSupervisor>(
      std::move(supervisor_options), slots_, spool_, launcher,
      [this](const v1::RendezvousPublish& p) { EnqueueRendezvous(p); });
  spool_->SetAppendListener([this] {
    absl::MutexLock lock(&mu_);
    spool_dirty_ = true;
  });
}

Agent::~Agent() {
  spool_->SetAppendListener(nullptr);
  if (stopper_.joinable()) stopper_.join();
  supervisor_.reset();
}

void Agent::Shutdown() {
  absl::MutexLock lock(&mu_);
  if (shutdown_requested_) return;
  shutdown_requested_ = true;
}

void Agent::StopRanksThread() {
  const bool none_left = supervisor_->Shutdown(options_.shutdown_grace);
  if (!none_left) LogError("some ranks did not exit after SIGKILL; they are left behind");
  absl::MutexLock lock(&mu_);
  ranks_stopped_ = true;
  flush_deadline_ = absl::Now() + options_.flush_timeout;
  // Nothing left to wait for: abandon a connection attempt that may hang
  // (a coordinator host that drops packets) instead of delaying the exit.
  if (!connected_ && context_ != nullptr) context_->TryCancel();
}

bool Agent::DoneLocked() const {
  if (!ranks_stopped_) return false;
  if (!connected_) return true;  // Nobody to flush to; the spool keeps the rest.
  return absl::Now() >= flush_deadline_ || spool_->acked_seq() >= spool_->last_seq();
}

void Agent::EnqueueRendezvous(const v1::RendezvousPublish& publish) {
  absl::MutexLock lock(&mu_);
  // While disconnected it is dropped here; LocalPublications() brings it back
  // after the next registration.
  if (!connected_) return;
  v1::AgentToCoordinator msg;
  *msg.mutable_rendezvous() = publish;
  outbox_.push_back(std::move(msg));
}

std::shared_ptr<grpc::Channel> Agent::MakeChannel() const {
  grpc::ChannelArguments args;
  // A fresh subchannel per attempt: gRPC's own reconnect backoff (up to 120 s)
  // must not override the agent's (capped at max_backoff).
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS,
              static_cast<int>(absl::ToInt64Milliseconds(options_.max_backoff)));
  // Keepalive finds a coordinator that vanished without closing the
  // connection. Just above 5 minutes because a gRPC server's default policy
  // answers more frequent pings with GOAWAY ("too_many_pings").
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 300 * 1000 + 1000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 20 * 1000);
  args.SetInt(GRPC_ARG_HTTP2_MAX_PINGS_WITHOUT_DATA, 0);
  std::shared_ptr<grpc::ChannelCredentials> creds;
  if (options_.tls_ca_pem.empty()) {
    creds = grpc::InsecureChannelCredentials();
  } else {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = options_.tls_ca_pem;
    creds = grpc::SslCredentials(ssl);
  }
  return grpc::CreateCustomChannel(options_.coordinator, creds, args);
}

void Agent::Run() {
  LogInfo(absl::StrCat("agent ", spool_->agent_id(), " on ", options_.host, " with ", slots_.size(),
                       " slots; coordinator ", options_.coordinator));
  std::mt19937_64 rng(std::random_device{}());
  std::uniform_real_distribution<double> jitter(0.8, 1.2);
  absl::Duration backoff = options_.initial_backoff;
  int failures = 0;  // consecutive attempts that did not register
  for (;;) {
    {
      absl::MutexLock lock(&mu_);
      if (shutdown_requested_ && !stopper_.joinable())
        stopper_ = std::thread([this] { StopRanksThread(); });
      if (DoneLocked()) break;
    }
    const absl::Time began = absl::Now();
    const Outcome outcome = RunConnection();
    // Only a connection that stayed up resets the backoff. One the
    // coordinator ends right after registering (its disk is full and it
    // refuses every batch, say) is no recovery: reconnecting at once would
    // loop at the initial backoff, logging each time on both sides.
    const bool stayed_up = outcome.registered && absl::Now() - began >= options_.max_backoff;
    if (stayed_up) {
      backoff = options_.initial_backoff;
      failures = 0;
    } else if (!outcome.registered) {
      ++failures;
    }
    absl::Duration wait = backoff * jitter(rng);
    {
      absl::MutexLock lock(&mu_);
      // A registration is what keeps this agent alive on the coordinator
      // while its streams end early: come back within one heartbeat
      // interval, or the coordinator would declare the agent dead and
      // restart its jobs.
      if (outcome.registered && !stayed_up) wait = std::min(wait, heartbeat_interval_);
      if (shutdown_requested_ && !stopper_.joinable())
        stopper_ = std::thread([this] { StopRanksThread(); });
      if (DoneLocked()) break;
      // A coordinator down for hours must not flood the log: every failure
      // while backing off, then one line a minute or so at the cap.
      if (!outcome.failure.empty() && (failures <= 6 || failures % 12 == 0)) {
        const std::string retry = absl::StrCat(
            "; retrying in ", absl::FormatDuration(absl::Trunc(wait, absl::Milliseconds(1))),
            failures > 1 ? absl::StrCat(" (attempt ", failures, ")") : "");
        Log(outcome.rejected ? LogLevel::kError : LogLevel::kWarning, outcome.failure + retry);
      }
      // Wakes early for shutdown: an unreachable coordinator must not delay it.
      mu_.AwaitWithTimeout(absl::Condition(
                               +[](Agent* a) {
                                 return a->shutdown_requested_ &&
                                        (!a->stopper_.joinable() || a->ranks_stopped_);
                               },
                               this),
                           wait);
    }
    backoff = std::min(backoff * 2, options_.max_backoff);
  }
  if (stopper_.joinable()) stopper_.join();
  LogInfo("agent stopped");
}

Agent::Outcome Agent::RunConnection() {
  std::shared_ptr<grpc::Channel> channel = MakeChannel();
  std::unique_ptr<v1::AgentService::Stub> stub = v1::AgentService::NewStub(channel);
  grpc::ClientContext context;
  if (!options_.token.empty()) context.AddMetadata("authorization", "Bearer " + options_.token);

  v1::AgentToCoordinator hello;
  v1::RegisterAgent* reg = hello.mutable_register_();
  reg->set_agent_id(spool_->agent_id());
  reg->set_host(options_.host);
  for (const HostSlot& s : slots_) *reg->add_slots() = s.slot;
  for (v1::RunningRank& r : supervisor_->Running()) *reg->add_running() = std::move(r);
  reg->set_version(options_.version);
  reg->set_last_agent_seq(spool_->last_seq());

  {
    absl::MutexLock lock(&mu_);
    context_ = &context;
    connected_ = false;
    synced_ = false;
    broken_ = false;
    reader_done_ = false;
    spool_dirty_ = false;
    sent_up_to_ = 0;
    next_heartbeat_ = absl::InfiniteFuture();
    ack_deadline_ = absl::InfiniteFuture();
    outbox_.clear();
  }
  const absl::Time register_deadline = absl::Now() + options_.register_timeout;
  std::unique_ptr<Stream> stream = stub->Connect(&context);
  bool registered = false;
  bool write_failed = false;
  if (stream->Write(hello)) {
    std::thread reader([this, s = stream.get()] { ReadLoop(s); });
    for (;;) {
      std::deque<v1::AgentToCoordinator> outbox;
      bool send_spool = false;
      bool heartbeat = false;
      {
        absl::MutexLock lock(&mu_);
        if (shutdown_requested_ && !stopper_.joinable())
          stopper_ = std::thread([this] { StopRanksThread(); });
        auto ready = [this, register_deadline]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
          const absl::Time now = absl::Now();
          return broken_ || DoneLocked() || !outbox_.empty() || (synced_ && spool_dirty_) ||
                 (!connected_ && now >= register_deadline) || now >= next_heartbeat_ ||
                 (!synced_ && now >= ack_deadline_) ||
                 (shutdown_requested_ && !stopper_.joinable());
        };
        // Deadlines are checked at least every 100 ms; everything else wakes
        // the wait through mu_.
        while (!ready()) mu_.AwaitWithTimeout(absl::Condition(&ready), absl::Milliseconds(100));
        registered = registered || connected_;
        if (broken_ || DoneLocked()) break;
        if (!connected_ && absl::Now() >= register_deadline) {
          LogWarning(absl::StrCat("no Registered from ", options_.coordinator, " within ",
                                  absl::FormatDuration(options_.register_timeout),
                                  "; reconnecting"));
          break;
        }
        if (shutdown_requested_ && !stopper_.joinable()) continue;
        const absl::Time now = absl::Now();
        if (!synced_ && now >= ack_deadline_) {
          synced_ = true;
          sent_up_to_ = std::max(sent_up_to_, spool_->acked_seq());
          spool_dirty_ = true;
          LogWarning(absl::StrCat("no Ack from the coordinator within ",
                                  absl::FormatDuration(options_.first_ack_timeout),
                                  " of Registered; sending events above the spool's ack ",
                                  sent_up_to_));
        }
        outbox.swap(outbox_);
        send_spool = synced_ && spool_dirty_;
        if (send_spool) spool_dirty_ = false;
        if (now >= next_heartbeat_) {
          heartbeat = true;
          next_heartbeat_ = now + heartbeat_interval_;
        }
      }
      bool ok = true;
      for (const v1::AgentToCoordinator& m : outbox) ok = ok && stream->Write(m);
      if (ok && send_spool) ok = SendSpooled(stream.get());
      if (ok && heartbeat) {
        v1::AgentToCoordinator hb;
        hb.mutable_heartbeat()->set_time_unix_ms(absl::ToUnixMillis(absl::Now()));
        ok = stream->Write(hb);
      }
      if (!ok) {
        write_failed = true;
        break;
      }
    }
    // Unblock the reader unless the stream ended (or is ending) on its own:
    // a cancel would replace the coordinator's status with CANCELLED.
    {
      absl::MutexLock lock(&mu_);
      const absl::Duration grace =
          broken_ || write_failed ? absl::Seconds(1) : absl::ZeroDuration();
      if (!mu_.AwaitWithTimeout(absl::Condition(&reader_done_), grace)) context.TryCancel();
    }
    reader.join();
  }
  const grpc::Status status = stream->Finish();
  bool shutting_down;
  {
    absl::MutexLock lock(&mu_);
    registered = registered || connected_;
    context_ = nullptr;
    connected_ = false;
    shutting_down = shutdown_requested_;
  }
  Outcome outcome;
  outcome.registered = registered;
  if (status.error_code() == grpc::StatusCode::UNAUTHENTICATED ||
      status.error_code() == grpc::StatusCode::PERMISSION_DENIED) {
    outcome.rejected = true;
    outcome.failure = absl::StrCat(
        "coordinator ", options_.coordinator, " rejected agent ", spool_->agent_id(), " (",
        StatusText(status),
        "): make --token-file hold this agent's token from the coordinator's --agent-tokens, "
        "and --agent-id the id it is listed under");
  } else if (status.error_code() == grpc::StatusCode::ALREADY_EXISTS) {
    outcome.rejected = true;
    outcome.failure = absl::StrCat("coordinator ", options_.coordinator, " refused agent ",
                                   spool_->agent_id(), " (", StatusText(status), ")");
  } else if (!shutting_down || status.error_code() != grpc::StatusCode::CANCELLED) {
    outcome.failure =
        absl::StrCat(registered ? "lost the connection to " : "cannot connect to ",
                     options_.coordinator, " (", StatusText(status), ")",
                     registered ? "" : "; check --coordinator and that ftune-coordinator runs");
  }
  return outcome;
}

bool Agent::SendSpooled(Stream* stream) {
  for (;;) {
    int64_t after;
    {
      absl::MutexLock lock(&mu_);
      after = sent_up_to_;
    }
    absl::StatusOr<std::vector<v1::RankEvent>> events =
        spool_->ReadAfter(after, options_.max_batch_events, options_.max_batch_bytes);
    if (!events.ok()) {
      LogError(absl::StrCat("cannot read the spool: ", events.status().message()));
      return false;
    }
    if (events->empty()) return true;
    v1::AgentToCoordinator msg;
    const int64_t last = events->back().agent_seq();
    for (v1::RankEvent& e : *events) *msg.mutable_events()->add_events() = std::move(e);
    if (!stream->Write(msg)) return false;
    absl::MutexLock lock(&mu_);
    sent_up_to_ = std::max(sent_up_to_, last);
  }
}

void Agent::ReadLoop(Stream* stream) {
  v1::CoordinatorToAgent msg;
  while (stream->Read(&msg)) {
    switch (msg.payload_case()) {
      case v1::CoordinatorToAgent::kRegistered: {
        const v1::Registered& r = msg.registered();
        {
          absl::MutexLock lock(&mu_);
          connected_ = true;
          heartbeat_interval_ =
              options_.heartbeat_ms > 0       ? absl::Milliseconds(options_.heartbeat_ms)
              : r.heartbeat_interval_ms() > 0 ? absl::Milliseconds(r.heartbeat_interval_ms())
                                              : kDefaultHeartbeat;
          next_heartbeat_ = absl::Now() + heartbeat_interval_;
          if (!synced_) ack_deadline_ = absl::Now() + options_.first_ack_timeout;
          // Rendezvous data is not spooled; the coordinator may have missed it.
          for (v1::RendezvousPublish& p : supervisor_->LocalPublications()) {
            v1::AgentToCoordinator out;
            *out.mutable_rendezvous() = std::move(p);
            outbox_.push_back(std::move(out));
          }
        }
        absl::Duration interval;
        {
          absl::MutexLock lock(&mu_);
          interval = heartbeat_interval_;
        }
        LogInfo(absl::StrCat(
            "registered with ", options_.coordinator, "; heartbeat every ",
            absl::FormatDuration(interval),
            r.stale_size() > 0 ? absl::StrCat("; stopping ", r.stale_size(), " stale ranks") : ""));
        if (r.stale_size() > 0) {
          supervisor_->StopStale(std::vector<v1::RunningRank>(r.stale().begin(), r.stale().end()));
        }
        break;
      }
      case v1::CoordinatorToAgent::kAck: {
        const int64_t seq = msg.ack().agent_seq();
        if (seq < spool_->acked_seq()) {
          LogWarning(absl::StrCat("coordinator acknowledges agent_seq ", seq,
                                  " but already acknowledged ", spool_->acked_seq(),
                                  " before; events in between are no longer in the spool"));
        }
        if (absl::Status s = spool_->Ack(seq); !s.ok()) LogError(s.message());
        absl::MutexLock lock(&mu_);
        if (!synced_) {
          // The first Ack says where the coordinator's store ends: resend
          // everything above it (the spool still has all unacked events).
          synced_ = true;
          sent_up_to_ = seq;
          spool_dirty_ = true;
        } else {
          sent_up_to_ = std::max(sent_up_to_, seq);
        }
        break;
      }
      case v1::CoordinatorToAgent::kAssign:
        LogInfo(absl::StrCat("assignment: job ", msg.assign().job_id(), " attempt ",
                             msg.assign().attempt(), ", ", msg.assign().ranks_size(), " of ",
                             msg.assign().world_size(), " ranks here"));
        supervisor_->Assign(msg.assign());
        break;
      case v1::CoordinatorToAgent::kStop:
        LogInfo(absl::StrCat(
            "stop: job ", msg.stop().job_id(), " attempt ", msg.stop().attempt(),
            msg.stop().reason().empty() ? "" : absl::StrCat(" (", msg.stop().reason(), ")")));
        supervisor_->Stop(msg.stop());
        break;
      case v1::CoordinatorToAgent::kRendezvous:
        supervisor_->DeliverRendezvous(msg.rendezvous());
        break;
      case v1::CoordinatorToAgent::PAYLOAD_NOT_SET:
        LogWarning(
            "coordinator sent an empty message; ignoring it (is the coordinator newer than this "
            "agent?)");
        break;
    }
  }
  absl::MutexLock lock(&mu_);
  broken_ = true;
  reader_done_ = true;
}

}  // namespace ftune::agent
