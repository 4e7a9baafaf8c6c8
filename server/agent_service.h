// AgentService: one bidirectional stream per host agent. The handler thread
// reads and hands each message to its manager (register, heartbeat,
// disconnect: AgentManager; rank events: EventManager; rendezvous:
// JobManager); a per-stream writer thread drains the outgoing queue, so the
// managers can queue messages without ever blocking on the network.
//
// Identity: the stream's credential must be an agent's (auth.h), and a
// per-agent credential registers only its own agent_id (PERMISSION_DENIED
// otherwise). Everything later on the stream is taken as that agent's: its
// rank events and rendezvous data act only on ranks placed on it
// (JobManager drops and counts the rest). When the credentials are reloaded
// (Authenticator::Reload), EndStreamsOfRevokedCredentials ends each open
// stream whose token no longer proves its agent id; the agent reconnects and
// is refused (or accepted, with the token it now has).
//
// Thread-safety: Connect runs on gRPC's threads, one per stream;
// EndStreamsOfRevokedCredentials may be called from any thread.
#ifndef FTUNE_SERVER_AGENT_SERVICE_H_
#define FTUNE_SERVER_AGENT_SERVICE_H_

#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "ftune/v1/agent_service.grpc.pb.h"
#include "agent_manager.h"
#include "auth.h"
#include "event_manager.h"
#include "job_manager.h"

namespace ftune::server {

class AgentServiceImpl final : public v1::AgentService::Service {
 public:
  // The managers must outlive the service.
  AgentServiceImpl(AgentManager* agents, EventManager* events, JobManager* jobs,
                   const Authenticator* auth);

  grpc::Status Connect(
      grpc::ServerContext* ctx,
      grpc::ServerReaderWriter<v1::CoordinatorToAgent, v1::AgentToCoordinator>* stream) override;

  // Authenticates every open stream's credential again and ends those it no
  // longer proves for the stream's agent id. Returns their agent ids.
  std::vector<std::string> EndStreamsOfRevokedCredentials();

 private:
  // What a registered stream was opened with.
  struct OpenStream {
    std::optional<std::string> authorization;
    std::string agent_id;
    std::shared_ptr<AgentLink> link;
  };
  // OK when `authorization` still proves `agent_id`.
  absl::Status Recheck(const std::optional<std::string>& authorization,
                       const std::string& agent_id) const;

  AgentManager* agents_;
  EventManager* events_;
  JobManager* jobs_;
  const Authenticator* auth_;
  std::mutex mu_;
  std::map<const AgentLink*, OpenStream> open_;  // guarded by mu_
};

}  // namespace ftune::server

#endif  // FTUNE_SERVER_AGENT_SERVICE_H_
