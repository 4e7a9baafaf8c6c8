// AgentService: one bidirectional stream per host agent. The handler thread
// reads; a per-stream writer thread drains the outgoing queue, so the
// JobManager can queue messages without ever blocking on the network.
#ifndef FTUNE_SERVER_AGENT_SERVICE_H_
#define FTUNE_SERVER_AGENT_SERVICE_H_

#include <string>

#include "ftune/v1/agent_service.grpc.pb.h"
#include "job_manager.h"

namespace ftune::server {

class AgentServiceImpl final : public v1::AgentService::Service {
 public:
  AgentServiceImpl(JobManager* manager, std::string agent_token);

  grpc::Status Connect(
      grpc::ServerContext* ctx,
      grpc::ServerReaderWriter<v1::CoordinatorToAgent, v1::AgentToCoordinator>* stream) override;

 private:
  JobManager* manager_;
  std::string token_;
};

}  // namespace ftune::server

#endif  // FTUNE_SERVER_AGENT_SERVICE_H_
