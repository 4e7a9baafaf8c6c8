#include "metrics.h"

#include <map>
#include <mutex>
#include <set>

#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include "job_state.h"
#include "tls_terminator.h"

namespace ftune::server {

using prometheus::BuildCounter;
using prometheus::BuildGauge;
using prometheus::BuildHistogram;
using prometheus::Counter;
using prometheus::Family;
using prometheus::Gauge;
using prometheus::Histogram;

struct Metrics::Impl {
  std::shared_ptr<prometheus::Registry> registry = std::make_shared<prometheus::Registry>();
  std::unique_ptr<prometheus::Exposer> exposer;
  // Declared after the exposer: it stops first, so no relay outlives it.
  std::unique_ptr<TlsTerminator> tls;
  std::mutex mu;

  Family<Gauge>& jobs = BuildGauge().Name("ftune_jobs").Help("Jobs by state").Register(*registry);
  Gauge& queue_depth =
      BuildGauge().Name("ftune_queue_depth").Help("Jobs waiting in the queue").Register(*registry).Add({});
  Family<Gauge>& agents =
      BuildGauge().Name("ftune_agents").Help("Registered agents by liveness").Register(*registry);
  Family<Gauge>& slots =
      BuildGauge().Name("ftune_slots").Help("Slots of live agents, free or used").Register(*registry);
  Family<Gauge>& step = BuildGauge().Name("ftune_job_step").Help("Last step").Register(*registry);
  Family<Gauge>& loss = BuildGauge().Name("ftune_job_loss").Help("Training loss").Register(*registry);
  Family<Gauge>& lr =
      BuildGauge().Name("ftune_job_learning_rate").Help("Learning rate").Register(*registry);
  Family<Gauge>& tps = BuildGauge()
                           .Name("ftune_job_tokens_per_second")
                           .Help("Training throughput of a rank")
                           .Register(*registry);
  Family<Gauge>& phase = BuildGauge()
                             .Name("ftune_job_step_phase_seconds")
                             .Help("Seconds of a rank's last step by phase (forward, backward, "
                                   "optimizer, exposed_comm)")
                             .Register(*registry);
  Family<Counter>& tokens = BuildCounter()
                                .Name("ftune_job_tokens_total")
                                .Help("Tokens trained on by a rank")
                                .Register(*registry);
  Family<Gauge>& mem_alloc = BuildGauge()
                                 .Name("ftune_job_gpu_memory_allocated_bytes")
                                 .Help("Device memory allocated")
                                 .Register(*registry);
  Family<Gauge>& mem_reserved = BuildGauge()
                                    .Name("ftune_job_gpu_memory_reserved_bytes")
                                    .Help("Device memory reserved by the allocator")
                                    .Register(*registry);
  Family<Gauge>& mem_peak = BuildGauge()
                                .Name("ftune_job_gpu_memory_peak_bytes")
                                .Help("Peak device memory allocated")
                                .Register(*registry);
  Family<Gauge>& rss =
      BuildGauge().Name("ftune_job_host_rss_bytes").Help("Host RSS of a rank").Register(*registry);
  Family<Counter>& ckpts = BuildCounter()
                               .Name("ftune_job_checkpoints_total")
                               .Help("Complete checkpoints saved")
                               .Register(*registry);
  Family<Gauge>& last_ckpt = BuildGauge()
                                 .Name("ftune_job_last_checkpoint_timestamp_seconds")
                                 .Help("Time of the last complete checkpoint")
                                 .Register(*registry);
  Family<Counter>& restarts = BuildCounter()
                                  .Name("ftune_job_restarts_total")
                                  .Help("Gang restarts of a job")
                                  .Register(*registry);
  Counter& events = BuildCounter()
                        .Name("ftune_events_ingested_total")
                        .Help("Rank events stored")
                        .Register(*registry)
                        .Add({});
  Family<Counter>& dropped = BuildCounter()
                                 .Name("ftune_events_dropped_total")
                                 .Help("Rank events not stored, by reason")
                                 .Register(*registry);
  Counter& store_errors = BuildCounter()
                              .Name("ftune_store_errors_total")
                              .Help("Failed operations on the state database")
                              .Register(*registry)
                              .Add({});
  Family<Histogram>& rpc = BuildHistogram()
                               .Name("ftune_rpc_duration_seconds")
                               .Help("Latency of coordinator RPCs")
                               .Register(*registry);
  Family<Gauge>& build =
      BuildGauge().Name("ftune_build_info").Help("ftune version").Register(*registry);

  // Every labelled per-job series, so JobEnded can remove them all.
  std::map<std::string, std::set<int>> ranks_of_job;
  std::set<std::string> jobs_with_job_series;

  std::map<std::string, std::string> JR(const std::string& job, int rank) {
    ranks_of_job[job].insert(rank);
    return {{"job_id", job}, {"rank", std::to_string(rank)}};
  }
  std::map<std::string, std::string> J(const std::string& job) {
    jobs_with_job_series.insert(job);
    return {{"job_id", job}};
  }
};

Metrics::Metrics() : impl_(std::make_unique<Impl>()) {
  impl_->build.Add({{"version", "0.1.0"}}).Set(1);
  // Every reason at 0 from the start: a rate() over them has data (0) on a
  // healthy coordinator instead of an empty panel until the first drop.
  for (const char* reason : kEventDropReasons) impl_->dropped.Add({{"reason", reason}});
}
Metrics::~Metrics() = default;

std::string Metrics::Serve(const std::string& listen, ScrapeAuth auth,
                           std::shared_ptr<const TlsIdentity> tls) {
  // With TLS the exposer is reachable from this host only, and only the
  // terminator listens on `listen`.
  const std::string exposer_listen = tls ? "127.0.0.1:0" : listen;
  try {
    impl_->exposer = std::make_unique<prometheus::Exposer>(exposer_listen);
    // The check before the registry: no scrape is ever answered with
    // metrics before it is in place.
    if (auth) impl_->exposer->RegisterAuth(std::move(auth), "ftune-coordinator", "/metrics");
    impl_->exposer->RegisterCollectable(impl_->registry);
  } catch (const std::exception& e) {
    impl_->exposer.reset();
    return "cannot serve metrics on " + exposer_listen + ": " + e.what();
  }
  if (tls) {
    const std::vector<int> ports = impl_->exposer->GetListeningPorts();
    auto terminator =
        ports.empty() ? absl::StatusOr<std::unique_ptr<TlsTerminator>>(
                            absl::InternalError("the exposer reports no port"))
                      : TlsTerminator::Start(listen, ports.front(), std::move(tls));
    if (!terminator.ok()) {
      impl_->exposer.reset();
      return "cannot serve metrics over TLS on " + listen + ": " +
             std::string(terminator.status().message());
    }
    impl_->tls = *std::move(terminator);
  }
  return "";
}

void Metrics::SetTlsIdentity(std::shared_ptr<const TlsIdentity> tls) {
  if (impl_->tls) impl_->tls->SetIdentity(std::move(tls));
}

int Metrics::port() const {
  if (impl_->tls) return impl_->tls->port();
  if (!impl_->exposer) return 0;
  const std::vector<int> ports = impl_->exposer->GetListeningPorts();
  return ports.empty() ? 0 : ports.front();
}

std::shared_ptr<prometheus::Registry> Metrics::registry() { return impl_->registry; }

void Metrics::JobStates(const std::map<v1::JobState, int>& counts) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  for (const auto& [s, n] : counts) {
    impl_->jobs.Add({{"state", StateName(s)}}).Set(n);
    if (s == v1::QUEUED) impl_->queue_depth.Set(n);
  }
}

void Metrics::Fleet(int alive, int dead, int free, int used) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->agents.Add({{"state", "alive"}}).Set(alive);
  impl_->agents.Add({{"state", "dead"}}).Set(dead);
  impl_->slots.Add({{"state", "free"}}).Set(free);
  impl_->slots.Add({{"state", "used"}}).Set(used);
}

void Metrics::Step(const std::string& job, int rank, const v1::StepMetrics& m) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto l = impl_->JR(job, rank);
  impl_->step.Add(l).Set(static_cast<double>(m.step()));
  impl_->loss.Add(l).Set(m.loss());
  impl_->lr.Add(l).Set(m.learning_rate());
  impl_->tps.Add(l).Set(m.tokens_per_second());
  if (m.forward_seconds() > 0 || m.backward_seconds() > 0) {
    const std::pair<const char*, double> phases[] = {
        {"forward", m.forward_seconds()},
        {"backward", m.backward_seconds()},
        {"optimizer", m.optimizer_seconds()},
        {"exposed_comm", m.exposed_comm_seconds()}};
    for (const auto& [name, seconds] : phases) {
      auto pl = l;
      pl["phase"] = name;
      impl_->phase.Add(pl).Set(seconds);
    }
  }
  if (m.tokens() > 0) impl_->tokens.Add(l).Increment(static_cast<double>(m.tokens()));
}

void Metrics::Memory(const std::string& job, int rank, const v1::MemoryStats& m) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto l = impl_->JR(job, rank);
  impl_->mem_alloc.Add(l).Set(static_cast<double>(m.allocated_bytes()));
  impl_->mem_reserved.Add(l).Set(static_cast<double>(m.reserved_bytes()));
  impl_->mem_peak.Add(l).Set(static_cast<double>(m.peak_bytes()));
  impl_->rss.Add(l).Set(static_cast<double>(m.host_rss_bytes()));
}

void Metrics::CheckpointSaved(const std::string& job, int64_t time_ms) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto l = impl_->J(job);
  impl_->ckpts.Add(l).Increment();
  impl_->last_ckpt.Add(l).Set(static_cast<double>(time_ms) / 1000.0);
}

void Metrics::JobStarted(const std::string& job, int64_t restarts) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto l = impl_->J(job);
  impl_->ckpts.Add(l);
  Counter& r = impl_->restarts.Add(l);
  // A counter only goes up: a recovered coordinator catches up with the
  // job's stored count once; a later attempt's start changes nothing.
  if (static_cast<double>(restarts) > r.Value()) r.Increment(static_cast<double>(restarts) - r.Value());
}

void Metrics::Restarted(const std::string& job) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->restarts.Add(impl_->J(job)).Increment();
}

void Metrics::JobEnded(const std::string& job) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto& im = *impl_;
  for (int rank : im.ranks_of_job[job]) {
    const std::map<std::string, std::string> l = {{"job_id", job}, {"rank", std::to_string(rank)}};
    for (auto* fam : {&im.step, &im.loss, &im.lr, &im.tps, &im.mem_alloc, &im.mem_reserved,
                      &im.mem_peak, &im.rss})
      if (fam->Has(l)) fam->Remove(&fam->Add(l));
    if (im.tokens.Has(l)) im.tokens.Remove(&im.tokens.Add(l));
    for (const char* phase : {"forward", "backward", "optimizer", "exposed_comm"}) {
      auto pl = l;
      pl["phase"] = phase;
      if (im.phase.Has(pl)) im.phase.Remove(&im.phase.Add(pl));
    }
  }
  im.ranks_of_job.erase(job);
  if (im.jobs_with_job_series.erase(job)) {
    const std::map<std::string, std::string> l = {{"job_id", job}};
    if (im.ckpts.Has(l)) im.ckpts.Remove(&im.ckpts.Add(l));
    if (im.restarts.Has(l)) im.restarts.Remove(&im.restarts.Add(l));
    if (im.last_ckpt.Has(l)) im.last_ckpt.Remove(&im.last_ckpt.Add(l));
  }
}

void Metrics::EventsIngested(int n) { impl_->events.Increment(n); }

void Metrics::EventsDropped(const std::string& reason, int n) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->dropped.Add({{"reason", reason}}).Increment(n);
}

void Metrics::StoreError() { impl_->store_errors.Increment(); }

void Metrics::RpcLatency(const std::string& method, double seconds) {
  static const Histogram::BucketBoundaries kBuckets = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                                       0.05,   0.1,   0.25,   0.5,   1,    2.5};
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->rpc.Add({{"method", method}}, kBuckets).Observe(seconds);
}

}  // namespace ftune::server
