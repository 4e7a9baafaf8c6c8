// ftune-test-rank: a scripted stand-in for ftune-rank, used by control-plane
// tests (agent, coordinator, CLI) until the real trainer exists and wherever
// a test needs a rank that crashes, hangs or fails on cue. THIS IS A TEST
// TOOL: it trains nothing.
//
// Command line (the agent's, docs/control-plane.md "Rank processes"):
//   ftune-test-rank run --channel-fd FD --spec FILE --job-id ID --attempt N
//       --rank R --world-size W --device DEV --output-dir DIR [--resume-from CKPT]
//
// Behaviour, scripted by the spec's labels:
//   test.steps            total steps (default 10)
//   test.step_ms          sleep per step (default 20)
//   test.crash_at_step    the targeted rank exits 3 when it reaches this step
//   test.crash_exit_code  the exit code of that crash instead of 3
//   test.big_log_bytes    after step 1 the targeted rank sends a LogLine of
//                         this many bytes ("x"...)
//   test.big_error_bytes  ... and a RankError whose message is this long
//                         (it keeps training: the agent must cope)
//   test.big_log_count    how many such LogLines (default 1)
//   test.big_log_step     the step after which they are sent instead of 1
//   test.hang_at_step     the targeted rank stops sending and sleeps forever
//   test.fail_rendezvous  "true": the targeted rank reports a RankError and
//                         exits 5 instead of training after the rendezvous
//   test.crash_rank       rank the faults above target ("*" or unset: every rank)
//   test.crash_attempt    attempt they target ("*": every attempt; unset: 0,
//                         so that a restarted gang runs clean)
//   training.save_steps   checkpoint period (unset or 0: none)
//
// Protocol: hello (start_step from the resume checkpoint), then on a resume a
// LogLine "resuming at step <N> from <CKPT>"; rank 0 publishes
// "rdzv:<job>:<attempt>" and every rank waits for AgentMessage.rendezvous
// with exactly those bytes before stepping. Each step sends StepMetrics
// (loss 2*exp(-0.1*step) + 0.01*sin(0.7*step), the same on every rank;
// forward, backward and optimizer 30/60/10% of the step's time) and
// every 5th step MemoryStats. A running checksum, updated deterministically
// each step and identical on every rank, stands in for the weights:
// checkpoint-<step>/rank-<R>.state holds "step checksum"; rank 0 writes
// manifest.json (tmp + rename) once every rank's file is there and sends
// CheckpointSaved{complete}. At the end rank 0 writes
// adapter/adapter_model.txt with the final checksum, so a run resumed from a
// checkpoint produces the same file as an uninterrupted one; every rank sends
// RankDone and exits 0.
//
// Lockstep: real ranks stay in step through their collectives; this one keeps
// a file barrier per step under <output-dir>/.ftune-test-rank/<job>/attempt-<N>/
// (files tagged with a nonce rank 0 draws before it publishes the rendezvous,
// so leftovers of an earlier run are ignored). The barrier also carries each
// rank's "stop requested" flag, so all ranks agree on the step at which a
// StopRank takes effect: StopRank{save_checkpoint} makes every rank save that
// step's checkpoint and exit 0. Like a real collective, the barrier waits
// forever for a dead or hung peer. Ranks of one job on several hosts need a
// shared output dir (as real checkpoints do).
//
// SIGTERM exits 143 at once. A closed channel (agent gone) exits 4; bad
// arguments or spec exit 2.
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "channel.h"
#include "ftune/v1/rank_channel.pb.h"
#include "jobspec.h"

namespace {

using ftune::v1::AgentMessage;
using ftune::v1::RankMessage;

[[noreturn]] void Exit(int code) {
  std::fflush(stderr);
  ::_exit(code);
}

void Say(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  std::fprintf(stderr, "ftune-test-rank: %s\n", buf);
}

[[noreturn]] void Die(int code, const std::string& message) {
  Say("%s", message.c_str());
  Exit(code);
}

struct Args {
  int channel_fd = -1;
  std::string spec;
  std::string job_id;
  int attempt = -1;
  int rank = -1;
  int world_size = -1;
  std::string device;
  std::string output_dir;
  std::string resume_from;
};

bool ParseInt64(const std::string& s, int64_t* out) {
  if (s.empty()) return false;
  char* end = nullptr;
  errno = 0;
  long long v = std::strtoll(s.c_str(), &end, 10);
  if (errno != 0 || end == nullptr || *end != '\0') return false;
  *out = v;
  return true;
}

Args ParseArgs(int argc, char** argv) {
  const char* kUsage =
      "usage: ftune-test-rank run --channel-fd FD --spec FILE --job-id ID --attempt N --rank R "
      "--world-size W --device DEV --output-dir DIR [--resume-from CKPT]";
  if (argc < 2 || std::string(argv[1]) != "run") Die(2, kUsage);
  Args a;
  for (int i = 2; i < argc; ++i) {
    // "--flag=value" (what the agent passes) or "--flag value".
    std::string flag = argv[i];
    std::string value;
    if (const size_t eq = flag.find('='); eq != std::string::npos) {
      value = flag.substr(eq + 1);
      flag.resize(eq);
    } else {
      if (i + 1 >= argc) Die(2, "flag " + flag + " needs a value; " + kUsage);
      value = argv[++i];
    }
    int64_t n = 0;
    auto need_int = [&](int* out) {
      if (!ParseInt64(value, &n) || n < 0 || n > 1 << 30)
        Die(2, flag + " (" + value + ") must be a non-negative integer");
      *out = static_cast<int>(n);
    };
    std::string* text = flag == "--spec"          ? &a.spec
                        : flag == "--job-id"      ? &a.job_id
                        : flag == "--device"      ? &a.device
                        : flag == "--output-dir"  ? &a.output_dir
                        : flag == "--resume-from" ? &a.resume_from
                                                  : nullptr;
    int* number = flag == "--channel-fd"   ? &a.channel_fd
                  : flag == "--attempt"    ? &a.attempt
                  : flag == "--rank"       ? &a.rank
                  : flag == "--world-size" ? &a.world_size
                                           : nullptr;
    if (text != nullptr) {
      *text = value;
    } else if (number != nullptr) {
      need_int(number);
    } else {
      Die(2, "unknown flag " + flag + "; " + kUsage);
    }
  }
  if (a.channel_fd < 0 || a.spec.empty() || a.job_id.empty() || a.attempt < 0 || a.rank < 0 ||
      a.world_size < 1 || a.device.empty() || a.output_dir.empty()) {
    Die(2, std::string("missing a required flag; ") + kUsage);
  }
  if (a.rank >= a.world_size) {
    Die(2, "--rank (" + std::to_string(a.rank) + ") must be < --world-size (" +
               std::to_string(a.world_size) + ")");
  }
  return a;
}

// The fault script read from the spec's labels.
struct Script {
  int64_t steps = 10;
  int64_t step_ms = 20;
  int64_t save_steps = 0;
  int64_t crash_at_step = -1;
  int64_t crash_exit_code = 3;
  int64_t big_log_bytes = 0;
  int64_t big_error_bytes = 0;
  int64_t big_log_count = 1;
  int64_t big_log_step = 1;
  int64_t hang_at_step = -1;
  bool fail_rendezvous = false;
  bool targeted = false;  // whether the faults apply to this rank and attempt
  double learning_rate = 2e-4;
  int64_t tokens_per_step = 512;
};

Script ReadScript(const ftune::v1::JobSpec& spec, const Args& args) {
  Script s;
  const auto& labels = spec.labels();
  auto label_int = [&](const char* key, int64_t* out, int64_t min) {
    auto it = labels.find(key);
    if (it == labels.end()) return;
    if (!ParseInt64(it->second, out) || *out < min) {
      Die(2, std::string("label ") + key + " ('" + it->second +
                 "') must be an integer >= " + std::to_string(min));
    }
  };
  label_int("test.steps", &s.steps, 0);
  label_int("test.step_ms", &s.step_ms, 0);
  label_int("test.crash_at_step", &s.crash_at_step, 1);
  label_int("test.crash_exit_code", &s.crash_exit_code, 1);
  label_int("test.big_log_bytes", &s.big_log_bytes, 0);
  label_int("test.big_error_bytes", &s.big_error_bytes, 0);
  label_int("test.big_log_count", &s.big_log_count, 0);
  label_int("test.big_log_step", &s.big_log_step, 1);
  label_int("test.hang_at_step", &s.hang_at_step, 1);
  auto fr = labels.find("test.fail_rendezvous");
  if (fr != labels.end()) {
    if (fr->second == "true")
      s.fail_rendezvous = true;
    else if (fr->second != "false" && !fr->second.empty())
      Die(2, "label test.fail_rendezvous ('" + fr->second + "') must be true or false");
  }
  auto matches = [&](const char* key, int value, const char* unset) {
    auto it = labels.find(key);
    const std::string v = it == labels.end() ? unset : it->second;
    if (v == "*") return true;
    int64_t n = 0;
    if (!ParseInt64(v, &n) || n < 0)
      Die(2, std::string("label ") + key + " ('" + v + "') must be '*' or an integer >= 0");
    return n == value;
  };
  s.targeted = matches("test.crash_rank", args.rank, "*") &&
               matches("test.crash_attempt", args.attempt, "0");
  if (spec.training().has_save_steps()) s.save_steps = spec.training().save_steps();
  if (spec.training().learning_rate() > 0) s.learning_rate = spec.training().learning_rate();
  const int64_t batch = spec.training().per_device_train_batch_size() > 0
                            ? spec.training().per_device_train_batch_size()
                            : 1;
  const int64_t seq = spec.training().max_seq_len() > 0 ? spec.training().max_seq_len() : 512;
  s.tokens_per_step = batch * seq;
  return s;
}

// splitmix64 of the previous checksum and the step: deterministic, rank
// independent, sensitive to every step taken.
uint64_t Mix(uint64_t checksum, int64_t step) {
  uint64_t z = checksum ^ (static_cast<uint64_t>(step) * 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
constexpr uint64_t kInitialChecksum = 0x6674756e65ull;  // "ftune"

double Loss(int64_t step) {
  return 2.0 * std::exp(-0.1 * static_cast<double>(step)) + 0.01 * std::sin(0.7 * step);
}

void SleepMs(int64_t ms) {
  struct timespec ts;
  ts.tv_sec = ms / 1000;
  ts.tv_nsec = (ms % 1000) * 1000000;
  while (::nanosleep(&ts, &ts) != 0 && errno == EINTR) {
  }
}

bool MakeDirs(const std::string& path) {
  std::string cur;
  std::stringstream ss(path);
  std::string part;
  if (!path.empty() && path[0] == '/') cur = "/";
  while (std::getline(ss, part, '/')) {
    if (part.empty()) continue;
    if (!cur.empty() && cur.back() != '/') cur += '/';
    cur += part;
    if (::mkdir(cur.c_str(), 0755) != 0 && errno != EEXIST) return false;
  }
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool ReadText(const std::string& path, std::string* out) {
  std::ifstream in(path);
  if (!in) return false;
  std::stringstream ss;
  ss << in.rdbuf();
  *out = ss.str();
  return true;
}

// tmp + rename: readers (peers, the coordinator, a resumed run) never see a
// half-written file.
void WriteAtomic(const std::string& path, const std::string& content) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << content;
    out.flush();
    if (!out) Die(6, "cannot write " + tmp + ": " + std::strerror(errno));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0)
    Die(6, "cannot rename " + tmp + " to " + path + ": " + std::strerror(errno));
}

int64_t FileSize(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 ? static_cast<int64_t>(st.st_size) : 0;
}

int64_t HostRssBytes() {
  std::string statm;
  if (!ReadText("/proc/self/statm", &statm)) return 0;
  std::istringstream in(statm);
  int64_t size = 0, resident = 0;
  in >> size >> resident;
  return resident * ::sysconf(_SC_PAGESIZE);
}

std::string Hex(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016" PRIx64, v);
  return buf;
}

class Rank {
 public:
  Rank(Args args, Script script)
      : args_(std::move(args)), script_(script), channel_(args_.channel_fd) {}

  int Run() {
    Restore();
    Say("job %s attempt %d rank %d/%d on %s: steps %lld..%lld", args_.job_id.c_str(), args_.attempt,
        args_.rank, args_.world_size, args_.device.c_str(), static_cast<long long>(step_ + 1),
        static_cast<long long>(script_.steps));
    std::thread reader([this] { ReadLoop(); });
    reader.detach();  // Ends with the process.

    RankMessage hello;
    hello.mutable_hello()->set_rank(args_.rank);
    hello.mutable_hello()->set_world_size(args_.world_size);
    hello.mutable_hello()->set_pid(::getpid());
    hello.mutable_hello()->set_device(args_.device);
    hello.mutable_hello()->set_start_step(step_);
    Send(hello);
    if (!args_.resume_from.empty()) {
      RankMessage log;
      log.mutable_log()->set_level("INFO");
      log.mutable_log()->set_text("resuming at step " + std::to_string(step_) + " from " +
                                  args_.resume_from);
      Send(log);
    }

    Rendezvous();
    while (step_ < script_.steps) {
      const int64_t step = step_ + 1;
      if (script_.targeted && step == script_.crash_at_step) {
        Say("rank %d: simulated crash at step %lld (test.crash_at_step)", args_.rank,
            static_cast<long long>(step));
        Say("rank %d: last checksum %s", args_.rank, Hex(checksum_).c_str());
        Exit(static_cast<int>(script_.crash_exit_code));
      }
      if (script_.targeted && step == script_.hang_at_step) {
        Say("rank %d: simulated hang at step %lld (test.hang_at_step)", args_.rank,
            static_cast<long long>(step));
        for (;;) ::pause();
      }
      const auto t0 = std::chrono::steady_clock::now();
      SleepMs(script_.step_ms);
      step_ = step;
      checksum_ = Mix(checksum_, step);
      SendStep(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      if (step % 5 == 0) SendMemory();
      if (script_.targeted && step == script_.big_log_step) SendBigMessages();

      bool stop = false, save = false;
      Barrier(step, &stop, &save);
      if ((script_.save_steps > 0 && step % script_.save_steps == 0) || (stop && save))
        SaveCheckpoint();
      if (stop) {
        Say("rank %d: stopped by the agent after step %lld", args_.rank,
            static_cast<long long>(step));
        Exit(0);
      }
    }
    Finish();
    return 0;
  }

 private:
  void Send(const RankMessage& msg) {
    if (!channel_.Write(msg))
      Die(4, "cannot write to the agent channel (" + channel_.error() + "); exiting");
  }

  void SendBigMessages() {
    if (script_.big_log_bytes > 0) {
      RankMessage log;
      log.mutable_log()->set_level("INFO");
      log.mutable_log()->set_text(std::string(static_cast<size_t>(script_.big_log_bytes), 'x'));
      for (int64_t i = 0; i < script_.big_log_count; ++i) Send(log);
    }
    if (script_.big_error_bytes > 0) {
      RankMessage error;
      error.mutable_error()->set_message(
          std::string(static_cast<size_t>(script_.big_error_bytes), 'e'));
      Send(error);
    }
  }

  void ReadLoop() {
    AgentMessage msg;
    while (channel_.Read(&msg)) {
      std::lock_guard<std::mutex> lock(mu_);
      if (msg.has_rendezvous() && !have_rendezvous_) {
        have_rendezvous_ = true;
        rendezvous_ = msg.rendezvous().data();
      } else if (msg.has_stop()) {
        stop_requested_ = true;
        save_requested_ = save_requested_ || msg.stop().save_checkpoint();
        Say("rank %d: StopRank (%s)%s", args_.rank, msg.stop().reason().c_str(),
            msg.stop().save_checkpoint() ? ", saving a checkpoint first" : "");
      }
      cv_.notify_all();
    }
    Die(4, channel_.error().empty() ? "the agent closed the channel; exiting"
                                    : "agent channel broken (" + channel_.error() + "); exiting");
  }

  void Restore() {
    if (args_.resume_from.empty()) return;
    const std::string path = args_.resume_from + "/rank-" + std::to_string(args_.rank) + ".state";
    std::string text;
    if (!ReadText(path, &text))
      Die(2, "cannot read resume state " + path + ": " + std::strerror(errno));
    std::istringstream in(text);
    std::string hex;
    if (!(in >> step_ >> hex) || step_ < 0)
      Die(2, "resume state " + path + " is not 'step checksum': '" + text + "'");
    checksum_ = std::strtoull(hex.c_str(), nullptr, 16);
    Say("rank %d: resuming from %s at step %lld", args_.rank, args_.resume_from.c_str(),
        static_cast<long long>(step_));
  }

  std::string SyncDir() const {
    return args_.output_dir + "/.ftune-test-rank/" + args_.job_id + "/attempt-" +
           std::to_string(args_.attempt);
  }

  void Rendezvous() {
    const std::string expected = "rdzv:" + args_.job_id + ":" + std::to_string(args_.attempt);
    if (args_.world_size > 1 && !MakeDirs(SyncDir()))
      Die(6, "cannot create " + SyncDir() + ": " + std::strerror(errno));
    if (args_.rank == 0) {
      if (args_.world_size > 1) {
        std::random_device rd;
        nonce_ =
            Hex((static_cast<uint64_t>(rd()) << 32) ^ rd() ^ static_cast<uint64_t>(::getpid()));
        WriteAtomic(SyncDir() + "/nonce", nonce_ + "\n");
      }
      RankMessage publish;
      publish.set_rendezvous_publish(expected);
      Send(publish);
    }
    std::string got;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return have_rendezvous_ || stop_requested_; });
      if (!have_rendezvous_) {
        Say("rank %d: stopped before the rendezvous; nothing to save", args_.rank);
        Exit(0);
      }
      got = rendezvous_;
    }
    if (got != expected)
      Fail("rendezvous data mismatch: got '" + got + "', expected '" + expected + "'");
    if (script_.fail_rendezvous && script_.targeted)
      Fail("rendezvous failed (test.fail_rendezvous)");
    if (args_.world_size > 1 && args_.rank != 0) {
      std::string text;
      if (!ReadText(SyncDir() + "/nonce", &text)) Fail("rank 0 left no nonce in " + SyncDir());
      std::istringstream(text) >> nonce_;
    }
  }

  [[noreturn]] void Fail(const std::string& message) {
    RankMessage err;
    err.mutable_error()->set_message(message);
    channel_.Write(err);
    Die(5, "rank " + std::to_string(args_.rank) + ": " + message);
  }

  void SendStep(double seconds) {
    RankMessage m;
    ftune::v1::StepMetrics* s = m.mutable_step();
    s->set_step(step_);
    s->set_loss(Loss(step_));
    s->set_learning_rate(script_.learning_rate *
                         (1.0 - static_cast<double>(step_ - 1) /
                                    static_cast<double>(std::max<int64_t>(script_.steps, 1))));
    s->set_grad_norm(1.0 / (1.0 + 0.1 * static_cast<double>(step_)));
    s->set_tokens(script_.tokens_per_step);
    s->set_tokens_total(script_.tokens_per_step * step_);
    s->set_tokens_per_second(seconds > 0 ? static_cast<double>(script_.tokens_per_step) / seconds
                                         : 0);
    s->set_epoch(static_cast<double>(step_) /
                 static_cast<double>(std::max<int64_t>(script_.steps, 1)));
    // Phase times as ftune-rank reports them: forward, backward and
    // optimizer split the step; exposed_comm is a part of them (none with
    // one rank).
    s->set_forward_seconds(0.3 * seconds);
    s->set_backward_seconds(0.6 * seconds);
    s->set_optimizer_seconds(0.1 * seconds);
    s->set_exposed_comm_seconds(args_.world_size > 1 ? 0.05 * seconds : 0);
    Send(m);
  }

  void SendMemory() {
    RankMessage m;
    ftune::v1::MemoryStats* mem = m.mutable_memory();
    mem->set_allocated_bytes((1ll << 30) + step_ * (1ll << 20));
    mem->set_reserved_bytes(2ll << 30);
    mem->set_peak_bytes((3ll << 29) + step_ * (1ll << 20));
    mem->set_host_rss_bytes(HostRssBytes());
    mem->set_device(args_.device);
    mem->set_phase("train");
    Send(m);
  }

  // All ranks publish (nonce, stop, save) for this step, then wait for every
  // rank's file of the step: the stop decision is the OR over ranks, so every
  // rank stops (and saves) after the same step.
  void Barrier(int64_t step, bool* stop, bool* save) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      *stop = stop_requested_;
      *save = save_requested_;
    }
    if (args_.world_size == 1) return;
    const std::string dir = SyncDir();
    auto name = [&](int64_t s, int r) {
      return dir + "/step-" + std::to_string(s) + ".rank-" + std::to_string(r);
    };
    WriteAtomic(name(step, args_.rank),
                nonce_ + " " + (*stop ? "1" : "0") + " " + (*save ? "1" : "0") + "\n");
    // Safe to delete the file of step-2: every peer has written its file of
    // step-1 (this rank passed that barrier), so every peer is past the
    // barrier of step-2 and never reads it again.
    ::unlink(name(step - 2, args_.rank).c_str());
    for (int r = 0; r < args_.world_size; ++r) {
      for (;;) {
        std::string text;
        if (ReadText(name(step, r), &text)) {
          std::istringstream in(text);
          std::string nonce;
          int s = 0, v = 0;
          if ((in >> nonce >> s >> v) && nonce == nonce_) {
            *stop = *stop || s != 0;
            *save = *save || v != 0;
            break;
          }
        }
        SleepMs(1);
      }
    }
  }

  void SaveCheckpoint() {
    const auto t0 = std::chrono::steady_clock::now();
    const std::string dir = args_.output_dir + "/checkpoint-" + std::to_string(step_);
    if (!MakeDirs(dir))
      Die(6, "cannot create checkpoint directory " + dir + ": " + std::strerror(errno));
    WriteAtomic(dir + "/rank-" + std::to_string(args_.rank) + ".state",
                std::to_string(step_) + " " + Hex(checksum_) + "\n");
    if (args_.rank != 0) return;
    // Rank 0 writes the manifest only once every shard is there; a
    // checkpoint without a manifest is incomplete and never resumed from.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    int64_t bytes = 0;
    bool complete = true;
    std::string files;
    for (int r = 0; r < args_.world_size; ++r) {
      const std::string f = dir + "/rank-" + std::to_string(r) + ".state";
      while (::access(f.c_str(), F_OK) != 0 && std::chrono::steady_clock::now() < deadline)
        SleepMs(2);
      if (::access(f.c_str(), F_OK) != 0) complete = false;
      bytes += FileSize(f);
      files += std::string(r ? ", " : "") + "\"rank-" + std::to_string(r) + ".state\"";
    }
    RankMessage m;
    ftune::v1::CheckpointSaved* c = m.mutable_checkpoint();
    c->set_step(step_);
    c->set_path(dir);
    if (complete) {
      std::ostringstream manifest;
      manifest << "{\"job_id\": \"" << args_.job_id << "\", \"attempt\": " << args_.attempt
               << ", \"step\": " << step_ << ", \"world_size\": " << args_.world_size
               << ", \"checksum\": \"" << Hex(checksum_) << "\", \"files\": [" << files << "]}\n";
      WriteAtomic(dir + "/manifest.json", manifest.str());
      bytes += FileSize(dir + "/manifest.json");
      Say("rank 0: checkpoint %s complete", dir.c_str());
    } else {
      Say("rank 0: checkpoint %s incomplete: a rank's state file did not appear within 60 s",
          dir.c_str());
    }
    c->set_bytes(bytes);
    c->set_complete(complete);
    c->set_duration_seconds(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    Send(m);
  }

  void Finish() {
    RankMessage m;
    ftune::v1::RankDone* done = m.mutable_done();
    done->set_final_step(step_);
    done->set_final_loss(Loss(step_));
    if (args_.rank == 0) {
      const std::string dir = args_.output_dir + "/adapter";
      if (!MakeDirs(dir))
        Die(6, "cannot create adapter directory " + dir + ": " + std::strerror(errno));
      WriteAtomic(dir + "/adapter_model.txt", Hex(checksum_) + "\n");
      done->set_adapter_path(dir);
    }
    Send(m);
    Say("rank %d: done at step %lld", args_.rank, static_cast<long long>(step_));
    Exit(0);
  }

  const Args args_;
  const Script script_;
  ftune::Channel channel_;
  int64_t step_ = 0;
  uint64_t checksum_ = kInitialChecksum;
  std::string nonce_;

  std::mutex mu_;
  std::condition_variable cv_;
  bool have_rendezvous_ = false;
  std::string rendezvous_;
  bool stop_requested_ = false;
  bool save_requested_ = false;
};

void OnSigterm(int) { ::_exit(143); }

}  // namespace

int main(int argc, char** argv) {
  struct sigaction term {};
  term.sa_handler = OnSigterm;
  ::sigaction(SIGTERM, &term, nullptr);
  ::signal(SIGPIPE, SIG_IGN);

  Args args = ParseArgs(argc, argv);
  if (::fcntl(args.channel_fd, F_GETFD) < 0) {
    Die(2, "--channel-fd " + std::to_string(args.channel_fd) + " is not an open descriptor");
  }
  ftune::v1::JobSpec spec;
  std::vector<std::string> errors;
  if (!ftune::LoadJobSpecFile(args.spec, &spec, &errors)) {
    std::string all;
    for (const std::string& e : errors) all += "\n  " + e;
    Die(2, "cannot load --spec " + args.spec + ":" + all);
  }
  Script script = ReadScript(spec, args);
  Rank rank(std::move(args), script);
  return rank.Run();
}
