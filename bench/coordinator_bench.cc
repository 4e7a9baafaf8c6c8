// Coordinator benchmarks, printed as figures (never asserted):
//  1. event ingest: rank events/s into SQLite (WAL, synchronous=FULL), in
//     batches as agents send them, through the real managers;
//  2. WatchJob fan-out: latency from "event committed" to "event received by
//     a watcher" over real gRPC on loopback, p50/p99, for 1, 100, 1000
//     watchers of one job.
//
//  3. scale (--scale): N simulated agents (8 slots each) on real gRPC
//     streams, heartbeating, against M queued jobs: the time to open the
//     store on them (its queue loaded once), the scheduling tick, the
//     coordinator's CPU per heartbeat, CreateJob p50/p99 over gRPC and
//     called directly with each --store-sync mode (full, then normal, on
//     the same store and fleet), next to the disk's own fdatasync p50/p99
//     (with full, each CreateJob waits for one), and the coordinator's RSS.
//     The agents run in a child process forked before gRPC starts, so the
//     CPU and memory figures are the coordinator's alone.
//
//   coordinator_bench [--events N] [--batch B] [--watchers 1,100,1000]
//                     [--fanout-events N] [--fanout-period-ms MS]
//   coordinator_bench --scale 1 [--agents 1000] [--queued 100000]
//                     [--heartbeat-ms 1000] [--creates 100]
#include <fcntl.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/wait.h>
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

#include "agent_service.h"
#include "ftune/file_util.h"
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

// --- scale

double CpuSeconds() {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

// One simulated agent: registers 8 slots, heartbeats when told, and reads
// (and drops) whatever the coordinator sends.
class SimAgent : public grpc::ClientBidiReactor<v1::AgentToCoordinator, v1::CoordinatorToAgent> {
 public:
  SimAgent(v1::AgentService::Stub* stub, int i) {
    auto* reg = out_.mutable_register_();
    reg->set_agent_id("sim-" + std::to_string(i));
    reg->set_host("sim-host-" + std::to_string(i));
    for (int s = 0; s < 8; ++s) {
      auto* slot = reg->add_slots();
      slot->set_index(s);
      slot->set_memory_bytes(80LL << 30);
    }
    stub->async()->Connect(&ctx_, this);
    writing_ = true;
    StartWrite(&out_);
    StartRead(&in_);
    StartCall();
  }
  // Sends a heartbeat unless a write is still in flight; true if sent.
  bool Heartbeat() {
    std::lock_guard<std::mutex> lock(mu_);
    if (writing_ || done_) return false;
    out_.Clear();
    out_.mutable_heartbeat()->set_time_unix_ms(NowNs() / 1000000);
    writing_ = true;
    StartWrite(&out_);
    return true;
  }
  void OnWriteDone(bool) override {
    std::lock_guard<std::mutex> lock(mu_);
    writing_ = false;
  }
  void OnReadDone(bool ok) override {
    if (ok) StartRead(&in_);
  }
  void OnDone(const grpc::Status&) override {
    std::lock_guard<std::mutex> lock(mu_);
    done_ = true;
  }
  grpc::ClientContext ctx_;

 private:
  std::mutex mu_;
  bool writing_ = false;
  bool done_ = false;
  v1::AgentToCoordinator out_;
  v1::CoordinatorToAgent in_;
};

// What one durable commit costs at least on the state dir's disk: with
// --store-sync=full every committed transaction (each CreateJob) waits for
// one fdatasync of the WAL. p50 and p99 of n syncs of 4 KiB, ms.
std::pair<double, double> SyncLatencyMs(const std::string& dir, int n) {
  const std::string path = dir + "/sync-probe";
  const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  if (fd < 0) return {-1, -1};
  const std::string block(4096, 'x');
  std::vector<double> ms;
  for (int i = 0; i < n; ++i) {
    if (write(fd, block.data(), block.size()) != static_cast<ssize_t>(block.size())) break;
    const auto a = Steady::now();
    if (fdatasync(fd) != 0) break;
    ms.push_back(std::chrono::duration<double, std::milli>(Steady::now() - a).count());
  }
  close(fd);
  std::filesystem::remove(path);
  if (ms.empty()) return {-1, -1};
  std::sort(ms.begin(), ms.end());
  return {ms[ms.size() / 2], ms[std::min(ms.size() - 1, ms.size() * 99 / 100)]};
}

// p50 and p99 of the latencies, ms (sorts them).
std::pair<double, double> P50P99(std::vector<double>& ms) {
  std::sort(ms.begin(), ms.end());
  return {ms[ms.size() / 2], ms[std::min(ms.size() - 1, ms.size() * 99 / 100)]};
}

// num_creates CreateJob calls over gRPC, then as many on the JobManager
// directly (validation, the per-user cap, the fit check, one commit, a
// pass: what CreateJob costs without gRPC), with the store's synchronous
// mode set to `sync` first.
void CreateJobLatency(Store& store, StoreSync sync, v1::JobService::Stub& stub, JobManager& jobs,
                      const v1::JobSpec& spec, int num_creates, int num_queued) {
  if (auto st = store.SetSync(sync); !st.ok()) {
    std::fprintf(stderr, "--store-sync=%s: %s\n", StoreSyncName(sync),
                 std::string(st.message()).c_str());
    return;
  }
  std::vector<double> lat;
  for (int i = 0; i < num_creates; ++i) {
    grpc::ClientContext ctx;
    v1::CreateJobRequest req;
    *req.mutable_spec() = spec;
    v1::Job out;
    const auto a = Steady::now();
    const grpc::Status s = stub.CreateJob(&ctx, req, &out);
    lat.push_back(std::chrono::duration<double, std::milli>(Steady::now() - a).count());
    if (!s.ok()) {
      std::fprintf(stderr, "CreateJob: %s\n", s.error_message().c_str());
      break;
    }
  }
  if (!lat.empty()) {
    const auto [p50, p99] = P50P99(lat);
    std::printf("scale: CreateJob over gRPC, --store-sync=%s, with %d queued: p50 %.1f ms, "
                "p99 %.1f ms (%zu calls)\n",
                StoreSyncName(sync), num_queued, p50, p99, lat.size());
  }
  std::vector<double> direct;
  for (int i = 0; i < num_creates; ++i) {
    const auto a = Steady::now();
    const auto job = jobs.CreateJob(spec, "");
    direct.push_back(std::chrono::duration<double, std::milli>(Steady::now() - a).count());
    if (!job.ok()) break;
  }
  if (!direct.empty()) {
    const auto [p50, p99] = P50P99(direct);
    std::printf("scale: CreateJob in the process (no gRPC), --store-sync=%s: p50 %.1f ms, "
                "p99 %.1f ms (%zu calls)\n",
                StoreSyncName(sync), p50, p99, direct.size());
  }
}

// The child: connects num_agents agents and heartbeats each every
// heartbeat_ms until its parent closes the pipe. Writes how many
// heartbeats it sent when done.
void RunAgents(int port_fd, int count_fd, int num_agents, int heartbeat_ms) {
  int port = 0;
  if (read(port_fd, &port, sizeof(port)) != sizeof(port)) _exit(1);
  const std::string address = "127.0.0.1:" + std::to_string(port);
  std::vector<std::shared_ptr<grpc::Channel>> channels;
  std::vector<std::unique_ptr<v1::AgentService::Stub>> stubs;
  for (int i = 0; i < 16; ++i) {
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    channels.push_back(
        grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args));
    stubs.push_back(v1::AgentService::NewStub(channels.back()));
  }
  std::vector<std::unique_ptr<SimAgent>> agents;
  for (int i = 0; i < num_agents; ++i)
    agents.push_back(std::make_unique<SimAgent>(stubs[i % stubs.size()].get(), i));
  // Spread over the interval: 100 rounds, each a hundredth of the agents.
  int64_t sent = 0;
  for (int64_t round = 0;; ++round) {
    struct pollfd p{port_fd, POLLIN, 0};
    if (poll(&p, 1, std::max(1, heartbeat_ms / 100)) != 0) break;  // parent closed: done
    for (int i = static_cast<int>(round % 100); i < num_agents; i += 100)
      sent += agents[i]->Heartbeat();
  }
  if (write(count_fd, &sent, sizeof(sent)) != sizeof(sent)) _exit(1);
  for (auto& a : agents) a->ctx_.TryCancel();
  _exit(0);
}

void ScaleBench(int num_agents, int num_queued, int heartbeat_ms, int num_creates) {
  // Fork first: gRPC must not be running in a process that forks.
  int to_child[2], from_child[2];
  if (pipe(to_child) != 0 || pipe(from_child) != 0) return;
  const pid_t child = fork();
  if (child == 0) {
    close(to_child[1]);
    close(from_child[0]);
    RunAgents(to_child[0], from_child[1], num_agents, heartbeat_ms);
  }
  close(to_child[0]);
  close(from_child[1]);

  const std::string dir = (std::filesystem::temp_directory_path() /
                           ("ftune-bench-scale-" + std::to_string(getpid())))
                              .string();
  std::filesystem::remove_all(dir);
  auto store = std::move(*Store::Open(dir));
  v1::JobSpec spec;
  spec.mutable_model()->set_model_name_or_path("/m");
  spec.mutable_dataset()->add_data_files("/d.jsonl");
  spec.mutable_resources()->set_num_ranks(8);
  // The queue, stored directly in one transaction (CreateJob one by one
  // would schedule after each).
  auto t0 = Steady::now();
  auto st = store->Transaction([&]() -> absl::Status {
    for (int i = 1; i <= num_queued; ++i) {
      v1::Job job;
      job.set_id("job-" + std::to_string(i));
      *job.mutable_spec() = spec;
      job.mutable_spec()->set_name(job.id());
      job.set_state(v1::QUEUED);
      job.set_owner(i % 2 ? "alice" : "bob");
      if (auto s = store->InsertJob(job, i); !s.ok()) return s;
    }
    return absl::OkStatus();
  });
  if (!st.ok()) {
    std::fprintf(stderr, "preload failed: %s\n", std::string(st.message()).c_str());
    return;
  }
  std::printf("scale: %d jobs queued in %.1f s; coordinator RSS %.0f MiB\n", num_queued,
              std::chrono::duration<double>(Steady::now() - t0).count(), ftune::CurrentRssBytes() / 1048576.0);
  // Started again on that state, as a coordinator after a restart: the
  // store loads its in-memory queue from the rows once, here.
  store.reset();
  t0 = Steady::now();
  store = std::move(*Store::Open(dir));
  std::printf("scale: the store opened again in %.2f s (integrity check, queue of %d loaded); "
              "RSS %.0f MiB\n",
              std::chrono::duration<double>(Steady::now() - t0).count(), num_queued,
              ftune::CurrentRssBytes() / 1048576.0);

  EventBus bus;
  ManagerOptions mo;
  mo.heartbeat_interval_ms = heartbeat_ms;
  mo.agent_timeout_ms = 60000;
  Coordinator coordinator(store.get(), RealClock(), &bus, nullptr, mo);
  (void)coordinator.Recover();
  const Authenticator open_auth = *Authenticator::Create({});  // loopback: no tokens
  AgentServiceImpl agent_service(&coordinator.agents(), &coordinator.events(), &coordinator.jobs(),
                                 &open_auth);
  JobServiceImpl job_service(&coordinator.jobs(), &coordinator.agents(), &coordinator.events(),
                             nullptr, &open_auth);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&agent_service);
  builder.RegisterService(&job_service);
  auto server = builder.BuildAndStart();
  if (write(to_child[1], &port, sizeof(port)) != sizeof(port)) return;

  t0 = Steady::now();
  while (coordinator.agents().ListAgents().size() < static_cast<size_t>(num_agents) &&
         Steady::now() - t0 < std::chrono::seconds(120))
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  std::printf("scale: %zu agents x 8 slots registered over gRPC in %.1f s; RSS %.0f MiB\n",
              coordinator.agents().ListAgents().size(),
              std::chrono::duration<double>(Steady::now() - t0).count(), ftune::CurrentRssBytes() / 1048576.0);

  // Ticks: the first places what fits, the next ones find the fleet full.
  std::vector<double> ticks;
  for (int i = 0; i < 6; ++i) {
    const auto a = Steady::now();
    coordinator.Tick();
    ticks.push_back(std::chrono::duration<double, std::milli>(Steady::now() - a).count());
  }
  std::vector<double> later(ticks.begin() + 1, ticks.end());
  std::sort(later.begin(), later.end());
  std::printf("scale: scheduling tick: first %.1f ms (places jobs), then median %.1f ms, max %.1f "
              "ms (%d queued, fleet full)\n",
              ticks[0], later[later.size() / 2], later.back(), num_queued);

  // Heartbeats alone for 10 s: the coordinator's CPU over them.
  const double cpu0 = CpuSeconds();
  const auto w0 = Steady::now();
  std::this_thread::sleep_for(std::chrono::seconds(10));
  const double cpu = CpuSeconds() - cpu0;
  const double window = std::chrono::duration<double>(Steady::now() - w0).count();
  const double expected = num_agents * window * 1000.0 / heartbeat_ms;
  std::printf("scale: heartbeats: ~%.0f/s; coordinator CPU %.1f%% of a core, %.1f us per "
              "heartbeat\n",
              expected / window, 100.0 * cpu / window, 1e6 * cpu / expected);

  const auto [sync_p50, sync_p99] = SyncLatencyMs(dir, 300);
  std::printf("scale: fdatasync of 4 KiB on the state dir's disk (one per commit with "
              "--store-sync=full): p50 %.1f ms, p99 %.1f ms\n",
              sync_p50, sync_p99);
  // CreateJob against the full queue, with each synchronous mode in turn
  // on the same store, agents and server.
  auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(port),
                                     grpc::InsecureChannelCredentials());
  auto stub = v1::JobService::NewStub(channel);
  for (StoreSync sync : {StoreSync::kFull, StoreSync::kNormal})
    CreateJobLatency(*store, sync, *stub, coordinator.jobs(), spec, num_creates, num_queued);
  std::printf("scale: coordinator RSS %.0f MiB\n", ftune::CurrentRssBytes() / 1048576.0);

  close(to_child[1]);  // the agents stop
  int64_t sent = 0;
  if (read(from_child[0], &sent, sizeof(sent)) == sizeof(sent))
    std::printf("scale: the agents sent %lld heartbeats in all\n", static_cast<long long>(sent));
  waitpid(child, nullptr, 0);
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  std::filesystem::remove_all(dir);
}

}  // namespace

int main(int argc, char** argv) {
  int events = 200000, batch = 500, fan_events = 200, fan_batch = 10, fan_period_ms = 100;
  std::vector<int> watchers = {1, 100, 1000};
  int scale = 0, agents = 1000, queued = 100000, heartbeat_ms = 1000, creates = 100;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--events")) events = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--batch")) batch = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--fanout-events")) fan_events = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--fanout-period-ms")) fan_period_ms = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--scale")) scale = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--agents")) agents = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--queued")) queued = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--heartbeat-ms")) heartbeat_ms = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--creates")) creates = std::atoi(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--watchers")) {
      watchers.clear();
      std::stringstream ss(argv[i + 1]);
      std::string tok;
      while (std::getline(ss, tok, ',')) watchers.push_back(std::atoi(tok.c_str()));
    }
  }
  if (scale) {  // before anything starts gRPC: it forks
    std::printf("ftune coordinator scale benchmark (%u cores)\n",
                std::thread::hardware_concurrency());
    ScaleBench(agents, queued, heartbeat_ms, creates);
    return 0;
  }
  std::printf("ftune coordinator benchmark (%u cores)\n", std::thread::hardware_concurrency());
  IngestBench(events, batch);
  IngestBench(events / 10, 1);
  std::printf("fan-out: one job emitting %d events every %d ms (%d events/s) to N watchers\n",
              fan_batch, fan_period_ms, fan_batch * 1000 / std::max(1, fan_period_ms));
  for (int w : watchers) FanoutBench(w, fan_events, fan_batch, fan_period_ms);
  return 0;
}
