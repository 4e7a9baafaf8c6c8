#include "grpc_util.h"

#include <fstream>
#include <sstream>

namespace ftune::server {

grpc::Status CheckBearer(const grpc::ServerContextBase& ctx, const std::string& token,
                         const char* who) {
  if (token.empty()) return grpc::Status::OK;
  const auto& md = ctx.client_metadata();
  auto it = md.find("authorization");
  if (it == md.end())
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        std::string("missing 'authorization: Bearer <token>' metadata; pass the ") +
                            who + " token (--token-file)");
  const std::string value(it->second.data(), it->second.size());
  const std::string expected = "Bearer " + token;
  // Constant-time comparison: the token is a secret.
  unsigned diff = value.size() ^ expected.size();
  for (size_t i = 0; i < value.size() && i < expected.size(); ++i)
    diff |= static_cast<unsigned char>(value[i]) ^ static_cast<unsigned char>(expected[i]);
  if (diff != 0)
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        std::string("invalid ") + who + " token");
  return grpc::Status::OK;
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
