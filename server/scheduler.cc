#include "scheduler.h"

#include <algorithm>
#include <map>

#include "jobspec.h"

namespace ftune::server {
namespace {

struct HostFree {
  const AgentView* agent;
  std::vector<int> slots;  // eligible free slot indexes, ascending
};

std::vector<HostFree> EligibleFree(const v1::ResourceSpec& r, const std::vector<AgentView>& agents,
                                   bool ignore_use) {
  std::vector<HostFree> out;
  for (const auto& a : agents) {
    if (!ignore_use && !a.alive) continue;
    HostFree h{&a, {}};
    for (const auto& s : a.slots) {
      if (s.memory_bytes() < r.min_gpu_memory_bytes()) continue;
      if (!ignore_use && a.used.count(s.index())) continue;
      h.slots.push_back(s.index());
    }
    std::sort(h.slots.begin(), h.slots.end());
    if (!h.slots.empty()) out.push_back(std::move(h));
  }
  // Deterministic order: most free first, then agent id.
  std::sort(out.begin(), out.end(), [](const HostFree& x, const HostFree& y) {
    if (x.slots.size() != y.slots.size()) return x.slots.size() > y.slots.size();
    return x.agent->agent_id < y.agent->agent_id;
  });
  return out;
}

std::string MemoryClause(const v1::ResourceSpec& r) {
  return r.min_gpu_memory_bytes() > 0 ? " with >= " + FormatByteSize(r.min_gpu_memory_bytes())
                                      : "";
}

// Picks slots for one job, or returns false. Ranks are numbered host by host
// so that neighbouring ranks share a host.
bool PickSlots(const v1::ResourceSpec& r, std::vector<HostFree> hosts,
           std::vector<v1::RankPlacement>* out) {
  const int n = r.num_ranks();
  const int g = r.gpus_per_host();
  std::vector<std::pair<const AgentView*, std::vector<int>>> chosen;
  if (g > 0) {
    const int need_hosts = n / g;
    std::vector<HostFree*> fit;
    for (auto& h : hosts)
      if (static_cast<int>(h.slots.size()) >= g) fit.push_back(&h);
    if (static_cast<int>(fit.size()) < need_hosts) return false;
    if (r.placement() == "pack") {
      // Best fit: the fullest hosts that still fit, leaving big holes free.
      std::stable_sort(fit.begin(), fit.end(), [](HostFree* x, HostFree* y) {
        return x->slots.size() < y->slots.size();
      });
    }
    for (int i = 0; i < need_hosts; ++i)
      chosen.push_back({fit[i]->agent, {fit[i]->slots.begin(), fit[i]->slots.begin() + g}});
  } else if (r.placement() == "spread") {
    int total = 0;
    for (const auto& h : hosts) total += static_cast<int>(h.slots.size());
    if (total < n) return false;
    std::vector<std::vector<int>> take(hosts.size());
    int placed = 0;
    for (size_t round = 0; placed < n; ++round)
      for (size_t i = 0; i < hosts.size() && placed < n; ++i)
        if (round < hosts[i].slots.size()) {
          take[i].push_back(hosts[i].slots[round]);
          ++placed;
        }
    for (size_t i = 0; i < hosts.size(); ++i)
      if (!take[i].empty()) chosen.push_back({hosts[i].agent, take[i]});
  } else {  // pack
    const HostFree* single = nullptr;
    for (const auto& h : hosts)
      if (static_cast<int>(h.slots.size()) >= n &&
          (single == nullptr || h.slots.size() < single->slots.size()))
        single = &h;
    if (single != nullptr) {
      chosen.push_back({single->agent, {single->slots.begin(), single->slots.begin() + n}});
    } else {
      int left = n;
      for (const auto& h : hosts) {
        if (left == 0) break;
        const int k = std::min<int>(left, static_cast<int>(h.slots.size()));
        chosen.push_back({h.agent, {h.slots.begin(), h.slots.begin() + k}});
        left -= k;
      }
      if (left > 0) return false;
    }
  }
  out->clear();
  int rank = 0;
  for (const auto& [agent, slots] : chosen)
    for (int s : slots) {
      v1::RankPlacement p;
      p.set_rank(rank++);
      p.set_agent_id(agent->agent_id);
      p.set_host(agent->host);
      p.set_slot(s);
      out->push_back(p);
    }
  return true;
}

}  // namespace

GangPlacer::GangPlacer(std::vector<AgentView> agents) : agents_(std::move(agents)) {
  for (size_t i = 0; i < agents_.size(); ++i) by_id_[agents_[i].agent_id] = i;
}

Decision GangPlacer::Place(const PendingJob& job) {
  Decision d;
  d.job_id = job.job_id;
  const auto hosts = EligibleFree(job.resources, agents_, /*ignore_use=*/false);
  if (PickSlots(job.resources, hosts, &d.placement)) {
    d.placed = true;
    for (const auto& p : d.placement) agents_[by_id_[p.agent_id()]].used.insert(p.slot());
    return d;
  }
  int free = 0;
  for (const auto& h : hosts) free += static_cast<int>(h.slots.size());
  d.reason = "waiting for slots: needs " + std::to_string(job.resources.num_ranks()) + " ranks" +
             MemoryClause(job.resources) +
             (job.resources.gpus_per_host() > 0
                  ? " (" + std::to_string(job.resources.gpus_per_host()) + " per host)"
                  : "") +
             ", " + std::to_string(free) + " such slots free on " +
             std::to_string(hosts.size()) + " live hosts";
  d.reason_code = kSlotsMissingCode;
  return d;
}

Decision JobsAhead(const std::string& job_id) {
  Decision d;
  d.job_id = job_id;
  d.reason = kJobsAheadReason;
  d.reason_code = kJobsAheadCode;
  return d;
}

std::vector<Decision> Schedule(std::vector<PendingJob> pending,
                               const std::vector<AgentView>& agents) {
  std::stable_sort(pending.begin(), pending.end(), [](const PendingJob& a, const PendingJob& b) {
    if (a.priority != b.priority) return a.priority > b.priority;
    return a.ordinal < b.ordinal;
  });
  GangPlacer placer(agents);
  std::vector<Decision> out;
  bool blocked = false;
  for (const auto& job : pending) {
    out.push_back(blocked ? JobsAhead(job.job_id) : placer.Place(job));
    blocked = blocked || !out.back().placed;
  }
  return out;
}

absl::Status CheckFits(const v1::ResourceSpec& r, const std::vector<AgentView>& agents) {
  if (agents.empty())
    return absl::ResourceExhaustedError(
        "no agents have registered: start ftune-agent on the GPU hosts (or with --cpu-slots N) "
        "before submitting jobs");
  const auto hosts = EligibleFree(r, agents, /*ignore_use=*/true);
  std::vector<v1::RankPlacement> ignored;
  if (PickSlots(r, hosts, &ignored)) return absl::OkStatus();
  int eligible = 0;
  int total = 0;
  for (const auto& h : hosts) eligible += static_cast<int>(h.slots.size());
  for (const auto& a : agents) total += static_cast<int>(a.slots.size());
  std::string msg = "job needs " + std::to_string(r.num_ranks()) + " ranks" + MemoryClause(r);
  if (r.gpus_per_host() > 0) {
    int hosts_fit = 0;
    for (const auto& h : hosts)
      if (static_cast<int>(h.slots.size()) >= r.gpus_per_host()) ++hosts_fit;
    msg += " on " + std::to_string(r.num_ranks() / r.gpus_per_host()) + " hosts of " +
           std::to_string(r.gpus_per_host()) + " slots, but only " + std::to_string(hosts_fit) +
           " registered hosts have that many";
  } else {
    msg += ", but the registered fleet has " + std::to_string(eligible) + " such slots";
  }
  msg += " (" + std::to_string(agents.size()) + " agents, " + std::to_string(total) +
         " slots in all)";
  return absl::ResourceExhaustedError(msg);
}

v1::ResourceSpec PlannedResources(const v1::ResourceSpec& resources,
                                  int64_t planned_device_bytes) {
  v1::ResourceSpec r = resources;
  if (planned_device_bytes > r.min_gpu_memory_bytes()) {
    r.set_min_gpu_memory_bytes(planned_device_bytes);
  }
  return r;
}

}  // namespace ftune::server
