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
// (JobManager drops and counts the rest).
#ifndef FTUNE_SERVER_AGENT_SERVICE_H_
#define FTUNE_SERVER_AGENT_SERVICE_H_

#include <string>

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

 private:
  AgentManager* agents_;
  EventManager* events_;
  JobManager* jobs_;
  const Authenticator* auth_;
};

}  // namespace ftune::server

#endif  // FTUNE_SERVER_AGENT_SERVICE_H_
