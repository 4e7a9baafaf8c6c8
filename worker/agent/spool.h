// The agent's spool: an append-only on-disk log of RankEvents that are not
// yet acknowledged by the coordinator, plus the agent's stable identity.
//
// Why on disk: the coordinator may be down or unreachable for a while, and the
// agent itself may restart; neither may lose an event (a rank's exit, its
// final checkpoint). Delivery is at-least-once from here and exactly-once
// into the coordinator's store, which drops agent_seq values it already has.
//
// Layout of the spool directory:
//   agent_id     the agent's identity forever after: --agent-id when given
//                (the id its per-agent credential names), else random hex;
//                written once
//   acked        decimal agent_seq: every event <= it is stored upstream
//   events.log   records: varint length | RankEvent bytes | CRC-32 (LE, 4 B)
//                of length+bytes. The CRC lets recovery tell a torn or
//                zero-filled tail (crash mid-append) from a real record.
//   reserve      disk space held for `acked` (allocated, never read): see
//                "A full disk" below.
//
// Invariants:
//   * agent_seq is assigned here, starts at 1, and strictly increases across
//     agent restarts: the next seq is above both the persisted ack and every
//     record in the log. A record torn by a crash was never sent (sending
//     happens only after Append returns, i.e. after fsync), so its seq may be
//     assigned again.
//   * Append fsyncs before it returns; Ack persists the ack (atomic rename)
//     before any record is removed.
//   * Trimming: acked records are dropped from the in-memory index at once;
//     the file is truncated to nothing when everything is acked, and rewritten
//     without its acked prefix once that prefix exceeds compact_bytes.
//
// A full disk: Append refuses (RESOURCE_EXHAUSTED) and the caller holds its
// events. The log may have filled the disk itself (the coordinator was
// away): then only acks free space, by trimming, and persisting an ack
// needs a new block for the new `acked` before the old one is freed, which
// a full filesystem does not have. So the spool holds `reserve`: when an
// ack cannot be written, the reserve is deleted and the ack written into
// its room; after the trim the reserve is taken again (as much of it as
// the disk has, down to one block). Appends never get that room.
//
// Thread-safety: every method may be called from any thread.
#ifndef FTUNE_WORKER_AGENT_SPOOL_H_
#define FTUNE_WORKER_AGENT_SPOOL_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "ftune/v1/agent_service.pb.h"

namespace ftune::agent {

class Spool {
 public:
  struct Options {
    // Directory holding agent_id, acked and events.log; created if missing.
    std::string dir;
    // The agent's id: written on first use; a spool holding another id is
    // refused. Empty: the stored id, or a fresh random one.
    std::string agent_id;
    // Rewrite events.log once its acked prefix is at least this large.
    int64_t compact_bytes = 4 << 20;
    // Disk space held for persisting acks on a full disk; below 4096: none.
    int64_t reserve_bytes = 64 << 10;
  };

  // Opens (or creates) the spool and recovers events.log: a torn or corrupt
  // tail is cut off (logged with the number of bytes dropped). Temporary
  // files a crash left in the middle of an atomic write of agent_id or acked
  // ("<name>.tmp.<pid>.<n>") are removed (logged with their number).
  static absl::StatusOr<std::unique_ptr<Spool>> Open(const Options& options);
  ~Spool();
  Spool(const Spool&) = delete;
  Spool& operator=(const Spool&) = delete;

  // The agent's stable id (hex), created on first Open.
  const std::string& agent_id() const { return agent_id_; }

  // Assigns the next agent_seq values to *events (in order), appends them and
  // fsyncs once. On error nothing is appended and no seq is consumed; an
  // event over kMaxEventBytes (event_size.h) is INVALID_ARGUMENT.
  absl::Status Append(std::vector<v1::RankEvent>* events);
  absl::Status Append(v1::RankEvent* event);

  // Records that every event <= seq is stored upstream: persists it and
  // trims. A seq at or below the current ack is ignored; one above the last
  // assigned seq moves the next seq past it, so no new event is mistaken for a
  // duplicate upstream.
  absl::Status Ack(int64_t seq);

  // Unacked events with agent_seq > after_seq, oldest first, at most
  // max_events of them and (beyond the first) at most max_bytes in all.
  absl::StatusOr<std::vector<v1::RankEvent>> ReadAfter(int64_t after_seq, size_t max_events,
                                                       size_t max_bytes) const;

  int64_t acked_seq() const;
  // Highest seq assigned so far (or the ack, if higher); 0 for a new spool.
  int64_t last_seq() const;
  size_t num_unacked() const;
  // Current size of events.log in bytes.
  int64_t log_bytes() const;
  std::string log_path() const { return dir_ + "/events.log"; }

  // Called after every successful Append, outside the spool's lock, from the
  // appending thread. Set before events are appended concurrently.
  void SetAppendListener(std::function<void()> listener);

 private:
  struct Entry {
    int64_t seq;
    int64_t offset;  // of the record in events.log
    int64_t size;    // whole record: length prefix, payload, CRC
  };

  explicit Spool(Options options);
  absl::Status Recover();
  absl::Status TrimLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status CompactLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Allocates `reserve` unless held: reserve_bytes, or as much as the disk
  // has down to one block, or (a full disk) nothing until the next try.
  void TakeReserveLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Deletes `reserve`, freeing its space.
  void ReleaseReserveLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const Options options_;
  const std::string dir_;
  std::string agent_id_;

  mutable absl::Mutex mu_;
  int fd_ ABSL_GUARDED_BY(mu_) = -1;
  int64_t file_size_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t acked_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t last_seq_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t reserve_bytes_ ABSL_GUARDED_BY(mu_) = 0;  // held now; 0: none
  // Unacked records, ascending seq.
  std::deque<Entry> index_ ABSL_GUARDED_BY(mu_);

  absl::Mutex listener_mu_;
  std::function<void()> listener_ ABSL_GUARDED_BY(listener_mu_);
};

// CRC-32 (IEEE 802.3, as zlib computes it). Exposed for tests.
uint32_t Crc32(const void* data, size_t size);

}  // namespace ftune::agent

#endif  // FTUNE_WORKER_AGENT_SPOOL_H_
