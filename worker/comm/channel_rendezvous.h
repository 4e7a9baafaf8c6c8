// ChannelRendezvous: the rendezvous of ranks started by host agents, through
// the control plane (docs/control-plane.md, "Rendezvous").
//
// Rank 0 writes RankMessage{rendezvous_publish: data} on its agent channel;
// its agent sends it to the coordinator, which sends it to every agent of the
// job's attempt, which hand it to every rank (rank 0 too) as
// AgentMessage{rendezvous}. Exchange reads the channel until that message
// arrives. Messages of other kinds that arrive meanwhile (a StopRank) go to
// the `on_other` callback in arrival order, so none is lost.
//
// Thread-safety: one thread at a time. While Exchange runs it is the
// channel's only reader and only writer (Channel allows one of each).
#ifndef FTUNE_WORKER_COMM_CHANNEL_RENDEZVOUS_H_
#define FTUNE_WORKER_COMM_CHANNEL_RENDEZVOUS_H_

#include <chrono>
#include <functional>
#include <string>
#include <string_view>

#include "channel.h"
#include "ftune/v1/rank_channel.pb.h"
#include "worker/comm/rendezvous.h"
#include "ftune/status.h"

namespace ftune::comm {

class ChannelRendezvous : public Rendezvous {
 public:
  using OtherMessageFn = std::function<void(const v1::AgentMessage&)>;

  // `channel` is not owned and outlives this object. `on_other` may be
  // empty only when the caller expects no other message during rendezvous;
  // one that arrives anyway is then an error rather than dropped.
  ChannelRendezvous(Channel* channel, int rank, int world_size,
                    OtherMessageFn on_other = {});

  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }
  Status Exchange(std::string_view data, std::chrono::milliseconds timeout,
                  std::string* out) override;

 private:
  Channel* channel_;
  const int rank_;
  const int world_size_;
  OtherMessageFn on_other_;
};

}  // namespace ftune::comm

#endif  // FTUNE_WORKER_COMM_CHANNEL_RENDEZVOUS_H_
