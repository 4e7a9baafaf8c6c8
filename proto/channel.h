// The agent <-> rank local channel: length-delimited protobuf messages
// (varint length, then the bytes) over a stream file descriptor, normally
// one end of a socketpair the agent creates before it starts the rank.
//
// A Channel is not thread-safe for concurrent writers or concurrent readers;
// one reader thread and one writer thread may use it at the same time.
#ifndef FTUNE_PROTO_CHANNEL_H_
#define FTUNE_PROTO_CHANNEL_H_

#include <cstdint>
#include <string>

#include <google/protobuf/message_lite.h>

namespace ftune {

class Channel {
 public:
  // Takes ownership of fd (closed by the destructor).
  explicit Channel(int fd);
  ~Channel();
  Channel(const Channel&) = delete;
  Channel& operator=(const Channel&) = delete;

  // Writes one message; false (with errno set) if the peer is gone.
  bool Write(const google::protobuf::MessageLite& msg);
  // Reads one message. Returns false at end of stream or on a malformed
  // frame; error() then says which (empty for a clean end of stream).
  bool Read(google::protobuf::MessageLite* msg);
  const std::string& error() const { return error_; }
  int fd() const { return fd_; }

  // Largest frame accepted; a bigger length prefix is a corrupt stream.
  static constexpr uint32_t kMaxFrameBytes = 64u << 20;

 private:
  bool ReadExact(char* buf, size_t n, bool* clean_eof);
  int fd_;
  std::string error_;
};

}  // namespace ftune

#endif  // FTUNE_PROTO_CHANNEL_H_
