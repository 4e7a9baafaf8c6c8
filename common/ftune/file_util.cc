#include "ftune/file_util.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <utility>

namespace ftune {

std::string ErrnoMessage(int err) {
  char buf[256];
  // GNU strerror_r may return a static string instead of filling buf.
  const char* msg = strerror_r(err, buf, sizeof(buf));
  return msg;
}

Result<OpenedFile> OpenRegularFile(const std::string& path) {
  // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a
  // writer, forever. It is cleared again once fstat says the file is regular.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  if (fd < 0) {
    const int err = errno;
    if (err == ENOENT) return NotFoundError(path + ": no such file");
    return InternalError(path + ": cannot open: " + ErrnoMessage(err));
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    return InternalError(path + ": fstat failed: " + ErrnoMessage(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return InvalidArgumentError(path + ": not a regular file (a device, FIFO, socket or "
                                "directory cannot be read as one)");
  }
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0 || ::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) != 0) {
    const int err = errno;
    ::close(fd);
    return InternalError(path + ": fcntl failed: " + ErrnoMessage(err));
  }
  return OpenedFile{fd, static_cast<uint64_t>(st.st_size)};
}

Result<std::string> ReadFileToString(const std::string& path, uint64_t max_bytes) {
  Result<OpenedFile> opened = OpenRegularFile(path);
  if (!opened.ok()) return opened.status();
  const int fd = opened->fd;
  if (opened->size > max_bytes) {
    ::close(fd);
    return DataLossError(path + ": file is " + std::to_string(opened->size) +
                         " bytes, more than the " + std::to_string(max_bytes) +
                         " bytes allowed for it");
  }
  std::string out(static_cast<size_t>(opened->size), '\0');
  size_t done = 0;
  while (done < out.size()) {
    const ssize_t n = ::read(fd, out.data() + done, out.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::close(fd);
      return InternalError(path + ": read failed: " + ErrnoMessage(err));
    }
    if (n == 0) break;  // shrank while reading: keep what is there
    done += static_cast<size_t>(n);
  }
  ::close(fd);
  out.resize(done);
  return out;
}

AtomicFileWriter::AtomicFileWriter(std::string path, std::string tmp_path, int fd)
    : path_(std::move(path)), tmp_path_(std::move(tmp_path)), fd_(fd) {}

Result<std::unique_ptr<AtomicFileWriter>> AtomicFileWriter::Create(const std::string& path) {
  // pid + a process-wide counter make the name unique among concurrent
  // writers; O_EXCL turns a leftover from a crashed process with a recycled
  // pid into a retry instead of a clobber.
  // IsAtomicFileWriterTemp recognizes these names: change both together.
  static std::atomic<uint64_t> counter{0};
  for (int attempt = 0; attempt < 100; ++attempt) {
    std::string tmp = path + ".tmp." + std::to_string(::getpid()) + "." +
                      std::to_string(counter.fetch_add(1));
    const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd >= 0) {
      return std::unique_ptr<AtomicFileWriter>(new AtomicFileWriter(path, std::move(tmp), fd));
    }
    if (errno != EEXIST) {
      const int err = errno;
      return InternalError(path + ": cannot create temporary file " + tmp + ": " +
                           ErrnoMessage(err));
    }
  }
  return InternalError(path + ": cannot find an unused temporary file name");
}

bool IsAtomicFileWriterTemp(std::string_view file_name, std::string_view dest_name) {
  // The name Create makes: keep the two in step.
  const std::string_view infix = ".tmp.";
  if (dest_name.empty() || file_name.size() <= dest_name.size() + infix.size() ||
      file_name.substr(0, dest_name.size()) != dest_name ||
      file_name.substr(dest_name.size(), infix.size()) != infix) {
    return false;
  }
  const std::string_view rest = file_name.substr(dest_name.size() + infix.size());
  const size_t dot = rest.find('.');
  if (dot == std::string_view::npos) return false;
  const auto all_digits = [](std::string_view s) {
    return !s.empty() &&
           std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
  };
  return all_digits(rest.substr(0, dot)) && all_digits(rest.substr(dot + 1));
}

AtomicFileWriter::~AtomicFileWriter() {
  if (!committed_) Abandon();
}

void AtomicFileWriter::Abandon() {
  if (fd_ >= 0) {
    ::close(fd_);
    fd_ = -1;
  }
  if (!tmp_path_.empty()) {
    ::unlink(tmp_path_.c_str());
    tmp_path_.clear();
  }
}

Status AtomicFileWriter::Append(const void* data, size_t size) {
  if (fd_ < 0) return FailedPreconditionError(path_ + ": writer already finished");
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    const ssize_t n = ::write(fd_, p, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      return InternalError(path_ + ": write to " + tmp_path_ + " failed after " +
                           std::to_string(bytes_written_) + " bytes: " + ErrnoMessage(err));
    }
    p += n;
    size -= static_cast<size_t>(n);
    bytes_written_ += static_cast<uint64_t>(n);
  }
  return OkStatus();
}

Status AtomicFileWriter::Commit() {
  if (fd_ < 0) return FailedPreconditionError(path_ + ": writer already finished");
  if (::fsync(fd_) != 0) {
    const int err = errno;
    Abandon();
    return InternalError(path_ + ": fsync failed: " + ErrnoMessage(err));
  }
  const int rc = ::close(fd_);
  fd_ = -1;
  if (rc != 0) {
    const int err = errno;
    Abandon();
    return InternalError(path_ + ": close failed: " + ErrnoMessage(err));
  }
  if (::rename(tmp_path_.c_str(), path_.c_str()) != 0) {
    const int err = errno;
    Abandon();
    return InternalError(path_ + ": rename from " + tmp_path_ + " failed: " + ErrnoMessage(err));
  }
  tmp_path_.clear();
  committed_ = true;
  return FsyncDirectory(Dirname(path_));
}

Status WriteFileAtomically(const std::string& path, std::string_view contents) {
  FTUNE_ASSIGN_OR_RETURN(std::unique_ptr<AtomicFileWriter> writer,
                                 AtomicFileWriter::Create(path));
  FTUNE_RETURN_IF_ERROR(writer->Append(contents));
  return writer->Commit();
}

Status MakeDirectory(const std::string& dir) {
  if (::mkdir(dir.c_str(), 0755) == 0) return OkStatus();
  const int err = errno;
  if (err == EEXIST && IsDirectory(dir)) return OkStatus();
  return InternalError("cannot create directory " + dir + ": " + ErrnoMessage(err));
}

Status MakeDirectories(const std::string& path) {
  if (path.empty() || IsDirectory(path)) return OkStatus();
  const size_t slash = path.find_last_of('/');
  if (slash != std::string::npos && slash > 0) {
    FTUNE_RETURN_IF_ERROR(MakeDirectories(path.substr(0, slash)));
  }
  return MakeDirectory(path);
}

bool IsDirectory(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool IsRegularFile(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

Result<std::vector<std::string>> ListDirectory(const std::string& dir) {
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return NotFoundError("cannot list " + dir + ": " + ErrnoMessage(errno));
  std::vector<std::string> names;
  while (const dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name != "." && name != "..") names.push_back(name);
  }
  ::closedir(d);
  std::sort(names.begin(), names.end());
  return names;
}

Status RemoveTree(const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return OkStatus();
    return InternalError("cannot stat " + path + ": " + ErrnoMessage(errno));
  }
  if (S_ISDIR(st.st_mode)) {
    FTUNE_ASSIGN_OR_RETURN(std::vector<std::string> names, ListDirectory(path));
    for (const std::string& n : names) FTUNE_RETURN_IF_ERROR(RemoveTree(path + "/" + n));
    if (::rmdir(path.c_str()) != 0) {
      return InternalError("cannot remove " + path + ": " + ErrnoMessage(errno));
    }
    return OkStatus();
  }
  if (::unlink(path.c_str()) != 0) {
    return InternalError("cannot remove " + path + ": " + ErrnoMessage(errno));
  }
  return OkStatus();
}

namespace {

// A "Key:   123 kB" line of /proc/<pid>/status ("self" for this process),
// in bytes; 0 when the file cannot be read or has no such line.
int64_t ProcStatusBytes(const std::string& pid, const char* key) {
  FILE* f = std::fopen(("/proc/" + pid + "/status").c_str(), "r");
  if (f == nullptr) return 0;
  char line[256];
  int64_t kb = 0;
  const size_t n = std::strlen(key);
  while (std::fgets(line, sizeof(line), f) != nullptr) {
    if (std::strncmp(line, key, n) == 0) {
      kb = std::atoll(line + n);
      break;
    }
  }
  std::fclose(f);
  return kb * 1024;
}

}  // namespace

int64_t CurrentRssBytes() { return ProcStatusBytes("self", "VmRSS:"); }
int64_t PeakRssBytes() { return ProcStatusBytes("self", "VmHWM:"); }
int64_t ProcessRssBytes(int64_t pid) { return ProcStatusBytes(std::to_string(pid), "VmRSS:"); }

// Makes a completed rename durable: without the directory fsync a crash can
// leave the old directory entry in place although the data blocks are on
// disk.
Status FsyncDirectory(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return InternalError("cannot open directory " + dir + ": " + ErrnoMessage(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) return InternalError("fsync of directory " + dir + " failed: " + ErrnoMessage(err));
  return OkStatus();
}

std::vector<std::string> TailLines(const std::string& path, size_t max_lines) {
  std::vector<std::string> lines;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return lines;
  constexpr off_t kMaxTail = 64 << 10;
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    return lines;
  }
  const off_t start = std::max<off_t>(0, st.st_size - kMaxTail);
  std::string buf(static_cast<size_t>(st.st_size - start), '\0');
  const ssize_t n = ::pread(fd, buf.data(), buf.size(), start);
  ::close(fd);
  if (n <= 0) return lines;
  buf.resize(static_cast<size_t>(n));
  // A tail that starts mid-file starts mid-line: drop the partial first line.
  size_t begin = 0;
  if (start > 0) {
    const size_t nl = buf.find('\n');
    begin = nl == std::string::npos ? buf.size() : nl + 1;
  }
  std::vector<std::string> all;
  while (begin <= buf.size()) {
    const size_t end = std::min(buf.find('\n', begin), buf.size());
    all.push_back(buf.substr(begin, end - begin));
    begin = end + 1;
  }
  while (!all.empty() && all.back().empty()) all.pop_back();
  const size_t from = all.size() > max_lines ? all.size() - max_lines : 0;
  lines.assign(all.begin() + static_cast<std::ptrdiff_t>(from), all.end());
  return lines;
}

std::string AbsolutePath(const std::string& path) {
  if (!path.empty() && path[0] == '/') return path;
  char cwd[4096];
  if (::getcwd(cwd, sizeof(cwd)) == nullptr) return path;
  if (path.empty() || path == ".") return cwd;
  std::string p = path;
  if (p.rfind("./", 0) == 0) p = p.substr(2);
  return std::string(cwd) + "/" + p;
}

std::string Dirname(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

}  // namespace ftune
