#include "auth.h"

#include <set>

#include "absl/strings/ascii.h"
#include "ftune/file_util.h"

namespace ftune::server {
namespace {

// Constant time in the length of `expected` (the configured secret): the time
// tells neither where `given` differs nor how long the secret is.
bool SameToken(std::string_view expected, std::string_view given) {
  unsigned diff = expected.size() ^ given.size();
  for (size_t i = 0; i < expected.size(); ++i) {
    const unsigned char g = given.empty() ? 0 : static_cast<unsigned char>(given[i % given.size()]);
    diff |= static_cast<unsigned char>(expected[i]) ^ g;
  }
  return diff == 0;
}

// gRPC metadata values are printable ASCII; a token must travel unchanged.
bool IsValidToken(std::string_view token) {
  if (token.empty()) return false;
  for (char c : token)
    if (c <= ' ' || c > '~') return false;
  return true;
}

// The whitespace-separated fields of each line that is not blank or a
// comment, with its number.
std::vector<std::pair<int, std::vector<std::string>>> Lines(std::string_view text) {
  std::vector<std::pair<int, std::vector<std::string>>> out;
  int number = 0;
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string_view::npos) end = text.size();
    const std::string_view line = text.substr(pos, end - pos);
    pos = end + 1;
    ++number;
    std::vector<std::string> fields;
    size_t i = 0;
    while (i < line.size()) {
      while (i < line.size() && absl::ascii_isspace(static_cast<unsigned char>(line[i]))) ++i;
      size_t j = i;
      while (j < line.size() && !absl::ascii_isspace(static_cast<unsigned char>(line[j]))) ++j;
      if (j > i) fields.emplace_back(line.substr(i, j - i));
      i = j;
    }
    if (fields.empty() || fields[0][0] == '#') continue;
    out.emplace_back(number, std::move(fields));
  }
  return out;
}

std::string Where(const std::string& path, int line) {
  return path + ":" + std::to_string(line);
}

absl::Status CheckToken(std::string_view token, const std::string& where, const std::string& of,
                        const std::string& noun = "token") {
  if (!IsValidToken(token))
    return absl::InvalidArgumentError(where + ": the " + noun + " of " + of +
                                      " has characters other than printable ASCII");
  if (token.size() < kMinTokenChars)
    return absl::InvalidArgumentError(
        where + ": the " + noun + " of " + of + " has " + std::to_string(token.size()) +
        " characters; use at least " + std::to_string(kMinTokenChars) +
        " (e.g. `openssl rand -hex 32`)");
  return absl::OkStatus();
}

}  // namespace

bool IsValidPrincipalName(std::string_view name) {
  if (name.empty() || name.size() > 64) return false;
  for (char c : name)
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '-' &&
        c != '@')
      return false;
  return true;
}

absl::StatusOr<std::vector<UserToken>> ParseUserTokens(std::string_view text,
                                                       const std::string& path) {
  std::vector<UserToken> out;
  for (auto& [line, f] : Lines(text)) {
    const std::string where = Where(path, line);
    if (f.size() < 2 || f.size() > 3 || (f.size() == 3 && f[2] != "admin"))
      return absl::InvalidArgumentError(where + ": expected `TOKEN USER [admin]`");
    if (!IsValidPrincipalName(f[1]))
      return absl::InvalidArgumentError(where + ": user name '" + f[1].substr(0, 64) +
                                        "' must be 1 to 64 of A-Z a-z 0-9 . _ @ -");
    if (auto st = CheckToken(f[0], where, "user " + f[1]); !st.ok()) return st;
    out.push_back({f[0], User{f[1], f.size() == 3}});
  }
  if (out.empty())
    return absl::InvalidArgumentError(path + " holds no `TOKEN USER [admin]` line");
  return out;
}

absl::StatusOr<std::vector<AgentToken>> ParseAgentTokens(std::string_view text,
                                                         const std::string& path) {
  std::vector<AgentToken> out;
  std::set<std::string> ids;
  for (auto& [line, f] : Lines(text)) {
    const std::string where = Where(path, line);
    if (f.size() != 2) return absl::InvalidArgumentError(where + ": expected `AGENT_ID TOKEN`");
    if (!IsValidPrincipalName(f[0]))
      return absl::InvalidArgumentError(where + ": agent id '" + f[0].substr(0, 64) +
                                        "' must be 1 to 64 of A-Z a-z 0-9 . _ @ -");
    if (!ids.insert(f[0]).second)
      return absl::InvalidArgumentError(where + ": agent " + f[0] +
                                        " is listed twice; give each agent one token");
    if (auto st = CheckToken(f[1], where, "agent " + f[0]); !st.ok()) return st;
    out.push_back({f[0], f[1]});
  }
  if (out.empty()) return absl::InvalidArgumentError(path + " holds no `AGENT_ID TOKEN` line");
  return out;
}

absl::StatusOr<std::vector<MetricsUser>> ParseMetricsUsers(std::string_view text,
                                                           const std::string& path) {
  std::vector<MetricsUser> out;
  std::set<std::string> names;
  for (auto& [line, f] : Lines(text)) {
    const std::string where = Where(path, line);
    const size_t colon = f[0].find(':');
    if (f.size() != 1 || colon == std::string::npos)
      return absl::InvalidArgumentError(where + ": expected `USER:PASSWORD` (no spaces)");
    std::string name = f[0].substr(0, colon);
    std::string password = f[0].substr(colon + 1);
    if (!IsValidPrincipalName(name))
      return absl::InvalidArgumentError(where + ": user name '" + name.substr(0, 64) +
                                        "' must be 1 to 64 of A-Z a-z 0-9 . _ @ -");
    if (!names.insert(name).second)
      return absl::InvalidArgumentError(where + ": metrics user " + name +
                                        " is listed twice; give each user one password");
    if (auto st = CheckToken(password, where, "metrics user " + name, "password"); !st.ok())
      return st;
    out.push_back({std::move(name), std::move(password)});
  }
  if (out.empty()) return absl::InvalidArgumentError(path + " holds no `USER:PASSWORD` line");
  return out;
}

absl::Status ReadTokenFile(const std::string& path, std::string* token) {
  token->clear();
  if (path.empty()) return absl::OkStatus();
  ftune::Result<std::string> text = ftune::ReadFileToString(path, ftune::kMaxSmallFileBytes);
  if (!text.ok())
    return absl::NotFoundError("cannot read token file '" + path + "': " +
                               std::string(text.status().message()));
  const std::string& t = *text;
  const auto b = t.find_first_not_of(" \t\r\n");
  const auto e = t.find_last_not_of(" \t\r\n");
  if (b == std::string::npos)
    return absl::InvalidArgumentError("token file '" + path + "' is empty");
  *token = t.substr(b, e - b + 1);
  return absl::OkStatus();
}

absl::StatusOr<AuthConfig> LoadAuthConfig(const AuthFiles& f) {
  AuthConfig config;
  config.max_user_priority = f.max_user_priority;
  auto read = [](const std::string& flag, const std::string& path) -> absl::StatusOr<std::string> {
    ftune::Result<std::string> text = ftune::ReadFileToString(path, ftune::kMaxSmallFileBytes);
    if (!text.ok())
      return absl::InvalidArgumentError(flag + " " + path + ": " +
                                        std::string(text.status().message()));
    return std::move(*text);
  };
  if (!f.user_tokens.empty()) {
    auto text = read("--user-tokens", f.user_tokens);
    if (!text.ok()) return text.status();
    auto users = ParseUserTokens(*text, f.user_tokens);
    if (!users.ok()) return users.status();
    config.users = std::move(*users);
  }
  if (!f.client_token_file.empty()) {
    std::string token;
    if (auto st = ReadTokenFile(f.client_token_file, &token); !st.ok()) return st;
    config.users.push_back({token, User{"admin", true}});
  }
  if (!f.agent_tokens.empty() && !f.agent_token_file.empty())
    return absl::InvalidArgumentError(
        "--agent-tokens and --agent-token-file both given: the shared token would let its "
        "holder register as any agent; keep --agent-tokens");
  if (!f.agent_tokens.empty()) {
    auto text = read("--agent-tokens", f.agent_tokens);
    if (!text.ok()) return text.status();
    auto agents = ParseAgentTokens(*text, f.agent_tokens);
    if (!agents.ok()) return agents.status();
    config.agents = std::move(*agents);
  }
  if (auto st = ReadTokenFile(f.agent_token_file, &config.shared_agent_token); !st.ok()) return st;
  if (!f.metrics_auth.empty()) {
    auto text = read("--metrics-auth", f.metrics_auth);
    if (!text.ok()) return text.status();
    auto users = ParseMetricsUsers(*text, f.metrics_auth);
    if (!users.ok()) return users.status();
    config.metrics_users = std::move(*users);
  }
  return config;
}

absl::Status Authenticator::Check(const AuthConfig& config) {
  // Who holds each token, to refuse one token held twice.
  std::vector<std::pair<std::string_view, std::string>> holders;
  for (const auto& u : config.users) holders.emplace_back(u.token, "user " + u.user.name);
  for (const auto& a : config.agents) holders.emplace_back(a.token, "agent " + a.agent_id);
  if (!config.shared_agent_token.empty())
    holders.emplace_back(config.shared_agent_token, "the shared agent token");
  for (const auto& m : config.metrics_users)
    holders.emplace_back(m.password, "metrics user " + m.name + " (as its password)");
  for (size_t i = 0; i < holders.size(); ++i)
    for (size_t j = i + 1; j < holders.size(); ++j)
      if (holders[i].first == holders[j].first)
        return absl::InvalidArgumentError(
            "one token is configured for both " + holders[i].second + " and " + holders[j].second +
            ": every credential must be its own (a client token that is also an agent token "
            "lets every user act as an agent)");
  return absl::OkStatus();
}

Authenticator::Authenticator(AuthConfig config) : state_(std::make_unique<State>()) {
  state_->config = std::make_shared<const AuthConfig>(std::move(config));
}

absl::StatusOr<Authenticator> Authenticator::Create(AuthConfig config) {
  if (auto st = Check(config); !st.ok()) return st;
  return Authenticator(std::move(config));
}

absl::Status Authenticator::Reload(AuthConfig config) {
  if (auto st = Check(config); !st.ok()) return st;
  const std::shared_ptr<const AuthConfig> old = Config();
  auto kinds = [](const AuthConfig& c) {
    return std::vector<bool>{!c.users.empty(), !c.agents.empty(), !c.shared_agent_token.empty(),
                             !c.metrics_users.empty()};
  };
  if (kinds(*old) != kinds(config))
    return absl::FailedPreconditionError(
        "a reload may not switch a kind of credential (user tokens, per-agent tokens, the "
        "shared agent token, metrics users) on or off; restart the coordinator to change which "
        "are configured");
  auto next = std::make_shared<const AuthConfig>(std::move(config));
  absl::MutexLock lock(&state_->mu);
  state_->config = std::move(next);
  return absl::OkStatus();
}

std::shared_ptr<const AuthConfig> Authenticator::Config() const {
  absl::MutexLock lock(&state_->mu);
  return state_->config;
}

bool Authenticator::agents_configured() const {
  const auto c = Config();
  return !c->agents.empty() || !c->shared_agent_token.empty();
}

std::optional<std::string_view> Authenticator::Bearer(std::string_view authorization) {
  constexpr std::string_view kPrefix = "Bearer ";
  if (authorization.substr(0, kPrefix.size()) != kPrefix) return std::nullopt;
  return authorization.substr(kPrefix.size());
}

const UserToken* Authenticator::FindUser(const AuthConfig& c, std::string_view token) {
  const UserToken* found = nullptr;
  for (const auto& u : c.users)
    if (SameToken(u.token, token)) found = &u;
  return found;
}

const AgentToken* Authenticator::FindAgent(const AuthConfig& c, std::string_view token) {
  const AgentToken* found = nullptr;
  for (const auto& a : c.agents)
    if (SameToken(a.token, token)) found = &a;
  return found;
}

bool Authenticator::IsSharedAgentToken(const AuthConfig& c, std::string_view token) {
  return !c.shared_agent_token.empty() && SameToken(c.shared_agent_token, token);
}

absl::StatusOr<User> Authenticator::AuthenticateUser(
    std::optional<std::string_view> authorization) const {
  const std::shared_ptr<const AuthConfig> c = Config();
  const bool users_configured = !c->users.empty();
  if (!authorization) {
    if (!users_configured) return User{kLocalUser, true};
    return absl::UnauthenticatedError(
        "missing 'authorization: Bearer <token>' metadata; pass your user token (--token-file)");
  }
  std::optional<std::string_view> token = Bearer(*authorization);
  if (!token)
    return absl::UnauthenticatedError("the authorization metadata must be 'Bearer <token>'");
  if (const UserToken* u = FindUser(*c, *token)) return u->user;
  if (FindAgent(*c, *token) || IsSharedAgentToken(*c, *token))
    return absl::PermissionDeniedError(
        "an agent credential may not call JobService or reflection; use a user token");
  if (!users_configured) return User{kLocalUser, true};
  return absl::UnauthenticatedError("invalid user token");
}

absl::StatusOr<AgentIdentity> Authenticator::AuthenticateAgent(
    std::optional<std::string_view> authorization) const {
  const std::shared_ptr<const AuthConfig> c = Config();
  const bool agents_configured = !c->agents.empty() || !c->shared_agent_token.empty();
  if (!authorization) {
    if (!agents_configured) return AgentIdentity{};
    return absl::UnauthenticatedError(
        "missing 'authorization: Bearer <token>' metadata; pass the agent's token (--token-file)");
  }
  std::optional<std::string_view> token = Bearer(*authorization);
  if (!token)
    return absl::UnauthenticatedError("the authorization metadata must be 'Bearer <token>'");
  if (const AgentToken* a = FindAgent(*c, *token)) return AgentIdentity{a->agent_id};
  if (IsSharedAgentToken(*c, *token)) return AgentIdentity{};
  if (FindUser(*c, *token))
    return absl::PermissionDeniedError(
        "a user credential may not connect as an agent; use the agent's own token");
  if (!agents_configured) return AgentIdentity{};
  return absl::UnauthenticatedError("invalid agent token");
}

bool Authenticator::AuthenticateScrape(const std::string& user,
                                       const std::string& password) const {
  const std::shared_ptr<const AuthConfig> c = Config();
  if (c->metrics_users.empty()) return true;
  // Every line is compared, whatever the name, so the time does not tell
  // which names exist.
  bool ok = false;
  for (const auto& m : c->metrics_users) {
    const bool name = SameToken(m.name, user);
    const bool pass = SameToken(m.password, password);
    ok |= name & pass;
  }
  return ok;
}

absl::Status CheckCanSeeJob(const User& user, const v1::Job& job) {
  if (user.admin || (!job.owner().empty() && job.owner() == user.name)) return absl::OkStatus();
  // The store's words for a job that does not exist (Store::GetJob).
  return absl::NotFoundError("job '" + job.id() + "' not found");
}

absl::Status CheckPriority(const User& user, int priority, int max_user_priority) {
  if (user.admin || priority <= max_user_priority) return absl::OkStatus();
  return absl::PermissionDeniedError("priority " + std::to_string(priority) +
                                     " is above the coordinator's --max-user-priority (" +
                                     std::to_string(max_user_priority) +
                                     "); only an admin may set it higher");
}

absl::StatusOr<std::string> ListOwnerFilter(const User& user, const std::string& requested) {
  if (user.admin) return requested;
  if (requested.empty() || requested == user.name) return user.name;
  return absl::PermissionDeniedError("only an admin may list the jobs of another user (" +
                                     requested + ")");
}

absl::Status CheckAgentId(const AgentIdentity& identity, const std::string& claimed_id) {
  if (identity.agent_id.empty() || identity.agent_id == claimed_id) return absl::OkStatus();
  return absl::PermissionDeniedError("this credential is agent " + identity.agent_id +
                                     "'s; it may not register as agent " + claimed_id);
}

}  // namespace ftune::server
