#include "agent_service.h"

#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

#include "grpc_util.h"

namespace ftune::server {
namespace {

using Stream = grpc::ServerReaderWriter<v1::CoordinatorToAgent, v1::AgentToCoordinator>;

class StreamLink : public AgentLink {
 public:
  StreamLink(grpc::ServerContext* ctx, Stream* stream)
      : ctx_(ctx), stream_(stream), writer_([this] { Run(); }) {}
  ~StreamLink() override { Close(); }

  void Send(const v1::CoordinatorToAgent& msg) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) return;
    queue_.push_back(msg);
    cv_.notify_one();
  }

  // Cancelling the RPC makes the handler's Read fail, so Connect returns and
  // the agent sees its stream end. ended_ keeps the context from being used
  // once the handler has returned.
  void Disconnect() override {
    std::lock_guard<std::mutex> lock(mu_);
    if (ended_) return;
    closed_ = true;
    queue_.clear();
    cv_.notify_one();
    ctx_->TryCancel();
  }

  // The handler is done with the stream; call before it returns.
  void Close() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      closed_ = true;
      ended_ = true;
      cv_.notify_one();
    }
    if (writer_.joinable()) writer_.join();
  }

 private:
  void Run() {
    for (;;) {
      v1::CoordinatorToAgent msg;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return closed_ || !queue_.empty(); });
        if (queue_.empty()) return;
        msg = std::move(queue_.front());
        queue_.pop_front();
      }
      if (!stream_->Write(msg)) {
        std::lock_guard<std::mutex> lock(mu_);
        closed_ = true;
        queue_.clear();
        return;
      }
    }
  }

  grpc::ServerContext* const ctx_;
  Stream* stream_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<v1::CoordinatorToAgent> queue_;
  bool closed_ = false;
  bool ended_ = false;  // the handler returned (or is returning)
  std::thread writer_;
};

}  // namespace

AgentServiceImpl::AgentServiceImpl(AgentManager* agents, EventManager* events, JobManager* jobs,
                                   const Authenticator* auth)
    : agents_(agents), events_(events), jobs_(jobs), auth_(auth) {}

absl::Status AgentServiceImpl::Recheck(const std::optional<std::string>& authorization,
                                       const std::string& agent_id) const {
  auto identity = auth_->AuthenticateAgent(authorization
                                               ? std::optional<std::string_view>(*authorization)
                                               : std::nullopt);
  if (!identity.ok()) return identity.status();
  return CheckAgentId(*identity, agent_id);
}

std::vector<std::string> AgentServiceImpl::EndStreamsOfRevokedCredentials() {
  std::vector<std::shared_ptr<AgentLink>> revoked;
  std::vector<std::string> ids;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [key, s] : open_)
      if (!Recheck(s.authorization, s.agent_id).ok()) {
        revoked.push_back(s.link);
        ids.push_back(s.agent_id);
      }
  }
  // Outside mu_: the handler takes it to leave open_ once its Read fails.
  for (const auto& link : revoked) link->Disconnect();
  return ids;
}

grpc::Status AgentServiceImpl::Connect(grpc::ServerContext* ctx, Stream* stream) {
  const std::optional<std::string_view> authorization = Authorization(*ctx);
  auto identity = auth_->AuthenticateAgent(authorization);
  if (!identity.ok()) return ToGrpc(identity.status());
  v1::AgentToCoordinator first;
  if (!stream->Read(&first)) return grpc::Status::OK;
  if (!first.has_register_())
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                        "the first message on an agent stream must be RegisterAgent");
  const std::string agent_id = first.register_().agent_id();
  if (auto st = CheckAgentId(*identity, agent_id); !st.ok()) return ToGrpc(st);
  auto link = std::make_shared<StreamLink>(ctx, stream);
  OpenStream open{authorization ? std::optional<std::string>(*authorization) : std::nullopt,
                  agent_id, link};
  auto leave = [&] {
    std::lock_guard<std::mutex> lock(mu_);
    open_.erase(link.get());
  };
  {
    std::lock_guard<std::mutex> lock(mu_);
    open_.emplace(link.get(), open);
  }
  // Once more, now that a reload would find the stream: a reload between
  // the first check and here is not missed.
  if (auto st = Recheck(open.authorization, agent_id); !st.ok()) {
    leave();
    link->Close();
    return ToGrpc(st);
  }
  if (auto st = agents_->RegisterAgent(first.register_(), link); !st.ok()) {
    leave();
    link->Close();
    return ToGrpc(st);
  }
  grpc::Status result = grpc::Status::OK;
  v1::AgentToCoordinator msg;
  while (stream->Read(&msg)) {
    if (msg.has_heartbeat()) {
      agents_->Heartbeat(agent_id);
    } else if (msg.has_events()) {
      auto acked = events_->IngestEvents(agent_id, msg.events());
      if (!acked.ok()) {
        result = ToGrpc(acked.status());  // the agent reconnects and resends
        break;
      }
      v1::CoordinatorToAgent ack;
      ack.mutable_ack()->set_agent_seq(*acked);
      link->Send(ack);
    } else if (msg.has_rendezvous()) {
      jobs_->Rendezvous(agent_id, msg.rendezvous());
    } else if (msg.has_register_()) {
      result = grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                            "agent registered twice on one stream");
      break;
    }
  }
  leave();
  agents_->AgentDisconnected(agent_id, link.get());
  link->Close();
  return result;
}

}  // namespace ftune::server
