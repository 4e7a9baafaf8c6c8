// Unit tests of the collectives' building blocks that need no peer process:
// 16-bit float conversions, the rendezvous TCP store, LocalRendezvous, and
// the small helpers of communicator.h.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <thread>

#include "worker/comm/communicator.h"
#include "worker/comm/half.h"
#include "worker/comm/local_rendezvous.h"
#include "worker/comm/net_util.h"
#include "worker/comm/tcp_store.h"

namespace ftune::comm {
namespace {

using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

TEST(CommHalfTest, EveryHalfRoundTripsThroughFloat) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = HalfToFloat(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(HalfToFloat(FloatToHalf(f)))) << h;
      continue;
    }
    EXPECT_EQ(FloatToHalf(f), h) << "half 0x" << std::hex << h;
  }
}

TEST(CommHalfTest, EveryBf16RoundTripsThroughFloat) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = Bf16ToFloat(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(f)))) << h;
      continue;
    }
    EXPECT_EQ(FloatToBf16(f), h) << "bf16 0x" << std::hex << h;
  }
}

TEST(CommHalfTest, RoundsToNearestTiesToEven) {
  // 1 + 2^-8 lies halfway between bf16 1.0 and 1 + 2^-7: ties go to the
  // even mantissa (1.0); a hair above goes up.
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1.0f + 1.0f / 256)), 1.0f);
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1.0f + 3.0f / 256)), 1.0f + 4.0f / 256);
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1.0f + 1.0f / 256 + 1.0f / 65536)),
            1.0f + 1.0f / 128);
  // Half: 2049 is halfway between 2048 and 2050 -> 2048; 2051 -> 2052.
  EXPECT_EQ(HalfToFloat(FloatToHalf(2049.0f)), 2048.0f);
  EXPECT_EQ(HalfToFloat(FloatToHalf(2051.0f)), 2052.0f);
  // Overflow and the subnormal range.
  EXPECT_TRUE(std::isinf(HalfToFloat(FloatToHalf(65520.0f))));
  EXPECT_EQ(HalfToFloat(FloatToHalf(65519.0f)), 65504.0f);
  EXPECT_EQ(HalfToFloat(FloatToHalf(std::ldexp(1.0f, -24))),
            std::ldexp(1.0f, -24));
  EXPECT_EQ(HalfToFloat(FloatToHalf(std::ldexp(1.0f, -25))),
            0.0f);  // tie -> even 0
  EXPECT_EQ(HalfToFloat(FloatToHalf(std::ldexp(3.0f, -25))),
            std::ldexp(1.0f, -23));
  EXPECT_TRUE(std::isinf(Bf16ToFloat(FloatToBf16(3.4e38f))));
}

TEST(CommTypesTest, NamesSizesAndShards) {
  for (DataType d : kAllDataTypes) {
    DataType parsed;
    ASSERT_TRUE(ParseDataType(DataTypeName(d), &parsed));
    EXPECT_EQ(parsed, d);
  }
  DataType ignored;
  EXPECT_FALSE(ParseDataType("fp64", &ignored));
  EXPECT_EQ(DataTypeSize(DataType::kBFloat16), 2u);
  EXPECT_EQ(DataTypeSize(DataType::kInt64), 8u);
  EXPECT_EQ(PaddedShardCount(10, 3), 4u);
  EXPECT_EQ(PaddedShardCount(9, 3), 3u);
  EXPECT_EQ(PaddedShardCount(1, 4), 1u);
  EXPECT_EQ(PaddedShardCount(0, 4), 0u);
}

TEST(CommNetUtilTest, HostPortRoundTrip) {
  std::string host;
  int port = 0;
  ASSERT_TRUE(SplitHostPort("127.0.0.1:4000", &host, &port).ok());
  EXPECT_EQ(host, "127.0.0.1");
  EXPECT_EQ(port, 4000);
  ASSERT_TRUE(SplitHostPort(JoinHostPort("::1", 80), &host, &port).ok());
  EXPECT_EQ(host, "::1");
  EXPECT_EQ(port, 80);
  EXPECT_FALSE(SplitHostPort("no-port", &host, &port).ok());
  EXPECT_FALSE(SplitHostPort("h:99999", &host, &port).ok());
  std::string chosen;
  ASSERT_TRUE(ResolveCommHost("10.1.2.3", "", &chosen).ok());
  EXPECT_EQ(chosen, "10.1.2.3");
  ASSERT_TRUE(ResolveCommHost("", "lo", &chosen).ok());
  EXPECT_EQ(chosen, "127.0.0.1");
  EXPECT_EQ(ResolveCommHost("", "no-such-if0", &chosen).code(),
            StatusCode::kInvalidArgument);
}

class CommTcpStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(TcpStoreServer::Listen("127.0.0.1", 0, &server_).ok());
    server_->Start();
  }
  std::unique_ptr<TcpStoreClient> Client() {
    std::unique_ptr<TcpStoreClient> c;
    Status s =
        TcpStoreClient::Connect(server_->address(), milliseconds(2000), &c);
    EXPECT_TRUE(s.ok()) << s.ToString();
    return c;
  }
  std::unique_ptr<TcpStoreServer> server_;
};

TEST_F(CommTcpStoreTest, SetThenGetFromAnotherClient) {
  auto a = Client();
  auto b = Client();
  std::string binary("\0\1\2 bytes", 9);
  ASSERT_TRUE(a->Set("k", binary).ok());
  std::string v;
  ASSERT_TRUE(b->Get("k", milliseconds(1000), &v).ok());
  EXPECT_EQ(v, binary);
  ASSERT_TRUE(a->Set("k", "overwritten").ok());
  ASSERT_TRUE(b->Get("k", milliseconds(1000), &v).ok());
  EXPECT_EQ(v, "overwritten");
}

TEST_F(CommTcpStoreTest, GetWaitsForALaterSet) {
  auto a = Client();
  auto b = Client();
  std::thread setter([&] {
    std::this_thread::sleep_for(milliseconds(200));
    EXPECT_TRUE(a->Set("late", "value").ok());
  });
  std::string v;
  const auto t0 = Clock::now();
  Status s = b->Get("late", milliseconds(5000), &v);
  setter.join();
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(v, "value");
  EXPECT_GE(Clock::now() - t0, milliseconds(150));
}

TEST_F(CommTcpStoreTest, GetAndWaitTimeOutOnAMissingKey) {
  auto c = Client();
  std::string v;
  auto t0 = Clock::now();
  Status s = c->Get("never", milliseconds(300), &v);
  EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded) << s.ToString();
  EXPECT_NE(s.message().find("'never'"), std::string::npos) << s.message();
  EXPECT_LT(Clock::now() - t0, milliseconds(3000));
  ASSERT_TRUE(c->Set("a", "1").ok());
  t0 = Clock::now();
  s = c->Wait({"a", "b"}, milliseconds(300));
  EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded) << s.ToString();
  EXPECT_GE(Clock::now() - t0, milliseconds(250));
  ASSERT_TRUE(c->Set("b", "2").ok());
  EXPECT_TRUE(c->Wait({"a", "b"}, milliseconds(300)).ok());
  // The connection is still usable after a timed-out request.
  ASSERT_TRUE(c->Get("b", milliseconds(300), &v).ok());
  EXPECT_EQ(v, "2");
}

TEST_F(CommTcpStoreTest, AStoppedServerFailsWaitingClientsPromptly) {
  auto c = Client();
  std::thread stopper([&] {
    std::this_thread::sleep_for(milliseconds(200));
    server_->Stop();
  });
  std::string v;
  const auto t0 = Clock::now();
  Status s = c->Get("never", milliseconds(60000), &v);
  stopper.join();
  EXPECT_FALSE(s.ok());
  EXPECT_LT(Clock::now() - t0, milliseconds(5000)) << s.ToString();
  // And later requests fail at once instead of hanging.
  EXPECT_FALSE(c->Set("k", "v").ok());
}

TEST(CommTcpStoreClientTest, ConnectGivesUpAtItsDeadline) {
  // Bind a port, close it: nothing listens there.
  std::unique_ptr<TcpStoreServer> server;
  ASSERT_TRUE(TcpStoreServer::Listen("127.0.0.1", 0, &server).ok());
  const std::string address = server->address();
  server.reset();
  std::unique_ptr<TcpStoreClient> c;
  const auto t0 = Clock::now();
  Status s = TcpStoreClient::Connect(address, milliseconds(300), &c);
  EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded) << s.ToString();
  EXPECT_NE(s.message().find(address), std::string::npos);
  EXPECT_LT(Clock::now() - t0, milliseconds(3000));
}

TEST(CommLocalRendezvousTest, EveryRankGetsRankZerosDataInOrder) {
  std::unique_ptr<TcpStoreServer> server;
  ASSERT_TRUE(TcpStoreServer::Listen("127.0.0.1", 0, &server).ok());
  server->Start();
  constexpr int kWorld = 3;
  std::vector<std::vector<std::string>> got(kWorld);
  std::vector<std::thread> ranks;
  for (int r = 0; r < kWorld; ++r) {
    ranks.emplace_back([&, r] {
      std::unique_ptr<LocalRendezvous> rdzv;
      ASSERT_TRUE(LocalRendezvous::Connect(server->address(), r, kWorld,
                                           milliseconds(2000), &rdzv)
                      .ok());
      for (int k = 0; k < 2; ++k) {
        std::string out;
        const std::string mine =
            "from rank " + std::to_string(r) + " #" + std::to_string(k);
        Status s = rdzv->Exchange(mine, milliseconds(2000), &out);
        ASSERT_TRUE(s.ok()) << s.ToString();
        got[r].push_back(out);
      }
    });
  }
  for (auto& t : ranks) t.join();
  for (int r = 0; r < kWorld; ++r) {
    EXPECT_EQ(got[r],
              (std::vector<std::string>{"from rank 0 #0", "from rank 0 #1"}));
  }
}

TEST(CommLocalRendezvousTest, TimesOutWhenRankZeroNeverPublishes) {
  std::unique_ptr<TcpStoreServer> server;
  ASSERT_TRUE(TcpStoreServer::Listen("127.0.0.1", 0, &server).ok());
  server->Start();
  std::unique_ptr<LocalRendezvous> rdzv;
  ASSERT_TRUE(LocalRendezvous::Connect(server->address(), 1, 2,
                                       milliseconds(2000), &rdzv)
                  .ok());
  std::string out;
  const auto t0 = Clock::now();
  Status s = rdzv->Exchange("", milliseconds(300), &out);
  EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded);
  EXPECT_NE(s.message().find("rank 1"), std::string::npos) << s.message();
  EXPECT_LT(Clock::now() - t0, milliseconds(3000));
}

TEST(CommLocalRendezvousTest, FromEnvNamesTheMissingVariables) {
  ::unsetenv(kEnvRendezvousStore);
  std::unique_ptr<LocalRendezvous> rdzv;
  Status s = LocalRendezvous::FromEnv(milliseconds(100), &rdzv);
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(s.message().find(kEnvRendezvousStore), std::string::npos);
}

}  // namespace
}  // namespace ftune::comm
