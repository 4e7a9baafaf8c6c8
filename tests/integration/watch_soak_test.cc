// Watch soak: 5,000 WatchJob streams on one job of a real coordinator, a
// thousand of them slow consumers that never read. A job's stored history
// is far larger than what the coordinator may hold per watcher, so the
// coordinator's memory stays bounded only if a watcher that does not read
// holds at most one batch (gRPC flow control stops the writes) and the live
// queue behind it is capped. The readers must still see every live event.
// The coordinator's RSS is printed; the cap asserted is generous (a
// thousand batches in flight), far below what an unbounded queue would take
// (every slow watcher holding the job's whole history).
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "cluster.h"
#include "ftune/file_util.h"

namespace ftune::testing {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;

constexpr int kReaders = 4000;
constexpr int kSlow = 1000;
constexpr int kSteps = 80;
constexpr int64_t kHistoryLogBytes = 32 << 10;  // under the agent's 64 KiB cut
constexpr int kHistoryLogs = 500;               // 16 MiB of stored history

int64_t RssBytes(pid_t pid) { return ftune::ProcessRssBytes(pid); }

std::shared_ptr<grpc::Channel> OwnChannel(const std::string& address, int id) {
  // Channels of their own (no shared subchannel): the slow watchers' TCP
  // connections are not the readers'.
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  args.SetInt("ftune.test_channel", id);
  return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
}

// Reads until the stream ends, counting step events.
class Reader : public grpc::ClientReadReactor<v1::WatchJobResponse> {
 public:
  Reader(Cluster* c, v1::JobService::Stub* stub, const v1::WatchJobRequest& req,
         std::atomic<int>* done)
      : done_(done) {
    c->AddAuth(&ctx_);
    stub->async()->WatchJob(&ctx_, &req, this);
    StartRead(&response_);
    StartCall();
  }
  void OnReadDone(bool ok) override {
    if (!ok) return;
    for (const auto& e : response_.events()) steps_ += e.has_step();
    StartRead(&response_);
  }
  void OnDone(const grpc::Status& s) override {
    status_ = s;
    ++*done_;
  }
  grpc::ClientContext ctx_;
  int steps_ = 0;
  grpc::Status status_;

 private:
  std::atomic<int>* done_;
  v1::WatchJobResponse response_;
};

// Opens the stream and never reads.
class Slow : public grpc::ClientReadReactor<v1::WatchJobResponse> {
 public:
  Slow(Cluster* c, v1::JobService::Stub* stub, const v1::WatchJobRequest& req,
       std::atomic<int>* done)
      : done_(done) {
    c->AddAuth(&ctx_);
    stub->async()->WatchJob(&ctx_, &req, this);
    StartCall();
  }
  void OnDone(const grpc::Status&) override { ++*done_; }
  grpc::ClientContext ctx_;

 private:
  std::atomic<int>* done_;
};

TEST(WatchSoak, FiveThousandWatchersWithSlowConsumersKeepTheCoordinatorBounded) {
  Cluster c;
  c.StartCoordinator({"--max-watchers-per-job=0"});
  c.StartAgent("host-a", 1);
  ASSERT_TRUE(c.WaitAgents(1));
  v1::JobSpec spec = c.Spec(1, kSteps, 0);
  (*spec.mutable_labels())["test.step_ms"] = "100";
  (*spec.mutable_labels())["test.big_log_bytes"] = std::to_string(kHistoryLogBytes);
  (*spec.mutable_labels())["test.big_log_count"] = std::to_string(kHistoryLogs);
  const v1::Job job = c.Submit(spec);
  ASSERT_TRUE(c.WaitFor_Step(job.id(), 3));
  const pid_t pid = c.coordinator().pid();
  const int64_t rss_before = RssBytes(pid);

  const auto setup_start = std::chrono::steady_clock::now();
  std::vector<std::shared_ptr<grpc::Channel>> reader_channels, slow_channels;
  std::vector<std::unique_ptr<v1::JobService::Stub>> reader_stubs, slow_stubs;
  for (int i = 0; i < 4; ++i) {
    reader_channels.push_back(OwnChannel(c.address(), i));
    reader_stubs.push_back(v1::JobService::NewStub(reader_channels.back()));
    slow_channels.push_back(OwnChannel(c.address(), 100 + i));
    slow_stubs.push_back(v1::JobService::NewStub(slow_channels.back()));
  }
  std::atomic<int> readers_done{0}, slow_done{0};
  v1::WatchJobRequest history;  // the whole history: 16 MiB each
  history.set_job_id(job.id());
  history.set_follow(true);
  std::vector<std::unique_ptr<Slow>> slow;
  for (int i = 0; i < kSlow; ++i)
    slow.push_back(std::make_unique<Slow>(&c, slow_stubs[i % 4].get(), history, &slow_done));
  v1::WatchJobRequest live = history;  // from now on
  live.set_after_seq(c.GetJob(job.id()).last_event_seq());
  std::vector<std::unique_ptr<Reader>> readers;
  for (int i = 0; i < kReaders; ++i)
    readers.push_back(
        std::make_unique<Reader>(&c, reader_stubs[i % 4].get(), live, &readers_done));

  const double setup_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - setup_start).count();
  int64_t rss_peak = rss_before;
  const auto start = std::chrono::steady_clock::now();
  while (readers_done < kReaders && std::chrono::steady_clock::now() - start < seconds(60)) {
    rss_peak = std::max(rss_peak, RssBytes(pid));
    std::this_thread::sleep_for(milliseconds(100));
  }
  const int64_t rss_end = RssBytes(pid);
  std::fprintf(stderr, "[soak] readers done after %.1f s\n",
               std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  EXPECT_EQ(readers_done.load(), kReaders) << "readers still open after 60 s";
  EXPECT_EQ(c.GetJob(job.id()).state(), v1::SUCCEEDED);
  int live_steps = 0;  // what each reader must have seen
  for (const auto& e : c.Events(job.id(), live.after_seq())) live_steps += e.has_step();
  int min_steps = kSteps;
  for (const auto& r : readers) min_steps = std::min(min_steps, r->steps_);
  for (auto& s : slow) s->ctx_.TryCancel();
  for (auto& r : readers) r->ctx_.TryCancel();
  ASSERT_TRUE(WaitFor([&] { return slow_done == kSlow && readers_done == kReaders; }, seconds(30)));
  std::fprintf(stderr, "[soak] all closed after %.1f s\n",
               std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  std::this_thread::sleep_for(milliseconds(500));
  const int64_t rss_released = RssBytes(pid);

  const double mib = 1 << 20;
  std::printf(
      "watch soak: %d readers + %d slow watchers (never read, %d MiB of history each): "
      "coordinator RSS %.0f MiB before, %.0f MiB peak, %.0f MiB at the job's end, %.0f MiB "
      "once all closed; every reader got >= %d of the %d live steps (%.1f s to open the "
      "streams)\n",
      kReaders, kSlow, static_cast<int>(kHistoryLogs * kHistoryLogBytes >> 20), rss_before / mib,
      rss_peak / mib, rss_end / mib, rss_released / mib, min_steps, live_steps, setup_s);
  EXPECT_GT(live_steps, 0) << "the job ended before the readers came";
  EXPECT_EQ(min_steps, live_steps);
  // A slow watcher costs the server about two batches (1 MiB each): the
  // message the reactor keeps until OnWriteDone and its serialized copy the
  // transport cannot send; 3 MiB leaves room for the allocator. Unbounded, a
  // slow watcher would hold its 16 MiB of history (16 GiB for a thousand).
  EXPECT_LT(rss_peak - rss_before, int64_t{kSlow} * (3 << 20) + (512 << 20));
}

}  // namespace
}  // namespace ftune::testing
