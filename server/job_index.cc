#include "job_index.h"

#include "job_state.h"

namespace ftune::server {

IndexedJob IndexedJob::Of(const v1::Job& job, int64_t ordinal) {
  IndexedJob e;
  e.id = job.id();
  e.ordinal = ordinal;
  e.state = job.state();
  e.priority = job.spec().priority();
  e.owner = job.owner();
  e.resources = PlannedResources(job.spec().resources(), job.planned_device_bytes());
  e.state_reason = job.state_reason();
  e.reason_code = job.reason_code();
  if (HoldsSlots(job.state())) {
    for (const auto& pl : job.placement()) {
      bool exited = false;
      for (const auto& r : job.ranks())
        if (r.rank() == pl.rank()) exited = r.exited();
      if (!exited) e.held_slots.emplace_back(pl.agent_id(), pl.slot());
    }
  }
  return e;
}

bool IndexedJob::operator==(const IndexedJob& o) const {
  return id == o.id && ordinal == o.ordinal && state == o.state && priority == o.priority &&
         owner == o.owner && resources.SerializeAsString() == o.resources.SerializeAsString() &&
         state_reason == o.state_reason && reason_code == o.reason_code &&
         held_slots == o.held_slots;
}

void JobIndex::Remove(const std::string& id) {
  auto it = live_.find(id);
  if (it == live_.end()) return;
  const IndexedJob& old = it->second;
  if (old.state == v1::QUEUED) {
    queue_.erase(old.key());
    not_behind_.erase(old.key());
    if (--queued_per_owner_[old.owner] == 0) queued_per_owner_.erase(old.owner);
  }
  if (!old.held_slots.empty()) ++used_version_;
  for (const auto& [agent, slot] : old.held_slots) {
    auto& slots = used_[agent];
    if (--slots[slot] == 0) slots.erase(slot);
    if (slots.empty()) used_.erase(agent);
  }
  if (--per_state_[old.state] == 0) per_state_.erase(old.state);
  live_.erase(it);
}

void JobIndex::Put(IndexedJob job, bool inserted) {
  const bool was_live = live_.count(job.id) > 0;
  Remove(job.id);
  if (IsTerminal(job.state)) {
    // Ended jobs are only counted. One that was not live has ended before
    // (or was inserted ended) and is counted already, unless new.
    if (was_live || inserted) ++per_state_[job.state];
    return;
  }
  ++per_state_[job.state];
  if (!job.held_slots.empty()) ++used_version_;
  for (const auto& [agent, slot] : job.held_slots) ++used_[agent][slot];
  auto [it, added] = live_.emplace(job.id, std::move(job));
  const IndexedJob* e = &it->second;
  if (e->state == v1::QUEUED) {
    queue_.emplace(e->key(), e);
    if (e->reason_code != kJobsAheadCode) not_behind_.emplace(e->key(), e);
    ++queued_per_owner_[e->owner];
  }
}

void JobIndex::AddEnded(v1::JobState state, int64_t count) {
  if (count > 0) per_state_[state] += count;
}

void JobIndex::Clear() {
  ++used_version_;
  queue_.clear();
  not_behind_.clear();
  queued_per_owner_.clear();
  per_state_.clear();
  used_.clear();
  live_.clear();
}

const IndexedJob* JobIndex::Find(const std::string& id) const {
  auto it = live_.find(id);
  return it == live_.end() ? nullptr : &it->second;
}

void JobIndex::ForEachQueued(const std::function<bool(const IndexedJob&)>& fn) const {
  for (const auto& [key, job] : queue_)
    if (!fn(*job)) return;
}

void JobIndex::ForEachQueuedNotBehind(const std::function<bool(const IndexedJob&)>& fn) const {
  for (const auto& [key, job] : not_behind_)
    if (!fn(*job)) return;
}

int64_t JobIndex::NumQueued(const std::string& owner) const {
  auto it = queued_per_owner_.find(owner);
  return it == queued_per_owner_.end() ? 0 : it->second;
}

std::map<int, int> JobIndex::CountByState() const {
  std::map<int, int> out;
  for (const auto& [state, n] : per_state_) out[state] = static_cast<int>(n);
  return out;
}

std::map<std::string, std::vector<int>> JobIndex::UsedSlots() const {
  std::map<std::string, std::vector<int>> out;
  for (const auto& [agent, slots] : used_) {
    std::vector<int>& v = out[agent];
    v.reserve(slots.size());
    for (const auto& [slot, n] : slots) v.push_back(slot);
  }
  return out;
}

std::string JobIndex::Diff(const JobIndex& other) const {
  for (const auto& [id, job] : live_) {
    const IndexedJob* o = other.Find(id);
    if (o == nullptr) return "job " + id + " is live here but not there";
    if (!(job == *o))
      return "job " + id + " differs: state " + std::to_string(job.state) + " vs " +
             std::to_string(o->state) + ", priority " + std::to_string(job.priority) + " vs " +
             std::to_string(o->priority) + ", reason '" + job.state_reason + "' vs '" +
             o->state_reason + "'";
  }
  for (const auto& [id, job] : other.live_)
    if (Find(id) == nullptr) return "job " + id + " is live there but not here";
  auto order = [](const std::map<QueueKey, const IndexedJob*>& m) {
    std::vector<std::string> ids;
    for (const auto& [key, job] : m) ids.push_back(job->id);
    return ids;
  };
  if (order(queue_) != order(other.queue_)) return "the queue order differs";
  if (order(not_behind_) != order(other.not_behind_))
    return "the queued jobs not behind others differ";
  if (queued_per_owner_ != other.queued_per_owner_) return "queued jobs per owner differ";
  if (per_state_ != other.per_state_) return "jobs per state differ";
  if (used_ != other.used_) return "used slots differ";
  return "";
}

}  // namespace ftune::server
