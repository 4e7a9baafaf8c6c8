// /metrics over TLS (--metrics-tls-cert, --metrics-tls-key), through the real
// coordinator binary and an OpenSSL client that verifies the server's
// certificate against the one the test made:
//   * scraped over HTTPS with the certificate trusted; refused by a client
//     trusting another; a plaintext request on the port gets no metric;
//   * basic auth over TLS: 401 and its challenge without the password, 200
//     with it;
//   * secure by default: a /metrics other hosts can reach, with a password
//     but without TLS, is refused (exit 2, naming the flags) unless
//     --insecure, which warns; with TLS it serves;
//   * certificate and key files that are missing, do not parse, do not
//     match or are encrypted: exit 2 naming the flag and the file, the key
//     never printed; an expired certificate is served with a warning;
//   * SIGHUP re-reads the certificate and key: new connections get the new
//     certificate, an open one keeps its own, and a bad pair changes nothing.
// Certificates are made by the test (tls_test_util.h): self-signed, for
// IP 127.0.0.1.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <csignal>
#include <fstream>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "ftune/socket_util.h"
#include "cluster.h"
#include "tls_test_util.h"

namespace ftune::testing {
namespace {

using std::chrono::seconds;
using testutil::HttpsClient;
using testutil::KeyAndCert;
using testutil::SecretLine;
using testutil::SelfSigned;

constexpr char kPromPassword[] = "prom-password-0123456789";

void WriteFile(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::trunc) << text;
}

// GET /metrics over a fresh HTTPS connection; "" with `error` set when the
// handshake fails.
std::string HttpsScrape(int port, const std::string& trusted_pem,
                        const std::string& authorization = "", std::string* error = nullptr) {
  HttpsClient c;
  if (!c.Connect(port, trusted_pem)) {
    if (error) *error = c.error();
    return "";
  }
  return c.Get(authorization);
}

// A certificate and key written to dir/<name>.crt and dir/<name>.key.
struct TlsFiles {
  KeyAndCert pem;
  std::string cert;
  std::string key;
  std::vector<std::string> Flags() const {
    return {"--metrics-tls-cert=" + cert, "--metrics-tls-key=" + key};
  }
};
TlsFiles WriteTls(const std::string& dir, const std::string& name, const std::string& cn) {
  TlsFiles f{SelfSigned(cn), dir + "/" + name + ".crt", dir + "/" + name + ".key"};
  WriteFile(f.cert, f.pem.cert_pem);
  WriteFile(f.key, f.pem.key_pem);
  chmod(f.key.c_str(), 0600);
  return f;
}

// The coordinator with TLS on loopback: metrics over HTTPS, checked against
// the certificate; nothing for plaintext or for a client trusting another.
TEST(MetricsTls, ScrapedOverHttpsAgainstItsCertificateOnly) {
  Cluster c;
  const TlsFiles tls = WriteTls(c.dir(), "metrics", "ftune-metrics-test");
  c.StartCoordinator(tls.Flags());
  const int port = c.metrics_port();

  // Clients that never handshake hold no scrape up.
  std::vector<int> idle;
  for (int i = 0; i < 4; ++i) {
    idle.push_back(ConnectLoopback(port));
    ASSERT_GE(idle.back(), 0);
  }
  std::string error;
  const std::string r = HttpsScrape(port, tls.pem.cert_pem, "", &error);
  EXPECT_EQ(StatusLine(r), "HTTP/1.1 200 OK") << error << "\n" << r;
  EXPECT_NE(r.find("ftune_build_info{version=\""), std::string::npos) << r;
  EXPECT_NE(r.find("ftune_store_errors_total 0"), std::string::npos) << r;
  for (int fd : idle) close(fd);

  // A client that trusts another certificate refuses this server's.
  const KeyAndCert other = SelfSigned("someone-else");
  EXPECT_EQ(HttpsScrape(port, other.cert_pem, "", &error), "");
  EXPECT_NE(error.find("certificate refused"), std::string::npos) << error;

  // Plain HTTP on the TLS port: no metric, no HTTP answer.
  const std::string plain = Scrape(port);
  EXPECT_EQ(plain.find("ftune_"), std::string::npos) << plain;
  EXPECT_EQ(plain.find("HTTP/1.1 200"), std::string::npos) << plain;
  // ... and the coordinator goes on serving.
  EXPECT_EQ(StatusLine(HttpsScrape(port, tls.pem.cert_pem)), "HTTP/1.1 200 OK");
  EXPECT_TRUE(c.coordinator().Running());

  const std::string log = ReadFile(c.coordinator().log_path());
  EXPECT_NE(log.find("(metrics 127.0.0.1:" + std::to_string(port) + " over TLS, state "),
            std::string::npos)
      << log;
  EXPECT_NE(log.find("/metrics TLS certificate: subject CN=ftune-metrics-test, valid until "),
            std::string::npos)
      << log;
  EXPECT_EQ(log.find(SecretLine(tls.pem.key_pem)), std::string::npos) << log;
}

// --metrics-auth over TLS: the password travels inside TLS, and is still
// checked there.
TEST(MetricsTls, BasicAuthIsCheckedInsideTls) {
  Cluster c;
  const TlsFiles tls = WriteTls(c.dir(), "metrics", "ftune-metrics-test");
  const std::string auth_file = c.dir() + "/metrics.auth";
  WriteFile(auth_file, std::string("prom:") + kPromPassword + "\n");
  std::vector<std::string> flags = tls.Flags();
  flags.push_back("--metrics-auth=" + auth_file);
  c.StartCoordinator(flags);
  const int port = c.metrics_port();

  for (const auto& [what, authorization] : std::vector<std::pair<std::string, std::string>>{
           {"no credentials", ""},
           {"a wrong password", Basic("prom", "wrong-password-0123456789")},
           {"an unknown user", Basic("grafana", kPromPassword)}}) {
    std::string error;
    const std::string r = HttpsScrape(port, tls.pem.cert_pem, authorization, &error);
    EXPECT_EQ(StatusLine(r), "HTTP/1.1 401 Unauthorized") << what << ": " << error << "\n" << r;
    EXPECT_NE(r.find("WWW-Authenticate: Basic realm=\"ftune-coordinator\""), std::string::npos)
        << what << "\n" << r;
    EXPECT_EQ(r.find("ftune_"), std::string::npos) << what << "\n" << r;
  }
  const std::string ok = HttpsScrape(port, tls.pem.cert_pem, Basic("prom", kPromPassword));
  EXPECT_EQ(StatusLine(ok), "HTTP/1.1 200 OK") << ok;
  EXPECT_NE(ok.find("ftune_build_info{version=\""), std::string::npos) << ok;
  // The right password in plaintext on the same port: nothing.
  const std::string plain = Scrape(port, Basic("prom", kPromPassword));
  EXPECT_EQ(plain.find("ftune_"), std::string::npos) << plain;
  EXPECT_EQ(plain.find("HTTP/1.1 200"), std::string::npos) << plain;
  EXPECT_NE(ReadFile(c.coordinator().log_path()).find(" over TLS with basic auth, state "),
            std::string::npos)
      << ReadFile(c.coordinator().log_path());
}

// A /metrics other hosts can reach, with a password: refused without TLS
// (the password would cross the network in clear), served with it;
// --insecure serves it in plaintext and warns.
TEST(MetricsTls, OffLoopbackAPasswordNeedsTls) {
  Cluster c;
  const std::string dir = c.dir();
  const std::string listen = "--listen=127.0.0.1:" + std::to_string(FreePort());
  const std::string mport = std::to_string(FreePort());
  const std::string open_metrics = "--metrics-listen=0.0.0.0:" + mport;
  const std::string auth_file = dir + "/metrics.auth";
  WriteFile(auth_file, std::string("prom:") + kPromPassword + "\n");
  const std::string with_auth = "--metrics-auth=" + auth_file;

  Process refused({FTUNE_COORDINATOR_BIN, "--state-dir=" + dir + "/s1", listen, open_metrics,
                   with_auth},
                  dir + "/plain.log");
  int code = refused.Wait(seconds(20));
  if (code == INT_MIN) refused.Signal(SIGKILL);
  std::string log = ReadFile(dir + "/plain.log");
  EXPECT_EQ(code, 2) << log;
  EXPECT_NE(log.find("refusing to serve /metrics on 0.0.0.0:" + mport +
                     ", which other hosts can reach, without:\n  - TLS (--metrics-tls-cert FILE "
                     "and --metrics-tls-key FILE"),
            std::string::npos)
      << log;
  EXPECT_EQ(log.find("scrape credentials"), std::string::npos) << log;

  auto serve = [&](std::vector<std::string> argv, const std::string& name) {
    auto p = std::make_unique<Process>(std::move(argv), dir + "/" + name);
    EXPECT_TRUE(WaitFor(
        [&] { return ReadFile(dir + "/" + name).find("serving on") != std::string::npos; },
        seconds(20)))
        << ReadFile(dir + "/" + name);
    return p;
  };
  // --insecure: plaintext, with a warning about the password.
  {
    auto p = serve({FTUNE_COORDINATOR_BIN, "--state-dir=" + dir + "/s2", listen, open_metrics,
                    with_auth, "--insecure"},
                   "insecure.log");
    EXPECT_NE(ReadFile(dir + "/insecure.log")
                  .find("WARNING: --insecure: serving /metrics on 0.0.0.0:" + mport +
                        " over plain HTTP, without --metrics-tls-cert and --metrics-tls-key: the "
                        "basic auth password crosses the network in clear"),
              std::string::npos)
        << ReadFile(dir + "/insecure.log");
    EXPECT_EQ(StatusLine(Scrape(std::stoi(mport), Basic("prom", kPromPassword))),
              "HTTP/1.1 200 OK");
    p->Signal(SIGTERM);
    p->Wait(seconds(10));
  }
  // With TLS: served on every interface, HTTPS only, behind the password,
  // without a warning.
  const TlsFiles tls = WriteTls(dir, "metrics", "ftune-metrics-test");
  {
    std::vector<std::string> argv = {FTUNE_COORDINATOR_BIN, "--state-dir=" + dir + "/s3", listen,
                                     open_metrics, with_auth};
    for (const auto& f : tls.Flags()) argv.push_back(f);
    auto p = serve(argv, "tls.log");
    log = ReadFile(dir + "/tls.log");
    EXPECT_NE(log.find("(metrics 0.0.0.0:" + mport + " over TLS with basic auth"),
              std::string::npos)
        << log;
    EXPECT_EQ(log.find("WARNING"), std::string::npos) << log;
    EXPECT_EQ(StatusLine(HttpsScrape(std::stoi(mport), tls.pem.cert_pem)),
              "HTTP/1.1 401 Unauthorized");
    const std::string ok =
        HttpsScrape(std::stoi(mport), tls.pem.cert_pem, Basic("prom", kPromPassword));
    EXPECT_EQ(StatusLine(ok), "HTTP/1.1 200 OK") << ok;
    EXPECT_NE(ok.find("ftune_build_info"), std::string::npos) << ok;
    EXPECT_EQ(Scrape(std::stoi(mport), Basic("prom", kPromPassword)).find("ftune_"),
              std::string::npos);
    p->Signal(SIGTERM);
    p->Wait(seconds(10));
  }
}

// Certificate and key files the coordinator cannot use: it stops at start
// (exit 2) and says which flag and file, without printing the key.
TEST(MetricsTls, FilesItCannotUseAreRefusedAtStartNamingTheFlagAndFile) {
  Cluster c;
  const std::string dir = c.dir();
  const TlsFiles good = WriteTls(dir, "good", "ftune-metrics-test");
  const TlsFiles other = WriteTls(dir, "other", "another-server");
  const std::string garbage_cert = dir + "/garbage.crt";
  WriteFile(garbage_cert, "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n"
                          "-----END CERTIFICATE-----\n");
  const std::string garbage_key = dir + "/garbage.key";
  WriteFile(garbage_key, "-----BEGIN PRIVATE KEY-----\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n"
                         "-----END PRIVATE KEY-----\n");
  const std::string encrypted_key = dir + "/encrypted.key";
  const KeyAndCert encrypted = SelfSigned("encrypted", "a passphrase");
  WriteFile(encrypted_key, encrypted.key_pem);
  const std::string missing = dir + "/missing.pem";
  const std::string cert = "--metrics-tls-cert=";
  const std::string key = "--metrics-tls-key=";

  struct Case {
    std::string what;
    std::vector<std::string> flags;
    std::string said;
  };
  const std::vector<Case> cases = {
      {"a missing certificate file",
       {cert + missing, key + good.key},
       "--metrics-tls-cert " + missing + ": no such file"},
      {"a missing key file",
       {cert + good.cert, key + missing},
       "--metrics-tls-key " + missing + ": no such file"},
      {"a directory as the key",
       {cert + good.cert, key + dir},
       "--metrics-tls-key " + dir + ": not a regular file"},
      {"a certificate that does not parse",
       {cert + garbage_cert, key + good.key},
       "--metrics-tls-cert " + garbage_cert + ": certificate 1 does not parse as PEM"},
      {"a key as the certificate",
       {cert + good.key, key + good.key},
       "--metrics-tls-cert " + good.key + ": holds no PEM certificate"},
      {"a key that does not parse",
       {cert + good.cert, key + garbage_key},
       "--metrics-tls-key " + garbage_key + ": the private key does not parse as PEM"},
      {"a certificate as the key",
       {cert + good.cert, key + good.cert},
       "--metrics-tls-key " + good.cert + ": holds no PEM private key"},
      {"another certificate's key",
       {cert + good.cert, key + other.key},
       "--metrics-tls-key " + other.key + ": this private key is not the one of "
           "--metrics-tls-cert " + good.cert + " (subject CN=ftune-metrics-test"},
      {"an encrypted key",
       {cert + good.cert, key + encrypted_key},
       "--metrics-tls-key " + encrypted_key + ": the private key is encrypted"},
      {"a certificate without its key",
       {cert + good.cert},
       "--metrics-tls-cert and --metrics-tls-key go together: got only --metrics-tls-cert " +
           good.cert},
      {"a key without its certificate",
       {key + good.key},
       "--metrics-tls-cert and --metrics-tls-key go together: got only --metrics-tls-key " +
           good.key},
      {"TLS with /metrics off",
       {cert + good.cert, key + good.key, "--metrics-listen", ""},
       "--metrics-tls-cert and --metrics-tls-key need --metrics-listen"},
  };
  int n = 0;
  for (const Case& k : cases) {
    std::vector<std::string> argv = {FTUNE_COORDINATOR_BIN, "--state-dir=" + dir + "/state",
                                     "--listen=127.0.0.1:" + std::to_string(FreePort())};
    if (std::find(k.flags.begin(), k.flags.end(), "--metrics-listen") == k.flags.end())
      argv.push_back("--metrics-listen=127.0.0.1:" + std::to_string(FreePort()));
    for (const auto& f : k.flags) argv.push_back(f);
    const std::string log_path = dir + "/case-" + std::to_string(n++) + ".log";
    Process p(argv, log_path);
    const int code = p.Wait(seconds(20));
    if (code == INT_MIN) p.Signal(SIGKILL);
    const std::string log = ReadFile(log_path);
    EXPECT_EQ(code, 2) << k.what << "\n" << log;
    EXPECT_NE(log.find(k.said), std::string::npos) << k.what << "\n" << log;
    for (const std::string& pem : {good.pem.key_pem, other.pem.key_pem, encrypted.key_pem})
      EXPECT_EQ(log.find(SecretLine(pem)), std::string::npos) << k.what << "\n" << log;
  }
}

// An expired certificate is served (clocks differ), with a warning that
// clients will refuse it, as they do.
TEST(MetricsTls, AnExpiredCertificateIsServedWithAWarning) {
  Cluster c;
  const KeyAndCert expired = SelfSigned("expired", nullptr, 3600);
  const std::string cert = c.dir() + "/expired.crt", key = c.dir() + "/expired.key";
  WriteFile(cert, expired.cert_pem);
  WriteFile(key, expired.key_pem);
  c.StartCoordinator({"--metrics-tls-cert=" + cert, "--metrics-tls-key=" + key});
  const std::string log = ReadFile(c.coordinator().log_path());
  EXPECT_NE(log.find("WARNING: --metrics-tls-cert " + cert +
                     " has expired (subject CN=expired, valid until "),
            std::string::npos)
      << log;
  std::string error;
  EXPECT_EQ(HttpsScrape(c.metrics_port(), expired.cert_pem, "", &error), "");
  EXPECT_NE(error.find("certificate refused: certificate has expired"), std::string::npos)
      << error;
}

// SIGHUP re-reads the certificate and key: new connections get the new
// certificate, one opened before keeps its own, and a pair that does not
// match changes nothing.
TEST(MetricsTls, SighupReloadsTheCertificate) {
  Cluster c;
  const TlsFiles first = WriteTls(c.dir(), "metrics", "first");
  c.StartCoordinator(first.Flags());
  const int port = c.metrics_port();
  ASSERT_EQ(StatusLine(HttpsScrape(port, first.pem.cert_pem)), "HTTP/1.1 200 OK");
  HttpsClient opened_before;
  ASSERT_TRUE(opened_before.Connect(port, first.pem.cert_pem)) << opened_before.error();

  // New files at the same paths.
  const KeyAndCert second = SelfSigned("second");
  WriteFile(first.cert, second.cert_pem);
  WriteFile(first.key, second.key_pem);
  const std::string log = c.coordinator().log_path();
  c.coordinator().Signal(SIGHUP);
  ASSERT_TRUE(WaitFor(
      [&] {
        return ReadFile(log).find("SIGHUP: /metrics TLS certificate for new connections: "
                                  "subject CN=second") != std::string::npos;
      },
      seconds(10)))
      << ReadFile(log);
  std::string error;
  const std::string r = HttpsScrape(port, second.cert_pem, "", &error);
  EXPECT_EQ(StatusLine(r), "HTTP/1.1 200 OK") << error << "\n" << r;
  EXPECT_EQ(HttpsScrape(port, first.pem.cert_pem, "", &error), "");
  EXPECT_NE(error.find("certificate refused"), std::string::npos) << error;
  // The connection made before the reload still answers.
  EXPECT_EQ(StatusLine(opened_before.Get()), "HTTP/1.1 200 OK");

  // A key that is not the certificate's: not reloaded, the second pair
  // stays in force.
  WriteFile(first.key, first.pem.key_pem);
  c.coordinator().Signal(SIGHUP);
  ASSERT_TRUE(WaitFor(
      [&] { return ReadFile(log).find("credentials not reloaded") != std::string::npos; },
      seconds(10)))
      << ReadFile(log);
  EXPECT_NE(ReadFile(log).find("SIGHUP: credentials not reloaded, the previous ones stay in "
                               "force: --metrics-tls-key " +
                               first.key + ": this private key is not the one of"),
            std::string::npos)
      << ReadFile(log);
  EXPECT_EQ(StatusLine(HttpsScrape(port, second.cert_pem, "", &error)), "HTTP/1.1 200 OK")
      << error;
  EXPECT_TRUE(c.coordinator().Running());
}

}  // namespace
}  // namespace ftune::testing
