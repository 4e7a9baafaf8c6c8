#include "worker/agent/rank_supervisor.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "channel.h"
#include "jobspec.h"
#include "ftune/absl_status.h"
#include "ftune/file_util.h"
#include "worker/agent/event_size.h"
#include "worker/agent/log.h"

extern char** environ;

namespace ftune::agent {
namespace {

// A rank that stops reading its channel must not block the agent forever.
constexpr int kChannelSendTimeoutSeconds = 2;
// How long the waiter lets the reader drain messages a dead rank left behind
// before cutting the channel (a helper process may still hold it open).
constexpr absl::Duration kDrainTimeout = absl::Seconds(2);

bool SafePathComponent(const std::string& s) {
  if (s.empty() || s.size() > 128 || s == "." || s == "..") return false;
  return std::all_of(s.begin(), s.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '_' || c == '.';
  });
}

// Moves fd above the stdio range (the child's 0-2 are redirected), keeping
// it close-on-exec. An agent started with a closed stdin could otherwise get
// fd 0 for a channel.
int AboveStdio(int fd) {
  if (fd > 2) return fd;
  int moved = ::fcntl(fd, F_DUPFD_CLOEXEC, 3);
  ::close(fd);
  return moved;
}

std::string Describe(const std::string& job_id, int attempt, int rank) {
  return absl::StrCat("job ", job_id, " attempt ", attempt, " rank ", rank);
}

// What a rank may see of the agent's environment: what the loader, CUDA,
// NCCL/Gloo and the trainer read (grep getenv in worker/), and no more, so
// the agent's own secrets, LD_PRELOAD and the like never reach a job.
constexpr const char* kRankEnv[] = {
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ", "TMPDIR", "LD_LIBRARY_PATH",
    // The trainer: its interface for collectives and its data cache.
    "FTUNE_COMM_HOST", "FTUNE_DATA_CACHE", "XDG_CACHE_HOME",
    // LibTorch's CPU threads and allocator, Gloo's interface.
    "OMP_NUM_THREADS", "PYTORCH_CUDA_ALLOC_CONF", "GLOO_SOCKET_IFNAME"};
constexpr const char* kRankEnvPrefixes[] = {"LC_", "NCCL_", "CUDA_"};

bool RankMaySee(absl::string_view name, const std::vector<std::string>& extra) {
  for (const char* n : kRankEnv)
    if (name == n) return true;
  for (const char* p : kRankEnvPrefixes)
    if (absl::StartsWith(name, p)) return true;
  for (const std::string& n : extra)
    if (name == n) return true;
  return false;
}

std::string Flag(absl::string_view name, absl::string_view value) {
  return absl::StrCat("--", name, "=", value);
}

}  // namespace

struct RankSupervisor::Rank {
  std::string job_id;
  int attempt = 0;
  int rank = 0;
  int slot = 0;
  std::string log_path;
  std::unique_ptr<RankProcess> process;
  std::unique_ptr<Channel> channel;
  absl::Mutex write_mu;  // one writer at a time on the channel

  // Guarded by RankSupervisor::mu_.
  absl::Time last_activity;
  bool stopping = false;
  absl::Time term_at;
  absl::Time kill_at;
  bool term_sent = false;
  bool kill_sent = false;
  bool hung = false;
  bool rendezvous_sent = false;
  bool reader_done = false;
  bool exited = false;  // reaped; its exit is about to be spooled

  std::thread reader;
  std::thread waiter;

  std::string name() const { return Describe(job_id, attempt, rank); }
};

RankSupervisor::RankSupervisor(Options options, std::vector<HostSlot> slots, Spool* spool,
                               ProcessLauncher* launcher, RendezvousSink sink)
    : options_(std::move(options)),
      slots_(std::move(slots)),
      spool_(spool),
      launcher_(launcher),
      sink_(std::move(sink)),
      clock_(options_.clock != nullptr ? options_.clock : RealClock()) {
  if (!options_.allowed_roots.empty()) {
    std::vector<std::string> roots = options_.allowed_roots;
    roots.push_back(options_.work_dir);
    Result<PathPolicy> policy = PathPolicy::Create(roots);
    if (policy.ok()) {
      paths_ = *std::move(policy);
    } else {
      // main.cc checks the flags; this is the safety net: allow only work_dir.
      LogError(absl::StrCat("allowed roots: ", policy.status().message(),
                            "; jobs may only use ", options_.work_dir));
      paths_ = *PathPolicy::Create({options_.work_dir});
    }
  }
  // A rank may die while a message to it is in flight; that must be an EPIPE
  // error on the write, not a signal that kills the agent.
  ::signal(SIGPIPE, SIG_IGN);
  if (options_.poll_interval > absl::ZeroDuration()) timer_ = std::thread([this] { TimerLoop(); });
}

RankSupervisor::~RankSupervisor() {
  {
    absl::MutexLock lock(&mu_);
    stop_timer_ = true;
  }
  if (timer_.joinable()) timer_.join();
  std::vector<std::shared_ptr<Rank>> live;
  {
    absl::MutexLock lock(&mu_);
    for (auto& [key, r] : live_) live.push_back(r);
  }
  for (auto& r : live) r->process->Signal(SIGKILL);
  {
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(
        +[](std::map<Key, std::shared_ptr<Rank>>* m) { return m->empty(); }, &live_));
  }
  CheckTimers();  // joins the finished threads (and tries the held events once more)
  absl::MutexLock lock(&held_mu_);
  if (!held_.empty()) {
    LogError(absl::StrCat("exiting with ", held_.size(),
                          " events the full spool never took; they are lost"));
  }
}

void RankSupervisor::TimerLoop() {
  for (;;) {
    {
      absl::MutexLock lock(&mu_);
      if (mu_.AwaitWithTimeout(absl::Condition(&stop_timer_), options_.poll_interval)) return;
    }
    CheckTimers();
  }
}

namespace {

constexpr size_t kMaxHeldEvents = 10000;

// What the coordinator needs to move the job on: never dropped while held.
bool MustKeep(const v1::RankEvent& e) {
  if (!e.has_message()) return true;  // exit, launch failure
  const v1::RankMessage& m = e.message();
  return m.has_checkpoint() || m.has_error() || m.has_done() || m.has_rendezvous_publish();
}

}  // namespace

void RankSupervisor::SpoolEvent(v1::RankEvent* event) {
  event->set_time_unix_ms(absl::ToUnixMillis(clock_->Now()));
  if (const std::string cut = FitEvent(event); !cut.empty()) {
    LogWarning(absl::StrCat(Describe(event->job_id(), event->attempt(), event->rank()), ": ",
                            cut));
  }
  absl::MutexLock lock(&held_mu_);
  SpoolHeldLocked();
  if (held_.empty()) {
    absl::Status s = spool_->Append(event);
    if (s.ok()) return;
    if (s.code() != absl::StatusCode::kResourceExhausted) {
      LogError(absl::StrCat("lost an event of ",
                            Describe(event->job_id(), event->attempt(), event->rank()), ": ",
                            s.message()));
      return;
    }
    LogError(absl::StrCat(s.message(), "; holding events in memory until it can be written"));
  }
  if (held_.size() >= kMaxHeldEvents && !MustKeep(*event)) {
    if (num_held_dropped_++ % 1000 == 0) {
      LogWarning(absl::StrCat("the spool is still full: dropped ", num_held_dropped_,
                              " metrics and log events so far (exits and checkpoints are kept)"));
    }
    return;
  }
  held_.push_back(*event);
}

void RankSupervisor::SpoolHeldLocked() {
  if (held_.empty()) return;
  size_t num_spooled = 0;
  while (!held_.empty()) {
    if (!spool_->Append(&held_.front()).ok()) break;
    held_.pop_front();
    ++num_spooled;
  }
  if (held_.empty()) {
    LogInfo(absl::StrCat("the spool takes events again: ", num_spooled,
                         " held in memory are spooled", num_held_dropped_ > 0
                             ? absl::StrCat(", ", num_held_dropped_, " were dropped")
                             : std::string()));
    num_held_dropped_ = 0;
  }
}

void RankSupervisor::ReportLaunchFailed(const std::string& job_id, int attempt, int rank,
                                        const std::string& message) {
  LogError(absl::StrCat("cannot start ", Describe(job_id, attempt, rank), ": ", message));
  v1::RankEvent event;
  event.set_job_id(job_id);
  event.set_attempt(attempt);
  event.set_rank(rank);
  event.mutable_launch_failed()->set_message(message);
  SpoolEvent(&event);
}

void RankSupervisor::ReportBadInput(const std::string& job_id, int attempt, int rank,
                                    const std::string& message) {
  LogError(absl::StrCat("not starting ", Describe(job_id, attempt, rank), ": ", message));
  v1::RankEvent event;
  event.set_job_id(job_id);
  event.set_attempt(attempt);
  event.set_rank(rank);
  event.mutable_exit()->set_exit_code(2);
  event.mutable_exit()->add_stderr_tail(absl::StrCat("ftune-agent: ", message));
  SpoolEvent(&event);
}

absl::StatusOr<std::string> RankSupervisor::CheckPaths(const std::string& job_id,
                                                       const std::string& job_dir,
                                                       v1::JobSpec* spec) const {
  // The path resolved, or as it was when missing (the rank then says it is
  // missing: exit 2, the file named) or empty (the rank refuses the spec).
  const auto check = [&](const std::string& key, const std::string& path,
                         PathPolicy::Kind kind) -> absl::StatusOr<std::string> {
    if (path.empty()) return path;
    Result<std::string> resolved = paths_.Check(key, path, kind);
    if (resolved.status().code() == StatusCode::kNotFound) return path;
    return ToAbsl(std::move(resolved));
  };
  FTUNE_ASSIGN_OR_RETURN(std::string model, check("model.model_name_or_path",
                                                  spec->model().model_name_or_path(),
                                                  PathPolicy::Kind::kInputDir));
  if (model != spec->model().model_name_or_path())
    spec->mutable_model()->set_model_name_or_path(model);
  for (const bool eval : {false, true}) {
    const auto& files = eval ? spec->dataset().eval_data_files() : spec->dataset().data_files();
    for (int i = 0; i < files.size(); ++i) {
      FTUNE_ASSIGN_OR_RETURN(
          std::string file,
          check(absl::StrCat(eval ? "dataset.eval_data_files[" : "dataset.data_files[", i, "]"),
                files[i], PathPolicy::Kind::kInputFile));
      if (file == files[i]) continue;
      auto* d = spec->mutable_dataset();
      *(eval ? d->mutable_eval_data_files(i) : d->mutable_data_files(i)) = file;
    }
  }
  if (spec->output_dir().empty()) return job_dir + "/output";
  FTUNE_ASSIGN_OR_RETURN(std::string output_dir,
                         check("output_dir", spec->output_dir(), PathPolicy::Kind::kOutputDir));
  spec->set_output_dir(output_dir);
  // Each job its own subdirectory: another job naming the same output_dir
  // never reads or prunes this one's checkpoints.
  return absl::StrCat(output_dir, "/", job_id);
}

std::vector<std::string> RankSupervisor::BuildEnv(const HostSlot& slot) const {
  std::vector<std::string> env;
  std::vector<std::string> overrides = {"NCCL_NVLS_ENABLE=0"};
  if (slot.is_gpu()) {
    overrides.push_back(absl::StrCat("CUDA_VISIBLE_DEVICES=", slot.gpu_index));
    // The slot's index is NVML's, which is PCI bus order; CUDA's default order
    // is "fastest first", so without this the index could name another GPU.
    overrides.push_back("CUDA_DEVICE_ORDER=PCI_BUS_ID");
  }
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    absl::string_view entry(*e);
    const size_t eq = entry.find('=');
    if (eq == absl::string_view::npos || !RankMaySee(entry.substr(0, eq), options_.extra_env))
      continue;
    bool replaced = false;
    for (const std::string& o : overrides) {
      if (absl::StartsWith(entry, o.substr(0, o.find('=') + 1))) replaced = true;
    }
    if (!replaced) env.emplace_back(entry);
  }
  env.insert(env.end(), overrides.begin(), overrides.end());
  return env;
}

void RankSupervisor::Assign(const v1::Assignment& a) {
  absl::MutexLock assign_lock(&assign_mu_);
  std::vector<const v1::RankAssignment*> todo;
  bool closed;
  {
    absl::MutexLock lock(&mu_);
    closed = closed_;
    for (const v1::RankAssignment& ra : a.ranks()) {
      if (started_.count(Key(a.job_id(), a.attempt(), ra.rank())) > 0) {
        LogInfo(absl::StrCat(Describe(a.job_id(), a.attempt(), ra.rank()),
                             " was already started here; ignoring the repeated assignment"));
        continue;
      }
      started_.insert(Key(a.job_id(), a.attempt(), ra.rank()));
      todo.push_back(&ra);
    }
  }
  if (todo.empty()) return;
  auto fail_all = [&](const std::string& message) {
    for (const v1::RankAssignment* ra : todo)
      ReportLaunchFailed(a.job_id(), a.attempt(), ra->rank(), message);
  };
  if (closed) {
    fail_all("the agent is shutting down");
    return;
  }
  if (!SafePathComponent(a.job_id())) {
    fail_all(absl::StrCat("job id '", a.job_id(),
                          "' cannot name a directory (use 1-128 characters of A-Z a-z 0-9 . _ -)"));
    return;
  }
  const std::string job_dir = absl::StrCat(options_.work_dir, "/jobs/", a.job_id());
  const std::string attempt_dir = absl::StrCat(job_dir, "/attempt-", a.attempt());
  if (absl::Status s = ToAbsl(MakeDirectories(attempt_dir)); !s.ok()) {
    fail_all(absl::StrCat(s.message(), "; pass a writable --work-dir"));
    return;
  }
  // The paths the rank will open, checked where the files are and
  // resolved, so the rank opens what was checked.
  v1::JobSpec spec = a.spec();
  absl::StatusOr<std::string> output_dir = CheckPaths(a.job_id(), job_dir, &spec);
  if (output_dir.ok() && !a.resume_checkpoint().empty()) {
    // It came from the coordinator, as rank 0 of an earlier attempt
    // reported it: still, only a directory under the roots. A missing one
    // is the rank's to handle (it falls back to an earlier checkpoint).
    absl::Status resume = ToAbsl(
        paths_.Check("resume checkpoint", a.resume_checkpoint(), PathPolicy::Kind::kInputDir)
            .status());
    if (!resume.ok() && !absl::IsNotFound(resume)) output_dir = resume;
  }
  if (!output_dir.ok()) {
    for (const v1::RankAssignment* ra : todo)
      ReportBadInput(a.job_id(), a.attempt(), ra->rank(),
                     absl::StrCat(output_dir.status().message(),
                                  paths_.restricted() ? " (this agent's --allowed-root)" : ""));
    return;
  }
  const std::string spec_path = attempt_dir + "/spec.yaml";
  if (absl::Status s = ToAbsl(WriteFileAtomically(spec_path, JobSpecToYaml(spec))); !s.ok()) {
    fail_all(absl::StrCat(s.message(), "; pass a writable --work-dir"));
    return;
  }
  if (absl::Status s = ToAbsl(MakeDirectories(*output_dir)); !s.ok()) {
    fail_all(absl::StrCat(s.message(), "; make the job's output_dir writable by the agent"));
    return;
  }
  for (const v1::RankAssignment* ra : todo) LaunchRank(a, *ra, spec_path, attempt_dir, *output_dir);
}

void RankSupervisor::LaunchRank(const v1::Assignment& a, const v1::RankAssignment& ra,
                                const std::string& spec_path, const std::string& attempt_dir,
                                const std::string& output_dir) {
  const HostSlot* slot = nullptr;
  for (const HostSlot& s : slots_) {
    if (s.slot.index() == ra.slot()) slot = &s;
  }
  if (slot == nullptr) {
    ReportLaunchFailed(
        a.job_id(), a.attempt(), ra.rank(),
        absl::StrCat("slot ", ra.slot(), " does not exist on this host (it has ", slots_.size(),
                     " slots, 0-", static_cast<int>(slots_.size()) - 1, ")"));
    return;
  }
  std::string busy;
  {
    absl::MutexLock lock(&mu_);
    std::shared_ptr<Rank> holder;
    for (const auto& [key, r] : live_) {
      if (r->slot == ra.slot()) holder = r;
    }
    if (holder && holder->stopping && !closed_) {
      LogInfo(absl::StrCat(Describe(a.job_id(), a.attempt(), ra.rank()), " waits for slot ",
                           ra.slot(), ": ", holder->name(), " is stopping"));
      WaitingLaunch w{a, spec_path, attempt_dir, output_dir};
      w.assignment.clear_ranks();
      *w.assignment.add_ranks() = ra;
      waiting_.push_back(std::move(w));
      return;
    }
    if (holder) busy = absl::StrCat("slot ", ra.slot(), " is busy with ", holder->name());
  }
  if (!busy.empty()) {
    ReportLaunchFailed(a.job_id(), a.attempt(), ra.rank(), busy);
    return;
  }
  if (ra.rank() < 0 || ra.rank() >= a.world_size()) {
    ReportLaunchFailed(a.job_id(), a.attempt(), ra.rank(),
                       absl::StrCat("rank ", ra.rank(), " is outside world_size ", a.world_size()));
    return;
  }

  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) {
    ReportLaunchFailed(a.job_id(), a.attempt(), ra.rank(),
                       absl::StrCat("cannot create the rank channel: ", ErrnoMessage(errno)));
    return;
  }
  const int parent_fd = AboveStdio(fds[0]);
  const int child_fd = AboveStdio(fds[1]);
  if (parent_fd < 0 || child_fd < 0) {
    if (parent_fd >= 0) ::close(parent_fd);
    if (child_fd >= 0) ::close(child_fd);
    ReportLaunchFailed(a.job_id(), a.attempt(), ra.rank(),
                       "out of file descriptors for the rank channel");
    return;
  }
  struct timeval tv {
    kChannelSendTimeoutSeconds, 0
  };
  ::setsockopt(parent_fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));

  LaunchRequest req;
  req.binary = options_.rank_binary;
  // --flag=value: a value that starts with '-' stays a value.
  req.argv = {options_.rank_binary,
              "run",
              Flag("channel-fd", std::to_string(child_fd)),
              Flag("spec", spec_path),
              Flag("job-id", a.job_id()),
              Flag("attempt", std::to_string(a.attempt())),
              Flag("rank", std::to_string(ra.rank())),
              Flag("world-size", std::to_string(a.world_size())),
              Flag("device", slot->device()),
              Flag("output-dir", output_dir)};
  if (!a.resume_checkpoint().empty())
    req.argv.push_back(Flag("resume-from", a.resume_checkpoint()));
  req.env = BuildEnv(*slot);
  req.stderr_path = absl::StrCat(attempt_dir, "/rank-", ra.rank(), ".log");
  req.inherit_fd = child_fd;

  absl::StatusOr<std::unique_ptr<RankProcess>> process = launcher_->Launch(req);
  ::close(child_fd);
  if (!process.ok()) {
    ::close(parent_fd);
    ReportLaunchFailed(a.job_id(), a.attempt(), ra.rank(), std::string(process.status().message()));
    return;
  }

  auto rank = std::make_shared<Rank>();
  rank->job_id = a.job_id();
  rank->attempt = a.attempt();
  rank->rank = ra.rank();
  rank->slot = ra.slot();
  rank->log_path = req.stderr_path;
  rank->process = std::move(*process);
  rank->channel = std::make_unique<Channel>(parent_fd);
  std::string rendezvous;
  bool deliver = false;
  {
    absl::MutexLock lock(&mu_);
    rank->last_activity = clock_->Now();
    live_[Key(rank->job_id, rank->attempt, rank->rank)] = rank;
    auto it = rendezvous_in_.find(AttemptKey(rank->job_id, rank->attempt));
    if (it != rendezvous_in_.end()) {
      rendezvous = it->second;
      deliver = true;
      rank->rendezvous_sent = true;
    }
    // Both threads start under the lock so that a waiter finishing at once
    // cannot move the rank to finished_ before its thread objects exist.
    rank->reader = std::thread([this, rank] { ReadLoop(rank); });
    rank->waiter = std::thread([this, rank] { WaitLoop(rank); });
  }
  LogInfo(absl::StrCat("started ", rank->name(), " on slot ", ra.slot(), " (", slot->device(),
                       ", pid ", rank->process->pid(), "), log ", rank->log_path));
  if (deliver) {
    v1::AgentMessage msg;
    msg.mutable_rendezvous()->set_data(rendezvous);
    SendToRank(rank, msg);
  }
}

void RankSupervisor::SendToRank(const std::shared_ptr<Rank>& rank, const v1::AgentMessage& msg) {
  absl::MutexLock lock(&rank->write_mu);
  if (!rank->channel->Write(msg)) {
    // The rank is gone or not reading; its exit (or the silence timer) will
    // tell the coordinator, nothing more to do here.
    LogWarning(absl::StrCat("cannot send to ", rank->name(), ": ", rank->channel->error()));
  }
}

void RankSupervisor::ReadLoop(const std::shared_ptr<Rank>& rank) {
  v1::RankMessage msg;
  while (rank->channel->Read(&msg)) {
    {
      absl::MutexLock lock(&mu_);
      rank->last_activity = clock_->Now();
    }
    if (msg.payload_case() == v1::RankMessage::kRendezvousPublish) {
      v1::RendezvousPublish publish;
      publish.set_job_id(rank->job_id);
      publish.set_attempt(rank->attempt);
      publish.set_data(msg.rendezvous_publish());
      {
        absl::MutexLock lock(&mu_);
        rendezvous_out_[AttemptKey(rank->job_id, rank->attempt)] = publish.data();
      }
      if (sink_) sink_(publish);
      continue;
    }
    v1::RankEvent event;
    event.set_job_id(rank->job_id);
    event.set_attempt(rank->attempt);
    event.set_rank(rank->rank);
    if (msg.payload_case() == v1::RankMessage::kError) {
      for (std::string& line : TailLines(rank->log_path, options_.stderr_tail_lines)) {
        msg.mutable_error()->add_stderr_tail(std::move(line));
      }
    }
    *event.mutable_message() = std::move(msg);
    msg.Clear();
    SpoolEvent(&event);
  }
  const std::string& error = rank->channel->error();
  if (absl::StrContains(error, "corrupt")) {
    // A rank that writes garbage cannot be followed any more: say why, then
    // end it so the coordinator sees a failed rank rather than silence.
    const std::string why = absl::StrCat("agent: unreadable channel from the rank: ", error);
    LogError(absl::StrCat(rank->name(), ": ", why, "; killing it"));
    v1::RankEvent event;
    event.set_job_id(rank->job_id);
    event.set_attempt(rank->attempt);
    event.set_rank(rank->rank);
    event.mutable_message()->mutable_error()->set_message(why);
    SpoolEvent(&event);
    rank->process->Signal(SIGKILL);
  } else if (!error.empty()) {
    // Expected when a rank dies in the middle of a write.
    LogInfo(absl::StrCat(rank->name(), ": channel ended: ", error));
  }
  absl::MutexLock lock(&mu_);
  rank->reader_done = true;
}

void RankSupervisor::WaitLoop(const std::shared_ptr<Rank>& rank) {
  const int code = rank->process->Wait();
  bool hung;
  {
    absl::MutexLock lock(&mu_);
    rank->exited = true;
    if (!mu_.AwaitWithTimeout(absl::Condition(&rank->reader_done), kDrainTimeout)) {
      ::shutdown(rank->channel->fd(), SHUT_RDWR);
      mu_.Await(absl::Condition(&rank->reader_done));
    }
    hung = rank->hung;
  }
  rank->reader.join();

  v1::RankEvent event;
  event.set_job_id(rank->job_id);
  event.set_attempt(rank->attempt);
  event.set_rank(rank->rank);
  v1::RankExit* exit = event.mutable_exit();
  exit->set_exit_code(code);
  exit->set_hung(hung);
  if (code != 0 || hung) {
    for (std::string& line : TailLines(rank->log_path, options_.stderr_tail_lines)) {
      exit->add_stderr_tail(std::move(line));
    }
  }
  SpoolEvent(&event);
  if (code == 0) {
    LogInfo(absl::StrCat(rank->name(), " exited with code 0"));
  } else {
    LogWarning(absl::StrCat(rank->name(), hung ? " was silent too long and was killed" : " failed",
                            " (exit code ", code, "); log ", rank->log_path));
  }

  absl::MutexLock lock(&mu_);
  live_.erase(Key(rank->job_id, rank->attempt, rank->rank));
  const AttemptKey attempt(rank->job_id, rank->attempt);
  bool attempt_alive = false;
  for (const auto& [key, r] : live_) {
    if (std::get<0>(key) == attempt.first && std::get<1>(key) == attempt.second)
      attempt_alive = true;
  }
  if (!attempt_alive) {
    rendezvous_in_.erase(attempt);
    rendezvous_out_.erase(attempt);
  }
  finished_.push_back(rank);
}

void RankSupervisor::TerminateNow(const std::vector<std::shared_ptr<Rank>>& ranks,
                                  const std::string& why) {
  for (const auto& r : ranks) LogInfo(absl::StrCat("terminating ", r->name(), " (", why, ")"));
  // The deadlines are already due; running the timers now sends SIGTERM
  // without waiting for the next tick.
  CheckTimers();
}

void RankSupervisor::Stop(const v1::StopJob& stop) {
  const absl::Duration grace =
      stop.grace_seconds() > 0 ? absl::Seconds(stop.grace_seconds()) : options_.default_grace;
  std::vector<std::shared_ptr<Rank>> ranks;
  {
    absl::MutexLock lock(&mu_);
    const absl::Time now = clock_->Now();
    for (const auto& [key, r] : live_) {
      if (r->job_id != stop.job_id() || r->attempt != stop.attempt() || r->stopping) continue;
      r->stopping = true;
      r->term_at = now + grace;
      r->kill_at = now + 2 * grace;
      ranks.push_back(r);
    }
  }
  // Ranks of the attempt still waiting for a slot never start.
  std::vector<int> never_started;
  {
    absl::MutexLock lock(&mu_);
    for (auto it = waiting_.begin(); it != waiting_.end();) {
      const v1::Assignment& a = it->assignment;
      if (a.job_id() != stop.job_id() || a.attempt() != stop.attempt()) {
        ++it;
        continue;
      }
      never_started.push_back(a.ranks(0).rank());
      it = waiting_.erase(it);
    }
  }
  for (int r : never_started)
    ReportLaunchFailed(stop.job_id(), stop.attempt(), r,
                       "stopped while waiting for its slot to be freed");
  if (ranks.empty()) {
    if (never_started.empty())
      LogInfo(absl::StrCat("StopJob for job ", stop.job_id(), " attempt ", stop.attempt(),
                           ": no running rank of it here"));
    return;
  }
  v1::AgentMessage msg;
  msg.mutable_stop()->set_reason(stop.reason().empty() ? "stopped by the coordinator"
                                                       : stop.reason());
  msg.mutable_stop()->set_save_checkpoint(stop.save_checkpoint());
  for (const auto& r : ranks) {
    LogInfo(absl::StrCat("stopping ", r->name(), " (", msg.stop().reason(),
                         stop.save_checkpoint() ? ", with checkpoint" : "", ")"));
    SendToRank(r, msg);
  }
}

void RankSupervisor::StopStale(const std::vector<v1::RunningRank>& stale) {
  std::vector<std::shared_ptr<Rank>> ranks;
  {
    absl::MutexLock lock(&mu_);
    const absl::Time now = clock_->Now();
    for (const v1::RunningRank& s : stale) {
      auto it = live_.find(Key(s.job_id(), s.attempt(), s.rank()));
      if (it == live_.end() || it->second->stopping) continue;
      it->second->stopping = true;
      it->second->term_at = now;
      it->second->kill_at = now + options_.default_grace;
      ranks.push_back(it->second);
    }
  }
  if (!ranks.empty()) TerminateNow(ranks, "the coordinator no longer expects it");
}

void RankSupervisor::DeliverRendezvous(const v1::RendezvousPublish& publish) {
  std::vector<std::shared_ptr<Rank>> targets;
  {
    absl::MutexLock lock(&mu_);
    const AttemptKey attempt(publish.job_id(), publish.attempt());
    auto it = rendezvous_in_.find(attempt);
    if (it != rendezvous_in_.end() && it->second != publish.data()) {
      LogWarning(
          absl::StrCat("job ", publish.job_id(), " attempt ", publish.attempt(),
                       ": rendezvous data changed; ranks that already have the first keep it"));
    }
    // Older attempts of the job are over once a newer one rendezvouses.
    for (auto old = rendezvous_in_.begin(); old != rendezvous_in_.end();) {
      old = old->first.first == publish.job_id() && old->first.second < publish.attempt()
                ? rendezvous_in_.erase(old)
                : std::next(old);
    }
    rendezvous_in_[attempt] = publish.data();
    for (const auto& [key, r] : live_) {
      if (r->job_id == publish.job_id() && r->attempt == publish.attempt() && !r->rendezvous_sent) {
        r->rendezvous_sent = true;
        targets.push_back(r);
      }
    }
  }
  v1::AgentMessage msg;
  msg.mutable_rendezvous()->set_data(publish.data());
  for (const auto& r : targets) SendToRank(r, msg);
}

std::vector<v1::RunningRank> RankSupervisor::Running() const {
  std::vector<v1::RunningRank> out;
  std::set<Key> listed;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [key, r] : live_) {
      v1::RunningRank rr;
      rr.set_job_id(r->job_id);
      rr.set_attempt(r->attempt);
      rr.set_rank(r->rank);
      rr.set_slot(r->slot);
      out.push_back(std::move(rr));
      listed.insert(key);
    }
  }
  // A rank whose exit the spool has not taken yet (disk full) is gone from
  // live_ but not reported exited: the coordinator, told it is not running
  // and sent no agent_seq that covers its exit, would count it lost. (Its
  // slot is left unset: the coordinator goes by its own placement.)
  // Not under mu_: held_mu_ is taken before the agent's lock (the spool's
  // listener), which is taken before mu_. Read after live_, nothing slips
  // between: WaitLoop holds or spools the exit before it leaves live_, and
  // the agent reads the spool's last seq after this.
  absl::MutexLock lock(&held_mu_);
  for (const v1::RankEvent& e : held_) {
    if (!e.has_exit() || !listed.insert(Key(e.job_id(), e.attempt(), e.rank())).second) continue;
    v1::RunningRank rr;
    rr.set_job_id(e.job_id());
    rr.set_attempt(e.attempt());
    rr.set_rank(e.rank());
    out.push_back(std::move(rr));
  }
  return out;
}

size_t RankSupervisor::num_running() const {
  absl::MutexLock lock(&mu_);
  return live_.size();
}

std::vector<v1::RendezvousPublish> RankSupervisor::LocalPublications() const {
  absl::MutexLock lock(&mu_);
  std::vector<v1::RendezvousPublish> out;
  for (const auto& [attempt, data] : rendezvous_out_) {
    v1::RendezvousPublish p;
    p.set_job_id(attempt.first);
    p.set_attempt(attempt.second);
    p.set_data(data);
    out.push_back(std::move(p));
  }
  return out;
}

void RankSupervisor::CheckTimers() {
  {
    absl::MutexLock lock(&held_mu_);
    SpoolHeldLocked();
  }
  std::vector<std::pair<std::shared_ptr<Rank>, int>> signals;
  std::vector<std::shared_ptr<Rank>> finished;
  {
    absl::MutexLock lock(&mu_);
    const absl::Time now = clock_->Now();
    for (const auto& [key, r] : live_) {
      if (r->exited) continue;
      if (r->stopping) {
        if (!r->term_sent && now >= r->term_at) {
          r->term_sent = true;
          signals.emplace_back(r, SIGTERM);
        }
        if (!r->kill_sent && now >= r->kill_at) {
          r->kill_sent = true;
          signals.emplace_back(r, SIGKILL);
        }
      } else if (!r->hung && now - r->last_activity >= options_.silence_timeout) {
        r->hung = true;
        r->kill_sent = true;
        signals.emplace_back(r, SIGKILL);
        LogWarning(
            absl::StrCat(r->name(), " sent nothing for ",
                         absl::FormatDuration(now - r->last_activity), " (--rank-silence-timeout ",
                         absl::FormatDuration(options_.silence_timeout), "); killing it as hung"));
      }
    }
    finished.swap(finished_);
  }
  for (auto& [r, sig] : signals) {
    if (sig == SIGTERM) LogInfo(absl::StrCat("grace period over: SIGTERM to ", r->name()));
    if (sig == SIGKILL && !r->hung)
      LogWarning(absl::StrCat("grace period over: SIGKILL to ", r->name()));
    r->process->Signal(sig);
  }
  for (auto& r : finished) {
    if (r->waiter.joinable()) r->waiter.join();
  }
  StartWaitingLaunches();
}

void RankSupervisor::StartWaitingLaunches() {
  std::vector<WaitingLaunch> ready;
  bool closed;
  {
    absl::MutexLock lock(&mu_);
    closed = closed_;
    for (auto it = waiting_.begin(); it != waiting_.end();) {
      bool busy = false;
      for (const auto& [key, r] : live_)
        busy = busy || r->slot == it->assignment.ranks(0).slot();
      if (busy && !closed) {
        ++it;
        continue;
      }
      ready.push_back(std::move(*it));
      it = waiting_.erase(it);
    }
  }
  if (ready.empty()) return;
  absl::MutexLock assign_lock(&assign_mu_);
  for (const WaitingLaunch& w : ready) {
    const v1::Assignment& a = w.assignment;
    if (closed) {
      ReportLaunchFailed(a.job_id(), a.attempt(), a.ranks(0).rank(), "the agent is shutting down");
      continue;
    }
    LaunchRank(a, a.ranks(0), w.spec_path, w.attempt_dir, w.output_dir);
  }
}

bool RankSupervisor::WaitIdle(absl::Duration timeout) {
  absl::MutexLock lock(&mu_);
  return mu_.AwaitWithTimeout(
      absl::Condition(
          +[](std::map<Key, std::shared_ptr<Rank>>* m) { return m->empty(); }, &live_),
      timeout);
}

bool RankSupervisor::Shutdown(absl::Duration grace) {
  {
    // Taking assign_mu_ lets an Assign in progress finish first, so that its
    // ranks are among those stopped below.
    absl::MutexLock assign_lock(&assign_mu_);
    absl::MutexLock lock(&mu_);
    closed_ = true;
  }
  std::vector<std::shared_ptr<Rank>> ranks;
  {
    absl::MutexLock lock(&mu_);
    const absl::Time now = clock_->Now();
    for (const auto& [key, r] : live_) {
      // Ranks already stopping for the coordinator are hurried along too: the
      // agent will not wait out a longer grace period.
      const bool was_stopping = r->stopping;
      r->term_at = was_stopping ? std::min(r->term_at, now) : now;
      r->kill_at = was_stopping ? std::min(r->kill_at, now + grace) : now + grace;
      r->stopping = true;
      ranks.push_back(r);
    }
  }
  if (!ranks.empty()) TerminateNow(ranks, "the agent is shutting down");
  const absl::Time deadline = absl::Now() + grace + absl::Seconds(5);
  while (absl::Now() < deadline) {
    if (WaitIdle(absl::Milliseconds(50))) break;
    // Without a timer thread nobody else escalates.
    if (options_.poll_interval <= absl::ZeroDuration()) CheckTimers();
  }
  CheckTimers();
  return num_running() == 0;
}

}  // namespace ftune::agent
