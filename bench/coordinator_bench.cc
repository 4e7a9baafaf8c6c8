// Coordinator benchmarks, printed as figures (never asserted):
//  1. event ingest: rank events/s into SQLite (WAL, synchronous=FULL), in
//     batches as agents send them, through the real managers;
//  2. WatchJob fan-out: latency from "event committed" to "event received by
//     a watcher" over real gRPC on loopback, p50/p99, for 1, 100, 1000
//     watchers of one job.
//
//   coordinator_bench [--events N] [--batch B] [--watchers 1,100,1000]
//                     [--fanout-events N] [--fanout-period-ms MS]
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <sstream>
#include <thread>

#include <grpcpp/grpcpp.h>

#include "coordinator.h"
#include "job_service.h"
#include "metrics.h"

using namespace ftune;
using namespace ftune::server;
using Steady = std::chrono::steady_clock;

namespace {

class NullLink : public AgentLink {
 public:
  void Send(const v1::CoordinatorToAgent&) override {}
  void Disconnect() override {}
};

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Steady::now().time_since_epoch())
      .count();
}

struct Env {
  std::string dir;
  std::unique_ptr<Store> store;
  EventBus bus;
  std::unique_ptr<Coordinator> coordinator;
  std::string job_id;
  int64_t seq = 0;

  explicit Env(const std::string& name) {
    dir = (std::filesystem::temp_directory_path() /
           ("ftune-bench-" + name + "-" + std::to_string(getpid())))
              .string();
    std::filesystem::remove_all(dir);
    store = std::move(*Store::Open(dir));
    coordinator =
        std::make_unique<Coordinator>(store.get(), RealClock(), &bus, nullptr, ManagerOptions{});
    v1::RegisterAgent reg;
    reg.set_agent_id("bench-agent");
    reg.set_host("bench");
    for (int i = 0; i < 8; ++i) {
      auto* s = reg.add_slots();
      s->set_index(i);
      s->set_memory_bytes(80LL << 30);
    }
    (void)coordinator->agents().RegisterAgent(reg, std::make_shared<NullLink>());
    v1::JobSpec spec;
    spec.mutable_model()->set_model_name_or_path("/m");
    spec.mutable_dataset()->add_data_files("/d.jsonl");
    spec.mutable_resources()->set_num_ranks(8);
    job_id = coordinator->jobs().CreateJob(spec, "")->id();
  }
  ~Env() {
    coordinator.reset();
    store.reset();
    std::filesystem::remove_all(dir);
  }
  v1::RankEventBatch Batch(int n) {
    v1::RankEventBatch b;
    for (int i = 0; i < n; ++i) {
      auto* e = b.add_events();
      e->set_agent_seq(++seq);
      e->set_job_id(job_id);
      e->set_rank(static_cast<int>(seq % 8));
      auto* s = e->mutable_message()->mutable_step();
      s->set_step(seq);
      s->set_loss(2.0);
      s->set_tokens(4096);
      s->set_tokens_total(NowNs());  // send time, for the fan-out latency
    }
    return b;
  }
};

void IngestBench(int total, int batch) {
  Env env("ingest");
  const auto start = Steady::now();
  for (int done = 0; done < total; done += batch) {
    auto r = env.coordinator->events().IngestEvents("bench-agent", env.Batch(batch));
    if (!r.ok()) {
      std::fprintf(stderr, "ingest failed: %s\n", std::string(r.status().message()).c_str());
      return;
    }
  }
  const double s = std::chrono::duration<double>(Steady::now() - start).count();
  std::printf("ingest: %d events in batches of %d: %.0f events/s (%.2f s, SQLite WAL, "
              "synchronous=FULL)\n",
              total, batch, total / s, s);
}

void FanoutBench(int watchers, int events, int batch, int period_ms) {
  Env env("fanout");
  const Authenticator open_auth = *Authenticator::Create({});  // loopback: no tokens
  JobServiceImpl service(&env.coordinator->jobs(), &env.coordinator->agents(),
                         &env.coordinator->events(), nullptr, &open_auth);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  auto server = builder.BuildAndStart();
  auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(port),
                                     grpc::InsecureChannelCredentials());
  auto stub = v1::JobService::NewStub(channel);

  std::mutex mu;
  std::vector<double> latencies_ms;
  latencies_ms.reserve(static_cast<size_t>(watchers) * events);
  const int64_t live_from = env.coordinator->jobs().GetJob(env.job_id)->last_event_seq();
  std::atomic<int> finished{0};

  // Callback-API readers: the watchers cost no thread each here either, so
  // the figures are the server's rather than 1000 client threads'.
  class Watcher : public grpc::ClientReadReactor<v1::WatchJobResponse> {
   public:
    Watcher(v1::JobService::Stub* stub, const v1::WatchJobRequest& req, int events,
            std::mutex* mu, std::vector<double>* out, std::atomic<int>* finished)
        : events_(events), mu_(mu), out_(out), finished_(finished) {
      stub->async()->WatchJob(&ctx_, &req, this);
      StartRead(&event_);
      StartCall();
    }
    void OnReadDone(bool ok) override {
      if (!ok) return;
      const int64_t now = NowNs();
      for (const auto& e : event_.events())
        if (e.has_step()) mine_.push_back((now - e.step().tokens_total()) / 1e6);
      if (static_cast<int>(mine_.size()) >= events_) {
        ctx_.TryCancel();
        return;
      }
      StartRead(&event_);
    }
    void OnDone(const grpc::Status&) override {
      {
        std::lock_guard<std::mutex> lock(*mu_);
        out_->insert(out_->end(), mine_.begin(), mine_.end());
      }
      ++*finished_;
    }
    grpc::ClientContext ctx_;

   private:
    int events_;
    std::mutex* mu_;
    std::vector<double>* out_;
    std::atomic<int>* finished_;
    v1::WatchJobResponse event_;
    std::vector<double> mine_;
  };

  v1::WatchJobRequest req;
  req.set_job_id(env.job_id);
  req.set_follow(true);
  req.set_after_seq(live_from);  // live events only
  std::vector<std::unique_ptr<Watcher>> readers;
  for (int w = 0; w < watchers; ++w)
    readers.push_back(
        std::make_unique<Watcher>(stub.get(), req, events, &mu, &latencies_ms, &finished));
  while (env.bus.num_subscribers() < static_cast<size_t>(watchers))
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  const auto start = Steady::now();
  for (int sent = 0; sent < events; sent += batch) {
    (void)env.coordinator->events().IngestEvents("bench-agent", env.Batch(batch));
    std::this_thread::sleep_for(std::chrono::milliseconds(period_ms));
  }
  const auto deadline = Steady::now() + std::chrono::seconds(60);
  while (finished < watchers && Steady::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  if (finished < watchers)
    for (auto& r : readers) r->ctx_.TryCancel();
  while (finished < watchers) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  server->Shutdown(std::chrono::system_clock::now());
  const double secs = std::chrono::duration<double>(Steady::now() - start).count();
  std::sort(latencies_ms.begin(), latencies_ms.end());
  auto pct = [&](double p) {
    if (latencies_ms.empty()) return -1.0;
    return latencies_ms[std::min(latencies_ms.size() - 1,
                                 static_cast<size_t>(p * latencies_ms.size()))];
  };
  std::printf("fan-out: %4d watchers x %d events: p50 %.2f ms, p99 %.2f ms, max %.2f ms "
              "(%zu deliveries, %.0f deliveries/s)\n",
              watchers, events, pct(0.50), pct(0.99), latencies_ms.empty() ? -1.0 : latencies_ms.back(),
              latencies_ms.size(), latencies_ms.size() / secs);
}

}  // namespace

int main(int argc, char** argv) {
  int events = 200000, batch = 500, fan_events = 200, fan_batch = 10, fan_period_ms = 100;
  std::vector<int> watchers = {1, 100, 1000};
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--events")) events = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--batch")) batch = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--fanout-events")) fan_events = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--fanout-period-ms")) fan_period_ms = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--watchers")) {
      watchers.clear();
      std::stringstream ss(argv[i + 1]);
      std::string tok;
      while (std::getline(ss, tok, ',')) watchers.push_back(std::atoi(tok.c_str()));
    }
  }
  std::printf("ftune coordinator benchmark (%u cores)\n", std::thread::hardware_concurrency());
  IngestBench(events, batch);
  IngestBench(events / 10, 1);
  std::printf("fan-out: one job emitting %d events every %d ms (%d events/s) to N watchers\n",
              fan_batch, fan_period_ms, fan_batch * 1000 / std::max(1, fan_period_ms));
  for (int w : watchers) FanoutBench(w, fan_events, fan_batch, fan_period_ms);
  return 0;
}
