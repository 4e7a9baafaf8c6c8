// A full disk for one test, without a filesystem to fill: while a FullDisk
// lives no file of this process may grow past `bytes` (RLIMIT_FSIZE), so a
// write beyond fails with EFBIG, as it would with ENOSPC on a full disk.
// SIGXFSZ is ignored meanwhile (it would kill the process).
#ifndef FTUNE_TESTS_COMMON_FULL_DISK_H_
#define FTUNE_TESTS_COMMON_FULL_DISK_H_

#include <signal.h>
#include <sys/resource.h>

#include <cstdint>

#include <gtest/gtest.h>

namespace ftune::testutil {

class FullDisk {
 public:
  explicit FullDisk(uintmax_t bytes) {
    old_handler_ = ::signal(SIGXFSZ, SIG_IGN);
    ::getrlimit(RLIMIT_FSIZE, &old_);
    struct rlimit full = old_;
    full.rlim_cur = bytes;
    EXPECT_EQ(::setrlimit(RLIMIT_FSIZE, &full), 0);
  }
  ~FullDisk() {
    ::setrlimit(RLIMIT_FSIZE, &old_);
    ::signal(SIGXFSZ, old_handler_);
  }
  FullDisk(const FullDisk&) = delete;
  FullDisk& operator=(const FullDisk&) = delete;

 private:
  struct rlimit old_;
  sighandler_t old_handler_;
};

}  // namespace ftune::testutil

#endif  // FTUNE_TESTS_COMMON_FULL_DISK_H_
