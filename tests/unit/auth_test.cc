// Credentials and what they prove (server/auth.h), without gRPC: token files,
// the status each kind of caller gets, reloading them, ownership and
// priority rules, and
// which addresses count as this host (common/ftune/address.h).
#include <atomic>
#include <fstream>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "auth.h"
#include "ftune/address.h"
#include "temp_dir.h"

namespace ftune::server {
namespace {

constexpr char kAlice[] = "alice-token-0123456789";
constexpr char kBob[] = "bob-token-0123456789ab";
constexpr char kRoot[] = "root-token-0123456789ab";
constexpr char kAgentA[] = "agent-a-token-01234567";
constexpr char kAgentB[] = "agent-b-token-01234567";

std::string Bearer(const std::string& t) { return "Bearer " + t; }

Authenticator Full() {
  AuthConfig c;
  c.users = *ParseUserTokens(std::string(kAlice) + " alice\n" + kBob + " bob\n# ops\n\n" + kRoot +
                                 " root admin\n",
                             "users");
  c.agents = *ParseAgentTokens(std::string("gpu-a ") + kAgentA + "\ngpu-b " + kAgentB + "\n",
                               "agents");
  c.max_user_priority = 10;
  return *Authenticator::Create(c);
}

TEST(Auth, UserTokenFiles) {
  auto users = ParseUserTokens(std::string("  ") + kAlice + "\talice \n" + kRoot + " root admin",
                               "u.txt");
  ASSERT_TRUE(users.ok()) << users.status();
  ASSERT_EQ(users->size(), 2u);
  EXPECT_EQ((*users)[0].user.name, "alice");
  EXPECT_FALSE((*users)[0].user.admin);
  EXPECT_TRUE((*users)[1].user.admin);

  auto bad = [](const std::string& text) { return ParseUserTokens(text, "u.txt").status(); };
  EXPECT_NE(bad(std::string(kAlice) + " alice root").message().find("u.txt:1: expected"),
            std::string::npos);
  EXPECT_NE(bad("\nshort alice").message().find("u.txt:2: the token of user alice has 5 "
                                                "characters; use at least 16"),
            std::string::npos);
  EXPECT_NE(bad(std::string(kAlice) + " al/ice").message().find("user name 'al/ice'"),
            std::string::npos);
  EXPECT_NE(bad("# nothing\n").message().find("holds no"), std::string::npos);
}

TEST(Auth, AgentTokenFiles) {
  auto agents = ParseAgentTokens(std::string("gpu-a ") + kAgentA, "a.txt");
  ASSERT_TRUE(agents.ok()) << agents.status();
  EXPECT_EQ((*agents)[0].agent_id, "gpu-a");
  const auto twice =
      ParseAgentTokens(std::string("gpu-a ") + kAgentA + "\ngpu-a " + kAgentB, "a.txt").status();
  EXPECT_NE(twice.message().find("a.txt:2: agent gpu-a is listed twice"), std::string::npos)
      << twice;
  EXPECT_FALSE(ParseAgentTokens(std::string("gpu-a"), "a.txt").ok());
}

TEST(Auth, OneTokenIsNeverTwoCredentials) {
  AuthConfig c;
  c.users = {{kAlice, User{"alice", false}}};
  c.agents = {{"gpu-a", kAlice}};
  const auto st = Authenticator::Create(c).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("both user alice and agent gpu-a"), std::string::npos) << st;

  AuthConfig shared;
  shared.users = {{"same-token", User{"admin", true}}};
  shared.shared_agent_token = "same-token";
  EXPECT_FALSE(Authenticator::Create(shared).ok());
  AuthConfig two_users;
  two_users.users = {{kAlice, User{"alice", false}}, {kAlice, User{"bob", false}}};
  EXPECT_FALSE(Authenticator::Create(two_users).ok());
}

TEST(Auth, MetricsAuthFiles) {
  auto users = ParseMetricsUsers("# prometheus\n  prom:pass-0123456789abcdef:x \n\ngrafana:"
                                 "grafana-pass-0123456789\r\n",
                                 "m.txt");
  ASSERT_TRUE(users.ok()) << users.status();
  ASSERT_EQ(users->size(), 2u);
  EXPECT_EQ((*users)[0].name, "prom");
  EXPECT_EQ((*users)[0].password, "pass-0123456789abcdef:x");  // after the first ':'
  EXPECT_EQ((*users)[1].name, "grafana");
  EXPECT_EQ((*users)[1].password, "grafana-pass-0123456789");

  auto bad = [](const std::string& text) {
    return std::string(ParseMetricsUsers(text, "m.txt").status().message());
  };
  EXPECT_EQ(bad("prom pass-0123456789abcdef"), "m.txt:1: expected `USER:PASSWORD` (no spaces)");
  EXPECT_EQ(bad("\nprom:pass 0123456789abcdef"), "m.txt:2: expected `USER:PASSWORD` (no spaces)");
  EXPECT_EQ(bad("prom-pass-0123456789abcdef"), "m.txt:1: expected `USER:PASSWORD` (no spaces)");
  EXPECT_EQ(bad("prom:short"),
            "m.txt:1: the password of metrics user prom has 5 characters; use at least 16 (e.g. "
            "`openssl rand -hex 32`)");
  EXPECT_EQ(bad(":pass-0123456789abcdef"),
            "m.txt:1: user name '' must be 1 to 64 of A-Z a-z 0-9 . _ @ -");
  EXPECT_EQ(bad("prom:pass-0123456789abcdef\nprom:other-0123456789abcdef"),
            "m.txt:2: metrics user prom is listed twice; give each user one password");
  EXPECT_EQ(bad("# none\n"), "m.txt holds no `USER:PASSWORD` line");
}

TEST(Auth, AScrapeNeedsAConfiguredUserAndItsPassword) {
  AuthConfig c;
  c.metrics_users = *ParseMetricsUsers("prom:pass-0123456789abcdef\nops:ops-pass-0123456789ab",
                                       "m.txt");
  const Authenticator auth = *Authenticator::Create(c);
  EXPECT_TRUE(auth.metrics_auth_configured());
  EXPECT_TRUE(auth.AuthenticateScrape("prom", "pass-0123456789abcdef"));
  EXPECT_TRUE(auth.AuthenticateScrape("ops", "ops-pass-0123456789ab"));
  EXPECT_FALSE(auth.AuthenticateScrape("prom", "ops-pass-0123456789ab"));  // another's password
  EXPECT_FALSE(auth.AuthenticateScrape("prom", "pass-0123456789abcde"));   // a prefix
  EXPECT_FALSE(auth.AuthenticateScrape("prom", "pass-0123456789abcdefg"));  // longer
  EXPECT_FALSE(auth.AuthenticateScrape("prom", ""));
  EXPECT_FALSE(auth.AuthenticateScrape("", ""));
  EXPECT_FALSE(auth.AuthenticateScrape("nobody", "pass-0123456789abcdef"));
  // Without --metrics-auth anyone who reaches /metrics scrapes it.
  const Authenticator open = *Authenticator::Create({});
  EXPECT_FALSE(open.metrics_auth_configured());
  EXPECT_TRUE(open.AuthenticateScrape("", ""));

  // A metrics password is not a token too.
  c.users = {{"pass-0123456789abcdef", User{"alice", false}}};
  const auto st = Authenticator::Create(c).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("both user alice and metrics user prom"), std::string::npos) << st;
}

// What main.cc does on SIGHUP: LoadAuthConfig from the same files, then
// Reload. The whole new set or none of it.
TEST(Auth, ReloadSwapsTheWholeSetOrKeepsTheOld) {
  testutil::TempDir dir("auth_reload");
  AuthFiles files;
  files.user_tokens = dir.path() + "/users.tokens";
  files.agent_tokens = dir.path() + "/agents.tokens";
  files.metrics_auth = dir.path() + "/metrics.auth";
  auto write = [](const std::string& path, const std::string& text) {
    std::ofstream(path, std::ios::trunc) << text;
  };
  write(files.user_tokens, std::string(kAlice) + " alice\n" + kRoot + " root admin\n");
  write(files.agent_tokens, std::string("gpu-a ") + kAgentA + "\n");
  write(files.metrics_auth, "prom:pass-0123456789abcdef\n");
  auto first = LoadAuthConfig(files);
  ASSERT_TRUE(first.ok()) << first.status();
  Authenticator auth = *Authenticator::Create(*std::move(first));
  using absl::StatusCode;
  auto user = [&](const std::string& token) { return auth.AuthenticateUser(Bearer(token)); };
  auto agent = [&](const std::string& token) { return auth.AuthenticateAgent(Bearer(token)); };
  ASSERT_EQ(user(kAlice)->name, "alice");
  ASSERT_EQ(agent(kAgentA)->agent_id, "gpu-a");

  // alice revoked, carol added, gpu-a's token replaced, prom's password too.
  constexpr char kCarol[] = "carol-token-0123456789";
  constexpr char kAgentA2[] = "agent-a-new-token-0123";
  write(files.user_tokens, std::string(kCarol) + " carol\n" + kRoot + " root admin\n");
  write(files.agent_tokens, std::string("gpu-a ") + kAgentA2 + "\n");
  write(files.metrics_auth, "prom:new-pass-0123456789ab\n");
  auto second = LoadAuthConfig(files);
  ASSERT_TRUE(second.ok()) << second.status();
  ASSERT_TRUE(auth.Reload(*std::move(second)).ok());
  EXPECT_EQ(user(kAlice).status().code(), StatusCode::kUnauthenticated);
  EXPECT_EQ(user(kCarol)->name, "carol");
  EXPECT_TRUE(user(kRoot)->admin);
  EXPECT_EQ(agent(kAgentA).status().code(), StatusCode::kUnauthenticated);
  EXPECT_EQ(agent(kAgentA2)->agent_id, "gpu-a");
  EXPECT_FALSE(auth.AuthenticateScrape("prom", "pass-0123456789abcdef"));
  EXPECT_TRUE(auth.AuthenticateScrape("prom", "new-pass-0123456789ab"));

  // A file with a bad line: the same error as at start, and nothing moves.
  write(files.user_tokens, std::string(kCarol) + " carol\nshort dave\n");
  const auto bad_line = LoadAuthConfig(files).status();
  EXPECT_EQ(bad_line.message(), files.user_tokens +
                                    ":2: the token of user dave has 5 characters; use at least "
                                    "16 (e.g. `openssl rand -hex 32`)");
  write(files.user_tokens, "");
  EXPECT_EQ(LoadAuthConfig(files).status().message(),
            files.user_tokens + " holds no `TOKEN USER [admin]` line");
  // Files that parse but do not fit together (carol's token given to an
  // agent too): Reload refuses them whole; gpu-a keeps its token.
  write(files.user_tokens, std::string(kCarol) + " carol\n" + kRoot + " root admin\n");
  write(files.agent_tokens, std::string("gpu-a ") + kCarol + "\n");
  auto clash = LoadAuthConfig(files);
  ASSERT_TRUE(clash.ok()) << clash.status();
  const auto st = auth.Reload(*std::move(clash));
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("both user carol and agent gpu-a"), std::string::npos) << st;
  EXPECT_EQ(agent(kAgentA2)->agent_id, "gpu-a");
  EXPECT_EQ(user(kCarol)->name, "carol");
  EXPECT_TRUE(auth.AuthenticateScrape("prom", "new-pass-0123456789ab"));
  // A reload may not switch a kind of credential off.
  const auto off = auth.Reload(AuthConfig{});
  EXPECT_EQ(off.code(), StatusCode::kFailedPrecondition) << off;
  EXPECT_EQ(user(kCarol)->name, "carol");
  EXPECT_TRUE(auth.users_configured());
  EXPECT_EQ(auth.num_users(), 2u);
}

// Lookups on other threads while the set is swapped: a token in both sets
// is never refused, and nothing is read after it is freed (ASan/TSan builds).
TEST(Auth, ATokenInBothSetsHoldsThroughReloads) {
  AuthConfig a, b;
  a.users = {{kAlice, User{"alice", false}}, {kRoot, User{"root", true}}};
  b.users = {{kBob, User{"bob", false}}, {kRoot, User{"root", true}}};
  Authenticator auth = *Authenticator::Create(a);
  std::atomic<bool> stop{false};
  std::atomic<int> wrong{0};
  std::vector<std::thread> readers;
  for (int t = 0; t < 3; ++t)
    readers.emplace_back([&] {
      while (!stop) {
        auto root = auth.AuthenticateUser(Bearer(kRoot));
        if (!root.ok() || root->name != "root" || !root->admin) ++wrong;
      }
    });
  for (int i = 0; i < 2000; ++i) ASSERT_TRUE(auth.Reload(i % 2 ? a : b).ok());
  stop = true;
  for (auto& r : readers) r.join();
  EXPECT_EQ(wrong.load(), 0);
  // The last reload (i = 1999) put `a` in force.
  EXPECT_TRUE(auth.AuthenticateUser(Bearer(kAlice)).ok());
  EXPECT_FALSE(auth.AuthenticateUser(Bearer(kBob)).ok());
}

TEST(Auth, WhoEachCredentialIs) {
  const Authenticator auth = Full();
  using absl::StatusCode;
  auto user_code = [&](std::optional<std::string> h) {
    return auth.AuthenticateUser(h ? std::optional<std::string_view>(*h) : std::nullopt)
        .status()
        .code();
  };
  auto agent_code = [&](std::optional<std::string> h) {
    return auth.AuthenticateAgent(h ? std::optional<std::string_view>(*h) : std::nullopt)
        .status()
        .code();
  };
  EXPECT_EQ(user_code(std::nullopt), StatusCode::kUnauthenticated);
  EXPECT_EQ(user_code(Bearer("nope-nope-nope-nope")), StatusCode::kUnauthenticated);
  EXPECT_EQ(user_code(std::string(kAlice)), StatusCode::kUnauthenticated);  // no "Bearer "
  EXPECT_EQ(user_code(Bearer(kAgentA)), StatusCode::kPermissionDenied);
  EXPECT_EQ(auth.AuthenticateUser(Bearer(kAlice))->name, "alice");
  EXPECT_FALSE(auth.AuthenticateUser(Bearer(kAlice))->admin);
  EXPECT_TRUE(auth.AuthenticateUser(Bearer(kRoot))->admin);

  EXPECT_EQ(agent_code(std::nullopt), StatusCode::kUnauthenticated);
  EXPECT_EQ(agent_code(Bearer("nope-nope-nope-nope")), StatusCode::kUnauthenticated);
  EXPECT_EQ(agent_code(Bearer(kAlice)), StatusCode::kPermissionDenied);
  EXPECT_EQ(agent_code(Bearer(kRoot)), StatusCode::kPermissionDenied);
  EXPECT_EQ(auth.AuthenticateAgent(Bearer(kAgentB))->agent_id, "gpu-b");
}

TEST(Auth, APerAgentTokenRegistersOnlyItsOwnId) {
  const Authenticator auth = Full();
  const AgentIdentity b = *auth.AuthenticateAgent(Bearer(kAgentB));
  EXPECT_TRUE(CheckAgentId(b, "gpu-b").ok());
  const auto st = CheckAgentId(b, "gpu-a");
  EXPECT_EQ(st.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(st.message(), "this credential is agent gpu-b's; it may not register as agent gpu-a");
  // A shared token proves no id.
  AuthConfig c;
  c.shared_agent_token = "shared-agent-token-123";
  const Authenticator shared = *Authenticator::Create(c);
  EXPECT_TRUE(CheckAgentId(*shared.AuthenticateAgent(Bearer("shared-agent-token-123")), "x").ok());
}

TEST(Auth, WithoutUserTokensEveryClientIsTheLocalAdmin) {
  AuthConfig c;
  c.agents = {{"gpu-a", kAgentA}};
  const Authenticator auth = *Authenticator::Create(c);
  auto anyone = auth.AuthenticateUser(std::nullopt);
  ASSERT_TRUE(anyone.ok());
  EXPECT_EQ(anyone->name, kLocalUser);
  EXPECT_TRUE(anyone->admin);
  EXPECT_TRUE(auth.AuthenticateUser(Bearer("whatever-token-x")).ok());
  // An agent's credential is still not a client's.
  EXPECT_EQ(auth.AuthenticateUser(Bearer(kAgentA)).status().code(),
            absl::StatusCode::kPermissionDenied);
  // And without agent tokens any caller registers any id.
  const Authenticator open = *Authenticator::Create({});
  EXPECT_TRUE(open.AuthenticateAgent(std::nullopt)->agent_id.empty());
}

TEST(Auth, UsersSeeTheirOwnJobsAdminsEveryJob) {
  v1::Job job;
  job.set_id("job-7");
  job.set_owner("alice");
  EXPECT_TRUE(CheckCanSeeJob(User{"alice", false}, job).ok());
  EXPECT_TRUE(CheckCanSeeJob(User{"root", true}, job).ok());
  const auto st = CheckCanSeeJob(User{"bob", false}, job);
  EXPECT_EQ(st.code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(st.message(), "job 'job-7' not found");  // as for a job that does not exist
  job.clear_owner();  // stored before owners existed
  EXPECT_FALSE(CheckCanSeeJob(User{"", false}, job).ok());
  EXPECT_TRUE(CheckCanSeeJob(User{"root", true}, job).ok());

  EXPECT_EQ(*ListOwnerFilter(User{"bob", false}, ""), "bob");
  EXPECT_EQ(ListOwnerFilter(User{"bob", false}, "alice").status().code(),
            absl::StatusCode::kPermissionDenied);
  EXPECT_EQ(*ListOwnerFilter(User{"root", true}, ""), "");
  EXPECT_EQ(*ListOwnerFilter(User{"root", true}, "alice"), "alice");
}

TEST(Auth, PriorityAboveTheCapIsForAdmins) {
  EXPECT_TRUE(CheckPriority(User{"bob", false}, 10, 10).ok());
  EXPECT_TRUE(CheckPriority(User{"bob", false}, -5, 10).ok());
  const auto st = CheckPriority(User{"bob", false}, 11, 10);
  EXPECT_EQ(st.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_NE(st.message().find("priority 11 is above the coordinator's --max-user-priority (10)"),
            std::string::npos);
  EXPECT_TRUE(CheckPriority(User{"root", true}, 1000, 10).ok());
}

TEST(Address, LoopbackIsThisHostOnly) {
  for (const char* a : {"127.0.0.1:7450", "localhost:7450", "LOCALHOST", "[::1]:7450",
                        "127.1.2.3:1", "ipv4:127.0.0.1:7450", "dns:///localhost:7450",
                        "unix:/tmp/ftune.sock", "::1"})
    EXPECT_TRUE(IsLoopbackAddress(a)) << a;
  for (const char* a : {"0.0.0.0:7450", "[::]:7450", ":7450", "10.0.0.5:7450",
                        "coordinator.internal:7450", "128.0.0.1:7450", "127.0.0.1.evil.com:1",
                        "localhost.evil.com:7450", "1127.0.0.1:7450", ""})
    EXPECT_FALSE(IsLoopbackAddress(a)) << a;
  EXPECT_EQ(AddressHost("[::1]:80"), "::1");
  EXPECT_EQ(AddressHost("host:80"), "host");
}

}  // namespace
}  // namespace ftune::server
