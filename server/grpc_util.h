// Small glue between the managers' absl::Status and gRPC: status mapping and
// the call's credentials (auth.h decides what they prove). Only *_service.cc
// files include this.
#ifndef FTUNE_SERVER_GRPC_UTIL_H_
#define FTUNE_SERVER_GRPC_UTIL_H_

#include <optional>
#include <string>
#include <string_view>

#include <grpcpp/grpcpp.h>

#include "absl/status/status.h"
#include "auth.h"

namespace ftune::server {

inline grpc::Status ToGrpc(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

// The call's "authorization" metadata, nullopt when absent.
std::optional<std::string_view> Authorization(const grpc::ServerContextBase& ctx);

}  // namespace ftune::server

#endif  // FTUNE_SERVER_GRPC_UTIL_H_
