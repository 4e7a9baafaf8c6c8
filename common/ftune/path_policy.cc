#include "ftune/path_policy.h"

#include <dirent.h>
#include <sys/stat.h>

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <memory>

#include "ftune/file_util.h"

namespace ftune {
namespace {

bool Under(const std::string& path, const std::string& root) {
  if (root == "/") return true;
  return path == root || (path.size() > root.size() && path.compare(0, root.size(), root) == 0 &&
                          path[root.size()] == '/');
}

// realpath(3) of an existing path; errno-style failure as a Status.
Result<std::string> RealPath(const std::string& path) {
  std::unique_ptr<char, decltype(&std::free)> resolved(::realpath(path.c_str(), nullptr),
                                                       &std::free);
  if (resolved == nullptr) {
    const int err = errno;
    if (err == ENOENT || err == ENOTDIR) return NotFoundError(path + ": no such file");
    return InvalidArgumentError(path + ": cannot be resolved: " + ErrnoMessage(err));
  }
  return std::string(resolved.get());
}

std::string Quoted(const std::string& key, const std::string& path) {
  return key + " (" + path + ")";
}

}  // namespace

std::string NormalizeSlashes(const std::string& path) {
  std::string out;
  out.reserve(path.size());
  for (char c : path) {
    if (c == '/' && !out.empty() && out.back() == '/') continue;
    out += c;
  }
  while (out.size() > 1 && out.back() == '/') out.pop_back();
  return out;
}

Result<PathPolicy> PathPolicy::Create(const std::vector<std::string>& roots) {
  PathPolicy p;
  for (const std::string& r : roots) {
    if (r.empty() || r[0] != '/') {
      return InvalidArgumentError("allowed root '" + r + "' must be an absolute path");
    }
    const std::string given = NormalizeSlashes(r);
    p.given_.push_back(given);
    p.roots_.push_back(given);
    Result<std::string> resolved = RealPath(given);
    if (resolved.ok() && *resolved != given) p.roots_.push_back(*resolved);
  }
  return p;
}

Status PathPolicy::CheckSyntax(const std::string& key, const std::string& path) {
  const std::string shown = path.size() > 200 ? path.substr(0, 200) + "..." : path;
  if (path.empty()) return InvalidArgumentError(key + " is empty; it must be an absolute path");
  if (path.size() > kMaxSpecPathBytes) {
    return InvalidArgumentError(Quoted(key, shown) + " is " + std::to_string(path.size()) +
                                " bytes long, more than the " +
                                std::to_string(kMaxSpecPathBytes) + " a path may have");
  }
  for (char c : path) {
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) {
      return InvalidArgumentError(Quoted(key, shown) + " must not contain control characters");
    }
  }
  if (path[0] != '/') {
    return InvalidArgumentError(Quoted(key, shown) +
                                " must be an absolute path (ranks run in another directory)");
  }
  size_t start = 1;
  while (start <= path.size()) {
    size_t end = path.find('/', start);
    if (end == std::string::npos) end = path.size();
    const std::string part = path.substr(start, end - start);
    if (part == "." || part == "..") {
      return InvalidArgumentError(Quoted(key, shown) + " must not contain '" + part +
                                  "' components; give the path it means");
    }
    start = end + 1;
  }
  return OkStatus();
}

bool PathPolicy::Allows(const std::string& path) const {
  if (roots_.empty()) return true;
  for (const std::string& r : roots_)
    if (Under(path, r)) return true;
  return false;
}

std::string PathPolicy::RootsForMessage() const {
  std::string out;
  for (const std::string& r : given_) out += (out.empty() ? "" : ", ") + r;
  return out;
}

Result<std::string> PathPolicy::Check(const std::string& key, const std::string& path,
                                      Kind kind) const {
  FTUNE_RETURN_IF_ERROR(CheckSyntax(key, path));
  const std::string normalized = NormalizeSlashes(path);
  const auto outside = [&](const std::string& resolved) {
    std::string msg = Quoted(key, path);
    if (resolved != normalized) msg += ", which resolves to " + resolved + ",";
    return InvalidArgumentError(msg + " is outside the allowed roots (" + RootsForMessage() +
                                ")");
  };
  // Where the path leads as far as it exists: its nearest existing
  // ancestor resolved, plus the rest. A path that does not exist yet (an
  // output directory, an input the rank will find missing) is held to the
  // roots by that.
  std::string existing = normalized;
  std::string rest;
  struct stat lst;
  while (::lstat(existing.c_str(), &lst) != 0) {
    if (errno != ENOENT && errno != ENOTDIR) {
      return InvalidArgumentError(Quoted(key, path) + " cannot be checked: " +
                                  ErrnoMessage(errno));
    }
    const size_t slash = existing.rfind('/');
    rest = existing.substr(slash) + rest;
    existing = slash == 0 ? "/" : existing.substr(0, slash);
  }
  Result<std::string> prefix = RealPath(existing);
  if (!prefix.ok()) {
    // A dangling symlink: where it would lead is not known, so nowhere.
    return InvalidArgumentError(Quoted(key, path) + ": " + existing +
                                " cannot be resolved (a dangling symlink?)");
  }
  const std::string full = NormalizeSlashes(*prefix + rest);
  if (!Allows(full)) return outside(full);
  if (!rest.empty()) {
    if (!IsDirectory(*prefix)) {
      return InvalidArgumentError(Quoted(key, path) + ": " + existing + " is not a directory");
    }
    if (kind == Kind::kOutputDir) return full;
    return NotFoundError(Quoted(key, path) + " does not exist on this host");
  }
  Result<std::string> resolved = prefix;
  if (kind == Kind::kOutputDir) {
    if (!IsDirectory(*resolved)) {
      return InvalidArgumentError(Quoted(key, path) + " is not a directory");
    }
    return *resolved;
  }
  if (!Allows(*resolved)) return outside(*resolved);
  struct stat st;
  if (::stat(resolved->c_str(), &st) != 0) {
    return InvalidArgumentError(Quoted(key, path) + " cannot be checked: " + ErrnoMessage(errno));
  }
  if (kind == Kind::kInputFile && !S_ISREG(st.st_mode)) {
    return InvalidArgumentError(Quoted(key, path) +
                                " is not a regular file (a device, FIFO, socket or directory "
                                "cannot be a data file)");
  }
  if (kind == Kind::kInputDir) {
    if (!S_ISDIR(st.st_mode)) {
      return InvalidArgumentError(Quoted(key, path) + " is not a directory");
    }
    // The rank opens the files in it (config, weights, tokenizer): a
    // symlink among them must not lead out of the roots either.
    if (restricted()) {
      Result<std::vector<std::string>> names = ListDirectory(*resolved);
      if (!names.ok()) return InvalidArgumentError(key + ": " + names.status().message());
      for (const std::string& n : *names) {
        const std::string entry = *resolved + "/" + n;
        Result<std::string> target = RealPath(entry);
        if (target.ok() && !Allows(*target)) {
          return InvalidArgumentError(Quoted(key, path) + " holds " + n + ", which resolves to " +
                                      *target + ", outside the allowed roots (" +
                                      RootsForMessage() + ")");
        }
      }
    }
  }
  return *resolved;
}

Status PathPolicy::CheckSpec(const SpecPaths& paths, bool must_exist) const {
  const auto one = [&](const SpecPaths::Entry& e, Kind kind) -> Status {
    Result<std::string> r = Check(e.key, e.path, kind);
    if (r.ok()) return OkStatus();
    // NOT_FOUND comes after the place was checked (as far as the path
    // exists here).
    if (must_exist || r.status().code() != StatusCode::kNotFound) return r.status();
    return OkStatus();
  };
  FTUNE_RETURN_IF_ERROR(one(paths.model, Kind::kInputDir));
  for (const SpecPaths::Entry& e : paths.inputs) FTUNE_RETURN_IF_ERROR(one(e, Kind::kInputFile));
  if (!paths.output_dir.path.empty())
    FTUNE_RETURN_IF_ERROR(one(paths.output_dir, Kind::kOutputDir));
  return OkStatus();
}

}  // namespace ftune
