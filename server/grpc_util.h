// Small glue between the managers' absl::Status and gRPC: status mapping and
// bearer-token checks. Only *_service.cc files include this.
#ifndef FTUNE_SERVER_GRPC_UTIL_H_
#define FTUNE_SERVER_GRPC_UTIL_H_

#include <string>

#include <grpcpp/grpcpp.h>

#include "absl/status/status.h"

namespace ftune::server {

inline grpc::Status ToGrpc(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

// OK when `token` is empty (auth off) or the call carries
// "authorization: Bearer <token>"; UNAUTHENTICATED naming what is missing.
grpc::Status CheckBearer(const grpc::ServerContextBase& ctx, const std::string& token,
                         const char* who);

// Reads a token file (whitespace trimmed); empty path -> empty token.
absl::Status ReadTokenFile(const std::string& path, std::string* token);

}  // namespace ftune::server

#endif  // FTUNE_SERVER_GRPC_UTIL_H_
