// A fresh directory under $TMPDIR (or /tmp) for one test, removed with
// everything in it when the object goes out of scope.
#ifndef FTUNE_TESTS_COMMON_TEMP_DIR_H_
#define FTUNE_TESTS_COMMON_TEMP_DIR_H_

#include <ftw.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <cstdio>
#include <stdexcept>
#include <string>

namespace ftune::testutil {

class TempDir {
 public:
  // `name` makes the directory recognisable: <tmp>/<name>.XXXXXX.
  explicit TempDir(const std::string& name = "ftune_test") {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base != nullptr && *base != '\0' ? base : "/tmp") + "/" +
                       name + ".XXXXXX";
    if (::mkdtemp(tmpl.data()) == nullptr) throw std::runtime_error("mkdtemp " + tmpl + " failed");
    path_ = tmpl;
  }
  ~TempDir() {
    ::nftw(path_.c_str(),
           [](const char* p, const struct stat*, int, struct FTW*) { return std::remove(p); }, 16,
           FTW_DEPTH | FTW_PHYS);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

}  // namespace ftune::testutil

#endif  // FTUNE_TESTS_COMMON_TEMP_DIR_H_
