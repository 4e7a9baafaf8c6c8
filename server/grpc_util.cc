#include "grpc_util.h"

namespace ftune::server {

std::optional<std::string_view> Authorization(const grpc::ServerContextBase& ctx) {
  const auto& md = ctx.client_metadata();
  auto it = md.find("authorization");
  if (it == md.end()) return std::nullopt;
  return std::string_view(it->second.data(), it->second.size());
}

}  // namespace ftune::server
