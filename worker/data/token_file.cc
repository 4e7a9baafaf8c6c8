// See token_file.h.
#include "worker/data/token_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>

namespace ftune::data {
namespace {

constexpr uint32_t kHeaderSize = 128;
constexpr uint64_t kAlign = 64;
constexpr uint32_t kFlagPacked = 1;

uint64_t AlignUp(uint64_t v) { return (v + kAlign - 1) / kAlign * kAlign; }

template <typename T>
void Put(uint8_t* header, size_t offset, T value) {
  std::memcpy(header + offset, &value, sizeof(T));
}
template <typename T>
T Get(const uint8_t* header, size_t offset) {
  T value;
  std::memcpy(&value, header + offset, sizeof(T));
  return value;
}

bool LittleEndianHost() {
  const uint16_t one = 1;
  uint8_t first;
  std::memcpy(&first, &one, 1);
  return first == 1;
}

std::string Errno() { return std::strerror(errno); }

std::string DirName(const std::string& path) {
  const size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

// Writes all of [data, data+n) or fails.
bool WriteAll(int fd, const void* data, size_t n) {
  const auto* p = static_cast<const uint8_t*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  int get() const { return fd_; }
  int release() {
    const int fd = fd_;
    fd_ = -1;
    return fd;
  }

 private:
  int fd_;
};

}  // namespace

Status WriteTokenFile(const std::string& path, const std::vector<Row>& rows,
                      const TokenFileHeaderInfo& info) {
  if (!LittleEndianHost()) return InternalError("token files are little-endian; this host is not");
  int64_t num_tokens = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    const Row& r = rows[i];
    if (r.labels.size() != r.input_ids.size() || r.position_ids.size() != r.input_ids.size()) {
      return InternalError(path + ": row " + std::to_string(i) + " has arrays of different lengths");
    }
    if (static_cast<int64_t>(r.input_ids.size()) > info.max_seq_len) {
      return InternalError(path + ": row " + std::to_string(i) + " has " +
                           std::to_string(r.input_ids.size()) + " tokens, more than max_seq_len " +
                           std::to_string(info.max_seq_len));
    }
    num_tokens += static_cast<int64_t>(r.input_ids.size());
  }
  const uint64_t num_rows = rows.size();
  const uint64_t offsets_at = AlignUp(kHeaderSize);
  const uint64_t ids_at = AlignUp(offsets_at + (num_rows + 1) * sizeof(int64_t));
  const uint64_t tokens_bytes = static_cast<uint64_t>(num_tokens) * sizeof(int32_t);
  const uint64_t labels_at = AlignUp(ids_at + tokens_bytes);
  const uint64_t positions_at = AlignUp(labels_at + tokens_bytes);
  const uint64_t metadata_at = AlignUp(positions_at + tokens_bytes);
  const uint64_t file_size = metadata_at + info.metadata_json.size();

  uint8_t header[kHeaderSize] = {};
  std::memcpy(header, kTokenFileMagic, 8);
  Put<uint32_t>(header, 8, kTokenFileVersion);
  Put<uint32_t>(header, 12, kHeaderSize);
  Put<int64_t>(header, 16, static_cast<int64_t>(num_rows));
  Put<int64_t>(header, 24, num_tokens);
  Put<int64_t>(header, 32, info.max_seq_len);
  Put<int32_t>(header, 40, info.pad_token_id);
  Put<uint32_t>(header, 44, info.packed ? kFlagPacked : 0);
  Put<uint64_t>(header, 48, offsets_at);
  Put<uint64_t>(header, 56, ids_at);
  Put<uint64_t>(header, 64, labels_at);
  Put<uint64_t>(header, 72, positions_at);
  Put<uint64_t>(header, 80, metadata_at);
  Put<uint64_t>(header, 88, info.metadata_json.size());
  Put<uint64_t>(header, 96, file_size);

  static std::atomic<uint64_t> counter{0};
  const std::string tmp = path + ".tmp." + std::to_string(::getpid()) + "." +
                          std::to_string(counter.fetch_add(1)) + "." +
                          std::to_string(std::chrono::steady_clock::now().time_since_epoch().count());
  Fd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644));
  if (fd.get() < 0) return InternalError(tmp + ": cannot create: " + Errno());
  uint64_t written = 0;
  const std::vector<uint8_t> zeros(kAlign, 0);
  auto pad_to = [&](uint64_t at) { return WriteAll(fd.get(), zeros.data(), at - written) && ((written = at), true); };
  auto put = [&](const void* data, size_t n) { return WriteAll(fd.get(), data, n) && ((written += n), true); };
  bool ok = put(header, kHeaderSize) && pad_to(offsets_at);
  int64_t offset = 0;
  ok = ok && put(&offset, sizeof offset);
  for (size_t i = 0; ok && i < rows.size(); ++i) {
    offset += static_cast<int64_t>(rows[i].input_ids.size());
    ok = put(&offset, sizeof offset);
  }
  ok = ok && pad_to(ids_at);
  for (size_t i = 0; ok && i < rows.size(); ++i) ok = put(rows[i].input_ids.data(), rows[i].input_ids.size() * 4);
  ok = ok && pad_to(labels_at);
  for (size_t i = 0; ok && i < rows.size(); ++i) ok = put(rows[i].labels.data(), rows[i].labels.size() * 4);
  ok = ok && pad_to(positions_at);
  for (size_t i = 0; ok && i < rows.size(); ++i) {
    ok = put(rows[i].position_ids.data(), rows[i].position_ids.size() * 4);
  }
  ok = ok && pad_to(metadata_at) && put(info.metadata_json.data(), info.metadata_json.size());
  if (!ok || ::fsync(fd.get()) != 0) {
    const std::string err = Errno();
    ::unlink(tmp.c_str());
    return InternalError(tmp + ": write failed: " + err);
  }
  ::close(fd.release());
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string err = Errno();
    ::unlink(tmp.c_str());
    return InternalError(path + ": cannot rename the finished file into place: " + err);
  }
  Fd dir(::open(DirName(path).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dir.get() >= 0) ::fsync(dir.get());  // the rename itself survives a crash
  return OkStatus();
}

Result<std::unique_ptr<TokenFile>> TokenFile::Open(const std::string& path) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) return NotFoundError(path + ": cannot open the token file: " + Errno());
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) return InternalError(path + ": fstat: " + Errno());
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  auto bad = [&](const std::string& what) {
    return DataLossError(path + ": not a valid ftune token file: " + what +
                         " (delete it and run `ftune data prepare` again)");
  };
  if (size < kHeaderSize) return bad("shorter than its " + std::to_string(kHeaderSize) + "-byte header");
  std::unique_ptr<TokenFile> f(new TokenFile());
  f->path_ = path;
  f->map_ = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd.get(), 0);
  if (f->map_ == MAP_FAILED) {
    f->map_ = nullptr;
    return InternalError(path + ": mmap: " + Errno());
  }
  f->map_size_ = size;
  const auto* base = static_cast<const uint8_t*>(f->map_);
  if (std::memcmp(base, kTokenFileMagic, 8) != 0) return bad("wrong magic");
  const uint32_t version = Get<uint32_t>(base, 8);
  if (version != kTokenFileVersion) {
    return bad("version " + std::to_string(version) + ", this build reads version " +
               std::to_string(kTokenFileVersion));
  }
  if (Get<uint32_t>(base, 12) != kHeaderSize) return bad("unexpected header size");
  f->num_rows_ = Get<int64_t>(base, 16);
  f->num_tokens_ = Get<int64_t>(base, 24);
  f->max_seq_len_ = Get<int64_t>(base, 32);
  f->pad_token_id_ = Get<int32_t>(base, 40);
  f->packed_ = (Get<uint32_t>(base, 44) & kFlagPacked) != 0;
  const uint64_t offsets_at = Get<uint64_t>(base, 48), ids_at = Get<uint64_t>(base, 56),
                 labels_at = Get<uint64_t>(base, 64), positions_at = Get<uint64_t>(base, 72),
                 metadata_at = Get<uint64_t>(base, 80), metadata_size = Get<uint64_t>(base, 88),
                 file_size = Get<uint64_t>(base, 96);
  if (file_size != size) {
    return bad("header says " + std::to_string(file_size) + " bytes, file has " + std::to_string(size) +
               " (truncated?)");
  }
  if (f->num_rows_ < 0 || f->num_tokens_ < 0 || f->max_seq_len_ <= 0 ||
      static_cast<uint64_t>(f->num_rows_) > size / 8 || static_cast<uint64_t>(f->num_tokens_) > size / 4) {
    return bad("impossible counts in the header");
  }
  const uint64_t tokens_bytes = static_cast<uint64_t>(f->num_tokens_) * 4;
  auto section_ok = [&](uint64_t at, uint64_t bytes) {
    return at % kAlign == 0 && at >= kHeaderSize && at <= size && bytes <= size - at;
  };
  if (!section_ok(offsets_at, (static_cast<uint64_t>(f->num_rows_) + 1) * 8) ||
      !section_ok(ids_at, tokens_bytes) || !section_ok(labels_at, tokens_bytes) ||
      !section_ok(positions_at, tokens_bytes) || metadata_at > size || metadata_size > size - metadata_at) {
    return bad("a section lies outside the file");
  }
  f->row_offsets_ = reinterpret_cast<const int64_t*>(base + offsets_at);
  f->input_ids_ = reinterpret_cast<const int32_t*>(base + ids_at);
  f->labels_ = reinterpret_cast<const int32_t*>(base + labels_at);
  f->position_ids_ = reinterpret_cast<const int32_t*>(base + positions_at);
  f->metadata_ = std::string_view(reinterpret_cast<const char*>(base + metadata_at), metadata_size);
  if (f->row_offsets_[0] != 0 || f->row_offsets_[f->num_rows_] != f->num_tokens_) {
    return bad("the row index does not span the tokens");
  }
  for (int64_t i = 0; i < f->num_rows_; ++i) {
    const int64_t len = f->row_offsets_[i + 1] - f->row_offsets_[i];
    if (len < 0 || len > f->max_seq_len_) {
      return bad("row " + std::to_string(i) + " has length " + std::to_string(len) +
                 " (max_seq_len " + std::to_string(f->max_seq_len_) + ")");
    }
  }
  return f;
}

TokenFile::~TokenFile() {
  if (map_ != nullptr) ::munmap(map_, map_size_);
}

TokenRow TokenFile::row(int64_t i) const {
  const int64_t begin = row_offsets_[i];
  return {input_ids_ + begin, labels_ + begin, position_ids_ + begin, row_offsets_[i + 1] - begin};
}

}  // namespace ftune::data
