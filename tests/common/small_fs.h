// A small filesystem for one test, to fill for real: a tmpfs of a given
// size mounted on a fresh directory, so that once it is full every write
// that needs a new block fails with ENOSPC (SQLite: SQLITE_FULL), as on a
// real full disk, for every process. full_disk.h's file size limit is
// per process and per file, and fails with EFBIG.
//
// Fill() grows a filler file until the filesystem refuses more (or leaves
// a given room); MakeRoom() deletes it. Processes writing there meanwhile
// see the disk go full and come back without being touched. Space they
// free themselves (a file truncated or deleted) is theirs again at once,
// as on a real disk.
//
// Mounting needs CAP_SYS_ADMIN: where the kernel refuses it (EPERM: not
// root, or an unprivileged container) skip_reason() says so and the test
// should GTEST_SKIP; any other failure fails the test. The destructor
// unmounts, lazily (MNT_DETACH) if a process still has files open there,
// and removes the directory.
//
// Thread-safety: none; one thread (the test's) uses it.
#ifndef FTUNE_TESTS_COMMON_SMALL_FS_H_
#define FTUNE_TESTS_COMMON_SMALL_FS_H_

#include <errno.h>
#include <fcntl.h>
#include <linux/magic.h>
#include <sys/mount.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>

#include <gtest/gtest.h>

#include "temp_dir.h"

namespace ftune::testutil {

class SmallFs {
 public:
  // A tmpfs of `bytes` (rounded up to whole pages) on <$TMPDIR>/<name>.XXXXXX.
  explicit SmallFs(uint64_t bytes, const std::string& name = "ftune_small_fs") : dir_(name) {
    const std::string options = "size=" + std::to_string(bytes) + ",mode=0755";
    if (::mount("ftune-test", dir_.path().c_str(), "tmpfs", MS_NOSUID | MS_NODEV,
                options.c_str()) != 0) {
      const int err = errno;
      if (err == EPERM) {
        skip_reason_ = "mounting a " + std::to_string(bytes) + "-byte tmpfs on " + dir_.path() +
                       " is not permitted here (EPERM: it needs CAP_SYS_ADMIN, which a "
                       "non-root user or an unprivileged container lacks)";
      } else {
        ADD_FAILURE() << "mount -t tmpfs -o " << options << " " << dir_.path() << ": "
                      << std::strerror(err);
      }
      return;
    }
    mounted_ = true;
    // What is mounted is what was asked for: a tmpfs, not the directory's
    // own filesystem, of that size.
    struct statfs st {};
    if (::statfs(dir_.path().c_str(), &st) != 0) {
      ADD_FAILURE() << "statfs " << dir_.path() << ": " << std::strerror(errno);
      return;
    }
    const uint64_t block = static_cast<uint64_t>(st.f_bsize);
    EXPECT_EQ(st.f_type, static_cast<decltype(st.f_type)>(TMPFS_MAGIC))
        << dir_.path() << " is not a tmpfs";
    EXPECT_EQ(static_cast<uint64_t>(st.f_blocks) * block, (bytes + block - 1) / block * block)
        << dir_.path() << " is not " << bytes << " bytes";
    EXPECT_EQ(static_cast<uint64_t>(st.f_bfree), static_cast<uint64_t>(st.f_blocks))
        << dir_.path() << " is not empty";
  }

  ~SmallFs() {
    if (!mounted_) return;
    if (::umount2(dir_.path().c_str(), 0) != 0) {
      if (errno != EBUSY || ::umount2(dir_.path().c_str(), MNT_DETACH) != 0)
        ADD_FAILURE() << "umount " << dir_.path() << ": " << std::strerror(errno);
    }
    // dir_ removes the mount point, empty now.
  }
  SmallFs(const SmallFs&) = delete;
  SmallFs& operator=(const SmallFs&) = delete;

  bool mounted() const { return mounted_; }
  // Not empty when the kernel refused the mount (EPERM): why, for GTEST_SKIP.
  const std::string& skip_reason() const { return skip_reason_; }
  const std::string& path() const { return dir_.path(); }

  // Bytes free for an ordinary write.
  uint64_t free_bytes() const {
    struct statfs st {};
    if (::statfs(dir_.path().c_str(), &st) != 0) return 0;
    return static_cast<uint64_t>(st.f_bavail) * static_cast<uint64_t>(st.f_bsize);
  }

  // Grows <path>/filler until the filesystem refuses a write with ENOSPC,
  // or until only `leave_bytes` are free; returns the bytes added. Calling
  // it again fills what was freed since.
  uint64_t Fill(uint64_t leave_bytes = 0) {
    const std::string filler = dir_.path() + "/filler";
    const int fd = ::open(filler.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0) {
      // Not even an inode left: as full as it gets.
      if (errno != ENOSPC) ADD_FAILURE() << "open " << filler << ": " << std::strerror(errno);
      return 0;
    }
    const std::string chunk(64 << 10, 'f');
    const uint64_t now_free = free_bytes();
    uint64_t left = UINT64_MAX;  // until ENOSPC
    if (leave_bytes > 0) left = now_free > leave_bytes ? now_free - leave_bytes : 0;
    uint64_t added = 0;
    while (left > 0) {
      const ssize_t n =
          ::write(fd, chunk.data(), static_cast<size_t>(std::min<uint64_t>(chunk.size(), left)));
      if (n > 0) {  // a short write too: the next one says why
        added += static_cast<uint64_t>(n);
        left -= static_cast<uint64_t>(n);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n == 0 || errno != ENOSPC) {
        ADD_FAILURE() << "write " << filler << ": "
                      << (n == 0 ? "wrote 0 bytes" : std::strerror(errno));
      }
      break;
    }
    ::close(fd);
    return added;
  }

  // Deletes the filler: the space it took is free again.
  void MakeRoom() {
    const std::string filler = dir_.path() + "/filler";
    if (::unlink(filler.c_str()) != 0 && errno != ENOENT)
      ADD_FAILURE() << "unlink " << filler << ": " << std::strerror(errno);
  }

 private:
  TempDir dir_;  // the mount point; unmounted before it is removed
  bool mounted_ = false;
  std::string skip_reason_;
};

}  // namespace ftune::testutil

#endif  // FTUNE_TESTS_COMMON_SMALL_FS_H_
