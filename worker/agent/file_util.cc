#include "worker/agent/file_util.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace ftune::agent {

std::string ErrnoText(int err) { return strerror(err); }

absl::Status MakeDirs(const std::string& path) {
  if (path.empty())
    return absl::InvalidArgumentError("cannot create a directory with an empty path");
  std::string cur;
  if (path[0] == '/') cur = "/";
  for (absl::string_view part : absl::StrSplit(path, '/', absl::SkipEmpty())) {
    if (!cur.empty() && cur.back() != '/') cur += '/';
    cur.append(part.data(), part.size());
    if (::mkdir(cur.c_str(), 0755) == 0) continue;
    const int err = errno;
    struct stat st;
    if (err == EEXIST && ::stat(cur.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) continue;
    return absl::FailedPreconditionError(
        absl::StrCat("cannot create directory ", cur, ": ",
                     err == EEXIST ? "a file with that name exists" : ErrnoText(err)));
  }
  return absl::OkStatus();
}

std::string Dirname(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

absl::Status FsyncDir(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0)
    return absl::FailedPreconditionError(
        absl::StrCat("cannot open directory ", dir, ": ", ErrnoText(errno)));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0)
    return absl::InternalError(
        absl::StrCat("fsync of directory ", dir, " failed: ", ErrnoText(err)));
  return absl::OkStatus();
}

absl::Status WriteFileAtomic(const std::string& path, const std::string& content) {
  const std::string tmp = path + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0)
    return absl::FailedPreconditionError(
        absl::StrCat("cannot create ", tmp, ": ", ErrnoText(errno)));
  const char* p = content.data();
  size_t left = content.size();
  while (left > 0) {
    ssize_t n = ::write(fd, p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      return absl::InternalError(absl::StrCat("cannot write ", tmp, ": ", ErrnoText(err)));
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) {
    const int err = errno;
    ::close(fd);
    ::unlink(tmp.c_str());
    return absl::InternalError(absl::StrCat("fsync of ", tmp, " failed: ", ErrnoText(err)));
  }
  ::close(fd);
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    return absl::InternalError(
        absl::StrCat("cannot rename ", tmp, " to ", path, ": ", ErrnoText(err)));
  }
  return FsyncDir(Dirname(path));
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    const std::string msg = absl::StrCat("cannot open ", path, ": ", ErrnoText(err));
    return err == ENOENT ? absl::NotFoundError(msg) : absl::FailedPreconditionError(msg);
  }
  std::string out;
  char buf[65536];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      ::close(fd);
      return absl::InternalError(absl::StrCat("cannot read ", path, ": ", ErrnoText(err)));
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  return out;
}

std::vector<std::string> TailLines(const std::string& path, size_t max_lines) {
  std::vector<std::string> lines;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return lines;
  constexpr off_t kMaxTail = 64 << 10;
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    return lines;
  }
  const off_t start = std::max<off_t>(0, st.st_size - kMaxTail);
  std::string buf(static_cast<size_t>(st.st_size - start), '\0');
  ssize_t n = ::pread(fd, buf.data(), buf.size(), start);
  ::close(fd);
  if (n <= 0) return lines;
  buf.resize(static_cast<size_t>(n));
  // A tail that starts mid-file starts mid-line: drop the partial first line.
  size_t begin = 0;
  if (start > 0) {
    const size_t nl = buf.find('\n');
    begin = nl == std::string::npos ? buf.size() : nl + 1;
  }
  std::vector<std::string> all = absl::StrSplit(absl::string_view(buf).substr(begin), '\n');
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
  return absl::StrCat(cwd, "/", p);
}

}  // namespace ftune::agent
