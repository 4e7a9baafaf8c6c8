// Who is calling the coordinator, and what they may do. gRPC-free: the
// services hand in the call's `authorization` metadata and map the status.
//
// Credentials are bearer tokens (docs/security.md has the trust model):
//   * users: `--user-tokens FILE`, lines `TOKEN USER [admin]`; the legacy
//     `--client-token-file` is one more line, `TOKEN admin admin`. A user
//     calls JobService and reflection; an admin also sees every job and may
//     set any priority.
//   * agents: `--agent-tokens FILE`, lines `AGENT_ID TOKEN`: the token proves
//     that one id, and a registration under another id is refused. The legacy
//     shared `--agent-token-file` proves only "some agent": any holder may
//     claim any id (development only; main.cc refuses it off loopback
//     without --insecure).
//   * Prometheus: `--metrics-auth FILE`, lines `USER:PASSWORD`, checked by
//     the /metrics exposer as HTTP basic auth (AuthenticateScrape).
// A kind of credential that is not configured is not checked: without user
// tokens every client call is the built-in admin `local`, without agent
// tokens any caller may register any agent id. main.cc allows that only on a
// loopback address (or with --insecure).
//
// Status codes, the same for every RPC: no credential, or one that matches
// nothing -> UNAUTHENTICATED; a valid credential of the wrong kind (an agent
// token on JobService, a user token on AgentService) or an agent token
// claiming another agent's id -> PERMISSION_DENIED. A job another user owns
// is NOT_FOUND, word for word as a job that does not exist, so ids do not
// tell whether a job exists (CheckCanSeeJob below).
//
// Tokens are compared in constant time against every configured one.
//
// Reload: the credentials can be replaced while serving (main.cc does on
// SIGHUP, from the same files: LoadAuthConfig). Reload checks the new set as
// Create does and swaps it in whole, or keeps the old one whole on error.
// Every call after Reload returns sees only the new set, so a revoked token
// is refused from the next RPC on; a call already authenticated (an open
// stream) is not touched here (AgentServiceImpl ends agent streams whose
// token was revoked, JobServiceImpl WatchJob streams).
//
// Thread-safety: every method may be called from any thread; a call reads
// one snapshot of the credentials (a shared_ptr swapped under a mutex).
#ifndef FTUNE_SERVER_AUTH_H_
#define FTUNE_SERVER_AUTH_H_

#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "ftune/v1/job_service.pb.h"

namespace ftune::server {

// The user a client call acts for.
struct User {
  std::string name;
  bool admin = false;
};

// What an agent credential proves.
struct AgentIdentity {
  // The one id it may register; empty: any (shared token, or agent auth off).
  std::string agent_id;
};

struct UserToken {
  std::string token;
  User user;
};

struct AgentToken {
  std::string agent_id;
  std::string token;
};

// One `USER:PASSWORD` line of --metrics-auth: what a Prometheus scrape
// config's `basic_auth` sends.
struct MetricsUser {
  std::string name;
  std::string password;
};

// The built-in user of a coordinator without user tokens.
inline constexpr char kLocalUser[] = "local";

struct AuthConfig {
  std::vector<UserToken> users;
  std::vector<AgentToken> agents;
  // Legacy shared agent token; empty: none.
  std::string shared_agent_token;
  // Who may scrape /metrics; empty: anyone who reaches it.
  std::vector<MetricsUser> metrics_users;
  // Non-admin users may set priority up to this (--max-user-priority).
  int max_user_priority = 0;
};

// Parses a --user-tokens file: `TOKEN USER [admin]` per line, `#` comments
// and blank lines ignored. Errors name the file and line.
absl::StatusOr<std::vector<UserToken>> ParseUserTokens(std::string_view text,
                                                       const std::string& path);
// Parses an --agent-tokens file: `AGENT_ID TOKEN` per line.
absl::StatusOr<std::vector<AgentToken>> ParseAgentTokens(std::string_view text,
                                                         const std::string& path);

// Parses a --metrics-auth file: `USER:PASSWORD` per line (the password is
// the rest of the line after the first `:`, without spaces), `#` comments
// and blank lines ignored. Errors name the file and line.
absl::StatusOr<std::vector<MetricsUser>> ParseMetricsUsers(std::string_view text,
                                                           const std::string& path);

// A token (or metrics password) shorter than this in a file is refused.
inline constexpr size_t kMinTokenChars = 16;

// Agent ids and user names: 1 to 64 of [A-Za-z0-9._@-].
bool IsValidPrincipalName(std::string_view name);

// Reads a file holding one token (whitespace trimmed); empty path -> empty token.
absl::Status ReadTokenFile(const std::string& path, std::string* token);

// The credential files the coordinator's flags name; empty: not given.
struct AuthFiles {
  std::string user_tokens;        // --user-tokens
  std::string client_token_file;  // --client-token-file
  std::string agent_tokens;       // --agent-tokens
  std::string agent_token_file;   // --agent-token-file
  std::string metrics_auth;       // --metrics-auth
  int max_user_priority = 0;      // --max-user-priority
};

// Reads and parses every file `files` names. Errors name the flag, the file
// and, for a line that does not parse, its number. Create or Reload then
// checks the files against each other.
absl::StatusOr<AuthConfig> LoadAuthConfig(const AuthFiles& files);

class Authenticator {
 public:
  // INVALID_ARGUMENT when a token is configured twice (for two users, two
  // agents, or a user and an agent: a client token that is also an agent
  // token would let every user register agents), or a metrics password is
  // also a token.
  static absl::StatusOr<Authenticator> Create(AuthConfig config);

  // Replaces the credentials with `config`, checked as Create checks them,
  // and as a whole: on error nothing changes. The kinds of credential
  // configured (user, agent, per-agent, metrics) must stay as they are: the
  // start-up rules of main.cc (what may serve off loopback) were checked
  // against them (FAILED_PRECONDITION otherwise; restart to change them).
  absl::Status Reload(AuthConfig config);

  bool users_configured() const { return Config()->users.size() > 0; }
  bool agents_configured() const;
  bool per_agent_tokens() const { return Config()->agents.size() > 0; }
  bool metrics_auth_configured() const { return Config()->metrics_users.size() > 0; }
  int max_user_priority() const { return Config()->max_user_priority; }
  // How many of each are configured now, for logs.
  size_t num_users() const { return Config()->users.size(); }
  size_t num_agents() const { return Config()->agents.size(); }
  size_t num_metrics_users() const { return Config()->metrics_users.size(); }

  // `authorization`: the call's metadata value, nullopt when absent.
  absl::StatusOr<User> AuthenticateUser(std::optional<std::string_view> authorization) const;
  absl::StatusOr<AgentIdentity> AuthenticateAgent(
      std::optional<std::string_view> authorization) const;
  // Whether an HTTP basic auth pair may scrape /metrics: true when it
  // matches a --metrics-auth line, or when none is configured. The password
  // is compared in constant time against every configured user's, so the
  // time taken does not tell which user names exist.
  bool AuthenticateScrape(const std::string& user, const std::string& password) const;

 private:
  struct State {
    mutable absl::Mutex mu;
    std::shared_ptr<const AuthConfig> config ABSL_GUARDED_BY(mu);
  };
  explicit Authenticator(AuthConfig config);
  // OK when no token is configured twice (Create's rule).
  static absl::Status Check(const AuthConfig& config);
  // The credentials now; callers keep the snapshot for the whole call.
  std::shared_ptr<const AuthConfig> Config() const;
  // The bearer token of an authorization value; nullopt when malformed.
  static std::optional<std::string_view> Bearer(std::string_view authorization);
  static const UserToken* FindUser(const AuthConfig& c, std::string_view token);
  static const AgentToken* FindAgent(const AuthConfig& c, std::string_view token);
  static bool IsSharedAgentToken(const AuthConfig& c, std::string_view token);

  std::unique_ptr<State> state_;  // a pointer, so an Authenticator moves
};

// --- What a user may do with jobs.

// OK when `user` may see (get, watch, list checkpoints of, cancel) `job`:
// its owner, or an admin. Otherwise NOT_FOUND with the store's words for a
// missing job.
absl::Status CheckCanSeeJob(const User& user, const v1::Job& job);
// OK when `user` may submit a job with this priority.
absl::Status CheckPriority(const User& user, int priority, int max_user_priority);
// The owner filter a ListJobs of `user` runs with: non-admins see their own
// jobs only (naming another owner is PERMISSION_DENIED).
absl::StatusOr<std::string> ListOwnerFilter(const User& user, const std::string& requested);
// OK when a registration under `claimed_id` may use `identity`.
absl::Status CheckAgentId(const AgentIdentity& identity, const std::string& claimed_id);

}  // namespace ftune::server

#endif  // FTUNE_SERVER_AUTH_H_
