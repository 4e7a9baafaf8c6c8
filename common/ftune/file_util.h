// The one set of POSIX file helpers of every module: bounded whole-file
// reads (config.json, index files, token files), atomic writes (adapters,
// checkpoints, the agent's spool state), directories, log tails and the
// process's memory. Errors name the path and the OS reason. The control
// plane converts the Status with ftune/absl_status.h.
//
// Atomicity: AtomicFileWriter writes to a unique temporary file in the
// destination's directory, and Commit() fsyncs it, renames it over the
// destination and fsyncs the directory. A reader therefore sees either the old
// file or the complete new one, never a torn file, also across a crash; a
// writer that is destroyed without Commit() removes its temporary file.
//
// Thread-safety: the free functions may be called from any thread. An
// AtomicFileWriter is used by one thread at a time; different writers (even
// for the same destination) are independent, and the last Commit() wins.
#ifndef FTUNE_COMMON_FTUNE_FILE_UTIL_H_
#define FTUNE_COMMON_FTUNE_FILE_UTIL_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "ftune/status.h"

namespace ftune {

// The bound for small files read whole: tokens, TLS keys, state files.
inline constexpr uint64_t kMaxSmallFileBytes = 16ull << 20;

// Reads a whole regular file. Files larger than max_bytes are refused
// (DATA_LOSS naming the path and both sizes) instead of being read: config
// and index files are small, and a huge one is a mistake, not a model.
// A missing file is NOT_FOUND.
Result<std::string> ReadFileToString(const std::string& path, uint64_t max_bytes);

// An open read-only descriptor of a regular file and its size. Errors name
// the path: NOT_FOUND when missing, INVALID_ARGUMENT when not a regular file.
// Never blocks on a FIFO or a device: the file is opened non-blocking and
// checked with fstat before anything is read.
struct OpenedFile {
  int fd = -1;  // owned by the caller
  uint64_t size = 0;
};
Result<OpenedFile> OpenRegularFile(const std::string& path);

// strerror(errno) as a string, for messages.
std::string ErrnoMessage(int err);

class AtomicFileWriter {
 public:
  // Creates "<path>.tmp.<pid>.<n>" (mode 0644 before umask) next to path.
  static Result<std::unique_ptr<AtomicFileWriter>> Create(const std::string& path);
  ~AtomicFileWriter();  // removes the temporary file unless committed
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;

  Status Append(const void* data, size_t size);
  Status Append(std::string_view data) { return Append(data.data(), data.size()); }
  // Makes the written bytes the content of path. The writer is finished
  // afterwards whatever the outcome; a failed Commit leaves path untouched.
  Status Commit();

  const std::string& path() const { return path_; }
  uint64_t bytes_written() const { return bytes_written_; }

 private:
  AtomicFileWriter(std::string path, std::string tmp_path, int fd);
  void Abandon();

  std::string path_;
  std::string tmp_path_;
  int fd_ = -1;
  uint64_t bytes_written_ = 0;
  bool committed_ = false;
};

// Whether file_name (no directory) is a temporary file that
// AtomicFileWriter::Create makes for the destination dest_name in the same
// directory: exactly "<dest_name>.tmp.<pid>.<n>", both decimal numbers. A
// crash between Append and Commit leaves such a file behind; an owner of a
// directory may remove those of its own destinations when it starts (the
// agent's spool does). Nothing here removes them by itself: other writers'
// temporaries may belong to a live process.
bool IsAtomicFileWriterTemp(std::string_view file_name, std::string_view dest_name);

// Writes contents to path atomically (AtomicFileWriter in one call).
Status WriteFileAtomically(const std::string& path, std::string_view contents);

// mkdir that succeeds when the directory already exists; the parent must.
Status MakeDirectory(const std::string& dir);
// mkdir -p. (Not std::filesystem: the pip LibTorch on GPU hosts exports its
// own std::filesystem symbols, which interpose on ours and crash.)
Status MakeDirectories(const std::string& path);
// Whether path names an existing directory / regular file.
bool IsDirectory(const std::string& path);
bool IsRegularFile(const std::string& path);
// Names in dir (no "." or ".."), sorted; NOT_FOUND when dir cannot be listed.
Result<std::vector<std::string>> ListDirectory(const std::string& dir);
// rm -r of a directory tree ftune wrote (regular files and directories).
Status RemoveTree(const std::string& path);

// This process's resident set size now and at its peak (VmRSS / VmHWM of
// /proc/self/status), in bytes; 0 where /proc is unavailable.
// fsync of a directory (after a rename or a create in it).
Status FsyncDirectory(const std::string& dir);
// The last max_lines lines of a text file (at most its last 64 KiB); empty
// when it cannot be read. For error reports, not for data.
std::vector<std::string> TailLines(const std::string& path, size_t max_lines);
// `path` against the working directory when relative ("" and "." are the
// working directory); unchanged when absolute.
std::string AbsolutePath(const std::string& path);
// "a/b/c" -> "a/b"; "c" -> "."; "/c" -> "/".
std::string Dirname(const std::string& path);

int64_t CurrentRssBytes();
int64_t PeakRssBytes();
// Another process' resident set; 0 when it cannot be read (e.g. it exited).
int64_t ProcessRssBytes(int64_t pid);

}  // namespace ftune

#endif  // FTUNE_COMMON_FTUNE_FILE_UTIL_H_
