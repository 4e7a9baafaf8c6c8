#include "worker/comm/channel_rendezvous.h"

#include <errno.h>
#include <poll.h>
#include <string.h>

#include <algorithm>

namespace ftune::comm {

using Clock = std::chrono::steady_clock;

ChannelRendezvous::ChannelRendezvous(Channel* channel, int rank, int world_size,
                                     OtherMessageFn on_other)
    : channel_(channel),
      rank_(rank),
      world_size_(world_size),
      on_other_(std::move(on_other)) {}

Status ChannelRendezvous::Exchange(std::string_view data,
                                   std::chrono::milliseconds timeout,
                                   std::string* out) {
  const std::string who = "channel rendezvous, rank " + std::to_string(rank_) +
                          " of " + std::to_string(world_size_);
  if (rank_ == 0) {
    v1::RankMessage msg;
    msg.set_rendezvous_publish(std::string(data));
    if (!channel_->Write(msg)) {
      return Status(
          StatusCode::kUnavailable,
          who + ": cannot publish to the agent: " + channel_->error());
    }
  }
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    // Poll before reading: Channel::Read blocks, and the agent may never
    // send (rank 0 died before publishing). A frame, once begun, arrives
    // whole: the agent writes each message in one go.
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - Clock::now());
    pollfd p{channel_->fd(), POLLIN, 0};
    const int r = ::poll(
        &p, 1,
        static_cast<int>(std::clamp<int64_t>(left.count(), 0, 1000 * 1000)));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      return Status(StatusCode::kInternal,
                    who + ": poll: " + std::string(strerror(errno)));
    }
    if (r == 0) {
      if (Clock::now() < deadline) continue;
      return Status(StatusCode::kDeadlineExceeded,
                    who + ": no rendezvous data from rank 0 within " +
                        std::to_string(timeout.count()) + " ms");
    }
    v1::AgentMessage msg;
    if (!channel_->Read(&msg)) {
      return Status(StatusCode::kUnavailable,
                    who + ": agent channel closed" +
                        (channel_->error().empty() ? std::string()
                                                   : ": " + channel_->error()));
    }
    if (msg.has_rendezvous()) {
      *out = msg.rendezvous().data();
      return OkStatus();
    }
    if (!on_other_) {
      return Status(StatusCode::kFailedPrecondition,
                    who +
                        ": unexpected agent message while waiting for the "
                        "rendezvous (payload case " +
                        std::to_string(static_cast<int>(msg.payload_case())) +
                        ")");
    }
    on_other_(msg);
  }
}

}  // namespace ftune::comm
