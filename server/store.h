// Durable state of the coordinator in SQLite (WAL mode, synchronous=FULL by
// default, NORMAL by choice: StoreSync below).
//
// Jobs, agents and checkpoints are stored as serialized protobuf next to the
// few columns that are queried (state, priority, order, request id, owner,
// labels);
// events are rows keyed by (job_id, seq). Every mutation that belongs
// together runs in one transaction (Transaction below), so a kill -9 at any
// point leaves either all or none of a state change on disk. The schema is
// versioned; Open() applies the missing migrations in order.
//
// Open refuses a database it cannot trust: journal_mode=WAL must take
// effect (a filesystem without shared memory cannot do it), the synchronous
// mode asked for must read back as set, and `PRAGMA quick_check` must pass;
// the error says what to do.
//
// Every SQLite failure is logged to stderr and reported to the error
// listener (ftune_store_errors_total) where it happens, then returned:
// RESOURCE_EXHAUSTED for a full disk or database (SQLITE_FULL), UNAVAILABLE
// when the database is busy or locked, DATA_LOSS for corruption, INTERNAL
// otherwise. "Not found" answers are not errors.
//
// The live jobs are also kept in memory (JobIndex, job_index.h) for the
// scheduler: loaded once at Open, and fed every job InsertJob/UpdateJob
// writes once its transaction commits; a transaction rolled back (a COMMIT
// that fails is rolled back too) leaves it as it was. The database stays the
// source of truth: a process that dies mid-transaction loses only the index,
// which the next Open rebuilds. Ended jobs are only counted, so the index
// relies on the state machine: an ended job never becomes live again.
//
// WAL checkpoints run off the request path. SQLite's automatic checkpoint
// (every 1,000 WAL pages) would copy the WAL into the database file and
// sync it inside whichever commit crosses the threshold, one commit in about
// a hundred; a file-backed store turns it off (`PRAGMA wal_autocheckpoint=0`,
// read back at Open) and a background thread of the Store checkpoints
// instead, on a connection of its own, every kCheckpointInterval when
// something was committed since its last one. Its checkpoints are PASSIVE:
// they never wait for, nor block, the store's reads and writes. A WAL that
// still reaches kMaxWalBytes (passive checkpoints kept from resetting it by
// writes that never pause, or by an outside reader) gets one TRUNCATE
// checkpoint, which makes the writes wait while it runs, and a line on
// stderr. A checkpoint that fails is logged and reported as any store error
// (from the checkpoint thread) and tried again at the next tick; the WAL
// keeps what it could not copy. Closing the store stops the thread, and the
// last connection's close checkpoints the WAL and removes it, as SQLite
// always does.
//
// Thread-safety: a Store serializes all calls with an internal mutex, held
// across a Transaction; the managers hold their own locks across
// read-modify-write and take them before this one (coordinator.h). The
// checkpoint thread does not take that mutex to checkpoint (SQLite's WAL
// locks order it against the store's connection), only to report an error
// it hit to the error listener.
#ifndef FTUNE_SERVER_STORE_H_
#define FTUNE_SERVER_STORE_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "ftune/v1/job_service.pb.h"
#include "job_index.h"

struct sqlite3;
struct sqlite3_stmt;

namespace ftune::server {

struct StoredAgent {
  v1::Agent agent;
  int64_t acked_seq = 0;  // highest agent_seq stored from this agent
};

// How far a committed transaction (an acknowledged CreateJob, a stored
// event) is durable, as PostgreSQL's synchronous_commit chooses it. The
// values are SQLite's `PRAGMA synchronous` levels.
enum class StoreSync {
  // Every commit waits for an fdatasync of the WAL: it survives power loss
  // and an OS crash. Costs one disk flush per commit.
  kFull = 2,
  // Commits reach the OS but are not flushed (the WAL is synced at each
  // checkpoint, about every Store::kCheckpointInterval): they survive a crash or
  // kill -9 of the coordinator, but the last ones acknowledged before an OS
  // crash or power loss can roll back.
  // The database is never corrupted either way.
  kNormal = 1,
};

// "full" or "normal", as --store-sync spells it.
const char* StoreSyncName(StoreSync sync);

struct JobFilter {
  std::vector<v1::JobState> states;  // empty: all
  std::vector<std::pair<std::string, std::string>> labels;
  std::optional<std::string> owner;  // unset: every owner
  int64_t after_ordinal = 0;  // pagination cursor
  int limit = 100;
};

class Store {
 public:
  // Opens (creating if needed) <dir>/ftune.db; ":memory:" for tests.
  static absl::StatusOr<std::unique_ptr<Store>> Open(const std::string& dir,
                                                     StoreSync sync = StoreSync::kFull);
  ~Store();

  // The connection's `PRAGMA synchronous`, read back from SQLite (2: FULL,
  // 1: NORMAL); -1 if it cannot be read.
  int SynchronousMode();
  // Sets the synchronous mode on the open store and reads it back: Open
  // does it, and a benchmark comparing the modes on one state. Not inside a
  // Transaction.
  absl::Status SetSync(StoreSync sync);

  static constexpr int kSchemaVersion = 3;
  int schema_version() const { return schema_version_; }

  // Called with every store error (after it is logged), from the thread
  // that hit it (the checkpoint thread for a failed checkpoint), with the
  // store's lock held: count, do not call back.
  void SetErrorListener(std::function<void(const absl::Status&)> listener);

  // How often the checkpoint thread looks for committed changes to copy
  // into the database file, and the WAL size that makes it truncate the
  // WAL, writes waiting (see the head of this file).
  static constexpr std::chrono::milliseconds kCheckpointInterval{1000};
  static constexpr int64_t kMaxWalBytes = 64 << 20;
  // Checkpoints the background thread has completed, passive or truncating;
  // always 0 for ":memory:", which has no WAL.
  int64_t NumCheckpoints() const { return num_checkpoints_.load(); }
  // The store connection's `PRAGMA wal_autocheckpoint`, read back from
  // SQLite: 0 for a file-backed store (no commit checkpoints); -1 if it
  // cannot be read.
  int WalAutocheckpoint();

  // Runs fn inside BEGIN IMMEDIATE ... COMMIT; rolls back if fn fails. A
  // Transaction inside fn joins the outer one (depth tracked here, not
  // guessed from SQLite's autocommit flag).
  absl::Status Transaction(const std::function<absl::Status()>& fn);

  // --- jobs (call inside Transaction for multi-step changes)
  absl::Status InsertJob(const v1::Job& job, int64_t ordinal);
  absl::Status UpdateJob(const v1::Job& job);
  absl::StatusOr<v1::Job> GetJob(const std::string& id);
  absl::StatusOr<std::optional<v1::Job>> FindJobByRequestId(const std::string& request_id);
  // Jobs matching the filter in submission order, each with its ordinal.
  absl::StatusOr<std::vector<std::pair<int64_t, v1::Job>>> ListJobs(const JobFilter& filter);
  absl::StatusOr<int64_t> NextOrdinal();

  // --- the live jobs, from memory (JobIndex): what committed transactions
  // stored, never what the current one has written so far.
  // Number of jobs in each state (states with none are absent).
  std::map<int, int> CountJobsByState();
  // Number of `owner`'s QUEUED jobs.
  int64_t NumQueuedJobs(const std::string& owner);
  // QUEUED jobs in scheduling order (priority, then submission), while fn
  // returns true. fn must not write to the store.
  void ForEachQueuedJob(const std::function<bool(const IndexedJob&)>& fn);
  // The same, only those whose reason_code is not kJobsAheadCode.
  void ForEachQueuedJobNotBehind(const std::function<bool(const IndexedJob&)>& fn);
  // Slots held by live jobs (ranks not exited), per agent, ascending, and
  // the version of that answer (JobIndex::used_slots_version).
  std::map<std::string, std::vector<int>> UsedSlots();
  uint64_t UsedSlotsVersion();
  // Loads a fresh index from the rows and compares: OK when it matches the
  // one kept in memory, INTERNAL naming the first difference otherwise.
  // Reads every live job: for tests and checks, not for serving.
  absl::Status CheckJobIndex();

  // --- events
  absl::Status AppendEvent(const v1::JobEvent& event);
  // Events of a job with seq in (after_seq, up_to_seq], at most limit.
  absl::StatusOr<std::vector<v1::JobEvent>> ReadEvents(const std::string& job_id,
                                                       int64_t after_seq, int64_t up_to_seq,
                                                       int limit);
  // Deletes the events of a job with seq < before_seq; returns how many.
  absl::StatusOr<int64_t> DeleteEventsBefore(const std::string& job_id, int64_t before_seq);

  // --- checkpoints
  absl::Status InsertCheckpoint(const v1::Checkpoint& ckpt);
  absl::StatusOr<std::vector<v1::Checkpoint>> ListCheckpoints(const std::string& job_id);
  // Deletes all but the newest keep records of a job.
  absl::Status PruneCheckpoints(const std::string& job_id, int keep);

  // --- agents
  // Inserts the agent; an existing row gets the new record but keeps its
  // acked_seq, which only SetAgentAck moves (with the events it covers).
  absl::Status PutAgent(const StoredAgent& agent);
  absl::StatusOr<std::vector<StoredAgent>> ListAgents();
  absl::Status SetAgentAck(const std::string& agent_id, int64_t acked_seq);

 private:
  Store() = default;
  absl::Status Exec(const std::string& sql);
  absl::Status Migrate();
  sqlite3_stmt* Prepare(const char* sql);  // cached
  absl::Status Error(const std::string& what);
  // Logs and reports st (not OK) and returns it.
  absl::Status Failed(absl::Status st);
  absl::Status CheckIntegrity(const std::string& path);
  // Reads the live jobs and the ended counts into `index`.
  absl::Status LoadJobIndex(JobIndex* index);
  // A job InsertJob/UpdateJob stored: into the index now outside a
  // transaction, at its commit inside one.
  void IndexJob(IndexedJob job, bool inserted);
  // Opens the checkpoint thread's connection to `path` and starts it.
  absl::Status StartCheckpointer(const std::string& path, StoreSync sync);
  void CheckpointLoop();
  // Logs and reports a failed checkpoint (from the checkpoint thread).
  void CheckpointFailed(int rc, int sys_errno, const std::string& what);

  std::recursive_mutex mu_;
  sqlite3* db_ = nullptr;
  // The checkpoint thread's; only it and SetSync use the connection
  // (serialized by SQLite: it is opened SQLITE_OPEN_FULLMUTEX).
  sqlite3* checkpoint_db_ = nullptr;
  int64_t max_wal_frames_ = 0;  // kMaxWalBytes in pages
  std::thread checkpointer_;
  std::mutex checkpointer_mu_;
  std::condition_variable checkpointer_wake_;
  bool stopping_ = false;  // guarded by checkpointer_mu_
  std::atomic<int64_t> num_checkpoints_{0};
  int schema_version_ = 0;
  int transaction_depth_ = 0;  // guarded by mu_
  JobIndex index_;             // guarded by mu_
  // Jobs written by the open transaction, for the index at its commit.
  std::vector<std::pair<IndexedJob, bool>> staged_;  // guarded by mu_
  std::function<void(const absl::Status&)> on_error_;
  std::vector<std::pair<const char*, sqlite3_stmt*>> stmts_;
};

}  // namespace ftune::server

#endif  // FTUNE_SERVER_STORE_H_
