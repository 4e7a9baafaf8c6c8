// What a job may touch on a host: the paths of a JobSpec
// (model.model_name_or_path, dataset.data_files, dataset.eval_data_files,
// output_dir) checked against allowed roots.
//
// A path is accepted when
//   * it is absolute, at most kMaxSpecPathBytes long, with no control
//     characters and no "." or ".." component (checked on the text, so a
//     path says what it means before anything is resolved);
//   * resolved (realpath: every symlink followed), it lies under one of the
//     allowed roots (the root itself or below it), so a symlink inside a root
//     that points outside is refused like the path it points to;
//   * an input file is a regular file after resolving (not /dev/zero, a FIFO
//     or a directory), the model a directory, whose entries must not lead
//     out of the roots either; an output directory is a directory.
// A path that does not exist (yet) is held to the roots through its nearest
// existing ancestor, resolved; a missing input is then NOT_FOUND, for the
// caller to decide on (the rank reports a missing file as bad input).
// A policy with no roots restricts nothing by place; the other rules still
// hold.
//
// The coordinator may not see the files (they live on the GPU hosts), so it
// uses CheckSpec with must_exist false: a path missing on its host is held
// to the roots as far as it exists there. The agent, which runs where the
// files are, checks again and hands the rank the resolved paths: its check
// is the one that decides.
//
// Resolving a path (lstat, realpath) never opens it: a FIFO or a device in a
// spec cannot block the caller.
//
// Thread-safe: a PathPolicy is immutable after Create.
#ifndef FTUNE_COMMON_FTUNE_PATH_POLICY_H_
#define FTUNE_COMMON_FTUNE_PATH_POLICY_H_

#include <cstddef>
#include <string>
#include <vector>

#include "ftune/status.h"

namespace ftune {

// Longest path a spec may carry (Linux's PATH_MAX).
inline constexpr size_t kMaxSpecPathBytes = 4096;

// The spec's paths, each with the key that names it in messages
// ("dataset.data_files[2]").
struct SpecPaths {
  struct Entry {
    std::string key;
    std::string path;
  };
  Entry model;                 // model.model_name_or_path: a directory
  std::vector<Entry> inputs;   // data and eval files: regular files
  Entry output_dir;            // may be empty: the agent's default
};

class PathPolicy {
 public:
  enum class Kind { kInputFile, kInputDir, kOutputDir };

  // Every root must be absolute (INVALID_ARGUMENT naming it otherwise); it is
  // kept as written (normalized) and, where it exists, resolved.
  static Result<PathPolicy> Create(const std::vector<std::string>& roots);
  PathPolicy() = default;

  bool restricted() const { return !roots_.empty(); }
  // The roots as given (normalized), for messages and logs.
  const std::vector<std::string>& roots() const { return given_; }

  // The text rules alone. INVALID_ARGUMENT: "<key> (<path>) must be ...".
  static Status CheckSyntax(const std::string& key, const std::string& path);

  // The full check of one path; returns it resolved. INVALID_ARGUMENT for a
  // path the policy refuses, NOT_FOUND for a missing input (whose place was
  // checked). A missing output directory is fine: returned as it will be.
  Result<std::string> Check(const std::string& key, const std::string& path, Kind kind) const;

  // Every path of a spec (an empty output_dir is skipped). With must_exist
  // false, an input missing on this host passes. Returns the first problem.
  Status CheckSpec(const SpecPaths& paths, bool must_exist) const;

  // Whether an absolute, normalized path lies under a root (or no roots).
  bool Allows(const std::string& path) const;

 private:
  std::string RootsForMessage() const;

  std::vector<std::string> given_;  // normalized, as configured
  std::vector<std::string> roots_;  // given_ plus their resolved forms
};

// "/a//b/" -> "/a/b"; "/" stays "/". Does not touch "." or "..".
std::string NormalizeSlashes(const std::string& path);

}  // namespace ftune

#endif  // FTUNE_COMMON_FTUNE_PATH_POLICY_H_
