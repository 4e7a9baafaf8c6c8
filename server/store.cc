#include "store.h"

#include <sqlite3.h>

#include <cerrno>
#include <cstdio>
#include <filesystem>

#include "job_state.h"

namespace ftune::server {
namespace {

// Each entry migrates the schema from version i to i + 1.
const char* const kMigrations[] = {
    R"sql(
    CREATE TABLE jobs(
      id TEXT PRIMARY KEY,
      ordinal INTEGER NOT NULL UNIQUE,
      request_id TEXT UNIQUE,
      state INTEGER NOT NULL,
      priority INTEGER NOT NULL,
      job BLOB NOT NULL);
    CREATE INDEX jobs_by_state ON jobs(state, ordinal);
    CREATE TABLE job_labels(
      job_id TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
      PRIMARY KEY(job_id, key));
    CREATE INDEX job_labels_by_kv ON job_labels(key, value);
    CREATE TABLE events(
      job_id TEXT NOT NULL, seq INTEGER NOT NULL, event BLOB NOT NULL,
      PRIMARY KEY(job_id, seq)) WITHOUT ROWID;
    CREATE TABLE checkpoints(
      job_id TEXT NOT NULL, step INTEGER NOT NULL, checkpoint BLOB NOT NULL,
      PRIMARY KEY(job_id, step));
    CREATE TABLE agents(
      agent_id TEXT PRIMARY KEY, agent BLOB NOT NULL, acked_seq INTEGER NOT NULL);
    )sql",
    // 2: job owners. Rows stored before have none (''): only admins see them.
    R"sql(
    ALTER TABLE jobs ADD COLUMN owner TEXT NOT NULL DEFAULT '';
    CREATE INDEX jobs_by_owner ON jobs(owner, ordinal);
    )sql",
    // 3: the per-user queued cap counts one owner's jobs in one state on
    // every CreateJob; this index keeps that count off the job rows.
    R"sql(
    CREATE INDEX jobs_by_owner_state ON jobs(owner, state);
    )sql",
};

std::string Blob(sqlite3_stmt* st, int col) {
  const void* p = sqlite3_column_blob(st, col);
  const int n = sqlite3_column_bytes(st, col);
  return p ? std::string(static_cast<const char*>(p), n) : std::string();
}

// The integer a pragma answers (`PRAGMA synchronous`); -1 if it cannot be
// read.
int64_t PragmaInt(sqlite3* db, const char* sql) {
  sqlite3_stmt* q = nullptr;
  int64_t value = -1;
  if (sqlite3_prepare_v2(db, sql, -1, &q, nullptr) == SQLITE_OK && sqlite3_step(q) == SQLITE_ROW)
    value = sqlite3_column_int64(q, 0);
  sqlite3_finalize(q);
  return value;
}

// Sets `PRAGMA synchronous` on db and reads it back.
int64_t SetSynchronous(sqlite3* db, int level) {
  const std::string sql = "PRAGMA synchronous=" + std::to_string(level);
  if (sqlite3_exec(db, sql.c_str(), nullptr, nullptr, nullptr) != SQLITE_OK) return -1;
  return PragmaInt(db, "PRAGMA synchronous");
}

// Resets a cached statement however the scope is left.
struct Reset {
  sqlite3_stmt* st;
  ~Reset() {
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
  }
};

}  // namespace

absl::StatusOr<std::unique_ptr<Store>> Store::Open(const std::string& dir, StoreSync sync) {
  std::unique_ptr<Store> s(new Store());
  std::string path = dir;
  if (dir != ":memory:") {
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    if (ec)
      return absl::FailedPreconditionError("cannot create state dir '" + dir +
                                           "': " + ec.message());
    path = (std::filesystem::path(dir) / "ftune.db").string();
  }
  if (sqlite3_open_v2(path.c_str(), &s->db_,
                      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX,
                      nullptr) != SQLITE_OK) {
    return absl::FailedPreconditionError("cannot open state database '" + path +
                                         "': " + sqlite3_errmsg(s->db_));
  }
  sqlite3_busy_timeout(s->db_, 5000);
  if (auto st = s->CheckIntegrity(path); !st.ok()) return st;
  // WAL: readers never block the writer, and with synchronous=FULL a
  // committed transaction survives power loss (NORMAL: a process crash; see
  // StoreSync). journal_mode answers with the mode in effect, which is not
  // WAL where the filesystem cannot share memory.
  if (dir != ":memory:") {
    sqlite3_stmt* q = nullptr;
    std::string mode;
    if (sqlite3_prepare_v2(s->db_, "PRAGMA journal_mode=WAL", -1, &q, nullptr) == SQLITE_OK &&
        sqlite3_step(q) == SQLITE_ROW) {
      const unsigned char* m = sqlite3_column_text(q, 0);
      mode = m ? reinterpret_cast<const char*>(m) : "";
    }
    sqlite3_finalize(q);
    if (mode != "wal")
      return absl::FailedPreconditionError(
          "state database '" + path + "' cannot use write-ahead logging (journal_mode is '" +
          mode + "', " + sqlite3_errmsg(s->db_) +
          "): put --state-dir on a local filesystem");
    // No commit checkpoints: the checkpoint thread does (the head of store.h).
    if (auto st = s->Exec("PRAGMA wal_autocheckpoint=0"); !st.ok()) return st;
    if (const int pages = s->WalAutocheckpoint(); pages != 0)
      return absl::FailedPreconditionError(
          "state database '" + path + "': PRAGMA wal_autocheckpoint reads back " +
          std::to_string(pages) + " after setting it to 0: commits would run checkpoints");
  }
  if (auto st = s->SetSync(sync); !st.ok()) return st;
  if (auto st = s->Exec("PRAGMA foreign_keys=ON"); !st.ok()) return st;
  if (auto st = s->Migrate(); !st.ok()) return st;
  if (auto st = s->LoadJobIndex(&s->index_); !st.ok()) return st;
  if (dir != ":memory:")
    if (auto st = s->StartCheckpointer(path, sync); !st.ok()) return st;
  return s;
}

const char* StoreSyncName(StoreSync sync) {
  return sync == StoreSync::kNormal ? "normal" : "full";
}

int Store::SynchronousMode() {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  return static_cast<int>(PragmaInt(db_, "PRAGMA synchronous"));
}

int Store::WalAutocheckpoint() {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  return static_cast<int>(PragmaInt(db_, "PRAGMA wal_autocheckpoint"));
}

// The level in effect is read back rather than trusted (SQLite answers a
// pragma it does not take with silence, not an error): a store must not
// claim a durability it does not have.
absl::Status Store::SetSync(StoreSync sync) {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  if (transaction_depth_ > 0)
    return absl::FailedPreconditionError("the store's synchronous mode cannot change inside a "
                                         "transaction");
  const int want = static_cast<int>(sync);
  if (auto st = Exec("PRAGMA synchronous=" + std::to_string(want)); !st.ok()) return st;
  if (const int got = SynchronousMode(); got != want)
    return absl::FailedPreconditionError(
        "state database: PRAGMA synchronous reads back " + std::to_string(got) +
        " after setting it to " + std::to_string(want) + " (--store-sync=" +
        StoreSyncName(sync) + "): the store would not have the durability asked for");
  // The checkpoint connection follows, so that its checkpoints sync as the
  // store's own would.
  if (checkpoint_db_ != nullptr)
    if (const int64_t got = SetSynchronous(checkpoint_db_, want); got != want)
      return absl::FailedPreconditionError(
          "state database: PRAGMA synchronous of the checkpoint connection reads back " +
          std::to_string(got) + " after setting it to " + std::to_string(want) +
          " (--store-sync=" + StoreSyncName(sync) + ")");
  return absl::OkStatus();
}

// quick_check reads every page (not the indexes' contents): a few ms for a
// small database, seconds for gigabytes; paid once per start.
absl::Status Store::CheckIntegrity(const std::string& path) {
  sqlite3_stmt* q = nullptr;
  if (sqlite3_prepare_v2(db_, "PRAGMA quick_check", -1, &q, nullptr) != SQLITE_OK) {
    return absl::FailedPreconditionError("state database '" + path +
                                         "' cannot be read: " + sqlite3_errmsg(db_) +
                                         "; restore it from a backup, or move it away to start "
                                         "with an empty state");
  }
  std::string problems;
  int rc;
  int lines = 0;
  while ((rc = sqlite3_step(q)) == SQLITE_ROW) {
    const unsigned char* t = sqlite3_column_text(q, 0);
    const std::string line = t ? reinterpret_cast<const char*>(t) : "";
    if (line == "ok") continue;
    if (lines++ < 3) problems += (problems.empty() ? "" : "; ") + line;
  }
  if (rc != SQLITE_DONE && problems.empty()) problems = sqlite3_errmsg(db_);
  sqlite3_finalize(q);
  if (problems.empty()) return absl::OkStatus();
  return absl::FailedPreconditionError(
      "state database '" + path + "' failed its integrity check (PRAGMA quick_check: " + problems +
      (lines > 3 ? "; ..." : "") +
      "); restore it from a backup, or move it away to start with an empty state");
}

void Store::SetErrorListener(std::function<void(const absl::Status&)> listener) {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  on_error_ = std::move(listener);
}

absl::Status Store::Failed(absl::Status st) {
  std::fprintf(stderr, "ftune-coordinator: store error: %s\n", st.ToString().c_str());
  if (on_error_) on_error_(st);
  return st;
}

Store::~Store() {
  if (checkpointer_.joinable()) {
    {
      std::lock_guard<std::mutex> lock(checkpointer_mu_);
      stopping_ = true;
    }
    checkpointer_wake_.notify_one();
    checkpointer_.join();
  }
  // Closed first, so that the store's connection is the last one: its
  // close checkpoints the WAL and removes it.
  if (checkpoint_db_ && sqlite3_close(checkpoint_db_) != SQLITE_OK)
    std::fprintf(stderr, "ftune-coordinator: store error: closing the checkpoint connection: %s\n",
                 sqlite3_errmsg(checkpoint_db_));
  for (auto& [sql, st] : stmts_) sqlite3_finalize(st);
  if (db_) sqlite3_close(db_);
}

namespace {

// The OS error behind SQLite's last I/O error. sqlite3_system_errno is not
// set on every path (a failed COMMIT's write leaves it 0), so errno as the
// failing call left it stands in; callers clear errno before calling SQLite.
int SystemErrno(sqlite3* db) {
  const int e = sqlite3_system_errno(db);
  return e != 0 ? e : errno;
}

// sys_errno: the OS error behind an I/O error (SystemErrno).
absl::Status StatusFor(int rc, int sys_errno, const std::string& msg) {
  // SQLite says SQLITE_FULL only for ENOSPC; a write refused for the file
  // size limit (EFBIG) or a quota (EDQUOT) is an I/O error, but just as full.
  const bool full = (rc & 0xff) == SQLITE_FULL ||
                    ((rc & 0xff) == SQLITE_IOERR &&
                     (sys_errno == ENOSPC || sys_errno == EFBIG || sys_errno == EDQUOT));
  if (full) return absl::ResourceExhaustedError(msg + " (the state database's disk is full)");
  switch (rc & 0xff) {  // the primary code of an extended one
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
      return absl::UnavailableError(msg);
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB:
      return absl::DataLossError(msg);
    default:
      return absl::InternalError(msg);
  }
}

struct CheckpointResult {
  int rc = SQLITE_OK;
  int sys_errno = 0;    // with rc, SystemErrno
  std::string message;  // with rc, sqlite3_errmsg
  int num_log = 0;      // frames in the WAL
  int num_done = 0;     // of those, copied into the database file
};

// One checkpoint of every database of db. The error is read under the
// connection's mutex, before another call on it (SetSync) can replace it.
CheckpointResult RunCheckpoint(sqlite3* db, int mode) {
  CheckpointResult r;
  sqlite3_mutex* mu = sqlite3_db_mutex(db);
  sqlite3_mutex_enter(mu);
  errno = 0;
  r.rc = sqlite3_wal_checkpoint_v2(db, nullptr, mode, &r.num_log, &r.num_done);
  if (r.rc != SQLITE_OK) {
    r.sys_errno = SystemErrno(db);
    r.message = sqlite3_errmsg(db);
  }
  sqlite3_mutex_leave(mu);
  return r;
}

}  // namespace

// The checkpoints get a connection of their own: on the store's they would
// wait for its mutex behind requests, and requests behind them.
absl::Status Store::StartCheckpointer(const std::string& path, StoreSync sync) {
  if (sqlite3_open_v2(path.c_str(), &checkpoint_db_,
                      SQLITE_OPEN_READWRITE | SQLITE_OPEN_FULLMUTEX, nullptr) != SQLITE_OK)
    return absl::FailedPreconditionError("cannot open a checkpoint connection to the state "
                                         "database '" + path + "': " +
                                         sqlite3_errmsg(checkpoint_db_));
  // A passive checkpoint never waits; a truncating one waits this long for
  // the store's write in progress.
  sqlite3_busy_timeout(checkpoint_db_, 5000);
  const int want = static_cast<int>(sync);
  if (const int64_t got = SetSynchronous(checkpoint_db_, want); got != want)
    return absl::FailedPreconditionError(
        "state database '" + path + "': PRAGMA synchronous of the checkpoint connection reads "
        "back " + std::to_string(got) + " after setting it to " + std::to_string(want));
  const int64_t page_size = PragmaInt(checkpoint_db_, "PRAGMA page_size");
  if (page_size <= 0)
    return absl::FailedPreconditionError("state database '" + path +
                                         "': cannot read its page size: " +
                                         sqlite3_errmsg(checkpoint_db_));
  max_wal_frames_ = kMaxWalBytes / page_size;
  checkpointer_ = std::thread([this] { CheckpointLoop(); });
  return absl::OkStatus();
}

// Each tick checkpoints what was committed since the last complete
// checkpoint. `PRAGMA data_version` on this connection moves with every
// commit of another one (the store's), so an idle store costs a pragma a
// tick, not a checkpoint. A checkpoint that failed, or left frames a reader
// still needed, is tried again at the next tick.
void Store::CheckpointLoop() {
  int64_t checkpointed_version = -1;  // data_version the last complete one saw
  std::unique_lock<std::mutex> lock(checkpointer_mu_);
  while (!checkpointer_wake_.wait_for(lock, kCheckpointInterval, [this] { return stopping_; })) {
    lock.unlock();
    const int64_t version = PragmaInt(checkpoint_db_, "PRAGMA data_version");
    if (version < 0 || version != checkpointed_version) {
      const CheckpointResult r = RunCheckpoint(checkpoint_db_, SQLITE_CHECKPOINT_PASSIVE);
      if (r.rc == SQLITE_OK) {
        ++num_checkpoints_;
        if (r.num_done == r.num_log) checkpointed_version = version;
      } else if ((r.rc & 0xff) != SQLITE_BUSY) {
        // BUSY: another connection (an operator's sqlite3 shell) is
        // checkpointing; the next tick tries again.
        CheckpointFailed(r.rc, r.sys_errno, "checkpoint the WAL: " + r.message);
      }
      // The WAL starts over at the first commit after a complete checkpoint;
      // writes that never pause, or an outside reader, can keep it from it.
      if (r.rc == SQLITE_OK && r.num_log >= max_wal_frames_) {
        std::fprintf(stderr,
                     "ftune-coordinator: store: the WAL holds %d pages (%lld MiB or more) that "
                     "passive checkpoints could not reset; truncating it, writes wait meanwhile\n",
                     r.num_log, static_cast<long long>(kMaxWalBytes >> 20));
        const CheckpointResult t = RunCheckpoint(checkpoint_db_, SQLITE_CHECKPOINT_TRUNCATE);
        if (t.rc == SQLITE_OK)
          ++num_checkpoints_;
        else
          CheckpointFailed(t.rc, t.sys_errno,
                           "truncate the WAL of " + std::to_string(r.num_log) +
                               " pages: " + t.message);
      }
    }
    lock.lock();
  }
}

void Store::CheckpointFailed(int rc, int sys_errno, const std::string& what) {
  std::lock_guard<std::recursive_mutex> lock(mu_);  // the listener's contract
  Failed(StatusFor(rc, sys_errno, what)).IgnoreError();
}

absl::Status Store::Error(const std::string& what) {
  return Failed(StatusFor(sqlite3_extended_errcode(db_), SystemErrno(db_),
                          what + ": " + sqlite3_errmsg(db_)));
}

absl::Status Store::Exec(const std::string& sql) {
  char* err = nullptr;
  errno = 0;
  const int rc = sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &err);
  const int sys_errno = SystemErrno(db_);
  if (rc != SQLITE_OK) {
    std::string msg = err ? err : "unknown error";
    sqlite3_free(err);
    return Failed(StatusFor(rc, sys_errno, "sqlite: " + msg + " in: " + sql.substr(0, 80)));
  }
  return absl::OkStatus();
}

absl::Status Store::Migrate() {
  if (auto st = Exec("CREATE TABLE IF NOT EXISTS schema_version(version INTEGER NOT NULL)");
      !st.ok())
    return st;
  sqlite3_stmt* q = nullptr;
  sqlite3_prepare_v2(db_, "SELECT version FROM schema_version", -1, &q, nullptr);
  int version = 0;
  bool have_row = false;
  if (sqlite3_step(q) == SQLITE_ROW) {
    version = sqlite3_column_int(q, 0);
    have_row = true;
  }
  sqlite3_finalize(q);
  if (version > kSchemaVersion)
    return absl::FailedPreconditionError(
        "state database has schema version " + std::to_string(version) +
        ", newer than this coordinator understands (" + std::to_string(kSchemaVersion) +
        "): upgrade ftune-coordinator");
  for (int v = version; v < kSchemaVersion; ++v) {
    auto st = Transaction([&]() -> absl::Status {
      if (auto s2 = Exec(kMigrations[v]); !s2.ok()) return s2;
      const std::string bump =
          (v == 0 && !have_row) ? "INSERT INTO schema_version VALUES(" + std::to_string(v + 1) + ")"
                                : "UPDATE schema_version SET version=" + std::to_string(v + 1);
      return Exec(bump);
    });
    if (!st.ok()) return st;
  }
  schema_version_ = kSchemaVersion;
  return absl::OkStatus();
}

sqlite3_stmt* Store::Prepare(const char* sql) {
  for (auto& [s, st] : stmts_)
    if (s == sql) return st;
  sqlite3_stmt* st = nullptr;
  if (sqlite3_prepare_v2(db_, sql, -1, &st, nullptr) != SQLITE_OK) return nullptr;
  stmts_.push_back({sql, st});
  return st;
}

absl::Status Store::Transaction(const std::function<absl::Status()>& fn) {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  if (transaction_depth_ > 0) {  // nested: join the outer one
    ++transaction_depth_;
    absl::Status st = fn();
    --transaction_depth_;
    return st;
  }
  if (auto st = Exec("BEGIN IMMEDIATE"); !st.ok()) return st;
  staged_.clear();
  ++transaction_depth_;
  absl::Status st = fn();
  --transaction_depth_;
  if (st.ok()) st = Exec("COMMIT");
  // A failed COMMIT (a full disk) may leave the transaction open: end it,
  // so the next one can begin. Its own failure is logged by Exec.
  if (!st.ok() && !sqlite3_get_autocommit(db_)) Exec("ROLLBACK").IgnoreError();
  // Rolled back (SQLite rolls back a COMMIT that fails on I/O or a full
  // disk itself), the rows are what the index already holds.
  if (st.ok())
    for (auto& [job, inserted] : staged_) index_.Put(std::move(job), inserted);
  staged_.clear();
  return st;
}

void Store::IndexJob(IndexedJob job, bool inserted) {
  if (transaction_depth_ > 0) {
    staged_.emplace_back(std::move(job), inserted);
  } else {
    index_.Put(std::move(job), inserted);
  }
}

absl::Status Store::LoadJobIndex(JobIndex* index) {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  index->Clear();
  const std::string ended = std::to_string(v1::SUCCEEDED) + "," + std::to_string(v1::FAILED) +
                            "," + std::to_string(v1::CANCELLED);
  sqlite3_stmt* st = nullptr;
  const std::string live_sql = "SELECT ordinal, job FROM jobs WHERE state NOT IN (" + ended + ")";
  if (sqlite3_prepare_v2(db_, live_sql.c_str(), -1, &st, nullptr) != SQLITE_OK)
    return Error("prepare loading the live jobs");
  int rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    v1::Job job;
    if (!job.ParseFromString(Blob(st, 1))) {
      sqlite3_finalize(st);
      return Failed(absl::DataLossError("a stored job is corrupt (loading the live jobs)"));
    }
    index->Put(IndexedJob::Of(job, sqlite3_column_int64(st, 0)), /*inserted=*/true);
  }
  sqlite3_finalize(st);
  if (rc != SQLITE_DONE) return Error("load the live jobs");
  const std::string ended_sql =
      "SELECT state, COUNT(*) FROM jobs WHERE state IN (" + ended + ") GROUP BY state";
  if (sqlite3_prepare_v2(db_, ended_sql.c_str(), -1, &st, nullptr) != SQLITE_OK)
    return Error("prepare counting the ended jobs");
  while ((rc = sqlite3_step(st)) == SQLITE_ROW)
    index->AddEnded(static_cast<v1::JobState>(sqlite3_column_int(st, 0)),
                    sqlite3_column_int64(st, 1));
  sqlite3_finalize(st);
  if (rc != SQLITE_DONE) return Error("count the ended jobs");
  return absl::OkStatus();
}

#define FTUNE_PREPARE(var, sql)                                  \
  std::lock_guard<std::recursive_mutex> lock(mu_);               \
  static const char kSql[] = sql;                                \
  sqlite3_stmt* var = Prepare(kSql);                             \
  errno = 0; /* SystemErrno reads what the step leaves */        \
  if (var == nullptr) return Error("prepare");                   \
  Reset reset_##var{var}

absl::Status Store::InsertJob(const v1::Job& job, int64_t ordinal) {
  return Transaction([&]() -> absl::Status {
    {
      FTUNE_PREPARE(st,
                    "INSERT INTO jobs(id, ordinal, request_id, state, priority, job, owner) "
                    "VALUES(?,?,?,?,?,?,?)");
      const std::string blob = job.SerializeAsString();
      sqlite3_bind_text(st, 1, job.id().c_str(), -1, SQLITE_TRANSIENT);
      sqlite3_bind_int64(st, 2, ordinal);
      if (job.request_id().empty()) sqlite3_bind_null(st, 3);
      else sqlite3_bind_text(st, 3, job.request_id().c_str(), -1, SQLITE_TRANSIENT);
      sqlite3_bind_int(st, 4, job.state());
      sqlite3_bind_int(st, 5, job.spec().priority());
      sqlite3_bind_blob(st, 6, blob.data(), static_cast<int>(blob.size()), SQLITE_TRANSIENT);
      sqlite3_bind_text(st, 7, job.owner().c_str(), -1, SQLITE_TRANSIENT);
      if (sqlite3_step(st) != SQLITE_DONE) return Error("insert job " + job.id());
    }
    for (const auto& [k, v] : job.spec().labels()) {
      FTUNE_PREPARE(st, "INSERT INTO job_labels(job_id, key, value) VALUES(?,?,?)");
      sqlite3_bind_text(st, 1, job.id().c_str(), -1, SQLITE_TRANSIENT);
      sqlite3_bind_text(st, 2, k.c_str(), -1, SQLITE_TRANSIENT);
      sqlite3_bind_text(st, 3, v.c_str(), -1, SQLITE_TRANSIENT);
      if (sqlite3_step(st) != SQLITE_DONE) return Error("insert label of " + job.id());
    }
    IndexJob(IndexedJob::Of(job, ordinal), /*inserted=*/true);
    return absl::OkStatus();
  });
}

absl::Status Store::UpdateJob(const v1::Job& job) {
  int64_t ordinal = 0;
  {
    FTUNE_PREPARE(st, "UPDATE jobs SET state=?, priority=?, job=? WHERE id=? RETURNING ordinal");
    const std::string blob = job.SerializeAsString();
    sqlite3_bind_int(st, 1, job.state());
    sqlite3_bind_int(st, 2, job.spec().priority());
    sqlite3_bind_blob(st, 3, blob.data(), static_cast<int>(blob.size()), SQLITE_TRANSIENT);
    sqlite3_bind_text(st, 4, job.id().c_str(), -1, SQLITE_TRANSIENT);
    int rc = sqlite3_step(st);
    if (rc == SQLITE_DONE) return absl::NotFoundError("job " + job.id() + " not found");
    if (rc != SQLITE_ROW) return Error("update job " + job.id());
    ordinal = sqlite3_column_int64(st, 0);
    // The change is made at the first step; the next one ends the statement.
    if ((rc = sqlite3_step(st)) != SQLITE_DONE) return Error("update job " + job.id());
  }
  IndexJob(IndexedJob::Of(job, ordinal), /*inserted=*/false);
  return absl::OkStatus();
}

absl::StatusOr<v1::Job> Store::GetJob(const std::string& id) {
  FTUNE_PREPARE(st, "SELECT job FROM jobs WHERE id=?");
  sqlite3_bind_text(st, 1, id.c_str(), -1, SQLITE_TRANSIENT);
  const int rc = sqlite3_step(st);
  if (rc == SQLITE_DONE) return absl::NotFoundError("job '" + id + "' not found");
  if (rc != SQLITE_ROW) return Error("read job " + id);
  v1::Job job;
  if (!job.ParseFromString(Blob(st, 0)))
    return Failed(absl::DataLossError("stored job " + id + " is corrupt"));
  return job;
}

absl::StatusOr<std::optional<v1::Job>> Store::FindJobByRequestId(const std::string& request_id) {
  FTUNE_PREPARE(st, "SELECT job FROM jobs WHERE request_id=?");
  sqlite3_bind_text(st, 1, request_id.c_str(), -1, SQLITE_TRANSIENT);
  const int rc = sqlite3_step(st);
  if (rc == SQLITE_DONE) return std::optional<v1::Job>();
  if (rc != SQLITE_ROW) return Error("find request id");
  v1::Job job;
  if (!job.ParseFromString(Blob(st, 0)))
    return Failed(absl::DataLossError("stored job of request id " + request_id + " is corrupt"));
  return std::optional<v1::Job>(job);
}

absl::StatusOr<std::vector<std::pair<int64_t, v1::Job>>> Store::ListJobs(const JobFilter& f) {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  std::string sql = "SELECT ordinal, job FROM jobs WHERE ordinal > ?";
  if (!f.states.empty()) {
    sql += " AND state IN (";
    for (size_t i = 0; i < f.states.size(); ++i) sql += i ? ",?" : "?";
    sql += ")";
  }
  if (f.owner) sql += " AND owner=?";
  for (size_t i = 0; i < f.labels.size(); ++i)
    sql += " AND id IN (SELECT job_id FROM job_labels WHERE key=? AND value=?)";
  sql += " ORDER BY ordinal LIMIT ?";
  sqlite3_stmt* st = nullptr;
  if (sqlite3_prepare_v2(db_, sql.c_str(), -1, &st, nullptr) != SQLITE_OK)
    return Error("prepare list jobs");
  int i = 1;
  sqlite3_bind_int64(st, i++, f.after_ordinal);
  for (auto s : f.states) sqlite3_bind_int(st, i++, s);
  if (f.owner) sqlite3_bind_text(st, i++, f.owner->c_str(), -1, SQLITE_TRANSIENT);
  for (const auto& [k, v] : f.labels) {
    sqlite3_bind_text(st, i++, k.c_str(), -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(st, i++, v.c_str(), -1, SQLITE_TRANSIENT);
  }
  sqlite3_bind_int(st, i++, f.limit);
  std::vector<std::pair<int64_t, v1::Job>> out;
  int rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    v1::Job job;
    if (!job.ParseFromString(Blob(st, 1))) {
      sqlite3_finalize(st);
      return Failed(absl::DataLossError("a stored job is corrupt (listing jobs)"));
    }
    out.emplace_back(sqlite3_column_int64(st, 0), std::move(job));
  }
  if (rc != SQLITE_DONE) {
    absl::Status err = Error("list jobs");
    sqlite3_finalize(st);
    return err;
  }
  sqlite3_finalize(st);
  return out;
}

absl::StatusOr<int64_t> Store::NextOrdinal() {
  FTUNE_PREPARE(st, "SELECT COALESCE(MAX(ordinal), 0) + 1 FROM jobs");
  if (sqlite3_step(st) != SQLITE_ROW) return Error("next ordinal");
  return sqlite3_column_int64(st, 0);
}

std::map<int, int> Store::CountJobsByState() {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  return index_.CountByState();
}

int64_t Store::NumQueuedJobs(const std::string& owner) {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  return index_.NumQueued(owner);
}

void Store::ForEachQueuedJob(const std::function<bool(const IndexedJob&)>& fn) {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  index_.ForEachQueued(fn);
}

void Store::ForEachQueuedJobNotBehind(const std::function<bool(const IndexedJob&)>& fn) {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  index_.ForEachQueuedNotBehind(fn);
}

std::map<std::string, std::vector<int>> Store::UsedSlots() {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  return index_.UsedSlots();
}

uint64_t Store::UsedSlotsVersion() {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  return index_.used_slots_version();
}

absl::Status Store::CheckJobIndex() {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  JobIndex fresh;
  if (auto st = LoadJobIndex(&fresh); !st.ok()) return st;
  const std::string diff = index_.Diff(fresh);
  if (diff.empty()) return absl::OkStatus();
  return absl::InternalError("the in-memory job index differs from the stored jobs: " + diff);
}

absl::Status Store::AppendEvent(const v1::JobEvent& e) {
  FTUNE_PREPARE(st, "INSERT INTO events(job_id, seq, event) VALUES(?,?,?)");
  const std::string blob = e.SerializeAsString();
  sqlite3_bind_text(st, 1, e.job_id().c_str(), -1, SQLITE_TRANSIENT);
  sqlite3_bind_int64(st, 2, e.seq());
  sqlite3_bind_blob(st, 3, blob.data(), static_cast<int>(blob.size()), SQLITE_TRANSIENT);
  if (sqlite3_step(st) != SQLITE_DONE)
    return Error("append event " + std::to_string(e.seq()) + " of " + e.job_id());
  return absl::OkStatus();
}

absl::StatusOr<std::vector<v1::JobEvent>> Store::ReadEvents(const std::string& job_id,
                                                            int64_t after_seq, int64_t up_to_seq,
                                                            int limit) {
  FTUNE_PREPARE(st,
                "SELECT event FROM events WHERE job_id=? AND seq>? AND seq<=? ORDER BY seq "
                "LIMIT ?");
  sqlite3_bind_text(st, 1, job_id.c_str(), -1, SQLITE_TRANSIENT);
  sqlite3_bind_int64(st, 2, after_seq);
  sqlite3_bind_int64(st, 3, up_to_seq);
  sqlite3_bind_int(st, 4, limit);
  std::vector<v1::JobEvent> out;
  int rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    v1::JobEvent e;
    if (!e.ParseFromString(Blob(st, 0)))
      return Failed(absl::DataLossError("a stored event of job " + job_id + " is corrupt"));
    out.push_back(std::move(e));
  }
  if (rc != SQLITE_DONE) return Error("read events of " + job_id);
  return out;
}

absl::StatusOr<int64_t> Store::DeleteEventsBefore(const std::string& job_id,
                                                  int64_t before_seq) {
  FTUNE_PREPARE(st, "DELETE FROM events WHERE job_id=? AND seq<?");
  sqlite3_bind_text(st, 1, job_id.c_str(), -1, SQLITE_TRANSIENT);
  sqlite3_bind_int64(st, 2, before_seq);
  if (sqlite3_step(st) != SQLITE_DONE) return Error("expire events of " + job_id);
  return static_cast<int64_t>(sqlite3_changes(db_));
}

absl::Status Store::InsertCheckpoint(const v1::Checkpoint& c) {
  FTUNE_PREPARE(st, "INSERT OR REPLACE INTO checkpoints(job_id, step, checkpoint) VALUES(?,?,?)");
  const std::string blob = c.SerializeAsString();
  sqlite3_bind_text(st, 1, c.job_id().c_str(), -1, SQLITE_TRANSIENT);
  sqlite3_bind_int64(st, 2, c.step());
  sqlite3_bind_blob(st, 3, blob.data(), static_cast<int>(blob.size()), SQLITE_TRANSIENT);
  if (sqlite3_step(st) != SQLITE_DONE) return Error("insert checkpoint of " + c.job_id());
  return absl::OkStatus();
}

absl::StatusOr<std::vector<v1::Checkpoint>> Store::ListCheckpoints(const std::string& job_id) {
  FTUNE_PREPARE(st, "SELECT checkpoint FROM checkpoints WHERE job_id=? ORDER BY step");
  sqlite3_bind_text(st, 1, job_id.c_str(), -1, SQLITE_TRANSIENT);
  std::vector<v1::Checkpoint> out;
  int rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    v1::Checkpoint c;
    if (!c.ParseFromString(Blob(st, 0)))
      return Failed(absl::DataLossError("a stored checkpoint of job " + job_id + " is corrupt"));
    out.push_back(std::move(c));
  }
  if (rc != SQLITE_DONE) return Error("list checkpoints of " + job_id);
  return out;
}

absl::Status Store::PruneCheckpoints(const std::string& job_id, int keep) {
  FTUNE_PREPARE(st,
                "DELETE FROM checkpoints WHERE job_id=? AND step NOT IN (SELECT step FROM "
                "checkpoints WHERE job_id=? ORDER BY step DESC LIMIT ?)");
  sqlite3_bind_text(st, 1, job_id.c_str(), -1, SQLITE_TRANSIENT);
  sqlite3_bind_text(st, 2, job_id.c_str(), -1, SQLITE_TRANSIENT);
  sqlite3_bind_int(st, 3, keep);
  if (sqlite3_step(st) != SQLITE_DONE) return Error("prune checkpoints of " + job_id);
  return absl::OkStatus();
}

absl::Status Store::PutAgent(const StoredAgent& a) {
  FTUNE_PREPARE(st,
                "INSERT INTO agents(agent_id, agent, acked_seq) VALUES(?,?,?) "
                "ON CONFLICT(agent_id) DO UPDATE SET agent=excluded.agent");
  const std::string blob = a.agent.SerializeAsString();
  sqlite3_bind_text(st, 1, a.agent.agent_id().c_str(), -1, SQLITE_TRANSIENT);
  sqlite3_bind_blob(st, 2, blob.data(), static_cast<int>(blob.size()), SQLITE_TRANSIENT);
  sqlite3_bind_int64(st, 3, a.acked_seq);
  if (sqlite3_step(st) != SQLITE_DONE) return Error("put agent " + a.agent.agent_id());
  return absl::OkStatus();
}

absl::StatusOr<std::vector<StoredAgent>> Store::ListAgents() {
  FTUNE_PREPARE(st, "SELECT agent, acked_seq FROM agents ORDER BY agent_id");
  std::vector<StoredAgent> out;
  int rc;
  while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
    StoredAgent a;
    if (!a.agent.ParseFromString(Blob(st, 0)))
      return Failed(absl::DataLossError("a stored agent is corrupt"));
    a.acked_seq = sqlite3_column_int64(st, 1);
    out.push_back(std::move(a));
  }
  if (rc != SQLITE_DONE) return Error("list agents");
  return out;
}

absl::Status Store::SetAgentAck(const std::string& agent_id, int64_t acked_seq) {
  FTUNE_PREPARE(st, "UPDATE agents SET acked_seq=? WHERE agent_id=?");
  sqlite3_bind_int64(st, 1, acked_seq);
  sqlite3_bind_text(st, 2, agent_id.c_str(), -1, SQLITE_TRANSIENT);
  if (sqlite3_step(st) != SQLITE_DONE) return Error("ack agent " + agent_id);
  return absl::OkStatus();
}

}  // namespace ftune::server
