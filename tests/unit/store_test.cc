#include <gtest/gtest.h>
#include <signal.h>
#include <sqlite3.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <mutex>
#include <random>
#include <thread>

#include "job_state.h"
#include "store.h"
#include "full_disk.h"
#include "temp_dir.h"

namespace ftune::server {
namespace {


v1::Job MakeJob(const std::string& id, v1::JobState state, const std::string& label = "") {
  v1::Job j;
  j.set_id(id);
  j.set_state(state);
  j.mutable_spec()->set_name(id);
  if (!label.empty()) (*j.mutable_spec()->mutable_labels())["team"] = label;
  return j;
}

// A queued job whose spec is about kBigJobBytes (its name): a commit of one
// fills several WAL pages.
constexpr int kBigJobBytes = 16384;
std::string BigJobName(int i) { return std::string(kBigJobBytes, static_cast<char>('a' + i % 26)); }
v1::Job BigJob(int i) {
  v1::Job j = MakeJob("job-" + std::to_string(i), v1::QUEUED, "team");
  j.mutable_spec()->set_name(BigJobName(i));
  return j;
}

// Polls cond until it holds, for up to `limit`.
bool WaitUntil(const std::function<bool()>& cond,
               std::chrono::milliseconds limit = std::chrono::seconds(10)) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (!cond()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return true;
}

// Store errors as the listener gets them, from any thread (the checkpoint
// thread reports its own).
class ErrorLog {
 public:
  void Listen(Store& store) {
    store.SetErrorListener([this](const absl::Status& st) {
      std::lock_guard<std::mutex> lock(mu_);
      errors_.push_back(st);
    });
  }
  std::vector<absl::Status> errors() {
    std::lock_guard<std::mutex> lock(mu_);
    return errors_;
  }

 private:
  std::mutex mu_;
  std::vector<absl::Status> errors_;
};

// `PRAGMA wal_checkpoint(PASSIVE)` from a connection of the test's own:
// true when nothing was left to copy or it copied everything.
bool WalFullyCheckpointed(const std::string& dir) {
  sqlite3* db = nullptr;
  bool done = false;
  if (sqlite3_open_v2((dir + "/ftune.db").c_str(), &db, SQLITE_OPEN_READWRITE, nullptr) ==
      SQLITE_OK) {
    sqlite3_stmt* q = nullptr;
    if (sqlite3_prepare_v2(db, "PRAGMA wal_checkpoint(PASSIVE)", -1, &q, nullptr) == SQLITE_OK &&
        sqlite3_step(q) == SQLITE_ROW)  // busy, frames in the WAL, frames copied
      done = sqlite3_column_int(q, 0) == 0 && sqlite3_column_int(q, 1) == sqlite3_column_int(q, 2);
    sqlite3_finalize(q);
  }
  sqlite3_close(db);
  return done;
}

TEST(Store, PersistsAcrossReopen) {
  testutil::TempDir tmp("ftune-store");
  const std::string dir = tmp.path() + "/state";  // Store::Open creates it
  {
    auto s = Store::Open(dir);
    ASSERT_TRUE(s.ok()) << s.status();
    ASSERT_TRUE((*s)->InsertJob(MakeJob("job-1", v1::RUNNING), 1).ok());
    v1::JobEvent e;
    e.set_job_id("job-1");
    e.set_seq(1);
    e.mutable_step()->set_loss(1.5);
    ASSERT_TRUE((*s)->AppendEvent(e).ok());
    StoredAgent a;
    a.agent.set_agent_id("ag");
    a.acked_seq = 7;
    ASSERT_TRUE((*s)->PutAgent(a).ok());
  }
  auto s = Store::Open(dir);
  ASSERT_TRUE(s.ok());
  EXPECT_EQ((*s)->schema_version(), Store::kSchemaVersion);
  auto job = (*s)->GetJob("job-1");
  ASSERT_TRUE(job.ok());
  EXPECT_EQ(job->state(), v1::RUNNING);
  auto events = (*s)->ReadEvents("job-1", 0, INT64_MAX, 10);
  ASSERT_TRUE(events.ok());
  ASSERT_EQ(events->size(), 1u);
  EXPECT_DOUBLE_EQ((*events)[0].step().loss(), 1.5);
  auto agents = (*s)->ListAgents();
  ASSERT_EQ(agents->size(), 1u);
  EXPECT_EQ((*agents)[0].acked_seq, 7);
}

TEST(Store, EachSyncModeIsInEffectAndKeepsJobsAcrossReopen) {
  {
    auto s = Store::Open(":memory:");  // the default
    ASSERT_TRUE(s.ok()) << s.status();
    EXPECT_EQ((*s)->SynchronousMode(), 2);  // FULL
  }
  for (const auto& [sync, pragma] : {std::pair{StoreSync::kFull, 2}, {StoreSync::kNormal, 1}}) {
    SCOPED_TRACE(StoreSyncName(sync));
    testutil::TempDir tmp("ftune-store");
    const std::string dir = tmp.path() + "/state";
    {
      auto s = Store::Open(dir, sync);
      ASSERT_TRUE(s.ok()) << s.status();
      EXPECT_EQ((*s)->SynchronousMode(), pragma);
      ASSERT_TRUE((*s)->InsertJob(MakeJob("job-1", v1::QUEUED), 1).ok());
    }
    auto s = Store::Open(dir, sync);
    ASSERT_TRUE(s.ok()) << s.status();
    EXPECT_EQ((*s)->SynchronousMode(), pragma);
    auto job = (*s)->GetJob("job-1");
    ASSERT_TRUE(job.ok()) << job.status();
    EXPECT_EQ(job->state(), v1::QUEUED);
  }
}

TEST(Store, SyncModeChangesOnAnOpenStoreOutsideATransactionOnly) {
  testutil::TempDir tmp("ftune-store");
  auto s = Store::Open(tmp.path() + "/state");
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_TRUE((*s)->SetSync(StoreSync::kNormal).ok());
  EXPECT_EQ((*s)->SynchronousMode(), 1);
  const absl::Status inside =
      (*s)->Transaction([&]() -> absl::Status { return (*s)->SetSync(StoreSync::kFull); });
  EXPECT_EQ(inside.code(), absl::StatusCode::kFailedPrecondition) << inside;
  EXPECT_EQ((*s)->SynchronousMode(), 1);
  ASSERT_TRUE((*s)->SetSync(StoreSync::kFull).ok());
  EXPECT_EQ((*s)->SynchronousMode(), 2);
}

// synchronous=NORMAL gives up durability against power loss only: a
// coordinator killed right after its commits (no clean close, no checkpoint)
// keeps every one of them.
TEST(Store, NormalSyncKeepsEveryCommitOfAKilledProcess) {
  testutil::TempDir tmp("ftune-store");
  const std::string dir = tmp.path() + "/state";
  constexpr int kNumJobs = 100;
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    auto s = Store::Open(dir, StoreSync::kNormal);
    if (!s.ok()) _exit(1);
    for (int i = 1; i <= kNumJobs; ++i)  // one commit each, as CreateJob
      if (!(*s)->InsertJob(MakeJob("job-" + std::to_string(i), v1::QUEUED), i).ok()) _exit(1);
    kill(getpid(), SIGKILL);
    _exit(1);
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL)
      << "the child did not store its jobs (status " << status << ")";
  // A clean close checkpoints the WAL and removes it; the killed one left it.
  ASSERT_TRUE(std::filesystem::exists(dir + "/ftune.db-wal"));

  auto s = Store::Open(dir, StoreSync::kNormal);
  ASSERT_TRUE(s.ok()) << s.status();
  for (int i = 1; i <= kNumJobs; ++i)
    EXPECT_TRUE((*s)->GetJob("job-" + std::to_string(i)).ok()) << "job-" << i;
  EXPECT_EQ((*s)->CountJobsByState()[v1::QUEUED], kNumJobs);
  EXPECT_TRUE((*s)->CheckJobIndex().ok()) << (*s)->CheckJobIndex();
}

// Commits never checkpoint (SQLite would, past 1,000 WAL pages, inside the
// commit): the store's thread copies the WAL into the database file while
// the store is open, the connection's autocheckpoint reads 0.
TEST(Store, TheCheckpointThreadNotTheCommitsCopiesTheWalIntoTheDatabase) {
  {
    auto s = Store::Open(":memory:");  // no WAL, no thread
    ASSERT_TRUE(s.ok()) << s.status();
    EXPECT_EQ((*s)->NumCheckpoints(), 0);
  }
  testutil::TempDir tmp("ftune-store");
  const std::string dir = tmp.path() + "/state";
  auto s = Store::Open(dir);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ((*s)->WalAutocheckpoint(), 0);
  // One commit each, 5 WAL pages or more each: past 1,000 pages.
  constexpr int kNumJobs = 300;
  for (int i = 1; i <= kNumJobs; ++i) ASSERT_TRUE((*s)->InsertJob(BigJob(i), i).ok());
  const std::string db = dir + "/ftune.db";
  // Only a checkpoint puts the jobs into ftune.db, and the store has not
  // closed. (The count moves once the checkpoint returns, after the file
  // has grown.)
  EXPECT_TRUE(WaitUntil([&] {
    return std::filesystem::file_size(db) >= kNumJobs * kBigJobBytes &&
           (*s)->NumCheckpoints() >= 1;
  })) << "ftune.db holds " << std::filesystem::file_size(db) << " bytes after "
      << (*s)->NumCheckpoints() << " checkpoints";
}

// Jobs committed before, between and after the thread's checkpoints are all
// there once the store is closed (its close checkpoints the rest and removes
// the WAL, autocheckpoint off or not) and opened again (quick_check passes).
TEST(Store, JobsAroundBackgroundCheckpointsAreAllThereAfterReopen) {
  testutil::TempDir tmp("ftune-store");
  const std::string dir = tmp.path() + "/state";
  const std::string db = dir + "/ftune.db";
  constexpr int kNumRounds = 3;
  constexpr int kJobsPerRound = 100;
  {
    ErrorLog errors;  // outlives the store, whose thread calls it
    auto s = Store::Open(dir, StoreSync::kNormal);
    ASSERT_TRUE(s.ok()) << s.status();
    errors.Listen(**s);
    for (int round = 0; round < kNumRounds; ++round) {
      for (int i = round * kJobsPerRound + 1; i <= (round + 1) * kJobsPerRound; ++i) {
        ASSERT_TRUE((*s)->Transaction([&]() -> absl::Status {
                          if (auto st = (*s)->InsertJob(BigJob(i), i); !st.ok()) return st;
                          v1::JobEvent e;
                          e.set_job_id("job-" + std::to_string(i));
                          e.set_seq(1);
                          return (*s)->AppendEvent(e);
                        }).ok());
      }
      if (round + 1 == kNumRounds) break;  // the last round stays in the WAL
      const uintmax_t stored = static_cast<uintmax_t>(round + 1) * kJobsPerRound * kBigJobBytes;
      ASSERT_TRUE(WaitUntil([&] { return std::filesystem::file_size(db) >= stored; }))
          << "round " << round << ": no checkpoint";
    }
    EXPECT_TRUE(errors.errors().empty()) << errors.errors()[0];
  }
  EXPECT_FALSE(std::filesystem::exists(db + "-wal"));
  auto s = Store::Open(dir, StoreSync::kNormal);
  ASSERT_TRUE(s.ok()) << s.status();
  for (int i = 1; i <= kNumRounds * kJobsPerRound; ++i) {
    auto job = (*s)->GetJob("job-" + std::to_string(i));
    ASSERT_TRUE(job.ok()) << job.status();
    EXPECT_EQ(job->spec().name(), BigJobName(i)) << "job-" << i;
    auto events = (*s)->ReadEvents("job-" + std::to_string(i), 0, 10, 10);
    ASSERT_TRUE(events.ok()) << events.status();
    EXPECT_EQ(events->size(), 1u) << "job-" << i;
  }
  EXPECT_EQ((*s)->CountJobsByState()[v1::QUEUED], kNumRounds * kJobsPerRound);
  EXPECT_TRUE((*s)->CheckJobIndex().ok()) << (*s)->CheckJobIndex();
}

// The destructor wakes the thread rather than waiting out its tick, even
// right after Open.
TEST(Store, ClosingStopsTheCheckpointThreadAtOnce) {
  testutil::TempDir tmp("ftune-store");
  const std::string dir = tmp.path() + "/state";
  for (int i = 1; i <= 5; ++i) {
    auto s = Store::Open(dir);
    ASSERT_TRUE(s.ok()) << s.status();
    ASSERT_TRUE((*s)->InsertJob(MakeJob("job-" + std::to_string(i), v1::QUEUED), i).ok());
    const auto start = std::chrono::steady_clock::now();
    s->reset();
    EXPECT_LT(std::chrono::steady_clock::now() - start, Store::kCheckpointInterval);
  }
  auto s = Store::Open(dir);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ((*s)->CountJobsByState()[v1::QUEUED], 5);
}

using testutil::FullDisk;

// A checkpoint the disk refuses is logged and reported as any store error
// (RESOURCE_EXHAUSTED, from the checkpoint thread), and tried again until
// it succeeds.
TEST(Store, AFailedCheckpointIsReportedAndTriedAgain) {
  testutil::TempDir tmp("ftune-store");
  const std::string dir = tmp.path() + "/state";
  const std::string db = dir + "/ftune.db";
  ErrorLog errors;  // outlives the store, whose thread calls it
  auto s = Store::Open(dir);
  ASSERT_TRUE(s.ok()) << s.status();
  errors.Listen(**s);
  int num_stored = 0;
  for (; num_stored < 50; ++num_stored)
    ASSERT_TRUE((*s)->InsertJob(BigJob(num_stored + 1), num_stored + 1).ok());
  // Everything in ftune.db: the next commit starts the WAL over from its
  // first page, so the WAL has room under the limit below (ftune.db's size,
  // 800 KiB or more) while a checkpoint of a new job must grow ftune.db.
  ASSERT_TRUE(WaitUntil([&] { return WalFullyCheckpointed(dir); }));
  const auto checkpoint_error = [&]() -> std::optional<absl::Status> {
    for (const absl::Status& st : errors.errors())
      if (st.message().find("checkpoint") != std::string::npos) return st;
    return std::nullopt;
  };
  std::optional<absl::Status> failed;
  {
    FullDisk full(std::filesystem::file_size(db));
    ASSERT_TRUE(WaitUntil([&] {
      // Some of these may be refused too once the WAL cannot start over.
      if ((*s)->InsertJob(BigJob(num_stored + 1), num_stored + 1).ok()) ++num_stored;
      return (failed = checkpoint_error()).has_value();
    })) << "no checkpoint failed on a full disk; " << errors.errors().size() << " store errors";
  }
  EXPECT_EQ(failed->code(), absl::StatusCode::kResourceExhausted) << *failed;
  // Room again: the next tick's checkpoint succeeds.
  const int64_t before = (*s)->NumCheckpoints();
  EXPECT_TRUE(WaitUntil([&] { return (*s)->NumCheckpoints() > before; }));
  EXPECT_TRUE(WaitUntil([&] { return WalFullyCheckpointed(dir); }));
  s->reset();
  auto reopened = Store::Open(dir);  // quick_check passes
  ASSERT_TRUE(reopened.ok()) << reopened.status();
  EXPECT_EQ((*reopened)->CountJobsByState()[v1::QUEUED], num_stored);
  for (int i = 1; i <= num_stored; ++i) {
    auto job = (*reopened)->GetJob("job-" + std::to_string(i));
    ASSERT_TRUE(job.ok()) << job.status();
    EXPECT_EQ(job->spec().name(), BigJobName(i));
  }
}

TEST(Store, PutAgentUpdatesTheRecordButNotTheAck) {
  // Registration rewrites the agent's record; the ack moves only with the
  // events it covers (SetAgentAck), whatever the registry last read.
  auto s = Store::Open(":memory:");
  ASSERT_TRUE(s.ok());
  StoredAgent a;
  a.agent.set_agent_id("ag");
  a.agent.set_host("old-host");
  a.acked_seq = 3;
  ASSERT_TRUE((*s)->PutAgent(a).ok());
  ASSERT_TRUE((*s)->SetAgentAck("ag", 9).ok());
  a.agent.set_host("new-host");
  ASSERT_TRUE((*s)->PutAgent(a).ok());
  auto agents = (*s)->ListAgents();
  ASSERT_TRUE(agents.ok());
  ASSERT_EQ(agents->size(), 1u);
  EXPECT_EQ((*agents)[0].agent.host(), "new-host");
  EXPECT_EQ((*agents)[0].acked_seq, 9);
}

TEST(Store, FailedTransactionLeavesNothing) {
  auto s = Store::Open(":memory:");
  ASSERT_TRUE(s.ok());
  auto st = (*s)->Transaction([&]() -> absl::Status {
    EXPECT_TRUE((*s)->InsertJob(MakeJob("job-1", v1::QUEUED), 1).ok());
    return absl::InternalError("boom");
  });
  EXPECT_FALSE(st.ok());
  EXPECT_EQ((*s)->GetJob("job-1").status().code(), absl::StatusCode::kNotFound);
}

TEST(Store, DuplicateEventSeqIsRejected) {
  auto s = Store::Open(":memory:");
  v1::JobEvent e;
  e.set_job_id("j");
  e.set_seq(1);
  ASSERT_TRUE((*s)->AppendEvent(e).ok());
  EXPECT_FALSE((*s)->AppendEvent(e).ok());
}

TEST(Store, ListFiltersByStateAndLabelAndPages) {
  auto s = Store::Open(":memory:");
  for (int i = 1; i <= 5; ++i)
    ASSERT_TRUE((*s)
                    ->InsertJob(MakeJob("job-" + std::to_string(i),
                                        i % 2 ? v1::QUEUED : v1::RUNNING, i <= 3 ? "nlp" : "cv"),
                                i)
                    .ok());
  JobFilter f;
  f.states = {v1::QUEUED};
  auto rows = (*s)->ListJobs(f);
  ASSERT_EQ(rows->size(), 3u);
  f.labels = {{"team", "nlp"}};
  rows = (*s)->ListJobs(f);
  ASSERT_EQ(rows->size(), 2u);  // job-1, job-3
  JobFilter page;
  page.limit = 2;
  rows = (*s)->ListJobs(page);
  ASSERT_EQ(rows->size(), 2u);
  page.after_ordinal = rows->back().first;
  rows = (*s)->ListJobs(page);
  ASSERT_EQ(rows->size(), 2u);
  EXPECT_EQ((*rows)[0].second.id(), "job-3");
  auto counts = (*s)->CountJobsByState();
  EXPECT_EQ(counts[v1::QUEUED], 3);
  EXPECT_EQ(counts[v1::RUNNING], 2);
}

TEST(Store, RequestIdIsUnique) {
  auto s = Store::Open(":memory:");
  v1::Job a = MakeJob("job-1", v1::QUEUED);
  a.set_request_id("r1");
  ASSERT_TRUE((*s)->InsertJob(a, 1).ok());
  v1::Job b = MakeJob("job-2", v1::QUEUED);
  b.set_request_id("r1");
  EXPECT_FALSE((*s)->InsertJob(b, 2).ok());
  auto found = (*s)->FindJobByRequestId("r1");
  ASSERT_TRUE(found.ok() && found->has_value());
  EXPECT_EQ((*found)->id(), "job-1");
}

TEST(Store, PruneKeepsNewestCheckpoints) {
  auto s = Store::Open(":memory:");
  for (int step : {10, 20, 30, 40}) {
    v1::Checkpoint c;
    c.set_job_id("j");
    c.set_step(step);
    ASSERT_TRUE((*s)->InsertCheckpoint(c).ok());
  }
  ASSERT_TRUE((*s)->PruneCheckpoints("j", 2).ok());
  auto list = (*s)->ListCheckpoints("j");
  ASSERT_EQ(list->size(), 2u);
  EXPECT_EQ((*list)[0].step(), 30);
  EXPECT_EQ((*list)[1].step(), 40);
}

TEST(Store, ErrorsAreReportedToTheListenerAndReturned) {
  auto s = Store::Open(":memory:");
  ASSERT_TRUE(s.ok());
  std::vector<absl::Status> errors;
  (*s)->SetErrorListener([&](const absl::Status& st) { errors.push_back(st); });
  v1::JobEvent e;
  e.set_job_id("j");
  e.set_seq(1);
  ASSERT_TRUE((*s)->AppendEvent(e).ok());
  const absl::Status dup = (*s)->AppendEvent(e);
  EXPECT_EQ(dup.code(), absl::StatusCode::kInternal);
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_EQ(errors[0], dup);
  // "Not found" is an answer, not an error.
  EXPECT_EQ((*s)->GetJob("job-nope").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(errors.size(), 1u);
}

TEST(Store, AFullDiskIsResourceExhaustedAndLosesNothingStored) {
  testutil::TempDir tmp("ftune-store");
  const std::string dir = tmp.path() + "/state";
  ErrorLog errors;  // outlives the store, whose checkpoint thread may call it
  auto s = Store::Open(dir);
  ASSERT_TRUE(s.ok()) << s.status();
  errors.Listen(**s);
  int num_stored = 0;
  const auto insert = [&]() {
    const int i = num_stored + 1;
    absl::Status st = (*s)->Transaction([&]() -> absl::Status {
      if (auto st = (*s)->InsertJob(MakeJob("job-" + std::to_string(i), v1::QUEUED, "team"), i);
          !st.ok())
        return st;
      v1::JobEvent e;
      e.set_job_id("job-" + std::to_string(i));
      e.set_seq(1);
      e.mutable_log()->set_text(std::string(8192, 'x'));
      return (*s)->AppendEvent(e);
    });
    if (st.ok()) ++num_stored;
    return st;
  };
  for (int i = 0; i < 20; ++i) ASSERT_TRUE(insert().ok());

  absl::Status refused;
  {
    FullDisk full(std::filesystem::file_size(dir + "/ftune.db-wal"));
    for (int i = 0; i < 1000 && refused.ok(); ++i) refused = insert();
  }
  ASSERT_FALSE(refused.ok()) << "nothing was refused on a full disk";
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted) << refused;
  EXPECT_NE(refused.message().find("disk is full"), std::string::npos) << refused;
  ASSERT_FALSE(errors.errors().empty());
  EXPECT_EQ(errors.errors().back().code(), absl::StatusCode::kResourceExhausted);

  // Room again: what was stored is there, the refused job is not, and the
  // store takes writes.
  const auto count = [](Store& store) {
    EXPECT_TRUE(store.CheckJobIndex().ok()) << store.CheckJobIndex();
    return store.CountJobsByState()[v1::QUEUED];
  };
  EXPECT_EQ(count(**s), num_stored);
  const int before = num_stored;
  EXPECT_TRUE(insert().ok());
  s->reset();
  auto reopened = Store::Open(dir);  // quick_check passes
  ASSERT_TRUE(reopened.ok()) << reopened.status();
  EXPECT_EQ(count(**reopened), before + 1);
  for (int i = 1; i <= before + 1; ++i) {
    auto events = (*reopened)->ReadEvents("job-" + std::to_string(i), 0, 10, 10);
    ASSERT_TRUE(events.ok()) << events.status();
    EXPECT_EQ(events->size(), 1u) << "job-" << i;
  }
}

TEST(Store, CorruptDatabaseIsRefusedAtStart) {
  testutil::TempDir tmp("ftune-store");
  const std::string dir = tmp.path() + "/state";
  {
    auto s = Store::Open(dir);
    ASSERT_TRUE(s.ok());
    for (int i = 1; i <= 300; ++i)
      ASSERT_TRUE((*s)->InsertJob(MakeJob("job-" + std::to_string(i), v1::QUEUED, "team"), i).ok());
  }  // closing checkpoints the WAL into ftune.db
  const std::string db = dir + "/ftune.db";
  const auto size = std::filesystem::file_size(db);
  ASSERT_GT(size, 16u * 4096);
  {
    std::fstream f(db, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(8 * 4096);
    const std::string garbage(3 * 4096, '\xab');
    f.write(garbage.data(), static_cast<std::streamsize>(garbage.size()));
  }
  auto s = Store::Open(dir);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(s.status().message().find("restore it from a backup"), std::string::npos)
      << s.status().message();
}

TEST(Store, JobsStoredBeforeOwnersExistedStayReadable) {
  // A version 1 database (no owner column), as an older coordinator left it.
  testutil::TempDir tmp("ftune-store");
  const std::string dir = tmp.path() + "/state";
  {
    auto s = Store::Open(dir);
    ASSERT_TRUE(s.ok()) << s.status();
    ASSERT_TRUE((*s)->InsertJob(MakeJob("job-1", v1::RUNNING, "nlp"), 1).ok());
  }
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open((dir + "/ftune.db").c_str(), &db), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(db,
                         "DROP INDEX jobs_by_owner_state; DROP INDEX jobs_by_owner; "
                         "ALTER TABLE jobs DROP COLUMN owner; "
                         "UPDATE schema_version SET version=1",
                         nullptr, nullptr, nullptr),
            SQLITE_OK)
      << sqlite3_errmsg(db);
  sqlite3_close(db);

  auto s = Store::Open(dir);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ((*s)->schema_version(), Store::kSchemaVersion);
  auto job = (*s)->GetJob("job-1");
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->state(), v1::RUNNING);
  EXPECT_EQ(job->owner(), "");
  JobFilter all;
  EXPECT_EQ((*s)->ListJobs(all)->size(), 1u);
  JobFilter ownerless;
  ownerless.owner = "";
  EXPECT_EQ((*s)->ListJobs(ownerless)->size(), 1u);

  v1::Job owned = MakeJob("job-2", v1::QUEUED, "nlp");
  owned.set_owner("alice");
  ASSERT_TRUE((*s)->InsertJob(owned, 2).ok());
  JobFilter alice;
  alice.owner = "alice";
  alice.labels = {{"team", "nlp"}};
  auto listed = (*s)->ListJobs(alice);
  ASSERT_TRUE(listed.ok());
  ASSERT_EQ(listed->size(), 1u);
  EXPECT_EQ((*listed)[0].second.id(), "job-2");
}

// --- the job index (store.h): the live jobs in memory, always the rows.

std::vector<std::string> QueueOrder(Store& s) {
  std::vector<std::string> ids;
  s.ForEachQueuedJob([&](const IndexedJob& j) {
    ids.push_back(j.id);
    return true;
  });
  return ids;
}

v1::Job Queued(const std::string& id, int priority, const std::string& owner = "alice") {
  v1::Job j = MakeJob(id, v1::QUEUED);
  j.mutable_spec()->set_priority(priority);
  j.set_owner(owner);
  return j;
}

TEST(Store, JobIndexIsRebuiltAtOpenInSchedulingOrder) {
  testutil::TempDir tmp("ftune-store");
  const std::string dir = tmp.path() + "/state";
  {
    auto s = Store::Open(dir);
    ASSERT_TRUE(s.ok()) << s.status();
    ASSERT_TRUE((*s)->InsertJob(Queued("job-1", 0), 1).ok());
    ASSERT_TRUE((*s)->InsertJob(Queued("job-2", 5, "bob"), 2).ok());
    ASSERT_TRUE((*s)->InsertJob(MakeJob("job-3", v1::SUCCEEDED), 3).ok());
    ASSERT_TRUE((*s)->InsertJob(Queued("job-4", 0), 4).ok());
    ASSERT_TRUE((*s)->InsertJob(Queued("job-5", 5, "bob"), 5).ok());
    v1::Job running = MakeJob("job-6", v1::RUNNING);
    for (int r = 0; r < 2; ++r) {
      auto* pl = running.add_placement();
      pl->set_rank(r);
      pl->set_agent_id("a");
      pl->set_slot(r + 3);
      running.add_ranks()->set_rank(r);
    }
    running.mutable_ranks(1)->set_exited(true);  // slot 4 is free again
    ASSERT_TRUE((*s)->InsertJob(running, 6).ok());
    EXPECT_EQ(QueueOrder(**s),
              (std::vector<std::string>{"job-2", "job-5", "job-1", "job-4"}));
  }
  auto s = Store::Open(dir);  // as after kill -9: only the rows are left
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_TRUE((*s)->CheckJobIndex().ok()) << (*s)->CheckJobIndex();
  EXPECT_EQ(QueueOrder(**s), (std::vector<std::string>{"job-2", "job-5", "job-1", "job-4"}));
  EXPECT_EQ((*s)->NumQueuedJobs("alice"), 2);
  EXPECT_EQ((*s)->NumQueuedJobs("bob"), 2);
  EXPECT_EQ((*s)->NumQueuedJobs("carol"), 0);
  auto counts = (*s)->CountJobsByState();
  EXPECT_EQ(counts, (std::map<int, int>{{v1::QUEUED, 4}, {v1::RUNNING, 1}, {v1::SUCCEEDED, 1}}));
  EXPECT_EQ((*s)->UsedSlots(), (std::map<std::string, std::vector<int>>{{"a", {3}}}));
}

TEST(Store, JobIndexTakesCommitsOnlyNotRollbacks) {
  auto s = Store::Open(":memory:");
  ASSERT_TRUE(s.ok());
  ASSERT_TRUE((*s)->InsertJob(Queued("job-1", 0), 1).ok());
  ASSERT_TRUE((*s)->InsertJob(Queued("job-2", 0), 2).ok());
  // A transaction that places job-1, cancels job-2 and adds job-3, then
  // fails: the index still has what the rows have.
  auto st = (*s)->Transaction([&]() -> absl::Status {
    v1::Job placed = Queued("job-1", 0);
    placed.set_state(v1::SCHEDULED);
    auto* pl = placed.add_placement();
    pl->set_agent_id("a");
    placed.add_ranks();
    EXPECT_TRUE((*s)->UpdateJob(placed).ok());
    v1::Job cancelled = Queued("job-2", 0);
    cancelled.set_state(v1::CANCELLED);
    EXPECT_TRUE((*s)->UpdateJob(cancelled).ok());
    EXPECT_TRUE((*s)->InsertJob(Queued("job-3", 9), 3).ok());
    // Inside the transaction the index still says what is committed.
    EXPECT_EQ(QueueOrder(**s), (std::vector<std::string>{"job-1", "job-2"}));
    return absl::InternalError("boom");
  });
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(QueueOrder(**s), (std::vector<std::string>{"job-1", "job-2"}));
  EXPECT_TRUE((*s)->UsedSlots().empty());
  EXPECT_EQ((*s)->CountJobsByState(), (std::map<int, int>{{v1::QUEUED, 2}}));
  EXPECT_TRUE((*s)->CheckJobIndex().ok()) << (*s)->CheckJobIndex();
  // The same, committed.
  st = (*s)->Transaction([&]() -> absl::Status {
    v1::Job cancelled = Queued("job-2", 0);
    cancelled.set_state(v1::CANCELLED);
    if (auto st = (*s)->UpdateJob(cancelled); !st.ok()) return st;
    return (*s)->InsertJob(Queued("job-3", 9), 3);
  });
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_EQ(QueueOrder(**s), (std::vector<std::string>{"job-3", "job-1"}));
  EXPECT_EQ((*s)->CountJobsByState(), (std::map<int, int>{{v1::QUEUED, 2}, {v1::CANCELLED, 1}}));
  EXPECT_TRUE((*s)->CheckJobIndex().ok()) << (*s)->CheckJobIndex();
}

TEST(Store, APriorityChangeMovesAQueuedJob) {
  testutil::TempDir tmp("ftune-store");
  const std::string dir = tmp.path() + "/state";
  {
    auto s = Store::Open(dir);
    ASSERT_TRUE(s.ok()) << s.status();
    for (int i = 1; i <= 3; ++i)
      ASSERT_TRUE((*s)->InsertJob(Queued("job-" + std::to_string(i), 0), i).ok());
    ASSERT_TRUE((*s)->UpdateJob(Queued("job-3", 7)).ok());
    ASSERT_TRUE((*s)->UpdateJob(Queued("job-1", -1)).ok());
    EXPECT_EQ(QueueOrder(**s), (std::vector<std::string>{"job-3", "job-2", "job-1"}));
    EXPECT_TRUE((*s)->CheckJobIndex().ok()) << (*s)->CheckJobIndex();
  }
  auto s = Store::Open(dir);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(QueueOrder(**s), (std::vector<std::string>{"job-3", "job-2", "job-1"}));
  // The priority column, which the rows are listed by elsewhere, moved too.
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open((dir + "/ftune.db").c_str(), &db), SQLITE_OK);
  sqlite3_stmt* q = nullptr;
  ASSERT_EQ(sqlite3_prepare_v2(db, "SELECT priority FROM jobs WHERE id='job-3'", -1, &q, nullptr),
            SQLITE_OK);
  ASSERT_EQ(sqlite3_step(q), SQLITE_ROW);
  EXPECT_EQ(sqlite3_column_int(q, 0), 7);
  sqlite3_finalize(q);
  sqlite3_close(db);
}

// Random inserts and updates (state along the state machine's transitions,
// priority, owner, reason, placement), some in transactions that fail:
// after each step the index is what a fresh load of the rows gives, and so
// it is after a reopen.
TEST(Store, JobIndexNeverDriftsFromTheRows) {
  testutil::TempDir tmp("ftune-store");
  const std::string dir = tmp.path() + "/state";
  std::mt19937 rng(7);
  const v1::JobState states[] = {v1::QUEUED,     v1::SCHEDULED, v1::RUNNING, v1::RESTARTING,
                                 v1::CANCELLING, v1::SUCCEEDED, v1::FAILED,  v1::CANCELLED};
  std::vector<v1::Job> jobs;  // as last written (and maybe rolled back)
  {
    auto s = Store::Open(dir);
    ASSERT_TRUE(s.ok()) << s.status();
    auto random_change = [&](v1::Job job) {
      // Mostly a change within the state (a reason, a rank exiting).
      const v1::JobState to = states[rng() % 8];
      if (CheckTransition(job.state(), to).ok()) job.set_state(to);
      job.mutable_spec()->set_priority(static_cast<int>(rng() % 3));
      job.set_owner(rng() % 2 ? "alice" : "bob");
      job.set_reason_code(rng() % 2 ? "jobs_ahead" : "slots_missing");
      job.set_state_reason("reason " + std::to_string(rng() % 3));
      job.clear_placement();
      job.clear_ranks();
      for (int r = 0; r < static_cast<int>(rng() % 3); ++r) {
        auto* pl = job.add_placement();
        pl->set_rank(r);
        pl->set_agent_id("agent-" + std::to_string(rng() % 3));
        pl->set_slot(static_cast<int>(rng() % 4));
        job.add_ranks()->set_rank(r);
        job.mutable_ranks(r)->set_exited(rng() % 4 == 0);
      }
      return job;
    };
    for (int step = 0; step < 400; ++step) {
      const bool fail = rng() % 4 == 0;
      auto st = (*s)->Transaction([&]() -> absl::Status {
        for (int n = 1 + static_cast<int>(rng() % 3); n > 0; --n) {
          if (jobs.empty() || rng() % 3 == 0) {
            v1::Job job = random_change(
                MakeJob("job-" + std::to_string(jobs.size() + 1), states[rng() % 8]));
            if (auto st = (*s)->InsertJob(job, static_cast<int64_t>(jobs.size() + 1)); !st.ok())
              return st;
            jobs.push_back(job);
          } else {
            v1::Job& job = jobs[rng() % jobs.size()];
            job = random_change(job);
            if (auto st = (*s)->UpdateJob(job); !st.ok()) return st;
          }
        }
        return fail ? absl::InternalError("rolled back") : absl::OkStatus();
      });
      ASSERT_EQ(st.ok(), !fail) << st;
      if (fail) {  // what the rows have again
        jobs.clear();
        JobFilter all;
        all.limit = 1 << 20;
        auto rows = (*s)->ListJobs(all);
        ASSERT_TRUE(rows.ok()) << rows.status();
        for (auto& [ord, job] : *rows) jobs.push_back(job);
      }
      ASSERT_TRUE((*s)->CheckJobIndex().ok()) << "step " << step << ": " << (*s)->CheckJobIndex();
    }
  }
  auto s = Store::Open(dir);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_TRUE((*s)->CheckJobIndex().ok()) << (*s)->CheckJobIndex();
}

TEST(Store, RefusesNewerSchema) {
  testutil::TempDir tmp("ftune-store");
  const std::string dir = tmp.path() + "/state";  // Store::Open creates it
  { ASSERT_TRUE(Store::Open(dir).ok()); }
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open((dir + "/ftune.db").c_str(), &db), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(db, "UPDATE schema_version SET version=99", nullptr, nullptr, nullptr),
            SQLITE_OK);
  sqlite3_close(db);
  auto s = Store::Open(dir);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.status().message().find("upgrade ftune-coordinator"), std::string::npos);
}

}  // namespace
}  // namespace ftune::server
