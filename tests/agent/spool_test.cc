// Spool: identity, seq assignment across restarts, acks and trimming,
// compaction, and recovery from torn or corrupt tails.
#include "worker/agent/spool.h"
#include "worker/agent/event_size.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "small_fs.h"
#include "temp_dir.h"

namespace ftune::agent {
namespace {

namespace fs = std::filesystem;

class AgentSpoolTest : public ::testing::Test {
 protected:

  std::unique_ptr<Spool> Open(int64_t compact_bytes = 4 << 20) {
    Spool::Options o;
    o.dir = dir_;
    o.compact_bytes = compact_bytes;
    absl::StatusOr<std::unique_ptr<Spool>> s = Spool::Open(o);
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() ? std::move(*s) : nullptr;
  }

  static v1::RankEvent StepEvent(int rank, int64_t step) {
    v1::RankEvent e;
    e.set_job_id("job-1");
    e.set_rank(rank);
    e.set_time_unix_ms(1000 + step);
    e.mutable_message()->mutable_step()->set_step(step);
    return e;
  }

  // Appends n step events one call each; returns their seqs.
  static std::vector<int64_t> AppendSteps(Spool* s, int n, int64_t first_step = 1) {
    std::vector<int64_t> seqs;
    for (int i = 0; i < n; ++i) {
      v1::RankEvent e = StepEvent(0, first_step + i);
      EXPECT_TRUE(s->Append(&e).ok());
      seqs.push_back(e.agent_seq());
    }
    return seqs;
  }

  static std::vector<int64_t> Seqs(const Spool& s, int64_t after = 0) {
    absl::StatusOr<std::vector<v1::RankEvent>> events = s.ReadAfter(after, 1 << 20, 1 << 30);
    EXPECT_TRUE(events.ok()) << events.status();
    std::vector<int64_t> out;
    for (const v1::RankEvent& e : *events) out.push_back(e.agent_seq());
    return out;
  }

  std::string log_path() const { return dir_ + "/events.log"; }
  int64_t FileSize(const std::string& p) const { return static_cast<int64_t>(fs::file_size(p)); }

  testutil::TempDir tmp_{"agent_spool_test"};
  const std::string root_ = tmp_.path();
  const std::string dir_ = root_ + "/spool";
};

TEST_F(AgentSpoolTest, NewSpoolHasAStableHexAgentId) {
  std::string id;
  {
    auto s = Open();
    ASSERT_NE(s, nullptr);
    id = s->agent_id();
    EXPECT_EQ(id.size(), 32u);
    EXPECT_EQ(id.find_first_not_of("0123456789abcdef"), std::string::npos) << id;
    EXPECT_EQ(s->last_seq(), 0);
    EXPECT_EQ(s->acked_seq(), 0);
  }
  auto again = Open();
  ASSERT_NE(again, nullptr);
  EXPECT_EQ(again->agent_id(), id);

  // Another spool directory is another agent.
  Spool::Options o;
  o.dir = root_ + "/other";
  auto other = Spool::Open(o);
  ASSERT_TRUE(other.ok());
  EXPECT_NE((*other)->agent_id(), id);
}

TEST_F(AgentSpoolTest, AGivenAgentIdIsKeptAndAnotherIsRefused) {
  Spool::Options o;
  o.dir = dir_;
  o.agent_id = "gpu-node-1";
  {
    auto s = Spool::Open(o);
    ASSERT_TRUE(s.ok()) << s.status();
    EXPECT_EQ((*s)->agent_id(), "gpu-node-1");
  }
  EXPECT_EQ(Open()->agent_id(), "gpu-node-1");  // kept without the flag
  // The spool's unacknowledged events are gpu-node-1's: another id is refused.
  o.agent_id = "gpu-node-2";
  auto other = Spool::Open(o);
  ASSERT_FALSE(other.ok());
  EXPECT_EQ(other.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(other.status().message().find("belongs to agent gpu-node-1, not --agent-id gpu-node-2"),
            std::string::npos)
      << other.status();
  o.agent_id = "bad/id";
  o.dir = root_ + "/fresh";
  EXPECT_EQ(Spool::Open(o).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(AgentSpoolTest, AppendAssignsIncreasingSeqsAndReadsThemBack) {
  auto s = Open();
  std::vector<v1::RankEvent> batch = {StepEvent(0, 1), StepEvent(1, 1), StepEvent(0, 2)};
  ASSERT_TRUE(s->Append(&batch).ok());
  EXPECT_EQ(batch[0].agent_seq(), 1);
  EXPECT_EQ(batch[2].agent_seq(), 3);
  v1::RankEvent one = StepEvent(1, 2);
  ASSERT_TRUE(s->Append(&one).ok());
  EXPECT_EQ(one.agent_seq(), 4);
  EXPECT_EQ(s->last_seq(), 4);
  EXPECT_EQ(s->num_unacked(), 4u);

  auto events = s->ReadAfter(1, 10, 1 << 20);
  ASSERT_TRUE(events.ok());
  ASSERT_EQ(events->size(), 3u);
  EXPECT_EQ((*events)[0].agent_seq(), 2);
  EXPECT_EQ((*events)[0].rank(), 1);
  EXPECT_EQ((*events)[2].message().step().step(), 2);
  EXPECT_EQ((*events)[2].time_unix_ms(), 1002);

  // Limits: by count, and by bytes (but always at least one event).
  EXPECT_EQ(s->ReadAfter(0, 2, 1 << 20)->size(), 2u);
  EXPECT_EQ(s->ReadAfter(0, 10, 1)->size(), 1u);
  EXPECT_TRUE(s->ReadAfter(4, 10, 1 << 20)->empty());
}

TEST_F(AgentSpoolTest, EventsAndSeqsSurviveARestart) {
  {
    auto s = Open();
    AppendSteps(s.get(), 5);
  }
  auto s = Open();
  EXPECT_EQ(Seqs(*s), (std::vector<int64_t>{1, 2, 3, 4, 5}));
  EXPECT_EQ(AppendSteps(s.get(), 1), (std::vector<int64_t>{6}));
}

TEST_F(AgentSpoolTest, AnOversizedEventIsRefusedAndTheBatchWithIt) {
  auto s = Open();
  std::vector<v1::RankEvent> batch = {StepEvent(0, 1), StepEvent(0, 2)};
  batch[1].mutable_message()->mutable_log()->set_text(std::string(kMaxEventBytes + 1, 'x'));
  const absl::Status st = s->Append(&batch);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("limit"), std::string::npos) << st.message();
  EXPECT_EQ(batch[0].agent_seq(), 0);
  EXPECT_EQ(s->num_unacked(), 0u);
  EXPECT_EQ(s->last_seq(), 0);
  v1::RankEvent fits = StepEvent(0, 3);
  ASSERT_TRUE(s->Append(&fits).ok());
  EXPECT_EQ(fits.agent_seq(), 1);  // no seq was consumed
}

TEST_F(AgentSpoolTest, AckTrimsAndPersistsAndSeqsNeverRestart) {
  {
    auto s = Open();
    AppendSteps(s.get(), 5);
    ASSERT_TRUE(s->Ack(3).ok());
    EXPECT_EQ(s->acked_seq(), 3);
    EXPECT_EQ(Seqs(*s), (std::vector<int64_t>{4, 5}));
    EXPECT_EQ(s->num_unacked(), 2u);
  }
  {
    auto s = Open();
    EXPECT_EQ(s->acked_seq(), 3);
    EXPECT_EQ(Seqs(*s), (std::vector<int64_t>{4, 5}));
    ASSERT_TRUE(s->Ack(5).ok());
    // Everything acknowledged: the log is emptied.
    EXPECT_EQ(s->log_bytes(), 0);
    EXPECT_EQ(FileSize(log_path()), 0);
    EXPECT_TRUE(Seqs(*s).empty());
  }
  // An empty log after a restart still continues above the ack.
  auto s = Open();
  EXPECT_EQ(s->last_seq(), 5);
  EXPECT_EQ(AppendSteps(s.get(), 2), (std::vector<int64_t>{6, 7}));
}

TEST_F(AgentSpoolTest, StaleAndFutureAcks) {
  auto s = Open();
  AppendSteps(s.get(), 3);
  ASSERT_TRUE(s->Ack(2).ok());
  ASSERT_TRUE(s->Ack(1).ok());  // lower than before: ignored
  EXPECT_EQ(s->acked_seq(), 2);
  EXPECT_EQ(Seqs(*s), (std::vector<int64_t>{3}));
  // The coordinator knows more than this spool (e.g. the log was lost): new
  // seqs go above its ack, or the coordinator would drop them as duplicates.
  ASSERT_TRUE(s->Ack(100).ok());
  EXPECT_EQ(s->num_unacked(), 0u);
  EXPECT_EQ(AppendSteps(s.get(), 1), (std::vector<int64_t>{101}));
  s.reset();
  s = Open();
  EXPECT_EQ(AppendSteps(s.get(), 1), (std::vector<int64_t>{102}));
}

// An ack (or a record) at the top of int64, from a damaged or hand-edited
// spool: appends are refused with an error instead of overflowing the seq.
TEST_F(AgentSpoolTest, SeqsAtTheTopOfInt64RefuseAppendsInsteadOfOverflowing) {
  auto s = Open();
  ASSERT_TRUE(s->Ack(INT64_MAX - 1).ok());
  EXPECT_EQ(AppendSteps(s.get(), 1), (std::vector<int64_t>{INT64_MAX}));
  v1::RankEvent e = StepEvent(0, 1);
  const absl::Status st = s->Append(&e);
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
  EXPECT_NE(st.message().find("no room"), std::string::npos) << st;
  EXPECT_EQ(s->last_seq(), INT64_MAX);
  EXPECT_EQ(s->num_unacked(), 1u);
}

TEST_F(AgentSpoolTest, CompactionDropsTheAckedPrefixFromTheFile) {
  auto s = Open(/*compact_bytes=*/256);
  AppendSteps(s.get(), 100);
  const int64_t full = s->log_bytes();
  EXPECT_EQ(FileSize(log_path()), full);
  ASSERT_TRUE(s->Ack(60).ok());
  EXPECT_LT(s->log_bytes(), full / 2);
  EXPECT_EQ(FileSize(log_path()), s->log_bytes());
  std::vector<int64_t> expected;
  for (int64_t i = 61; i <= 100; ++i) expected.push_back(i);
  EXPECT_EQ(Seqs(*s), expected);
  // Appends after a compaction land in the new file, readable and recoverable.
  EXPECT_EQ(AppendSteps(s.get(), 1), (std::vector<int64_t>{101}));
  expected.push_back(101);
  EXPECT_EQ(Seqs(*s), expected);
  s.reset();
  s = Open(256);
  EXPECT_EQ(Seqs(*s), expected);
  EXPECT_FALSE(fs::exists(dir_ + "/events.log.compact"));
}

TEST_F(AgentSpoolTest, SmallAckedPrefixIsKeptButNotReturned) {
  auto s = Open(/*compact_bytes=*/1 << 20);
  AppendSteps(s.get(), 10);
  const int64_t full = s->log_bytes();
  ASSERT_TRUE(s->Ack(4).ok());
  EXPECT_EQ(s->log_bytes(), full);  // below the compaction threshold
  s.reset();
  s = Open(1 << 20);
  EXPECT_EQ(Seqs(*s), (std::vector<int64_t>{5, 6, 7, 8, 9, 10}));
}

TEST_F(AgentSpoolTest, TornLastRecordIsDroppedOnRecovery) {
  int64_t size_after_two;
  {
    auto s = Open();
    AppendSteps(s.get(), 2);
    size_after_two = s->log_bytes();
    AppendSteps(s.get(), 1);
  }
  // A crash in the middle of the third append: every cut point must recover.
  const int64_t full = FileSize(log_path());
  std::string bytes;
  {
    std::ifstream in(log_path(), std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    bytes = ss.str();
  }
  for (int64_t cut = size_after_two; cut < full; ++cut) {
    {
      std::ofstream out(log_path(), std::ios::binary | std::ios::trunc);
      out.write(bytes.data(), cut);
    }
    auto s = Open();
    ASSERT_NE(s, nullptr);
    EXPECT_EQ(Seqs(*s), (std::vector<int64_t>{1, 2})) << "cut at " << cut;
    EXPECT_EQ(FileSize(log_path()), size_after_two) << "cut at " << cut;
    // The torn event was never sent, so its seq is free again.
    EXPECT_EQ(s->last_seq(), 2);
  }
  // And appending after a recovery gives a clean log.
  auto s = Open();
  AppendSteps(s.get(), 1);
  s.reset();
  s = Open();
  EXPECT_EQ(Seqs(*s), (std::vector<int64_t>{1, 2, 3}));
}

TEST_F(AgentSpoolTest, GarbageAndZeroFilledTailsAreDropped) {
  {
    auto s = Open();
    AppendSteps(s.get(), 3);
  }
  const int64_t good = FileSize(log_path());
  {
    // What some file systems leave after a crash: the size grew, the data
    // did not arrive.
    std::ofstream out(log_path(), std::ios::binary | std::ios::app);
    out << std::string(64, '\0');
  }
  {
    auto s = Open();
    EXPECT_EQ(Seqs(*s), (std::vector<int64_t>{1, 2, 3}));
    EXPECT_EQ(FileSize(log_path()), good);
  }
  {
    std::ofstream out(log_path(), std::ios::binary | std::ios::app);
    out << "\x05hello\x01\x02\x03\x04";  // a well-formed length, wrong CRC
  }
  auto s = Open();
  EXPECT_EQ(Seqs(*s), (std::vector<int64_t>{1, 2, 3}));
  EXPECT_EQ(FileSize(log_path()), good);
  EXPECT_EQ(AppendSteps(s.get(), 1), (std::vector<int64_t>{4}));
}

TEST_F(AgentSpoolTest, CorruptRecordInTheMiddleCutsTheLogThere) {
  int64_t first_size;
  {
    auto s = Open();
    AppendSteps(s.get(), 1);
    first_size = s->log_bytes();
    AppendSteps(s.get(), 2);
  }
  {
    std::fstream f(log_path(), std::ios::binary | std::ios::in | std::ios::out);
    f.seekp(first_size + 3);
    f.put('\x7f');
  }
  auto s = Open();
  EXPECT_EQ(Seqs(*s), (std::vector<int64_t>{1}));
  EXPECT_EQ(FileSize(log_path()), first_size);
}

TEST_F(AgentSpoolTest, CorruptIdentityFilesAreReportedNotGuessed) {
  { Open(); }
  {
    std::ofstream(dir_ + "/acked") << "twelve\n";
    Spool::Options o;
    o.dir = dir_;
    auto s = Spool::Open(o);
    ASSERT_FALSE(s.ok());
    EXPECT_NE(std::string(s.status().message()).find("acked"), std::string::npos) << s.status();
    std::ofstream(dir_ + "/acked") << "12\n";
    EXPECT_TRUE(Spool::Open(o).ok());
  }
  std::ofstream(dir_ + "/agent_id") << "not hex!\n";
  Spool::Options o;
  o.dir = dir_;
  auto s = Spool::Open(o);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(std::string(s.status().message()).find("agent_id"), std::string::npos) << s.status();
}

TEST_F(AgentSpoolTest, UnusableDirectoryIsAClearError) {
  // A regular file where a directory should be (root ignores permission bits,
  // so this is the failure every user can hit).
  std::ofstream(root_ + "/file") << "x";
  Spool::Options o;
  o.dir = root_ + "/file/spool";
  auto s = Spool::Open(o);
  ASSERT_FALSE(s.ok());
  const std::string msg(s.status().message());
  EXPECT_NE(msg.find(root_ + "/file"), std::string::npos) << msg;
  EXPECT_NE(msg.find("--work-dir"), std::string::npos) << msg;
}

// A log that filled its disk itself (the coordinator was away): a record
// is refused, and replacing `acked` needs a block the disk has not got.
// The spool's reserve makes the room: the ack is recorded, the log
// trimmed, the reserve taken again, and appends go on. Without a reserve
// the ack is refused, and nothing would ever free the log.
TEST_F(AgentSpoolTest, AnAckOnADiskTheLogFilledIsRecordedInTheReserve) {
  for (const int64_t reserve_bytes : {int64_t{64 << 10}, int64_t{0}}) {
    SCOPED_TRACE("reserve_bytes " + std::to_string(reserve_bytes));
    testutil::SmallFs disk(256 << 10, "agent_spool_test_fs");
    if (!disk.skip_reason().empty()) GTEST_SKIP() << disk.skip_reason();
    ASSERT_TRUE(disk.mounted());
    Spool::Options o;
    o.dir = disk.path() + "/spool";
    o.reserve_bytes = reserve_bytes;
    absl::StatusOr<std::unique_ptr<Spool>> s = Spool::Open(o);
    ASSERT_TRUE(s.ok()) << s.status();
    EXPECT_EQ(fs::exists(o.dir + "/reserve"), reserve_bytes > 0);

    // Records far smaller than a block: the last one is used up before
    // one is refused.
    absl::Status refused;
    int64_t last = 0;
    for (int64_t step = 1; refused.ok(); ++step) {
      v1::RankEvent e = StepEvent(0, step);
      refused = (*s)->Append(&e);
      if (refused.ok()) last = e.agent_seq();
    }
    EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted) << refused;
    EXPECT_EQ(disk.free_bytes(), 0u);
    ASSERT_GT(last, 1000);

    const absl::Status acked = (*s)->Ack(last);
    if (reserve_bytes == 0) {
      EXPECT_FALSE(acked.ok());
      EXPECT_EQ((*s)->acked_seq(), 0);
      EXPECT_EQ((*s)->num_unacked(), static_cast<size_t>(last));
      continue;
    }
    ASSERT_TRUE(acked.ok()) << acked;
    EXPECT_EQ((*s)->acked_seq(), last);
    EXPECT_EQ((*s)->num_unacked(), 0u);
    EXPECT_EQ((*s)->log_bytes(), 0);
    EXPECT_TRUE(fs::exists(o.dir + "/reserve"));
    v1::RankEvent next = StepEvent(0, last + 1);
    ASSERT_TRUE((*s)->Append(&next).ok());
    EXPECT_EQ(next.agent_seq(), last + 1);

    // The ack is on disk.
    s->reset();
    s = Spool::Open(o);
    ASSERT_TRUE(s.ok()) << s.status();
    EXPECT_EQ((*s)->acked_seq(), last);
    EXPECT_EQ(Seqs(**s), std::vector<int64_t>{last + 1});
  }
}

TEST_F(AgentSpoolTest, LeftoverTemporaryFilesAreRemoved) {
  { Open(); }
  std::ofstream(dir_ + "/events.log.compact") << "half a compaction";
  std::ofstream(dir_ + "/acked.tmp") << "9";
  auto s = Open();
  EXPECT_FALSE(fs::exists(dir_ + "/events.log.compact"));
  EXPECT_FALSE(fs::exists(dir_ + "/acked.tmp"));
  EXPECT_EQ(s->acked_seq(), 0);
}

// A crash (kill -9) between an atomic write and its rename leaves the
// writer's temporary "<file>.tmp.<pid>.<n>" behind; Open removes those of the
// files the spool writes atomically (acked, agent_id), whatever their pid,
// and nothing else.
TEST_F(AgentSpoolTest, CrashedAtomicWriteTemporariesAreRemovedAndNothingElse) {
  std::string id;
  {
    auto s = Open();
    ASSERT_NE(s, nullptr);
    id = s->agent_id();
    AppendSteps(s.get(), 4);
    ASSERT_TRUE(s->Ack(2).ok());
  }
  const std::string pid = std::to_string(::getpid());
  const std::vector<std::string> leftovers = {
      "acked.tmp." + pid + ".0", "acked.tmp." + pid + ".17", "acked.tmp.4194303.2",
      "agent_id.tmp.31337.0"};
  const std::vector<std::string> unrelated = {
      "acked.tmp.123",         "acked.tmp.123.",   "acked.tmp..4",       "acked.tmp.12a.3",
      "acked.tmp.1.2.bak",     "acked.tmpx.1.2",   "xacked.tmp.1.2",     "acked.bak.1.2",
      "events.log.tmp.1.2",    "agent_id.tmp.1.2 ", "notes.txt"};
  for (const std::string& n : leftovers) std::ofstream(dir_ + "/" + n) << "99\n";
  for (const std::string& n : unrelated) std::ofstream(dir_ + "/" + n) << "keep\n";

  auto s = Open();
  ASSERT_NE(s, nullptr);
  for (const std::string& n : leftovers) EXPECT_FALSE(fs::exists(dir_ + "/" + n)) << n;
  for (const std::string& n : unrelated) EXPECT_TRUE(fs::exists(dir_ + "/" + n)) << n;
  EXPECT_EQ(s->agent_id(), id);
  EXPECT_EQ(s->acked_seq(), 2);
  EXPECT_EQ(Seqs(*s), (std::vector<int64_t>{3, 4}));
  EXPECT_EQ(AppendSteps(s.get(), 1), (std::vector<int64_t>{5}));
  // The spool's own atomic writes still work after the cleanup.
  ASSERT_TRUE(s->Ack(5).ok());
  s.reset();
  s = Open();
  EXPECT_EQ(s->acked_seq(), 5);
  EXPECT_TRUE(Seqs(*s).empty());
}

TEST_F(AgentSpoolTest, ConcurrentAppendsGetDistinctContiguousSeqsAndNotifyTheListener) {
  auto s = Open(/*compact_bytes=*/512);
  std::atomic<int> notified{0};
  s->SetAppendListener([&] { notified.fetch_add(1); });
  constexpr int kThreads = 4, kPerThread = 50;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        v1::RankEvent e = StepEvent(t, i);
        ASSERT_TRUE(s->Append(&e).ok());
      }
    });
  }
  // Acks race with the appends, like the coordinator's do.
  std::thread acker([&] {
    for (int64_t a = 10; a <= 100; a += 10) {
      while (s->last_seq() < a) std::this_thread::yield();
      ASSERT_TRUE(s->Ack(a).ok());
    }
  });
  for (auto& t : threads) t.join();
  acker.join();
  EXPECT_EQ(notified.load(), kThreads * kPerThread);
  std::vector<int64_t> expected;
  for (int64_t i = 101; i <= kThreads * kPerThread; ++i) expected.push_back(i);
  EXPECT_EQ(Seqs(*s), expected);
  s.reset();
  s = Open(512);
  EXPECT_EQ(Seqs(*s), expected);
}

TEST(AgentCrc32Test, MatchesTheStandardCheckValue) {
  EXPECT_EQ(Crc32("123456789", 9), 0xCBF43926u);
  EXPECT_EQ(Crc32("", 0), 0u);
}

}  // namespace
}  // namespace ftune::agent
