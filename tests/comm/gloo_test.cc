// Gloo backend across real processes on loopback: every collective, dtype
// and reduction for 2, 3 and 4 ranks; in-place forms and hand-computed
// results; a rank SIGKILLed mid-run makes the survivors fail with an error
// naming the collective and their rank within the timeout; a rank that
// never arrives fails the setup within the timeout; and the rendezvous
// through the agent channel, with the agents' relay simulated in the test.
#include <errno.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "channel.h"
#include "ftune/v1/rank_channel.pb.h"
#include "rank_harness.h"
#include "worker/comm/channel_rendezvous.h"
#include "worker/comm/gloo_communicator.h"
#include "worker/comm/half.h"
#include "worker/comm/local_rendezvous.h"
#include "worker/comm/selftest.h"

namespace ftune::comm {
namespace {

using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;
using testing::AllOk;
using testing::Report;
using testing::RunRanks;
using testing::StartRanks;

// Collectives time out after `timeout`; the setup gets `setup` (a loaded
// CI machine may start the ranks seconds apart).
Status MakeGloo(int rank, int world, const std::string& store,
                milliseconds timeout, std::unique_ptr<Communicator>* comm,
                milliseconds setup = milliseconds(30000)) {
  std::unique_ptr<LocalRendezvous> rdzv;
  FTUNE_RETURN_IF_ERROR(
      LocalRendezvous::Connect(store, rank, world, setup, &rdzv));
  GlooOptions options;
  options.host = "127.0.0.1";
  options.timeout = timeout;
  options.setup_timeout = setup;
  return CreateGlooCommunicator(*rdzv, options, comm);
}

// A failed expectation inside a rank process: becomes its exit status.
#define RANK_EXPECT(cond, what)                                               \
  do {                                                                        \
    if (!(cond)) {                                                            \
      return Status(StatusCode::kInternal, std::string(__FILE__ ":") +        \
                                               std::to_string(__LINE__) +     \
                                               ": " + #cond + ": " + (what)); \
    }                                                                         \
  } while (false)

class CommGlooWorldTest : public ::testing::TestWithParam<int> {};

TEST_P(CommGlooWorldTest, EveryCollectiveDtypeAndOpMatchesTheReference) {
  const int n = GetParam();
  auto exits = RunRanks(
      n,
      [n](int rank, const std::string& store) {
        std::unique_ptr<LocalRendezvous> rdzv;
        FTUNE_RETURN_IF_ERROR(LocalRendezvous::Connect(
            store, rank, n, milliseconds(20000), &rdzv));
        SelftestOptions options;
        options.backend = "gloo";
        options.check_only = true;
        options.max_bytes = 1 << 20;
        options.timeout = milliseconds(20000);
        SelftestResult result;
        Status s = RunSelftestRank(*rdzv, options, rank == 0 ? stdout : nullptr,
                                   &result);
        // 5 collectives x 6 dtypes x sizes, 3 ops for the three reductions.
        RANK_EXPECT(result.cases >= 2 * 6 * 5 * 4,
                    std::to_string(result.cases));
        RANK_EXPECT(result.mismatches == 0, std::to_string(result.mismatches));
        return s;
      },
      milliseconds(240000));
  ASSERT_TRUE(AllOk(exits, n)) << Report(exits);
  EXPECT_NE(exits[0].output.find("all results correct on every rank"),
            std::string::npos)
      << exits[0].output;
}

TEST_P(CommGlooWorldTest, InPlaceFormsAndHandComputedResults) {
  const int n = GetParam();
  auto exits = RunRanks(
      n,
      [n](int rank, const std::string& store) -> Status {
        std::unique_ptr<Communicator> comm;
        FTUNE_RETURN_IF_ERROR(
            MakeGloo(rank, n, store, milliseconds(20000), &comm));
        RANK_EXPECT(comm->rank() == rank && comm->size() == n, "rank/size");
        RANK_EXPECT(comm->backend() == "gloo", "backend");

        // AllReduce in place, int32: sum, avg (truncating), max.
        const int32_t tri = n * (n + 1) / 2;
        for (ReduceOp op : kAllReduceOps) {
          int32_t v[3] = {rank + 1, 10 * (rank + 1), -rank};
          FTUNE_RETURN_IF_ERROR(
              comm->AllReduce(v, v, 3, DataType::kInt32, op, nullptr));
          int32_t want[3];
          if (op == ReduceOp::kSum) {
            want[0] = tri, want[1] = 10 * tri, want[2] = -(n * (n - 1) / 2);
          } else if (op == ReduceOp::kAvg) {
            want[0] = tri / n, want[1] = 10 * tri / n,
            want[2] = -(n * (n - 1) / 2) / n;
          } else {
            want[0] = n, want[1] = 10 * n, want[2] = 0;
          }
          for (int j = 0; j < 3; ++j) {
            RANK_EXPECT(v[j] == want[j], std::string(ReduceOpName(op)) + " [" +
                                             std::to_string(j) +
                                             "] = " + std::to_string(v[j]));
          }
        }

        // AllGather in place: this rank's slot already holds its data.
        std::vector<float> gathered(5 * n, -1.0f);
        for (int j = 0; j < 5; ++j) gathered[rank * 5 + j] = rank * 100.0f + j;
        FTUNE_RETURN_IF_ERROR(
            comm->AllGather(gathered.data() + rank * 5, gathered.data(), 5,
                            DataType::kFloat32, nullptr));
        for (int q = 0; q < n; ++q) {
          for (int j = 0; j < 5; ++j) {
            RANK_EXPECT(gathered[q * 5 + j] == q * 100.0f + j,
                        "gathered[" + std::to_string(q * 5 + j) + "]");
          }
        }

        // ReduceScatter in place, bf16: the output is this rank's chunk.
        for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg}) {
          std::vector<uint16_t> buf(3 * n);
          for (int q = 0; q < n; ++q) {
            for (int j = 0; j < 3; ++j) {
              buf[q * 3 + j] = FloatToBf16(static_cast<float>(rank + q + j));
            }
          }
          uint16_t* mine = buf.data() + rank * 3;
          FTUNE_RETURN_IF_ERROR(comm->ReduceScatter(
              buf.data(), mine, 3, DataType::kBFloat16, op, nullptr));
          for (int j = 0; j < 3; ++j) {
            // sum over r of (r + rank + j); every value is exact in bf16.
            const float sum =
                n * (n - 1) / 2.0f + n * static_cast<float>(rank + j);
            const float want = op == ReduceOp::kSum ? sum : sum / n;
            RANK_EXPECT(Bf16ToFloat(mine[j]) == want,
                        std::string(ReduceOpName(op)) + " got " +
                            std::to_string(Bf16ToFloat(mine[j])) + " want " +
                            std::to_string(want));
          }
        }

        // fp16 max across negative values.
        uint16_t h[2] = {FloatToHalf(-1.5f - rank), FloatToHalf(0.25f * rank)};
        FTUNE_RETURN_IF_ERROR(comm->AllReduce(h, h, 2, DataType::kFloat16,
                                                   ReduceOp::kMax, nullptr));
        RANK_EXPECT(HalfToFloat(h[0]) == -1.5f, "fp16 max[0]");
        RANK_EXPECT(HalfToFloat(h[1]) == 0.25f * (n - 1), "fp16 max[1]");

        // Broadcast from every root in turn.
        for (int root = 0; root < n; ++root) {
          uint8_t b[7];
          for (int j = 0; j < 7; ++j)
            b[j] = rank == root ? root * 10 + j : 0xee;
          FTUNE_RETURN_IF_ERROR(
              comm->Broadcast(b, 7, DataType::kUInt8, root, nullptr));
          for (int j = 0; j < 7; ++j) {
            RANK_EXPECT(b[j] == root * 10 + j,
                        "broadcast from " + std::to_string(root));
          }
        }

        // Empty collectives are no-ops.
        FTUNE_RETURN_IF_ERROR(comm->AllReduce(
            nullptr, nullptr, 0, DataType::kFloat32, ReduceOp::kSum, nullptr));
        FTUNE_RETURN_IF_ERROR(
            comm->AllGather(nullptr, nullptr, 0, DataType::kInt64, nullptr));

        // The barrier holds everyone until the last rank arrives.
        const auto t0 = Clock::now();
        std::this_thread::sleep_for(milliseconds(150 * rank));
        FTUNE_RETURN_IF_ERROR(comm->Barrier(nullptr));
        const auto waited = Clock::now() - t0;
        RANK_EXPECT(
            waited >= milliseconds(150 * (n - 1) - 50),
            std::to_string(
                std::chrono::duration_cast<milliseconds>(waited).count()) +
                " ms");
        RANK_EXPECT(comm->Synchronize(nullptr).ok(), "synchronize");

        // A bad root fails on the spot (every rank passes it, so nobody
        // waits), and the communicator stays failed.
        int32_t x = 0;
        Status bad = comm->Broadcast(&x, 1, DataType::kInt32, n, nullptr);
        RANK_EXPECT(bad.code() == StatusCode::kInvalidArgument, bad.ToString());
        RANK_EXPECT(bad.message().find("Broadcast") != std::string::npos,
                    bad.message());
        Status after = comm->AllReduce(&x, &x, 1, DataType::kInt32,
                                       ReduceOp::kSum, nullptr);
        RANK_EXPECT(after.code() == StatusCode::kAborted, after.ToString());
        RANK_EXPECT(
            after.message().find("earlier failure") != std::string::npos,
            after.message());
        return OkStatus();
      },
      milliseconds(120000));
  ASSERT_TRUE(AllOk(exits, n)) << Report(exits);
}

INSTANTIATE_TEST_SUITE_P(Ranks, CommGlooWorldTest, ::testing::Values(2, 3, 4),
                         [](const auto& info) {
                           return std::to_string(info.param) + "ranks";
                         });

// ------------------------------------------------------------ failures

struct KillCase {
  int world;
  int victim;
};

class CommGlooKillTest : public ::testing::TestWithParam<KillCase> {};

// Ranks loop on AllReduce; once every rank has made progress the test
// SIGKILLs one. Each survivor must fail (not hang, not die of a signal)
// within the 3 s timeout plus scheduling slack, with an error that names
// the collective and its own rank.
TEST_P(CommGlooKillTest, SurvivorsFailWithinTheTimeoutNamingCollectiveAndRank) {
  const KillCase kc = GetParam();
  const milliseconds timeout(3000);
  int progress[2];
  ASSERT_EQ(::pipe2(progress, O_CLOEXEC), 0);
  auto group =
      StartRanks(kc.world, [&](int rank, const std::string& store) -> Status {
        ::close(progress[0]);
        std::unique_ptr<Communicator> comm;
        FTUNE_RETURN_IF_ERROR(
            MakeGloo(rank, kc.world, store, timeout, &comm));
        std::vector<float> buf(1 << 18, 1.0f);
        for (int i = 0;; ++i) {
          Status s =
              comm->AllReduce(buf.data(), buf.data(), buf.size(),
                              DataType::kFloat32, ReduceOp::kMax, nullptr);
          if (!s.ok()) return s;
          if (i == 3) {
            const char c = 'x';
            (void)!::write(progress[1], &c, 1);
          }
        }
      });
  ASSERT_NE(group, nullptr);
  ::close(progress[1]);
  // Wait for every rank's progress mark (bounded: a broken setup fails here).
  int marks = 0;
  const auto setup_deadline = Clock::now() + std::chrono::seconds(60);
  while (marks < kc.world && Clock::now() < setup_deadline) {
    pollfd p{progress[0], POLLIN, 0};
    if (::poll(&p, 1, 100) > 0) {
      char c[8];
      const ssize_t got = ::read(progress[0], c, sizeof(c));
      if (got <= 0) break;
      marks += static_cast<int>(got);
    }
  }
  ::close(progress[0]);
  ASSERT_EQ(marks, kc.world) << Report(group->Wait(milliseconds(1)));
  std::this_thread::sleep_for(milliseconds(20));  // well inside a collective
  ASSERT_EQ(::kill(group->pid(kc.victim), SIGKILL), 0);
  const auto killed_at = Clock::now();
  auto exits = group->Wait(timeout + std::chrono::seconds(20));
  const std::string report = Report(exits);
  ASSERT_EQ(static_cast<int>(exits.size()), kc.world);
  EXPECT_TRUE(WIFSIGNALED(exits[kc.victim].wait_status)) << report;
  int named_victim = 0;
  for (const auto& e : exits) {
    if (e.rank == kc.victim) continue;
    SCOPED_TRACE("survivor rank " + std::to_string(e.rank));
    ASSERT_TRUE(e.exited && WIFEXITED(e.wait_status)) << report;
    EXPECT_EQ(WEXITSTATUS(e.wait_status), 1) << report;
    EXPECT_FALSE(e.killed_by_launcher) << report;
    const auto took =
        std::chrono::duration_cast<milliseconds>(e.exited_at - killed_at);
    EXPECT_LT(took, timeout + milliseconds(2000)) << report;
    EXPECT_NE(e.output.find("RANK_ERROR"), std::string::npos) << report;
    EXPECT_NE(e.output.find("gloo AllReduce #"), std::string::npos) << report;
    EXPECT_NE(e.output.find("on rank " + std::to_string(e.rank) + " of " +
                            std::to_string(kc.world)),
              std::string::npos)
        << report;
    // Either Gloo saw a peer's connection close, and the error says which
    // peer, or a wait ran into the timeout, where no peer is known (in a
    // world of two there is only one it can be).
    const bool timed_out =
        e.output.find("DEADLINE_EXCEEDED") != std::string::npos;
    const bool lost_peer = e.output.find("UNAVAILABLE") != std::string::npos;
    EXPECT_TRUE(timed_out || lost_peer) << report;
    const size_t at = e.output.find("; peer rank ");
    if (lost_peer || kc.world == 2) {
      ASSERT_NE(at, std::string::npos) << report;
      const int peer =
          std::atoi(e.output.c_str() + at + std::strlen("; peer rank "));
      EXPECT_NE(peer, e.rank) << report;
      EXPECT_TRUE(peer >= 0 && peer < kc.world) << report;
      if (peer == kc.victim) ++named_victim;
    } else {
      EXPECT_NE(e.output.find("peer: unknown"), std::string::npos) << report;
    }
  }
  if (kc.world == 2) EXPECT_EQ(named_victim, 1) << report;
  std::printf("%d of %d survivors named the killed rank %d\n", named_victim,
              kc.world - 1, kc.victim);
}

INSTANTIATE_TEST_SUITE_P(Cases, CommGlooKillTest,
                         ::testing::Values(KillCase{2, 1}, KillCase{3, 2},
                                           KillCase{3, 0}, KillCase{4, 1}),
                         [](const auto& info) {
                           return std::to_string(info.param.world) +
                                  "ranks_kill" +
                                  std::to_string(info.param.victim);
                         });

TEST(CommGlooSetupTest, AMissingRankFailsTheSetupWithinTheTimeout) {
  // World of 3, but only ranks 0 and 1 exist.
  const milliseconds timeout(2000);
  auto exits = RunRanks(
      2,
      [&](int rank, const std::string& store) -> Status {
        const auto t0 = Clock::now();
        std::unique_ptr<Communicator> comm;
        Status s = MakeGloo(rank, 3, store, timeout, &comm, timeout);
        const auto took = Clock::now() - t0;
        RANK_EXPECT(!s.ok(), "setup without rank 2 succeeded");
        RANK_EXPECT(s.code() == StatusCode::kDeadlineExceeded, s.ToString());
        RANK_EXPECT(
            s.message().find("gloo setup on rank " + std::to_string(rank) +
                             " of 3") != std::string::npos,
            s.message());
        RANK_EXPECT(took < timeout + milliseconds(3000), s.message());
        std::fprintf(stderr, "expected failure: %s\n", s.ToString().c_str());
        return OkStatus();
      },
      milliseconds(60000));
  ASSERT_TRUE(AllOk(exits, 2)) << Report(exits);
}

// ------------------------------------------------------------ channel

// The agents' and coordinator's part of the rendezvous, in one thread: every
// rank's RankMessage.rendezvous_publish goes back to every rank (the sender
// too) as AgentMessage.rendezvous. Before relaying the first one it sends
// rank 1 a StopRank, which ChannelRendezvous must hand to its callback.
class Relay {
 public:
  explicit Relay(std::vector<int> fds) {
    for (int fd : fds) channels_.push_back(std::make_unique<Channel>(fd));
    thread_ = std::thread([this] { Run(); });
  }
  ~Relay() {
    stop_ = true;
    thread_.join();
  }
  int published() const { return published_.load(); }

 private:
  void Run() {
    std::vector<bool> open(channels_.size(), true);
    const auto deadline = Clock::now() + std::chrono::seconds(120);
    while (!stop_ && Clock::now() < deadline) {
      std::vector<pollfd> fds;
      std::vector<size_t> which;
      for (size_t i = 0; i < channels_.size(); ++i) {
        if (!open[i]) continue;
        fds.push_back({channels_[i]->fd(), POLLIN, 0});
        which.push_back(i);
      }
      if (fds.empty()) return;
      if (::poll(fds.data(), fds.size(), 50) <= 0) continue;
      for (size_t k = 0; k < fds.size(); ++k) {
        if (fds[k].revents == 0) continue;
        v1::RankMessage msg;
        if (!channels_[which[k]]->Read(&msg)) {
          open[which[k]] = false;
          continue;
        }
        if (msg.payload_case() != v1::RankMessage::kRendezvousPublish) continue;
        if (published_++ == 0 && channels_.size() > 1) {
          v1::AgentMessage stop;
          stop.mutable_stop()->set_reason("test: delivered during rendezvous");
          channels_[1]->Write(stop);
        }
        v1::AgentMessage out;
        out.mutable_rendezvous()->set_data(msg.rendezvous_publish());
        for (size_t i = 0; i < channels_.size(); ++i) {
          if (open[i]) channels_[i]->Write(out);
        }
      }
    }
  }

  std::vector<std::unique_ptr<Channel>> channels_;
  std::atomic<bool> stop_{false};
  std::atomic<int> published_{0};
  std::thread thread_;
};

TEST(CommChannelRendezvousTest, GlooThroughASimulatedAgentRelay) {
  constexpr int kWorld = 3;
  int pairs[kWorld][2];
  for (auto& p : pairs) {
    ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, p), 0);
  }
  auto group = StartRanks(kWorld, [&](int rank, const std::string&) -> Status {
    // Keep only this rank's end, as an agent-started rank would.
    for (int q = 0; q < kWorld; ++q) {
      ::close(pairs[q][0]);
      if (q != rank) ::close(pairs[q][1]);
    }
    Channel channel(pairs[rank][1]);
    int stops = 0;
    ChannelRendezvous rdzv(&channel, rank, kWorld,
                           [&](const v1::AgentMessage& m) {
                             if (m.has_stop()) ++stops;
                           });
    GlooOptions options;
    options.host = "127.0.0.1";
    options.timeout = milliseconds(20000);
    // Two communicators in a row: the second exchange must see rank 0's
    // second publish, not a stale first one.
    for (int round = 0; round < 2; ++round) {
      std::unique_ptr<Communicator> comm;
      FTUNE_RETURN_IF_ERROR(CreateGlooCommunicator(rdzv, options, &comm));
      int64_t v = (rank + 1) * (round + 1);
      FTUNE_RETURN_IF_ERROR(comm->AllReduce(&v, &v, 1, DataType::kInt64,
                                                 ReduceOp::kSum, nullptr));
      RANK_EXPECT(v == 6 * (round + 1), std::to_string(v));
    }
    RANK_EXPECT(stops == (rank == 1 ? 1 : 0), std::to_string(stops));
    return OkStatus();
  });
  ASSERT_NE(group, nullptr);
  std::vector<int> agent_ends;
  for (auto& p : pairs) {
    ::close(p[1]);
    agent_ends.push_back(p[0]);
  }
  auto relay = std::make_unique<Relay>(agent_ends);
  auto exits = group->Wait(milliseconds(120000));
  const int published = relay->published();
  relay.reset();
  ASSERT_TRUE(AllOk(exits, kWorld)) << Report(exits);
  EXPECT_EQ(published, 2);  // rank 0 only, once per communicator
}

TEST(CommChannelRendezvousTest,
     TimesOutWhenNothingArrivesAndReportsAClosedChannel) {
  int p[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, p), 0);
  Channel rank_end(p[1]);
  ChannelRendezvous rdzv(&rank_end, 1, 2);
  std::string out;
  const auto t0 = Clock::now();
  Status s = rdzv.Exchange("", milliseconds(300), &out);
  EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded) << s.ToString();
  EXPECT_NE(s.message().find("rank 1 of 2"), std::string::npos) << s.message();
  EXPECT_LT(Clock::now() - t0, milliseconds(3000));
  ::close(p[0]);  // the agent goes away
  s = rdzv.Exchange("", milliseconds(3000), &out);
  EXPECT_EQ(s.code(), StatusCode::kUnavailable) << s.ToString();
}

}  // namespace
}  // namespace ftune::comm
