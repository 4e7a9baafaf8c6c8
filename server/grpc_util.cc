#include "grpc_util.h"

#include <fstream>
#include <sstream>

namespace ftune::server {

std::optional<std::string_view> Authorization(const grpc::ServerContextBase& ctx) {
  const auto& md = ctx.client_metadata();
  auto it = md.find("authorization");
  if (it == md.end()) return std::nullopt;
  return std::string_view(it->second.data(), it->second.size());
}

absl::Status ReadTokenFile(const std::string& path, std::string* token) {
  token->clear();
  if (path.empty()) return absl::OkStatus();
  std::ifstream in(path);
  if (!in) return absl::NotFoundError("cannot read token file '" + path + "'");
  std::stringstream buf;
  buf << in.rdbuf();
  std::string t = buf.str();
  const auto b = t.find_first_not_of(" \t\r\n");
  const auto e = t.find_last_not_of(" \t\r\n");
  if (b == std::string::npos)
    return absl::InvalidArgumentError("token file '" + path + "' is empty");
  *token = t.substr(b, e - b + 1);
  return absl::OkStatus();
}

}  // namespace ftune::server
