#include "job_manager.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <optional>
#include <thread>

#include "job_state.h"
#include "jobspec.h"

namespace ftune::server {
namespace {

std::string JobIdFor(int64_t ordinal) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "job-%06lld", static_cast<long long>(ordinal));
  return buf;
}

// A rank's exit code for a bad spec or input (docs/control-plane.md, "Rank
// processes"), and the job's reason_code when that fails it.
constexpr int kBadInputExitCode = 2;
constexpr char kBadInputCode[] = "bad_input";

v1::RankStatus* RankStatusOf(v1::Job* job, int rank) {
  for (auto& r : *job->mutable_ranks())
    if (r.rank() == rank) return &r;
  return nullptr;
}

}  // namespace

JobManager::JobManager(Store* store, Clock* clock, MetricsSink* metrics, AgentManager* agents,
                       EventManager* events, Options options)
    : store_(store),
      clock_(clock),
      metrics_(metrics),
      agents_(agents),
      events_(events),
      options_(std::move(options)) {}

// ---------------------------------------------------------------- helpers

void JobManager::Pending::Merge(Pending&& other) {
  for (auto& e : other.events) events.push_back(std::move(e));
  for (auto& m : other.outbox) outbox.push_back(std::move(m));
  for (auto& j : other.ended_jobs) ended_jobs.push_back(std::move(j));
  for (auto& j : other.restarted_jobs) restarted_jobs.push_back(std::move(j));
  for (auto& j : other.started_jobs) started_jobs.push_back(std::move(j));
}

// The same resolution the CLI and the ranks use (proto/jobspec.h).
absl::Status JobManager::ValidateAndResolveSpec(v1::JobSpec* spec) {
  const ftune::Status resolved = ResolveJobSpec(spec);
  if (resolved.ok()) return absl::OkStatus();
  std::string msg = "invalid job spec: ";
  for (char c : resolved.message()) msg += c == '\n' ? std::string("; ") : std::string(1, c);
  return absl::InvalidArgumentError(msg);
}

absl::Status JobManager::CheckPaths(const v1::JobSpec& spec) const {
  SpecPaths paths;
  paths.model = {"model.model_name_or_path", spec.model().model_name_or_path()};
  for (int i = 0; i < spec.dataset().data_files_size(); ++i)
    paths.inputs.push_back(
        {"dataset.data_files[" + std::to_string(i) + "]", spec.dataset().data_files(i)});
  for (int i = 0; i < spec.dataset().eval_data_files_size(); ++i)
    paths.inputs.push_back(
        {"dataset.eval_data_files[" + std::to_string(i) + "]", spec.dataset().eval_data_files(i)});
  paths.output_dir = {"output_dir", spec.output_dir()};
  // The files live on the GPU hosts: what this host does not have passes on
  // its text, and the agent checks it again where it is.
  const ftune::Status st = options_.paths.CheckSpec(paths, /*must_exist=*/false);
  if (st.ok()) return absl::OkStatus();
  return absl::InvalidArgumentError("invalid job spec: " + st.message());
}

int64_t JobManager::PlanOutsideLock(const v1::JobSpec& spec) {
  if (!options_.plan_device_bytes) return 0;
  // Threads stuck on a hung filesystem are not waited for; past this many,
  // jobs go unplanned rather than pile up more.
  constexpr int kMaxPlansInFlight = 8;
  if (plans_in_flight_->fetch_add(1) >= kMaxPlansInFlight) {
    plans_in_flight_->fetch_sub(1);
    return 0;
  }
  struct Call {
    std::mutex mu;
    std::condition_variable done_cv;
    bool done = false;
    int64_t bytes = 0;
  };
  auto call = std::make_shared<Call>();
  std::thread([call, plan = options_.plan_device_bytes, spec, in_flight = plans_in_flight_] {
    absl::StatusOr<int64_t> bytes = plan(spec);
    std::lock_guard<std::mutex> lock(call->mu);
    call->bytes = bytes.ok() ? *bytes : 0;
    call->done = true;
    call->done_cv.notify_all();
    in_flight->fetch_sub(1);
  }).detach();
  std::unique_lock<std::mutex> lock(call->mu);
  if (!call->done_cv.wait_for(lock, std::chrono::milliseconds(options_.plan_timeout_ms),
                              [&] { return call->done; })) {
    std::fprintf(stderr,
                 "ftune-coordinator: the memory plan of a new job did not finish in %lld ms "
                 "(reading %s/config.json); scheduling it on resources.min_gpu_memory\n",
                 static_cast<long long>(options_.plan_timeout_ms),
                 spec.model().model_name_or_path().c_str());
    return 0;
  }
  return call->bytes;
}

void JobManager::ExpireEvents() {
  if (options_.event_retention_ms <= 0) return;
  std::lock_guard<std::mutex> lock(expiry_mu_);
  const int64_t now = NowMs();
  if (now < next_expiry_ms_) return;
  next_expiry_ms_ =
      now + std::clamp<int64_t>(options_.event_retention_ms / 10, 1000, 3600 * 1000);
  JobFilter f;
  f.states = {v1::SUCCEEDED, v1::FAILED, v1::CANCELLED};
  f.limit = 1 << 30;
  auto rows = store_->ListJobs(f);
  if (!rows.ok()) return;  // logged and counted by the store; next round
  int64_t jobs = 0, deleted = 0;
  for (const auto& [ord, job] : *rows) {
    if (now - job.update_time_unix_ms() <= options_.event_retention_ms) continue;
    if (events_expired_.count(job.id())) continue;
    auto n = store_->DeleteEventsBefore(job.id(), job.last_event_seq());
    if (!n.ok()) return;
    events_expired_.insert(job.id());
    deleted += *n;
    jobs += *n > 0;
  }
  if (deleted > 0)
    std::fprintf(stderr,
                 "ftune-coordinator: expired %lld events of %lld jobs that ended more than "
                 "%lld s ago (--event-retention)\n",
                 static_cast<long long>(deleted), static_cast<long long>(jobs),
                 static_cast<long long>(options_.event_retention_ms / 1000));
}

absl::StatusOr<std::vector<std::pair<int64_t, v1::Job>>> JobManager::ListSlotHolders() {
  JobFilter f;
  f.states = {v1::SCHEDULED, v1::RUNNING, v1::RESTARTING, v1::CANCELLING};
  f.limit = 1 << 20;
  return store_->ListJobs(f);
}

void JobManager::AddEvent(v1::Job* job, v1::JobEvent event, Pending* p) {
  event.set_job_id(job->id());
  event.set_seq(job->last_event_seq() + 1);
  if (event.time_unix_ms() == 0) event.set_time_unix_ms(NowMs());
  job->set_last_event_seq(event.seq());
  p->events.push_back(std::move(event));
}

absl::Status JobManager::Transition(v1::Job* job, v1::JobState to, const std::string& reason,
                                    const std::string& reason_code, Pending* p) {
  FTUNE_RETURN_IF_ERROR(CheckTransition(job->state(), to));
  v1::JobEvent e;
  e.set_rank(-1);
  e.set_attempt(job->attempt());
  e.mutable_state_change()->set_from(job->state());
  e.mutable_state_change()->set_to(to);
  e.mutable_state_change()->set_reason(reason);
  job->set_state(to);
  job->set_state_reason(reason);
  job->set_reason_code(reason_code);
  job->set_update_time_unix_ms(NowMs());
  AddEvent(job, std::move(e), p);
  if (IsTerminal(to)) p->ended_jobs.push_back(job->id());
  if (to == v1::RUNNING) p->started_jobs.emplace_back(job->id(), job->restarts());
  return absl::OkStatus();
}

bool JobManager::AllExited(const v1::Job& job) const {
  for (const auto& r : job.ranks())
    if (!r.exited()) return false;
  return true;
}

void JobManager::StopRanks(const v1::Job& job, bool save_checkpoint, const std::string& reason,
                           Pending* p) {
  std::set<std::string> agents;
  for (const auto& pl : job.placement()) {
    for (const auto& r : job.ranks())
      if (r.rank() == pl.rank() && !r.exited()) agents.insert(pl.agent_id());
  }
  for (const auto& a : agents) {
    v1::CoordinatorToAgent msg;
    auto* stop = msg.mutable_stop();
    stop->set_job_id(job.id());
    stop->set_attempt(job.attempt());
    stop->set_reason(reason);
    stop->set_save_checkpoint(save_checkpoint);
    stop->set_grace_seconds(options_.grace_seconds);
    p->outbox.emplace_back(a, std::move(msg));
  }
}

absl::Status JobManager::Requeue(v1::Job* job, Pending* p) {
  job->set_restarts(job->restarts() + 1);
  const std::string from = job->resume_checkpoint().empty()
                               ? "from the start (no complete checkpoint yet)"
                               : "from checkpoint " + job->resume_checkpoint();
  FTUNE_RETURN_IF_ERROR(Transition(
      job, v1::QUEUED,
      "restart " + std::to_string(job->restarts()) + " of " +
          std::to_string(job->spec().max_restarts()) + ": gang restarts " + from,
      "restarting", p));
  job->set_attempt(job->attempt() + 1);
  job->clear_placement();
  job->clear_ranks();
  p->restarted_jobs.push_back(job->id());
  return absl::OkStatus();
}

absl::Status JobManager::FailAttempt(v1::Job* job, const std::string& why,
                                     const std::string& code, Pending* p) {
  if (code == kBadInputCode) {
    // The rank said its spec or input is wrong: every restart would fail the
    // same way, so none is spent.
    FTUNE_RETURN_IF_ERROR(Transition(
        job, v1::FAILED,
        why + " (exit code " + std::to_string(kBadInputExitCode) +
            ": a bad spec or input, which a restart would not fix)",
        code, p));
    StopRanks(*job, /*save_checkpoint=*/false, "job failed: " + why, p);
    return absl::OkStatus();
  }
  if (job->restarts() < job->spec().max_restarts()) {
    FTUNE_RETURN_IF_ERROR(Transition(job, v1::RESTARTING, why, code, p));
    StopRanks(*job, /*save_checkpoint=*/false, "gang restart: " + why, p);
    if (AllExited(*job)) return Requeue(job, p);
    return absl::OkStatus();
  }
  FTUNE_RETURN_IF_ERROR(Transition(
      job, v1::FAILED,
      why + " (no restarts left: max_restarts is " + std::to_string(job->spec().max_restarts()) +
          ")",
      code, p));
  StopRanks(*job, /*save_checkpoint=*/false, "job failed: " + why, p);
  return absl::OkStatus();
}

absl::Status JobManager::RankExited(v1::Job* job, int32_t rank, int32_t exit_code,
                                    const std::string& failure, Pending* p) {
  v1::RankStatus* rs = RankStatusOf(job, rank);
  if (rs == nullptr || rs->exited()) return absl::OkStatus();
  rs->set_exited(true);
  rs->set_exit_code(exit_code);
  switch (job->state()) {
    case v1::SCHEDULED:
    case v1::RUNNING:
      if (exit_code == kBadInputExitCode) return FailAttempt(job, failure, kBadInputCode, p);
      if (exit_code != 0) return FailAttempt(job, failure, "rank_failed", p);
      if (AllExited(*job)) {
        return Transition(job, v1::SUCCEEDED,
                          "all " + std::to_string(job->ranks_size()) + " ranks finished", "", p);
      }
      return absl::OkStatus();
    case v1::RESTARTING:
      return AllExited(*job) ? Requeue(job, p) : absl::OkStatus();
    case v1::CANCELLING:
      return AllExited(*job) ? Transition(job, v1::CANCELLED, "cancelled by user; ranks stopped",
                                          "cancelled", p)
                             : absl::OkStatus();
    default:
      return absl::OkStatus();
  }
}

// Only the ranks the job's current attempt placed, each from the agent it was
// placed on, speak for the job: a rank of an earlier attempt (left running
// on an agent that was declared dead, or whose events were spooled while the
// coordinator restarted the gang) must not move the job's checkpoint,
// adapter or state, nor add to its events.
const char* JobManager::WhyDropped(const v1::Job& job, const v1::RankEvent& ev,
                                   const std::string& agent_id) {
  if (ev.attempt() != job.attempt()) return kDropStaleAttempt;
  for (const auto& pl : job.placement())
    if (pl.rank() == ev.rank()) return pl.agent_id() == agent_id ? nullptr : kDropNotPlaced;
  return kDropNotPlaced;
}

// What one rank event does to its job. `je` (EventManager's words for it) is
// appended first, so a state change it causes follows it in the job's events.
absl::Status JobManager::ApplyRankEvent(v1::Job* job, const v1::RankEvent& ev, v1::JobEvent je,
                                        Pending* p) {
  // Events after the end (ranks stopped after a failure) are kept, but move
  // no state; those of other attempts never get here (WhyDropped).
  const bool current = !IsTerminal(job->state());
  switch (ev.payload_case()) {
    case v1::RankEvent::kMessage: {
      const v1::RankMessage& m = ev.message();
      switch (m.payload_case()) {
        case v1::RankMessage::kHello: {
          AddEvent(job, std::move(je), p);
          if (!current) return absl::OkStatus();
          if (auto* rs = RankStatusOf(job, ev.rank())) rs->set_started(true);
          bool all = true;
          for (const auto& r : job->ranks()) all = all && r.started();
          if (all && job->state() == v1::SCHEDULED)
            return Transition(job, v1::RUNNING,
                              "all " + std::to_string(job->ranks_size()) + " ranks started", "",
                              p);
          return absl::OkStatus();
        }
        case v1::RankMessage::kStep:
          if (current && ev.rank() == 0) {
            job->set_last_step(m.step().step());
            job->set_last_loss(m.step().loss());
          }
          break;
        case v1::RankMessage::kCheckpoint:
          if (m.checkpoint().complete() && ev.rank() == 0) {
            v1::Checkpoint c;
            c.set_job_id(job->id());
            c.set_step(m.checkpoint().step());
            c.set_path(m.checkpoint().path());
            c.set_bytes(m.checkpoint().bytes());
            c.set_complete(true);
            c.set_create_time_unix_ms(ev.time_unix_ms());
            FTUNE_RETURN_IF_ERROR(store_->InsertCheckpoint(c));
            if (job->spec().training().save_total_limit() > 0)
              FTUNE_RETURN_IF_ERROR(store_->PruneCheckpoints(
                  job->id(), job->spec().training().save_total_limit()));
            job->set_resume_checkpoint(c.path());
          }
          break;
        case v1::RankMessage::kDone:
          if (ev.rank() == 0 && !m.done().adapter_path().empty())
            job->set_adapter_path(m.done().adapter_path());
          break;
        default:
          break;
      }
      AddEvent(job, std::move(je), p);
      return absl::OkStatus();
    }
    case v1::RankEvent::kExit: {
      const auto& x = ev.exit();
      const bool failed = x.exit_code() != 0 || x.hung();
      // The event's own words are the reason, with the last stderr line.
      std::string failure = failed ? je.error().message() : je.log().text();
      if (failed && x.stderr_tail_size() > 0)
        failure += ": " + x.stderr_tail(x.stderr_tail_size() - 1);
      AddEvent(job, std::move(je), p);
      if (!current) return absl::OkStatus();
      return RankExited(job, ev.rank(), failed ? (x.exit_code() != 0 ? x.exit_code() : -9) : 0,
                        failure, p);
    }
    case v1::RankEvent::kLaunchFailed: {
      const std::string failure = je.error().message();
      AddEvent(job, std::move(je), p);
      if (!current) return absl::OkStatus();
      return RankExited(job, ev.rank(), -1, failure, p);
    }
    default:
      return absl::OkStatus();
  }
}

// ---------------------------------------------------------------- JobService

absl::StatusOr<v1::Job> JobManager::CreateJob(v1::JobSpec spec, const std::string& request_id,
                                               const std::string& owner) {
  FTUNE_RETURN_IF_ERROR(ValidateAndResolveSpec(&spec));
  if (request_id.size() > 128)
    return absl::InvalidArgumentError("request_id is longer than 128 characters");
  FTUNE_RETURN_IF_ERROR(CheckPaths(spec));
  // Before the job lock: it reads the model's config.json.
  const int64_t planned = PlanOutsideLock(spec);
  std::lock_guard<std::mutex> lock(mu_);
  if (!request_id.empty()) {
    auto found = store_->FindJobByRequestId(request_id);
    if (!found.ok()) return found.status();
    if (found->has_value()) {
      // Request ids are one namespace; another user's job is neither
      // returned nor named.
      if ((*found)->owner() != owner)
        return absl::AlreadyExistsError("request_id '" + request_id +
                                        "' is already used by another user's job; choose another");
      v1::JobSpec same = spec;
      if (same.name().empty()) same.set_name((*found)->spec().name());
      if ((*found)->spec().SerializeAsString() != same.SerializeAsString())
        return absl::AlreadyExistsError("request_id '" + request_id +
                                        "' was already used for job " + (*found)->id() +
                                        " with a different spec");
      return **found;
    }
  }
  if (options_.max_queued_jobs > 0) {
    // Per owner, admins included: one user filling the queue must not lock
    // the others out of it.
    const int64_t queued = store_->NumQueuedJobs(owner);
    if (queued >= options_.max_queued_jobs)
      return absl::ResourceExhaustedError(
          (owner.empty() ? std::string("you have ") : "user '" + owner + "' has ") +
          std::to_string(queued) + " jobs queued, the most one user may have "
          "(--max-queued-jobs " + std::to_string(options_.max_queued_jobs) +
          "); submit again once some have started, or cancel some");
  }
  const auto fleet = agents_->Fleet();
  if (auto st = CheckFits(PlannedResources(spec.resources(), planned), *fleet); !st.ok()) {
    if (planned > 0 && planned > spec.resources().min_gpu_memory_bytes()) {
      return absl::ResourceExhaustedError(std::string(st.message()) +
                                          " (the memory plan needs " + FormatByteSize(planned) +
                                          " per rank; see `ftune-rank plan`)");
    }
    return st;
  }

  // Behind a queued job of the same or a higher priority, the new job waits
  // for it: stored with that reason, the pass below has nothing to write
  // for it (one commit per CreateJob, not two) unless the queue moves.
  bool behind = false;
  store_->ForEachQueuedJob([&](const IndexedJob& first) {
    behind = first.priority >= spec.priority();
    return false;
  });
  Pending p;
  v1::Job job;
  auto st = store_->Transaction([&]() -> absl::Status {
    auto ordinal = store_->NextOrdinal();
    if (!ordinal.ok()) return ordinal.status();
    job.set_id(JobIdFor(*ordinal));
    if (spec.name().empty()) spec.set_name(job.id());
    *job.mutable_spec() = spec;
    job.set_request_id(request_id);
    job.set_owner(owner);
    job.set_planned_device_bytes(planned);
    job.set_state(v1::QUEUED);
    job.set_state_reason(behind ? kJobsAheadReason : "waiting for the scheduler");
    if (behind) job.set_reason_code(kJobsAheadCode);
    job.set_create_time_unix_ms(NowMs());
    job.set_update_time_unix_ms(job.create_time_unix_ms());
    v1::JobEvent e;
    e.set_rank(-1);
    e.mutable_state_change()->set_to(v1::QUEUED);
    e.mutable_state_change()->set_reason("submitted");
    AddEvent(&job, std::move(e), &p);
    FTUNE_RETURN_IF_ERROR(store_->InsertJob(job, *ordinal));
    return events_->Append(p.events);
  });
  if (!st.ok()) return st;
  Flush(&p);
  Pending sched;
  ScheduleLocked(&sched);
  Flush(&sched);
  auto fresh = store_->GetJob(job.id());
  return fresh.ok() ? *fresh : job;
}

absl::StatusOr<v1::Job> JobManager::GetJob(const std::string& job_id) {
  std::lock_guard<std::mutex> lock(mu_);
  return store_->GetJob(job_id);
}

absl::StatusOr<ListJobsResult> JobManager::ListJobs(const v1::ListJobsRequest& req) {
  if (req.page_size() < 0) return absl::InvalidArgumentError("page_size must be >= 0");
  JobFilter f;
  f.limit = req.page_size() == 0 ? 100 : std::min(req.page_size(), 1000);
  if (!req.page_token().empty()) {
    char* end = nullptr;
    f.after_ordinal = std::strtoll(req.page_token().c_str(), &end, 10);
    if (*end != '\0' || f.after_ordinal < 0)
      return absl::InvalidArgumentError("page_token '" + req.page_token() +
                                        "' is not one this server returned");
  }
  for (int s : req.states()) f.states.push_back(static_cast<v1::JobState>(s));
  for (const auto& [k, v] : req.labels()) f.labels.emplace_back(k, v);
  if (!req.owner().empty()) f.owner = req.owner();
  std::lock_guard<std::mutex> lock(mu_);
  // One extra row tells whether another page exists.
  ++f.limit;
  auto rows = store_->ListJobs(f);
  if (!rows.ok()) return rows.status();
  ListJobsResult out;
  const size_t page = static_cast<size_t>(f.limit - 1);
  size_t bytes = 0;
  size_t i = 0;
  for (; i < rows->size() && i < page; ++i) {
    // A page ends early rather than outgrow what a client takes.
    const size_t size = (*rows)[i].second.ByteSizeLong();
    if (i > 0 && bytes + size > kMaxListJobsBytes) break;
    bytes += size;
    out.jobs.push_back((*rows)[i].second);
  }
  if (i < rows->size()) out.next_page_token = std::to_string((*rows)[i - 1].first);
  return out;
}

absl::StatusOr<v1::Job> JobManager::CancelJob(const std::string& job_id) {
  std::lock_guard<std::mutex> lock(mu_);
  Pending p;
  v1::Job job;
  auto st = store_->Transaction([&]() -> absl::Status {
    auto got = store_->GetJob(job_id);
    if (!got.ok()) return got.status();
    job = *got;
    if (IsTerminal(job.state()))
      return absl::FailedPreconditionError("job " + job_id + " already ended (" +
                                           StateName(job.state()) + "); nothing to cancel");
    if (job.state() == v1::CANCELLING) return absl::OkStatus();
    if (job.state() == v1::QUEUED) {
      FTUNE_RETURN_IF_ERROR(
          Transition(&job, v1::CANCELLED, "cancelled by user while queued", "cancelled", &p));
    } else {
      FTUNE_RETURN_IF_ERROR(Transition(&job, v1::CANCELLING,
                                       "cancelled by user; ranks save a checkpoint and stop",
                                       "cancelled", &p));
      StopRanks(job, /*save_checkpoint=*/true, "cancelled by user", &p);
      if (AllExited(job))
        FTUNE_RETURN_IF_ERROR(
            Transition(&job, v1::CANCELLED, "cancelled by user", "cancelled", &p));
    }
    FTUNE_RETURN_IF_ERROR(store_->UpdateJob(job));
    return events_->Append(p.events);
  });
  if (!st.ok()) return st;
  Flush(&p);
  Pending sched;
  ScheduleLocked(&sched);
  Flush(&sched);
  return job;
}

absl::StatusOr<std::vector<v1::Checkpoint>> JobManager::ListCheckpoints(
    const std::string& job_id) {
  std::lock_guard<std::mutex> lock(mu_);
  if (auto job = store_->GetJob(job_id); !job.ok()) return job.status();
  return store_->ListCheckpoints(job_id);
}

// ---------------------------------------------------------------- AgentService

bool JobManager::Rendezvous(const std::string& agent_id, const v1::RendezvousPublish& pub) {
  std::lock_guard<std::mutex> lock(mu_);
  auto job = store_->GetJob(pub.job_id());
  if (!job.ok() || job->attempt() != pub.attempt() || IsTerminal(job->state())) return false;
  std::set<std::string> targets;
  bool from_rank0 = false;
  for (const auto& pl : job->placement()) {
    targets.insert(pl.agent_id());
    from_rank0 = from_rank0 || (pl.rank() == 0 && pl.agent_id() == agent_id);
  }
  // Rank 0 publishes where its peers connect: from anyone else it could
  // lead a job's ranks (and their weights) to another host.
  if (!from_rank0) {
    if (metrics_) metrics_->EventsDropped(kDropRendezvousNotPlaced, 1);
    return false;
  }
  v1::CoordinatorToAgent msg;
  *msg.mutable_rendezvous() = pub;
  for (const auto& t : targets) agents_->Send(t, msg);
  return true;
}

// ---------------------------------------------------------------- rank events

absl::StatusOr<int> JobManager::ApplyRankEvents(
    std::vector<IngestedEvent> events, const std::function<absl::Status()>& also_in_transaction) {
  std::lock_guard<std::mutex> lock(mu_);
  Pending p;
  int applied = 0;
  std::map<std::string, int> dropped;  // by reason
  auto st = store_->Transaction([&]() -> absl::Status {
    applied = 0;
    dropped.clear();
    std::map<std::string, v1::Job> jobs;
    for (auto& in : events) {
      const v1::RankEvent& ev = *in.rank_event;
      auto jit = jobs.find(ev.job_id());
      if (jit == jobs.end()) {
        auto job = store_->GetJob(ev.job_id());
        if (absl::IsNotFound(job.status())) {  // nothing to attach it to
          ++dropped[kDropUnknownJob];
          continue;
        }
        if (!job.ok()) return job.status();  // not stored, not acked: the agent resends
        jit = jobs.emplace(ev.job_id(), *job).first;
      }
      if (const char* why = WhyDropped(jit->second, ev, in.agent_id)) {
        ++dropped[why];
        continue;
      }
      FTUNE_RETURN_IF_ERROR(ApplyRankEvent(&jit->second, ev, std::move(in.job_event), &p));
      ++applied;
    }
    for (const auto& [id, job] : jobs) FTUNE_RETURN_IF_ERROR(store_->UpdateJob(job));
    FTUNE_RETURN_IF_ERROR(events_->Append(p.events));
    return also_in_transaction();
  });
  if (!st.ok()) return st;
  if (metrics_)
    for (const auto& [why, n] : dropped) metrics_->EventsDropped(why, n);
  FlushAndReschedule(&p);
  return applied;
}

// ---------------------------------------------------------------- agents

std::vector<v1::RunningRank> JobManager::UnwantedRanks(
    const std::string& agent_id, const std::vector<v1::RunningRank>& running) {
  std::vector<v1::RunningRank> unwanted;
  for (const auto& r : running) {
    auto job = store_->GetJob(r.job_id());
    bool wanted = false;
    if (job.ok() && HoldsSlots(job->state()) && job->state() != v1::CANCELLING &&
        job->state() != v1::RESTARTING && job->attempt() == r.attempt()) {
      for (const auto& pl : job->placement())
        if (pl.rank() == r.rank() && pl.agent_id() == agent_id) wanted = true;
    }
    if (!wanted) unwanted.push_back(r);
  }
  return unwanted;
}

std::vector<v1::RankPlacement> JobManager::SlotHolderPlacements() {
  std::vector<v1::RankPlacement> out;
  auto rows = ListSlotHolders();
  if (!rows.ok()) return out;
  for (const auto& [ord, job] : *rows)
    for (const auto& pl : job.placement()) {
      out.push_back(pl);
      out.back().set_job_id(job.id());
    }
  return out;
}

void JobManager::CheckLostRanks(const std::string& agent_id,
                                const std::vector<v1::RunningRank>& running) {
  std::lock_guard<std::mutex> lock(mu_);
  Pending p;
  auto rows = ListSlotHolders();
  if (!rows.ok()) return;
  for (auto& [ord, job_row] : *rows) {
    v1::Job job = job_row;
    Pending local;
    v1::Assignment resend;
    auto st = store_->Transaction([&]() -> absl::Status {
      for (const auto& pl : job.placement()) {
        if (pl.agent_id() != agent_id) continue;
        const v1::RankStatus* rs = RankStatusOf(&job, pl.rank());
        if (rs == nullptr || rs->exited()) continue;
        bool is_running = false;
        for (const auto& r : running)
          if (r.job_id() == job.id() && r.attempt() == job.attempt() && r.rank() == pl.rank())
            is_running = true;
        if (is_running) continue;
        if (!rs->started() && job.state() == v1::SCHEDULED) {
          // The assignment may never have reached the agent: send it again.
          auto* ra = resend.add_ranks();
          ra->set_rank(pl.rank());
          ra->set_slot(pl.slot());
          continue;
        }
        FTUNE_RETURN_IF_ERROR(RankExited(&job, pl.rank(), -1,
                                         "rank " + std::to_string(pl.rank()) + " on " +
                                             pl.host() + " was lost: its agent restarted",
                                         &local));
      }
      if (local.events.empty()) return absl::OkStatus();
      FTUNE_RETURN_IF_ERROR(store_->UpdateJob(job));
      return events_->Append(local.events);
    });
    if (!st.ok()) continue;
    if (resend.ranks_size() > 0) {
      resend.set_job_id(job.id());
      resend.set_attempt(job.attempt());
      *resend.mutable_spec() = job.spec();
      resend.set_world_size(job.placement_size());
      resend.set_resume_checkpoint(job.resume_checkpoint());
      v1::CoordinatorToAgent msg;
      *msg.mutable_assign() = resend;
      local.outbox.emplace_back(agent_id, std::move(msg));
    }
    p.Merge(std::move(local));
  }
  FlushAndReschedule(&p);
}

void JobManager::AgentsDead(const std::set<std::string>& dead) {
  std::lock_guard<std::mutex> lock(mu_);
  Pending p;
  auto rows = ListSlotHolders();
  if (!rows.ok()) return;
  for (auto& [ord, row] : *rows) {
    v1::Job job = row;
    Pending local;
    auto st = store_->Transaction([&]() -> absl::Status {
      for (const auto& pl : job.placement()) {
        if (!dead.count(pl.agent_id())) continue;
        FTUNE_RETURN_IF_ERROR(RankExited(
            &job, pl.rank(), -1,
            "rank " + std::to_string(pl.rank()) + " lost: agent on " + pl.host() +
                " sent no heartbeat for " + std::to_string(options_.agent_timeout_ms / 1000) + "s",
            &local));
      }
      if (local.events.empty()) return absl::OkStatus();
      FTUNE_RETURN_IF_ERROR(store_->UpdateJob(job));
      return events_->Append(local.events);
    });
    if (!st.ok()) continue;
    p.Merge(std::move(local));
  }
  FlushAndReschedule(&p);
}

// ---------------------------------------------------------------- scheduling

std::vector<AgentView> JobManager::FreeFleetLocked() {
  // Until an agent registers or dies, or a job takes or frees slots, the
  // answer stays what it was (on a full fleet: nothing).
  const auto fleet = agents_->Fleet();
  const uint64_t used_version = store_->UsedSlotsVersion();
  if (free_fleet_.fleet == fleet && free_fleet_.used_version == used_version)
    return free_fleet_.agents;
  const std::map<std::string, std::vector<int>> used = store_->UsedSlots();
  std::vector<AgentView> out;
  for (const AgentView& a : *fleet) {
    if (!a.alive) continue;
    auto it = used.find(a.agent_id);
    if (it == used.end()) {
      out.push_back(a);
      continue;
    }
    if (NumUsed(a, it->second) == static_cast<int>(a.slots.size())) continue;
    out.push_back(a);
    out.back().used.insert(it->second.begin(), it->second.end());
  }
  free_fleet_ = {fleet, used_version, out};
  return out;
}

int JobManager::NumUsed(const AgentView& agent, const std::vector<int>& used) {
  int n = 0;
  for (const auto& s : agent.slots) n += std::binary_search(used.begin(), used.end(), s.index());
  return n;
}

// One pass over the queue in memory (store.h's job index), in scheduling
// order, up to the first job that does not fit; then one transaction for
// every placement and every reason that changed. A job already waiting
// behind others keeps its stored reason (the same words for all), so a
// pass writes only what moved: the jobs placed, the head of the queue, and
// jobs new to the queue.
void JobManager::ScheduleLocked(Pending* p) {
  GangPlacer placer(FreeFleetLocked());
  std::vector<Decision> decisions;  // placements, then reasons to store
  std::optional<QueueKey> blocked;
  store_->ForEachQueuedJob([&](const IndexedJob& job) {
    Decision d = placer.Place({job.id, job.priority, job.ordinal, job.resources});
    if (d.placed) {
      decisions.push_back(std::move(d));
      return true;
    }
    blocked = job.key();
    if (job.state_reason != d.reason || job.reason_code != d.reason_code)
      decisions.push_back(std::move(d));
    return false;
  });
  if (blocked) {
    store_->ForEachQueuedJobNotBehind([&](const IndexedJob& job) {
      // Ahead of the blocked job: placed above.
      if (*blocked < job.key()) decisions.push_back(JobsAhead(job.id));
      return true;
    });
  }
  if (decisions.empty()) return;

  Pending local;
  auto st = store_->Transaction([&]() -> absl::Status {
    local = Pending();
    for (const auto& d : decisions) {
      auto got = store_->GetJob(d.job_id);
      // One row that is unreadable (logged and counted by the store), or
      // not QUEUED as the index said (it and the rows must never disagree),
      // is left alone rather than stop every placement; any other error
      // ends the pass, to be tried again.
      if (absl::IsDataLoss(got.status())) continue;
      if (!got.ok() && !absl::IsNotFound(got.status())) return got.status();
      if (!got.ok() || got->state() != v1::QUEUED) {
        std::fprintf(stderr, "ftune-coordinator: scheduler skipped job %s: %s\n",
                     d.job_id.c_str(),
                     got.ok() ? ("stored as " + StateName(got->state()) + ", not QUEUED").c_str()
                              : "not stored");
        continue;
      }
      v1::Job& job = *got;
      if (!d.placed) {
        job.set_state_reason(d.reason);
        job.set_reason_code(d.reason_code);
        FTUNE_RETURN_IF_ERROR(store_->UpdateJob(job));
        continue;
      }
      job.clear_placement();
      job.clear_ranks();
      std::set<std::string> hosts;
      for (const auto& pl : d.placement) {
        *job.add_placement() = pl;
        job.add_ranks()->set_rank(pl.rank());
        hosts.insert(pl.host());
      }
      std::string where;
      for (const auto& h : hosts) where += (where.empty() ? "" : ", ") + h;
      FTUNE_RETURN_IF_ERROR(Transition(&job, v1::SCHEDULED,
                                       "placed " + std::to_string(d.placement.size()) +
                                           " ranks on " + where,
                                       "", &local));
      FTUNE_RETURN_IF_ERROR(store_->UpdateJob(job));
      std::map<std::string, v1::Assignment> per_agent;
      for (const auto& pl : d.placement) {
        auto* ra = per_agent[pl.agent_id()].add_ranks();
        ra->set_rank(pl.rank());
        ra->set_slot(pl.slot());
      }
      for (auto& [agent_id, as] : per_agent) {
        as.set_job_id(job.id());
        as.set_attempt(job.attempt());
        *as.mutable_spec() = job.spec();
        as.set_world_size(static_cast<int32_t>(d.placement.size()));
        as.set_resume_checkpoint(job.resume_checkpoint());
        v1::CoordinatorToAgent msg;
        *msg.mutable_assign() = as;
        local.outbox.emplace_back(agent_id, std::move(msg));
      }
    }
    return events_->Append(local.events);
  });
  // Not stored: nothing is sent, and the next pass decides again.
  if (!st.ok()) return;
  p->Merge(std::move(local));
}

void JobManager::ExpireCancelsLocked(Pending* p) {
  if (store_->CountJobsByState().count(v1::CANCELLING) == 0) return;  // no query
  const int64_t now = NowMs();
  const int64_t cancel_deadline_ms =
      2LL * options_.grace_seconds * 1000 + options_.agent_timeout_ms;
  JobFilter f;
  f.states = {v1::CANCELLING};
  f.limit = 1 << 20;
  auto rows = store_->ListJobs(f);
  if (!rows.ok()) return;
  for (auto& [ord, row] : *rows) {
    if (now - row.update_time_unix_ms() <= cancel_deadline_ms) continue;
    v1::Job job = row;
    Pending local;
    auto st = store_->Transaction([&]() -> absl::Status {
      for (auto& r : *job.mutable_ranks()) r.set_exited(true);
      FTUNE_RETURN_IF_ERROR(Transition(&job, v1::CANCELLED,
                                       "cancelled by user; some ranks did not confirm they "
                                       "stopped within " +
                                           std::to_string(cancel_deadline_ms / 1000) + "s",
                                       "cancelled", &local));
      FTUNE_RETURN_IF_ERROR(store_->UpdateJob(job));
      return events_->Append(local.events);
    });
    if (!st.ok()) continue;
    p->Merge(std::move(local));
  }
}

void JobManager::Tick() {
  std::lock_guard<std::mutex> lock(mu_);
  Pending p;
  ExpireCancelsLocked(&p);
  Flush(&p);
  Pending sched;
  ScheduleLocked(&sched);
  Flush(&sched);
  RefreshGaugesLocked();
}

// ---------------------------------------------------------------- after commit

void JobManager::Flush(Pending* p) {
  events_->Publish(p->events);
  for (auto& [agent_id, msg] : p->outbox) agents_->Send(agent_id, msg);
  if (metrics_) {
    for (const auto& [j, restarts] : p->started_jobs) metrics_->JobStarted(j, restarts);
    for (const auto& j : p->restarted_jobs) metrics_->Restarted(j);
    for (const auto& j : p->ended_jobs) metrics_->JobEnded(j);
  }
  p->events.clear();
  p->outbox.clear();
}

void JobManager::FlushAndReschedule(Pending* p) {
  Flush(p);
  if (p->ended_jobs.empty() && p->restarted_jobs.empty()) return;
  Pending sched;
  ScheduleLocked(&sched);
  Flush(&sched);
}

void JobManager::RefreshGauges() {
  std::lock_guard<std::mutex> lock(mu_);
  RefreshGaugesLocked();
  // Jobs a recovered coordinator finds live started before it did.
  if (!metrics_) return;
  if (auto live = ListSlotHolders(); live.ok()) {
    for (const auto& [ord, job] : *live) metrics_->JobStarted(job.id(), job.restarts());
  }
}

void JobManager::RefreshGaugesLocked() {
  if (!metrics_) return;
  std::map<v1::JobState, int> counts;
  for (int s = v1::QUEUED; s <= v1::CANCELLED; ++s) counts[static_cast<v1::JobState>(s)] = 0;
  for (const auto& [state, n] : store_->CountJobsByState())
    counts[static_cast<v1::JobState>(state)] = n;
  metrics_->JobStates(counts);
  int alive = 0, dead = 0, free = 0, used = 0;
  const std::map<std::string, std::vector<int>> used_slots = store_->UsedSlots();
  for (const auto& v : *agents_->Fleet()) {
    (v.alive ? alive : dead)++;
    if (!v.alive) continue;
    auto it = used_slots.find(v.agent_id);
    const int n = it == used_slots.end() ? 0 : NumUsed(v, it->second);
    used += n;
    free += static_cast<int>(v.slots.size()) - n;
  }
  metrics_->Fleet(alive, dead, free, used);
}

}  // namespace ftune::server
