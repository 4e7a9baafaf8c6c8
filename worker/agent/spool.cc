#include "worker/agent/spool.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "ftune/absl_status.h"
#include "ftune/file_util.h"
#include "worker/agent/event_size.h"
#include "worker/agent/log.h"

namespace ftune::agent {
namespace {

// A length prefix above this is corruption, not an event: Append refuses
// events over kMaxEventBytes (event_size.h), far below it.
constexpr uint64_t kMaxRecordBytes = 16u << 20;
static_assert(kMaxEventBytes + 64 < kMaxRecordBytes);
constexpr size_t kMaxVarintBytes = 10;
// The smallest reserve worth holding: a block of most filesystems, the room
// one `acked` file takes.
constexpr int64_t kMinReserveBytes = 4096;

std::array<uint32_t, 256> MakeCrcTable() {
  std::array<uint32_t, 256> table{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
    table[i] = c;
  }
  return table;
}

void AppendVarint(uint64_t v, std::string* out) {
  while (v >= 0x80) {
    out->push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out->push_back(static_cast<char>(v));
}

void AppendFixed32(uint32_t v, std::string* out) {
  for (int i = 0; i < 4; ++i) out->push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

uint32_t DecodeFixed32(const char* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i)
    v |= static_cast<uint32_t>(static_cast<unsigned char>(p[i])) << (8 * i);
  return v;
}

// Reads exactly n bytes at offset; false on a short read or error.
bool PreadExact(int fd, char* buf, size_t n, int64_t offset) {
  size_t got = 0;
  while (got < n) {
    ssize_t r = ::pread(fd, buf + got, n - got, offset + static_cast<int64_t>(got));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    got += static_cast<size_t>(r);
  }
  return true;
}

bool WriteAll(int fd, const char* p, size_t n) {
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) return false;
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

// The coordinator's rule for agent ids (server/auth.h).
bool IsValidAgentId(const std::string& id) {
  return !id.empty() && id.size() <= 64 && std::all_of(id.begin(), id.end(), [](char c) {
    return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' ||
           c == '-' || c == '@';
  });
}

absl::StatusOr<std::string> NewAgentId() {
  unsigned char bytes[16];
  size_t got = 0;
  while (got < sizeof(bytes)) {
    ssize_t n = ::getrandom(bytes + got, sizeof(bytes) - got, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return absl::InternalError(absl::StrCat("getrandom failed: ", ErrnoMessage(errno)));
    got += static_cast<size_t>(n);
  }
  static constexpr char kHex[] = "0123456789abcdef";
  std::string id;
  for (unsigned char b : bytes) {
    id.push_back(kHex[b >> 4]);
    id.push_back(kHex[b & 15]);
  }
  return id;
}

// Serializes one record: varint length | payload | CRC of both.
std::string EncodeRecord(const v1::RankEvent& event) {
  std::string record;
  AppendVarint(event.ByteSizeLong(), &record);
  event.AppendToString(&record);
  AppendFixed32(Crc32(record.data(), record.size()), &record);
  return record;
}

}  // namespace

uint32_t Crc32(const void* data, size_t size) {
  static const std::array<uint32_t, 256> kTable = MakeCrcTable();
  uint32_t c = 0xFFFFFFFFu;
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < size; ++i) c = kTable[(c ^ p[i]) & 0xff] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

Spool::Spool(Options options) : options_(std::move(options)), dir_(options_.dir) {}

Spool::~Spool() {
  absl::MutexLock lock(&mu_);
  if (fd_ >= 0) ::close(fd_);
}

absl::StatusOr<std::unique_ptr<Spool>> Spool::Open(const Options& options) {
  if (options.dir.empty())
    return absl::InvalidArgumentError("spool directory is empty: pass --work-dir");
  if (absl::Status s = ToAbsl(MakeDirectories(options.dir)); !s.ok()) {
    return absl::FailedPreconditionError(
        absl::StrCat("spool: ", s.message(), "; pass a writable --work-dir"));
  }
  std::unique_ptr<Spool> spool(new Spool(options));
  const std::string& dir = spool->dir_;

  // Leftovers of a crash in the middle of an atomic write or a compaction:
  // the real files are intact, these are garbage, and on a full disk they
  // hold space the spool needs. The spool's atomic writes (agent_id, acked:
  // WriteFileAtomically) leave "<name>.tmp.<pid>.<n>"; the spool owns this
  // directory, and no write of its own runs yet, so every such file is a
  // crashed one, whatever its pid. Only those exact names are removed.
  int removed = 0;
  for (const char* name : {"agent_id.tmp", "acked.tmp", "events.log.compact"}) {
    if (::unlink(absl::StrCat(dir, "/", name).c_str()) == 0) ++removed;
  }
  if (Result<std::vector<std::string>> names = ListDirectory(dir); names.ok()) {
    for (const std::string& name : *names) {
      if (!IsAtomicFileWriterTemp(name, "acked") && !IsAtomicFileWriterTemp(name, "agent_id"))
        continue;
      const std::string path = absl::StrCat(dir, "/", name);
      if (::unlink(path.c_str()) == 0) {
        ++removed;
      } else if (errno != ENOENT) {
        LogWarning(absl::StrCat("spool: cannot remove leftover temporary file ", path, ": ",
                                ErrnoMessage(errno)));
      }
    }
  } else {
    LogWarning(absl::StrCat("spool: ", names.status().message(),
                            "; leftover temporary files are not removed"));
  }
  if (removed > 0) {
    LogInfo(absl::StrCat("spool ", dir, ": removed ", removed,
                         " leftover temporary file(s) of an interrupted write"));
  }

  const std::string id_path = dir + "/agent_id";
  absl::StatusOr<std::string> id = ToAbsl(ReadFileToString(id_path, kMaxSmallFileBytes));
  if (!options.agent_id.empty() && !IsValidAgentId(options.agent_id)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "agent id '", options.agent_id.substr(0, 64), "' must be 1 to 64 of A-Z a-z 0-9 . _ @ -"));
  }
  if (id.ok()) {
    std::string trimmed(absl::StripAsciiWhitespace(*id));
    if (!IsValidAgentId(trimmed)) {
      return absl::DataLossError(absl::StrCat(
          "spool: ", id_path, " does not hold an agent id ('", trimmed.substr(0, 40),
          "'); restore it, or delete the whole spool directory to register as a new agent"));
    }
    if (!options.agent_id.empty() && options.agent_id != trimmed) {
      return absl::FailedPreconditionError(absl::StrCat(
          "spool: ", dir, " belongs to agent ", trimmed, ", not --agent-id ", options.agent_id,
          "; its unacknowledged events are that agent's. Pass --agent-id ", trimmed,
          ", or another --work-dir for a new agent"));
    }
    spool->agent_id_ = trimmed;
  } else if (absl::IsNotFound(id.status())) {
    absl::StatusOr<std::string> fresh =
        options.agent_id.empty() ? NewAgentId() : absl::StatusOr<std::string>(options.agent_id);
    if (!fresh.ok()) return fresh.status();
    if (absl::Status s = ToAbsl(WriteFileAtomically(id_path, *fresh + "\n")); !s.ok()) {
      return absl::FailedPreconditionError(
          absl::StrCat("spool: ", s.message(), "; pass a writable --work-dir"));
    }
    spool->agent_id_ = *fresh;
  } else {
    return id.status();
  }

  if (absl::Status s = spool->Recover(); !s.ok()) return s;
  return spool;
}

absl::Status Spool::Recover() {
  absl::MutexLock lock(&mu_);
  const std::string acked_path = dir_ + "/acked";
  absl::StatusOr<std::string> acked_text = ToAbsl(ReadFileToString(acked_path, kMaxSmallFileBytes));
  if (acked_text.ok()) {
    // A wrong ack is worse than none: guessing low resends duplicates (fine),
    // but with a compacted log it would also restart seqs at 1, and the
    // coordinator would drop those new events as duplicates. So refuse.
    std::string t(absl::StripAsciiWhitespace(*acked_text));
    if (!absl::SimpleAtoi(t, &acked_) || acked_ < 0) {
      return absl::DataLossError(absl::StrCat(
          "spool: ", acked_path, " does not hold an agent_seq ('", t.substr(0, 40),
          "'); write the coordinator's last stored agent_seq for agent ", agent_id_, " into it"));
    }
  } else if (!absl::IsNotFound(acked_text.status())) {
    return acked_text.status();
  }
  last_seq_ = acked_;

  const std::string path = log_path();
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd_ < 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "spool: cannot open ", path, ": ", ErrnoMessage(errno), "; pass a writable --work-dir"));
  }
  struct stat st;
  if (::fstat(fd_, &st) != 0)
    return absl::InternalError(absl::StrCat("spool: cannot stat ", path, ": ", ErrnoMessage(errno)));
  const int64_t size = st.st_size;

  int64_t off = 0;
  int64_t prev_seq = 0;
  std::string why;
  std::string buf;
  while (off < size) {
    char head[kMaxVarintBytes];
    const size_t head_len = static_cast<size_t>(std::min<int64_t>(kMaxVarintBytes, size - off));
    if (!PreadExact(fd_, head, head_len, off)) {
      why = "unreadable record header";
      break;
    }
    uint64_t len = 0;
    size_t vlen = 0;
    bool complete = false;
    for (size_t i = 0; i < head_len; ++i) {
      len |= static_cast<uint64_t>(static_cast<unsigned char>(head[i]) & 0x7f) << (7 * i);
      if ((static_cast<unsigned char>(head[i]) & 0x80) == 0) {
        vlen = i + 1;
        complete = true;
        break;
      }
    }
    if (!complete) {
      why = "torn length prefix";
      break;
    }
    if (len > kMaxRecordBytes) {
      why = absl::StrCat("length prefix ", len, " is not plausible");
      break;
    }
    const int64_t total = static_cast<int64_t>(vlen + len + 4);
    if (off + total > size) {
      why = "record cut short";
      break;
    }
    buf.resize(static_cast<size_t>(total));
    if (!PreadExact(fd_, buf.data(), buf.size(), off)) {
      why = "unreadable record";
      break;
    }
    if (Crc32(buf.data(), vlen + len) != DecodeFixed32(buf.data() + vlen + len)) {
      why = "checksum mismatch";
      break;
    }
    v1::RankEvent event;
    if (!event.ParseFromArray(buf.data() + vlen, static_cast<int>(len))) {
      why = "record does not parse as a RankEvent";
      break;
    }
    if (event.agent_seq() <= prev_seq) {
      why = absl::StrCat("agent_seq ", event.agent_seq(), " does not increase (previous ", prev_seq,
                         ")");
      break;
    }
    prev_seq = event.agent_seq();
    if (event.agent_seq() > acked_) index_.push_back(Entry{event.agent_seq(), off, total});
    off += total;
  }
  if (off < size) {
    LogWarning(absl::StrCat(
        "spool ", path, ": dropping ", size - off, " bytes from offset ", off, " (", why,
        "); a crash during an append leaves such a tail (its events were never sent), "
        "anything else is disk corruption"));
    if (::ftruncate(fd_, off) != 0 || ::fsync(fd_) != 0) {
      return absl::InternalError(absl::StrCat("spool: cannot truncate ", path, " to ", off,
                                              " bytes: ", ErrnoMessage(errno),
                                              "; check the disk and --work-dir"));
    }
  }
  file_size_ = off;
  last_seq_ = std::max(acked_, prev_seq);
  absl::Status trimmed = TrimLocked();
  TakeReserveLocked();
  if (reserve_bytes_ == 0 && options_.reserve_bytes >= kMinReserveBytes) {
    LogWarning(absl::StrCat("spool ", dir_, ": no room for its reserve (", options_.reserve_bytes,
                            " bytes); if the disk stays full, acks cannot be recorded and the "
                            "spool cannot free its log; free disk space under --work-dir"));
  }
  return trimmed;
}

void Spool::SetAppendListener(std::function<void()> listener) {
  absl::MutexLock lock(&listener_mu_);
  listener_ = std::move(listener);
}

absl::Status Spool::Append(v1::RankEvent* event) {
  std::vector<v1::RankEvent> events(1);
  events[0].Swap(event);
  absl::Status s = Append(&events);
  events[0].Swap(event);
  return s;
}

absl::Status Spool::Append(std::vector<v1::RankEvent>* events) {
  if (events->empty()) return absl::OkStatus();
  {
    absl::MutexLock lock(&mu_);
    std::string buf;
    std::vector<Entry> added;
    int64_t seq = last_seq_;
    int64_t off = file_size_;
    // A damaged or hand-edited log or ack may put the last seq near the top
    // of int64; numbering past it would overflow and reuse seqs.
    if (seq > INT64_MAX - static_cast<int64_t>(events->size())) {
      return absl::FailedPreconditionError(absl::StrCat(
          "spool ", dir_, ": agent_seq ", seq, " leaves no room for ", events->size(),
          " more events; the spool's acked file or events.log is damaged (move the spool "
          "directory aside and start the agent again)"));
    }
    for (v1::RankEvent& e : *events) {
      // Checked before anything is written: a batch is appended whole or not at all.
      if (e.ByteSizeLong() > kMaxEventBytes) {
        for (v1::RankEvent& undo : *events) undo.clear_agent_seq();
        return absl::InvalidArgumentError(absl::StrCat(
            "spool: an event of job ", e.job_id(), " rank ", e.rank(), " is ", e.ByteSizeLong(),
            " bytes, over the ", kMaxEventBytes, "-byte limit (FitEvent makes events fit)"));
      }
      e.set_agent_seq(++seq);
      std::string record = EncodeRecord(e);
      added.push_back(Entry{seq, off, static_cast<int64_t>(record.size())});
      off += static_cast<int64_t>(record.size());
      buf += record;
    }
    const bool written = WriteAll(fd_, buf.data(), buf.size()) && ::fdatasync(fd_) == 0;
    if (!written) {
      const int err = errno;
      // Cut off whatever part did land, so the next append starts on a
      // record boundary and recovery never sees half a batch.
      if (::ftruncate(fd_, file_size_) != 0) {
        LogError(absl::StrCat("spool ", log_path(),
                              ": cannot undo a failed append: ", ErrnoMessage(errno)));
      }
      for (v1::RankEvent& e : *events) e.clear_agent_seq();
      return absl::ResourceExhaustedError(absl::StrCat("spool: cannot append to ", log_path(), ": ",
                                                       ErrnoMessage(err),
                                                       "; free disk space under --work-dir"));
    }
    file_size_ = off;
    last_seq_ = seq;
    index_.insert(index_.end(), added.begin(), added.end());
  }
  std::function<void()> listener;
  {
    absl::MutexLock lock(&listener_mu_);
    listener = listener_;
  }
  if (listener) listener();
  return absl::OkStatus();
}

absl::Status Spool::Ack(int64_t seq) {
  absl::MutexLock lock(&mu_);
  if (seq <= acked_) return absl::OkStatus();
  const std::string acked_path = dir_ + "/acked";
  const std::string text = absl::StrCat(seq, "\n");
  absl::Status s = ToAbsl(WriteFileAtomically(acked_path, text));
  if (!s.ok() && reserve_bytes_ > 0) {
    // Most likely a full disk, perhaps filled by this log, which only a
    // recorded ack lets us trim: the ack gets the reserve's room.
    LogWarning(absl::StrCat("spool: ", s.message(), "; using the spool's ", reserve_bytes_,
                            "-byte reserve to record ack ", seq));
    ReleaseReserveLocked();
    s = ToAbsl(WriteFileAtomically(acked_path, text));
  }
  if (!s.ok()) {
    return absl::InternalError(absl::StrCat("spool: cannot persist ack ", seq, ": ", s.message()));
  }
  acked_ = seq;
  if (seq > last_seq_) {
    LogWarning(absl::StrCat("spool: coordinator acknowledged agent_seq ", seq,
                            " but the last one assigned here is ", last_seq_,
                            "; new events continue above ", seq));
    last_seq_ = seq;
  }
  while (!index_.empty() && index_.front().seq <= seq) index_.pop_front();
  absl::Status trimmed = TrimLocked();
  // Under mu_ still: no append of ours takes the room the trim and a
  // released reserve left.
  TakeReserveLocked();
  return trimmed;
}

void Spool::TakeReserveLocked() {
  if (reserve_bytes_ > 0 || options_.reserve_bytes < kMinReserveBytes) return;
  const std::string path = dir_ + "/reserve";
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return;
  // Even one block is room for the next ack. A file already allocated (an
  // earlier run's) is kept as it is.
  for (int64_t n = options_.reserve_bytes; n >= kMinReserveBytes; n /= 2) {
    if (::posix_fallocate(fd, 0, n) == 0) {
      reserve_bytes_ = n;
      break;
    }
    if (::ftruncate(fd, 0) != 0) break;  // drops what a failed try allocated
  }
  ::close(fd);
  if (reserve_bytes_ == 0) ::unlink(path.c_str());
}

void Spool::ReleaseReserveLocked() {
  const std::string path = dir_ + "/reserve";
  if (::unlink(path.c_str()) != 0 && errno != ENOENT)
    LogError(absl::StrCat("spool: cannot delete ", path, ": ", ErrnoMessage(errno)));
  reserve_bytes_ = 0;
}

absl::Status Spool::TrimLocked() {
  if (index_.empty()) {
    if (file_size_ == 0) return absl::OkStatus();
    if (::ftruncate(fd_, 0) != 0 || ::fsync(fd_) != 0) {
      return absl::InternalError(
          absl::StrCat("spool: cannot truncate ", log_path(), ": ", ErrnoMessage(errno)));
    }
    file_size_ = 0;
    return absl::OkStatus();
  }
  if (index_.front().offset >= options_.compact_bytes) return CompactLocked();
  return absl::OkStatus();
}

absl::Status Spool::CompactLocked() {
  const std::string path = log_path();
  const std::string tmp = dir_ + "/events.log.compact";
  const int64_t start = index_.front().offset;
  int out = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (out < 0)
    return absl::InternalError(absl::StrCat("spool: cannot create ", tmp, ": ", ErrnoMessage(errno)));
  std::string buf(1 << 20, '\0');
  int64_t off = start;
  bool ok = true;
  while (ok && off < file_size_) {
    const size_t n =
        static_cast<size_t>(std::min<int64_t>(static_cast<int64_t>(buf.size()), file_size_ - off));
    ok = PreadExact(fd_, buf.data(), n, off) && WriteAll(out, buf.data(), n);
    off += static_cast<int64_t>(n);
  }
  ok = ok && ::fsync(out) == 0;
  const int err = errno;
  ::close(out);
  if (!ok || ::rename(tmp.c_str(), path.c_str()) != 0) {
    const int e = ok ? errno : err;
    ::unlink(tmp.c_str());
    return absl::InternalError(
        absl::StrCat("spool: compaction of ", path, " failed: ", ErrnoMessage(e),
                     "; the log is intact, check free space under --work-dir"));
  }
  // The rename is durable only once the directory is synced; until then a
  // crash brings back the old (still valid) file.
  if (absl::Status s = ToAbsl(FsyncDirectory(dir_)); !s.ok()) LogWarning(s.message());
  int fd = ::open(path.c_str(), O_RDWR | O_APPEND | O_CLOEXEC);
  if (fd < 0) {
    return absl::InternalError(
        absl::StrCat("spool: cannot reopen ", path, " after compaction: ", ErrnoMessage(errno)));
  }
  ::close(fd_);
  fd_ = fd;
  for (Entry& e : index_) e.offset -= start;
  file_size_ -= start;
  return absl::OkStatus();
}

absl::StatusOr<std::vector<v1::RankEvent>> Spool::ReadAfter(int64_t after_seq, size_t max_events,
                                                            size_t max_bytes) const {
  absl::MutexLock lock(&mu_);
  std::vector<v1::RankEvent> out;
  auto it = std::upper_bound(index_.begin(), index_.end(), after_seq,
                             [](int64_t seq, const Entry& e) { return seq < e.seq; });
  size_t bytes = 0;
  std::string buf;
  for (; it != index_.end() && out.size() < max_events; ++it) {
    if (!out.empty() && bytes + static_cast<size_t>(it->size) > max_bytes) break;
    buf.resize(static_cast<size_t>(it->size));
    if (!PreadExact(fd_, buf.data(), buf.size(), it->offset)) {
      return absl::InternalError(absl::StrCat("spool: cannot read ", log_path(), " at offset ",
                                              it->offset, ": ", ErrnoMessage(errno)));
    }
    // Re-decode the length prefix; the index does not keep its width.
    uint64_t len = 0;
    size_t vlen = 0;
    for (size_t i = 0; i < buf.size() && i < kMaxVarintBytes; ++i) {
      len |= static_cast<uint64_t>(static_cast<unsigned char>(buf[i]) & 0x7f) << (7 * i);
      if ((static_cast<unsigned char>(buf[i]) & 0x80) == 0) {
        vlen = i + 1;
        break;
      }
    }
    v1::RankEvent event;
    if (vlen == 0 || vlen + len + 4 != buf.size() ||
        !event.ParseFromArray(buf.data() + vlen, static_cast<int>(len))) {
      return absl::DataLossError(
          absl::StrCat("spool: record of agent_seq ", it->seq, " in ", log_path(),
                       " changed on disk; stop the agent and inspect the file"));
    }
    bytes += static_cast<size_t>(it->size);
    out.push_back(std::move(event));
  }
  return out;
}

int64_t Spool::acked_seq() const {
  absl::MutexLock lock(&mu_);
  return acked_;
}

int64_t Spool::last_seq() const {
  absl::MutexLock lock(&mu_);
  return last_seq_;
}

size_t Spool::num_unacked() const {
  absl::MutexLock lock(&mu_);
  return index_.size();
}

int64_t Spool::log_bytes() const {
  absl::MutexLock lock(&mu_);
  return file_size_;
}

}  // namespace ftune::agent
