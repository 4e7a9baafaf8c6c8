#include <gtest/gtest.h>
#include <signal.h>
#include <sqlite3.h>
#include <sys/resource.h>

#include <filesystem>
#include <fstream>

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
  EXPECT_EQ((*counts)[v1::QUEUED], 3);
  EXPECT_EQ((*counts)[v1::RUNNING], 2);
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

using testutil::FullDisk;

TEST(Store, AFullDiskIsResourceExhaustedAndLosesNothingStored) {
  testutil::TempDir tmp("ftune-store");
  const std::string dir = tmp.path() + "/state";
  auto s = Store::Open(dir);
  ASSERT_TRUE(s.ok()) << s.status();
  std::vector<absl::Status> errors;
  (*s)->SetErrorListener([&](const absl::Status& st) { errors.push_back(st); });
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
  ASSERT_FALSE(errors.empty());
  EXPECT_EQ(errors.back().code(), absl::StatusCode::kResourceExhausted);

  // Room again: what was stored is there, the refused job is not, and the
  // store takes writes.
  const auto count = [](Store& store) {
    auto counts = store.CountJobsByState();
    EXPECT_TRUE(counts.ok()) << counts.status();
    return counts.ok() ? (*counts)[v1::QUEUED] : -1;
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
