#include "agent_manager.h"

#include <utility>

namespace ftune::server {

AgentManager::AgentManager(Store* store, Clock* clock, Options options)
    : store_(store), clock_(clock), options_(options) {}

absl::Status AgentManager::Recover() {
  auto agents = store_->ListAgents();
  if (!agents.ok()) return agents.status();
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t now = NowMs();
  for (auto& a : *agents) {
    AgentState s;
    s.stored = std::move(a);
    s.alive = true;
    s.last_seen_ms = now;
    agents_[s.stored.agent.agent_id()] = std::move(s);
  }
  fleet_.reset();
  return absl::OkStatus();
}

absl::Status AgentManager::RegisterAgent(const v1::RegisterAgent& reg,
                                         std::shared_ptr<AgentLink> link) {
  if (reg.agent_id().empty()) return absl::InvalidArgumentError("register: agent_id is empty");
  if (reg.slots_size() == 0)
    return absl::InvalidArgumentError("register: agent " + reg.host() +
                                      " has no slots (no GPUs found and no --cpu-slots)");
  const std::vector<v1::RunningRank> running(reg.running().begin(), reg.running().end());
  bool check_lost_now = false;
  std::shared_ptr<AgentLink> replaced;
  {
    std::lock_guard<std::mutex> lock(mu_);
    const int64_t now = NowMs();
    if (auto it = agents_.find(reg.agent_id()); it != agents_.end() && it->second.link &&
                                                 it->second.alive &&
                                                 now - it->second.last_seen_ms <= LiveWindowMs()) {
      return absl::AlreadyExistsError(
          "agent " + reg.agent_id() + " is already connected (host " +
          it->second.stored.agent.host() + ", heard from " +
          std::to_string(now - it->second.last_seen_ms) +
          " ms ago); a second agent with its id is refused. Two hosts with one id (a copied "
          "--work-dir or --agent-id)? Give each its own");
    }
    AgentState& a = agents_[reg.agent_id()];
    // A link that went quiet is a stream the agent itself left (a network
    // cut the coordinator has not noticed): end it, the new one replaces it.
    replaced = std::move(a.link);
    a.stored.agent.set_agent_id(reg.agent_id());
    a.stored.agent.set_host(reg.host());
    *a.stored.agent.mutable_slots() = reg.slots();
    if (auto st = store_->PutAgent(a.stored); !st.ok()) return st;
    a.link = std::move(link);
    a.alive = true;
    a.last_seen_ms = now;
    a.reported_running = running;
    fleet_.reset();

    // Still under mu_: a job change committed after this read sends its
    // messages to the new link, one committed before is in the read.
    v1::CoordinatorToAgent registered;
    registered.mutable_registered()->set_heartbeat_interval_ms(options_.heartbeat_interval_ms);
    for (auto& r : listener_->UnwantedRanks(reg.agent_id(), running))
      *registered.mutable_registered()->add_stale() = std::move(r);
    a.link->Send(registered);
    v1::CoordinatorToAgent ack;
    ack.mutable_ack()->set_agent_seq(a.stored.acked_seq);
    a.link->Send(ack);

    a.lost_check_seq = reg.last_agent_seq();
    if (a.stored.acked_seq >= a.lost_check_seq) {
      check_lost_now = true;
      a.lost_check_seq = -1;
    }
  }
  if (replaced) replaced->Disconnect();
  if (check_lost_now) listener_->CheckLostRanks(reg.agent_id(), running);
  listener_->FleetChanged();
  return absl::OkStatus();
}

void AgentManager::Heartbeat(const std::string& agent_id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = agents_.find(agent_id);
  if (it != agents_.end()) it->second.last_seen_ms = NowMs();
}

void AgentManager::AgentDisconnected(const std::string& agent_id, const AgentLink* link) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = agents_.find(agent_id);
  if (it != agents_.end() && it->second.link.get() == link) it->second.link.reset();
}

std::vector<v1::Agent> AgentManager::ListAgents() {
  std::vector<v1::Agent> out;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [id, a] : agents_) {
      v1::Agent agent = a.stored.agent;
      agent.set_alive(a.alive);
      agent.set_last_seen_unix_ms(a.last_seen_ms);
      out.push_back(std::move(agent));
    }
  }
  for (const auto& pl : listener_->SlotHolderPlacements())
    for (auto& agent : out)
      if (agent.agent_id() == pl.agent_id()) *agent.add_used() = pl;
  return out;
}

void AgentManager::CheckLiveness() {
  std::set<std::string> dead;
  std::vector<std::shared_ptr<AgentLink>> links;
  {
    std::lock_guard<std::mutex> lock(mu_);
    const int64_t now = NowMs();
    for (auto& [id, a] : agents_) {
      if (a.alive && now - a.last_seen_ms > options_.agent_timeout_ms) {
        a.alive = false;
        fleet_.reset();
        if (a.link) links.push_back(std::move(a.link));
        a.link.reset();
        dead.insert(id);
      }
    }
  }
  if (!dead.empty()) listener_->AgentsDead(dead);
  // The stream may still be open (a paused agent, a stalled network): end it,
  // so that the agent registers again instead of heartbeating into a link the
  // coordinator no longer uses. After AgentsDead: the registration's reply
  // must already see its ranks' attempt as failed, so that it lists them as
  // stale.
  for (const auto& link : links) link->Disconnect();
}

std::shared_ptr<const std::vector<AgentView>> AgentManager::Fleet() {
  std::lock_guard<std::mutex> lock(mu_);
  if (fleet_) return fleet_;
  auto out = std::make_shared<std::vector<AgentView>>();
  out->reserve(agents_.size());
  for (const auto& [id, a] : agents_) {
    AgentView v;
    v.agent_id = id;
    v.host = a.stored.agent.host();
    v.alive = a.alive;
    v.slots.assign(a.stored.agent.slots().begin(), a.stored.agent.slots().end());
    out->push_back(std::move(v));
  }
  fleet_ = std::move(out);
  return fleet_;
}

void AgentManager::Send(const std::string& agent_id, const v1::CoordinatorToAgent& msg) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = agents_.find(agent_id);
  if (it != agents_.end() && it->second.link) it->second.link->Send(msg);
}

absl::StatusOr<AgentManager::EventSource> AgentManager::EventsArrived(
    const std::string& agent_id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = agents_.find(agent_id);
  if (it == agents_.end())
    return absl::FailedPreconditionError("agent " + agent_id + " sent events before registering");
  it->second.last_seen_ms = NowMs();
  return EventSource{it->second.stored.agent.host(), it->second.stored.acked_seq};
}

void AgentManager::EventsAcked(const std::string& agent_id, int64_t acked_seq) {
  std::vector<v1::RunningRank> running;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = agents_.find(agent_id);
    if (it == agents_.end()) return;
    AgentState& a = it->second;
    a.stored.acked_seq = acked_seq;
    if (a.lost_check_seq < 0 || acked_seq < a.lost_check_seq) return;
    a.lost_check_seq = -1;
    running = a.reported_running;
  }
  listener_->CheckLostRanks(agent_id, running);
}

}  // namespace ftune::server
