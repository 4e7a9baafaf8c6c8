// libFuzzer target: the agent <-> rank channel's framing, read from a stream a
// misbehaving rank controls. Reading any bytes must yield messages until a
// clean end of stream or an error, never crash, hang or allocate beyond the
// frame limit; every message read must survive a Write/Read round trip
// through a second channel unchanged.
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "channel.h"
#include "ftune/v1/rank_channel.pb.h"

namespace {

// A channel over an in-memory file holding `bytes`, positioned at its start.
int MemFd(const void* bytes, size_t size) {
  const int fd = memfd_create("channel_fuzzer", 0);
  if (fd < 0) __builtin_trap();
  if (size > 0 && write(fd, bytes, size) != static_cast<ssize_t>(size)) __builtin_trap();
  if (lseek(fd, 0, SEEK_SET) != 0) __builtin_trap();
  return fd;
}

void RoundTrip(const ftune::v1::RankMessage& msg) {
  ftune::Channel out(memfd_create("channel_fuzzer_rt", 0));
  if (!out.Write(msg)) __builtin_trap();
  if (lseek(out.fd(), 0, SEEK_SET) != 0) __builtin_trap();
  ftune::v1::RankMessage back;
  if (!out.Read(&back)) __builtin_trap();
  if (back.SerializeAsString() != msg.SerializeAsString()) __builtin_trap();
  if (out.Read(&back) || !out.error().empty()) __builtin_trap();  // clean end
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  ftune::Channel in(MemFd(data, size));
  ftune::v1::RankMessage msg;
  int num_read = 0;
  while (in.Read(&msg)) {
    if (++num_read > static_cast<int>(size)) __builtin_trap();  // every frame takes a byte
    RoundTrip(msg);
  }
  // At the end of the bytes: either a clean end or an error that says why.
  if (size == 0 && !in.error().empty()) __builtin_trap();
  return 0;
}
