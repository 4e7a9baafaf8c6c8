// A fresh directory for one test (under $TMPDIR, /tmp or a given parent),
// removed with everything in it when the object goes out of scope, unless
// Keep() was called (a failed test's logs). Every test that needs a
// temporary directory uses this one.
#ifndef FTUNE_TESTS_COMMON_TEMP_DIR_H_
#define FTUNE_TESTS_COMMON_TEMP_DIR_H_

#include <ftw.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>

#include <gtest/gtest.h>

namespace ftune::testutil {

class TempDir {
 public:
  // `name` makes the directory recognisable: <parent>/<name>.XXXXXX, where
  // parent is $TMPDIR (or /tmp) unless given (e.g. the working directory,
  // where a test needs a disk filesystem rather than a tmpfs).
  explicit TempDir(const std::string& name = "ftune_test", const std::string& parent = "") {
    const char* tmp = std::getenv("TMPDIR");
    const std::string dir =
        !parent.empty() ? parent : (tmp != nullptr && *tmp != '\0' ? tmp : "/tmp");
    std::string tmpl = dir + "/" + name + ".XXXXXX";
    if (::mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp " + tmpl + " failed");
    path_ = tmpl;
  }
  ~TempDir() {
    if (keep_) return;
    ::nftw(path_.c_str(),
           [](const char* p, const struct stat*, int, struct FTW*) { return std::remove(p); }, 16,
           FTW_DEPTH | FTW_PHYS);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }

  // Leaves the directory and its contents on disk.
  void Keep() { keep_ = true; }

 private:
  std::string path_;
  bool keep_ = false;
};

// One TempDir shared by every test of a test binary, for helpers that hand
// out file paths: made at the first call, removed after the last test by a
// gtest Environment (inside main, so a forked child that calls exit() leaves
// it alone). The first call's `name` names it.
inline std::string SharedTempDir(const std::string& name = "ftune_test") {
  static std::unique_ptr<TempDir>* dir = [] {
    auto* d = new std::unique_ptr<TempDir>();
    class Cleanup : public ::testing::Environment {
     public:
      explicit Cleanup(std::unique_ptr<TempDir>* d) : d_(d) {}
      void TearDown() override { d_->reset(); }

     private:
      std::unique_ptr<TempDir>* d_;
    };
    ::testing::AddGlobalTestEnvironment(new Cleanup(d));
    return d;
  }();
  if (*dir == nullptr) *dir = std::make_unique<TempDir>(name);
  return (*dir)->path();
}

}  // namespace ftune::testutil

#endif  // FTUNE_TESTS_COMMON_TEMP_DIR_H_
