// Small POSIX file helpers shared by the spool and the rank supervisor. Each
// error names the path and the OS reason, so the operator knows what to fix.
//
// Thread-safe: the functions keep no state.
#ifndef FTUNE_WORKER_AGENT_FILE_UTIL_H_
#define FTUNE_WORKER_AGENT_FILE_UTIL_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace ftune::agent {

// mkdir -p. Fails when a component exists and is not a directory.
absl::Status MakeDirs(const std::string& path);

// Writes content to path through path.tmp + fsync + rename + fsync of the
// directory, so a crash leaves either the old or the new file, never a torn one.
absl::Status WriteFileAtomic(const std::string& path, const std::string& content);

absl::StatusOr<std::string> ReadFile(const std::string& path);

// fsync of a directory, making renames and creations in it durable.
absl::Status FsyncDir(const std::string& dir);

// The last max_lines lines of a text file (reading at most its last 64 KiB),
// without trailing newlines. Empty when the file is missing or empty.
std::vector<std::string> TailLines(const std::string& path, size_t max_lines);

// Absolute form of path (relative to the current directory); no symlink
// resolution, so the path need not exist.
std::string AbsolutePath(const std::string& path);

std::string Dirname(const std::string& path);

// "errno text" for the current errno, e.g. "Permission denied".
std::string ErrnoText(int err);

}  // namespace ftune::agent

#endif  // FTUNE_WORKER_AGENT_FILE_UTIL_H_
