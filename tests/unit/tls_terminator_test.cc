// TlsTerminator in front of a plain upstream the test runs: it relays a
// request and its answer over TLS and nothing in plaintext; it closes
// connections beyond its cap at accept, a handshake that does not finish
// and a connection that goes idle; a new identity serves new handshakes
// while an open connection keeps its own; destruction ends open
// connections at once. Timeouts are the Options', made short here.
#include "ftune/socket_util.h"
#include "tls_terminator.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <string>
#include <thread>

#include <gtest/gtest.h>

#include "temp_dir.h"
#include "tls_test_util.h"

namespace ftune::server {
namespace {

using std::chrono::milliseconds;
using std::chrono::steady_clock;
using testutil::HttpsClient;
using testutil::KeyAndCert;
using testutil::SelfSigned;

// Answers each connection once: reads up to the end of the request's
// headers, writes "HTTP/1.0 200 OK" and the request line back, closes.
class Upstream {
 public:
  Upstream() {
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bind(fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a));
    listen(fd_, 16);
    socklen_t len = sizeof(a);
    getsockname(fd_, reinterpret_cast<sockaddr*>(&a), &len);
    port_ = ntohs(a.sin_port);
    thread_ = std::thread([this] {
      for (;;) {
        const int c = accept(fd_, nullptr, nullptr);
        if (c < 0) return;  // shut down
        std::string req;
        char buf[4096];
        ssize_t n;
        while (req.find("\r\n\r\n") == std::string::npos && (n = read(c, buf, sizeof(buf))) > 0)
          req.append(buf, static_cast<size_t>(n));
        const std::string answer =
            "HTTP/1.0 200 OK\r\n\r\necho: " + req.substr(0, req.find("\r\n"));
        (void)!write(c, answer.data(), answer.size());
        close(c);
      }
    });
  }
  ~Upstream() {
    shutdown(fd_, SHUT_RDWR);
    thread_.join();
    close(fd_);
  }
  int port() const { return port_; }

 private:
  int fd_ = -1;
  int port_ = 0;
  std::thread thread_;
};

std::shared_ptr<const TlsIdentity> Identity(const testutil::TempDir& dir, const std::string& name,
                                            const KeyAndCert& pem) {
  const std::string cert = dir.path() + "/" + name + ".crt";
  const std::string key = dir.path() + "/" + name + ".key";
  std::ofstream(cert) << pem.cert_pem;
  std::ofstream(key) << pem.key_pem;
  auto id = TlsIdentity::Load({"--cert", cert}, {"--key", key});
  EXPECT_TRUE(id.ok()) << id.status();
  return id.ok() ? *id : nullptr;
}

// A plain TCP connection to 127.0.0.1:port that gives up reading after 5 s.
int RawConnect(int port) {
  const int fd = ConnectLoopback(port, std::chrono::seconds(5));
  EXPECT_GE(fd, 0);
  return fd;
}

// Whether the server closed `fd` (read returns 0 or a reset) before the
// socket's 5 s timeout, and how long that took.
bool ClosedByServer(int fd, milliseconds* took) {
  const auto start = steady_clock::now();
  char buf[256];
  ssize_t n;
  while ((n = read(fd, buf, sizeof(buf))) > 0) {
  }
  *took = std::chrono::duration_cast<milliseconds>(steady_clock::now() - start);
  return n == 0 || errno == ECONNRESET;
}

class TlsTerminatorTest : public ::testing::Test {
 protected:
  testutil::TempDir dir_{"tls_terminator_test"};
  Upstream upstream_;
  KeyAndCert pem_ = SelfSigned("terminator-test");
  std::shared_ptr<const TlsIdentity> identity_ = Identity(dir_, "first", pem_);
};

TEST_F(TlsTerminatorTest, RelaysARequestAndItsAnswerOverTlsOnly) {
  auto t = TlsTerminator::Start("127.0.0.1:0", upstream_.port(), identity_);
  ASSERT_TRUE(t.ok()) << t.status();
  HttpsClient c;
  ASSERT_TRUE(c.Connect((*t)->port(), pem_.cert_pem)) << c.error();
  EXPECT_EQ(c.Get(), "HTTP/1.0 200 OK\r\n\r\necho: GET /metrics HTTP/1.0");

  // The same request in plaintext reaches nothing.
  const int fd = RawConnect((*t)->port());
  const std::string req = "GET /metrics HTTP/1.0\r\n\r\n";
  ASSERT_EQ(write(fd, req.data(), req.size()), static_cast<ssize_t>(req.size()));
  std::string got;
  char buf[256];
  ssize_t n;
  while ((n = read(fd, buf, sizeof(buf))) > 0) got.append(buf, static_cast<size_t>(n));
  close(fd);
  EXPECT_EQ(got.find("echo"), std::string::npos) << got;
  EXPECT_EQ(got.find("200 OK"), std::string::npos) << got;
}

TEST_F(TlsTerminatorTest, ConnectionsBeyondTheCapAreClosedAtAccept) {
  TlsTerminator::Options o;
  o.max_connections = 2;
  auto t = TlsTerminator::Start("127.0.0.1:0", upstream_.port(), identity_, o);
  ASSERT_TRUE(t.ok()) << t.status();
  const int first = RawConnect((*t)->port());
  const int second = RawConnect((*t)->port());
  const int third = RawConnect((*t)->port());  // accepted after the two, in order
  milliseconds took{};
  EXPECT_TRUE(ClosedByServer(third, &took));
  EXPECT_LT(took, milliseconds(2000));
  close(third);
  // One of the two leaves: a TLS client gets in again.
  close(first);
  bool served = false;
  for (int i = 0; i < 50 && !served; ++i) {
    HttpsClient c;
    served = c.Connect((*t)->port(), pem_.cert_pem) && c.Get().find("200 OK") != std::string::npos;
    if (!served) std::this_thread::sleep_for(milliseconds(50));
  }
  EXPECT_TRUE(served);
  close(second);
}

TEST_F(TlsTerminatorTest, AHandshakeThatDoesNotFinishIsEnded) {
  TlsTerminator::Options o;
  o.handshake_timeout = milliseconds(200);
  auto t = TlsTerminator::Start("127.0.0.1:0", upstream_.port(), identity_, o);
  ASSERT_TRUE(t.ok()) << t.status();
  const int fd = RawConnect((*t)->port());
  milliseconds took{};
  EXPECT_TRUE(ClosedByServer(fd, &took));
  EXPECT_GE(took, milliseconds(150));
  EXPECT_LT(took, milliseconds(3000));
  close(fd);
}

TEST_F(TlsTerminatorTest, AnIdleConnectionIsEnded) {
  TlsTerminator::Options o;
  o.idle_timeout = milliseconds(200);
  auto t = TlsTerminator::Start("127.0.0.1:0", upstream_.port(), identity_, o);
  ASSERT_TRUE(t.ok()) << t.status();
  HttpsClient c;
  ASSERT_TRUE(c.Connect((*t)->port(), pem_.cert_pem)) << c.error();
  const auto start = steady_clock::now();
  EXPECT_EQ(c.ReadAll(), "");  // no request: the terminator ends it
  EXPECT_LT(steady_clock::now() - start, milliseconds(3000));
}

TEST_F(TlsTerminatorTest, ANewIdentityServesNewHandshakesAndAnOpenConnectionKeepsItsOwn) {
  auto t = TlsTerminator::Start("127.0.0.1:0", upstream_.port(), identity_);
  ASSERT_TRUE(t.ok()) << t.status();
  HttpsClient before;
  ASSERT_TRUE(before.Connect((*t)->port(), pem_.cert_pem)) << before.error();
  const KeyAndCert second = SelfSigned("terminator-test-2");
  (*t)->SetIdentity(Identity(dir_, "second", second));
  HttpsClient old_trust;
  EXPECT_FALSE(old_trust.Connect((*t)->port(), pem_.cert_pem));
  HttpsClient new_trust;
  ASSERT_TRUE(new_trust.Connect((*t)->port(), second.cert_pem)) << new_trust.error();
  EXPECT_NE(new_trust.Get().find("200 OK"), std::string::npos);
  EXPECT_NE(before.Get().find("200 OK"), std::string::npos);
}

TEST_F(TlsTerminatorTest, DestructionEndsOpenConnectionsAtOnce) {
  auto t = TlsTerminator::Start("127.0.0.1:0", upstream_.port(), identity_);
  ASSERT_TRUE(t.ok()) << t.status();
  HttpsClient open;
  ASSERT_TRUE(open.Connect((*t)->port(), pem_.cert_pem)) << open.error();
  const int handshaking = RawConnect((*t)->port());
  const auto start = steady_clock::now();
  t->reset();  // the idle and handshake timeouts are the defaults: 60 s and 10 s
  EXPECT_LT(steady_clock::now() - start, milliseconds(3000));
  EXPECT_EQ(open.ReadAll(), "");
  close(handshaking);
}

TEST_F(TlsTerminatorTest, AnAddressItCannotUseIsAnError) {
  auto bad = TlsTerminator::Start("127.0.0.1:notaport", upstream_.port(), identity_);
  EXPECT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("'127.0.0.1:notaport' is not HOST:PORT"),
            std::string::npos)
      << bad.status();
  auto first = TlsTerminator::Start("127.0.0.1:0", upstream_.port(), identity_);
  ASSERT_TRUE(first.ok());
  const std::string taken = "127.0.0.1:" + std::to_string((*first)->port());
  auto second = TlsTerminator::Start(taken, upstream_.port(), identity_);
  EXPECT_FALSE(second.ok());
  EXPECT_NE(second.status().message().find("cannot listen on " + taken), std::string::npos)
      << second.status();
}

}  // namespace
}  // namespace ftune::server
