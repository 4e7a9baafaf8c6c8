// grpc.reflection.v1alpha.ServerReflection behind the coordinator's
// credentials: any user (admin or not) may describe the API, an agent
// credential or none may not (auth.h's codes). gRPC's own reflection plugin
// answers everyone and cannot be wrapped, so this serves the protocol from
// the protobuf descriptors linked into the binary: list_services, files by
// name, by symbol and by extension (each with the files it imports), and
// extension numbers.
//
// Thread-safety: one thread per stream (sync API); the service's state is
// immutable.
#ifndef FTUNE_SERVER_REFLECTION_SERVICE_H_
#define FTUNE_SERVER_REFLECTION_SERVICE_H_

#include <string>
#include <vector>

#include "auth.h"
#include "grpc/reflection/v1alpha/reflection.grpc.pb.h"

namespace ftune::server {

class ReflectionServiceImpl final
    : public grpc::reflection::v1alpha::ServerReflection::Service {
 public:
  // `services`: the full names list_services answers. auth must outlive this.
  ReflectionServiceImpl(const Authenticator* auth, std::vector<std::string> services);

  grpc::Status ServerReflectionInfo(
      grpc::ServerContext* ctx,
      grpc::ServerReaderWriter<grpc::reflection::v1alpha::ServerReflectionResponse,
                               grpc::reflection::v1alpha::ServerReflectionRequest>* stream)
      override;

 private:
  const Authenticator* auth_;
  std::vector<std::string> services_;
};

}  // namespace ftune::server

#endif  // FTUNE_SERVER_REFLECTION_SERVICE_H_
