#include "channel.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>

#include <vector>

namespace ftune {

Channel::Channel(int fd) : fd_(fd) {}

Channel::~Channel() {
  if (fd_ >= 0) ::close(fd_);
}

bool Channel::Write(const google::protobuf::MessageLite& msg) {
  const size_t size = msg.ByteSizeLong();
  std::string buf;
  buf.reserve(size + 5);
  uint64_t v = size;
  while (v >= 0x80) {
    buf.push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  buf.push_back(static_cast<char>(v));
  if (!msg.AppendToString(&buf)) {
    error_ = "cannot serialize message";
    return false;
  }
  const char* p = buf.data();
  size_t left = buf.size();
  while (left > 0) {
    ssize_t n = ::write(fd_, p, left);
    if (n < 0) {
      if (errno == EINTR) continue;
      error_ = std::string("write to channel failed: ") + strerror(errno);
      return false;
    }
    p += n;
    left -= static_cast<size_t>(n);
  }
  return true;
}

bool Channel::ReadExact(char* buf, size_t n, bool* clean_eof) {
  size_t got = 0;
  *clean_eof = false;
  while (got < n) {
    ssize_t r = ::read(fd_, buf + got, n - got);
    if (r < 0) {
      if (errno == EINTR) continue;
      error_ = std::string("read from channel failed: ") + strerror(errno);
      return false;
    }
    if (r == 0) {
      if (got == 0) *clean_eof = true;
      else error_ = "channel closed in the middle of a message";
      return false;
    }
    got += static_cast<size_t>(r);
  }
  return true;
}

bool Channel::Read(google::protobuf::MessageLite* msg) {
  error_.clear();
  uint64_t len = 0;
  for (int shift = 0;; shift += 7) {
    if (shift > 28) {
      error_ = "corrupt frame: length prefix too long";
      return false;
    }
    char c;
    bool eof = false;
    if (!ReadExact(&c, 1, &eof)) {
      if (!eof || shift > 0) {
        if (error_.empty()) error_ = "channel closed in the middle of a message";
      }
      return false;
    }
    len |= static_cast<uint64_t>(static_cast<unsigned char>(c) & 0x7f) << shift;
    if ((static_cast<unsigned char>(c) & 0x80) == 0) break;
  }
  if (len > kMaxFrameBytes) {
    error_ = "corrupt frame: length " + std::to_string(len) + " exceeds " +
             std::to_string(kMaxFrameBytes);
    return false;
  }
  std::vector<char> buf(len);
  bool eof = false;
  if (len > 0 && !ReadExact(buf.data(), len, &eof)) {
    if (error_.empty()) error_ = "channel closed in the middle of a message";
    return false;
  }
  if (!msg->ParseFromArray(buf.data(), static_cast<int>(len))) {
    error_ = "corrupt frame: message of " + std::to_string(len) + " bytes does not parse";
    return false;
  }
  return true;
}

}  // namespace ftune
