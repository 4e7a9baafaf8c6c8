// Prometheus metrics of the coordinator (prometheus-cpp), served on
// --metrics-listen at /metrics. Names and labels: docs/control-plane.md.
// Per-job counters appear at 0 when the job starts (JobStarted), so a query
// over them has data before the first checkpoint or restart; the fleet
// counters (store errors, events dropped by every reason) exist at 0 from
// construction, for the same reason. Per-job series are removed when the job
// ends, so a long-lived coordinator does not accumulate dead series.
//
// /metrics may require HTTP basic auth (Serve's `auth`, --metrics-auth): a
// scrape without an `Authorization: Basic` pair the check accepts gets 401
// and a `WWW-Authenticate` challenge, and no metric.
//
// With a TLS identity (Serve's `tls`, --metrics-tls-cert and -key) /metrics
// is HTTPS only: the exposer listens on 127.0.0.1 at a port of its own and
// a TlsTerminator (tls_terminator.h says why) on the address asked for.
//
// Thread-safe.
#ifndef FTUNE_SERVER_METRICS_H_
#define FTUNE_SERVER_METRICS_H_

#include <functional>
#include <memory>
#include <string>

#include "metrics_sink.h"
#include "tls_identity.h"

namespace prometheus {
class Registry;
}

namespace ftune::server {

class Metrics : public MetricsSink {
 public:
  Metrics();
  ~Metrics() override;

  // Whether a basic auth (user, password) pair may scrape; called on the
  // exposer's threads.
  using ScrapeAuth = std::function<bool(const std::string& user, const std::string& password)>;
  // Starts the HTTP exposer ("127.0.0.1:9464"); with `auth`, every request
  // to /metrics must pass it; with `tls`, it is served over TLS only.
  // Throws nothing, returns error text.
  std::string Serve(const std::string& listen, ScrapeAuth auth = nullptr,
                    std::shared_ptr<const TlsIdentity> tls = nullptr);
  // The identity later TLS handshakes use (a reloaded certificate); open
  // connections keep theirs. Nothing when not serving TLS.
  void SetTlsIdentity(std::shared_ptr<const TlsIdentity> tls);
  // The port /metrics listens on (useful with port 0); 0 when not serving.
  int port() const;
  std::shared_ptr<prometheus::Registry> registry();

  void JobStates(const std::map<v1::JobState, int>& counts) override;
  void Fleet(int agents_alive, int agents_dead, int slots_free, int slots_used) override;
  void Step(const std::string& job_id, int rank, const v1::StepMetrics& m) override;
  void Memory(const std::string& job_id, int rank, const v1::MemoryStats& m) override;
  void CheckpointSaved(const std::string& job_id, int64_t time_ms) override;
  void JobStarted(const std::string& job_id, int64_t restarts) override;
  void Restarted(const std::string& job_id) override;
  void JobEnded(const std::string& job_id) override;
  void EventsIngested(int n) override;
  void EventsDropped(const std::string& reason, int n) override;
  // A store operation failed (Store::SetErrorListener).
  void StoreError();
  // Latency of one RPC, by method name.
  void RpcLatency(const std::string& method, double seconds);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ftune::server

#endif  // FTUNE_SERVER_METRICS_H_
