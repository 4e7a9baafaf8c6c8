#include "worker/comm/local_launcher.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <thread>

#include "worker/comm/local_rendezvous.h"

namespace ftune::comm {

using Clock = std::chrono::steady_clock;

bool RankExit::ok() const {
  return exited && WIFEXITED(wait_status) && WEXITSTATUS(wait_status) == 0;
}

std::string RankExit::Describe() const {
  std::string s =
      "rank " + std::to_string(rank) + " (pid " + std::to_string(pid) + ")";
  if (!exited) return s + " is still running";
  if (WIFEXITED(wait_status)) {
    return s + " exited with " + std::to_string(WEXITSTATUS(wait_status));
  }
  if (WIFSIGNALED(wait_status)) {
    s += " killed by signal " + std::to_string(WTERMSIG(wait_status));
    if (killed_by_launcher) s += " (by the launcher)";
    return s;
  }
  return s + " ended with wait status " + std::to_string(wait_status);
}

Status LocalRankGroup::Start(const LocalLaunchOptions& options,
                             const RankMain& rank_main,
                             std::unique_ptr<LocalRankGroup>* out) {
  if (options.nproc < 1) {
    return Status(StatusCode::kInvalidArgument,
                  "nproc (" + std::to_string(options.nproc) + ") must be >= 1");
  }
  std::unique_ptr<LocalRankGroup> group(new LocalRankGroup());
  FTUNE_RETURN_IF_ERROR(
      TcpStoreServer::Listen(options.host, 0, &group->server_));
  const std::string address = group->server_->address();
  // Flush before forking, or the children inherit and repeat buffered output.
  std::fflush(stdout);
  std::fflush(stderr);
  for (int r = 0; r < options.nproc; ++r) {
    int fds[2] = {-1, -1};
    if (options.capture_output && ::pipe2(fds, O_CLOEXEC) != 0) {
      return Status(StatusCode::kInternal,
                    std::string("pipe: ") + strerror(errno));
    }
    const pid_t pid = ::fork();
    if (pid < 0) {
      return Status(StatusCode::kInternal,
                    std::string("fork: ") + strerror(errno));
    }
    if (pid == 0) {
      if (options.capture_output) {
        ::dup2(fds[1], STDOUT_FILENO);
        ::dup2(fds[1], STDERR_FILENO);
      }
      for (int fd : group->output_fds_) {
        if (fd >= 0) ::close(fd);
      }
      ::close(group->server_->listen_fd());
      ::setenv(kEnvRendezvousStore, address.c_str(), 1);
      ::setenv(kEnvRank, std::to_string(r).c_str(), 1);
      ::setenv(kEnvWorldSize, std::to_string(options.nproc).c_str(), 1);
      // Every rank environment keeps NVLink multicast off: NVLS on shared
      // GPU hosts can take their GPUs out of service.
      ::setenv("NCCL_NVLS_ENABLE", "0", 0);
      const int code = rank_main(r, address);
      std::fflush(stdout);
      std::fflush(stderr);
      ::_exit(code);
    }
    RankExit e;
    e.rank = r;
    e.pid = pid;
    group->ranks_.push_back(e);
    if (options.capture_output) {
      ::close(fds[1]);
      ::fcntl(fds[0], F_SETFL, ::fcntl(fds[0], F_GETFL) | O_NONBLOCK);
      group->output_fds_.push_back(fds[0]);
    } else {
      group->output_fds_.push_back(-1);
    }
  }
  group->server_->Start();
  *out = std::move(group);
  return OkStatus();
}

LocalRankGroup::~LocalRankGroup() {
  for (auto& r : ranks_) {
    if (!r.exited) ::kill(r.pid, SIGKILL);
  }
  Reap(/*block=*/true);
  for (int fd : output_fds_) {
    if (fd >= 0) ::close(fd);
  }
  if (server_) server_->Stop();
}

void LocalRankGroup::Reap(bool block) {
  for (auto& r : ranks_) {
    if (r.exited) continue;
    int status = 0;
    const pid_t got = ::waitpid(r.pid, &status, block ? 0 : WNOHANG);
    if (got == r.pid) {
      r.exited = true;
      r.wait_status = status;
      r.exited_at = Clock::now();
    }
  }
}

void LocalRankGroup::Drain() {
  char buf[4096];
  for (size_t i = 0; i < output_fds_.size(); ++i) {
    int& fd = output_fds_[i];
    while (fd >= 0) {
      const ssize_t n = ::read(fd, buf, sizeof(buf));
      if (n > 0) {
        ranks_[i].output.append(buf, static_cast<size_t>(n));
      } else if (n == 0) {
        ::close(fd);
        fd = -1;
      } else {
        break;  // EAGAIN: nothing more for now
      }
    }
  }
}

std::vector<RankExit> LocalRankGroup::Wait(
    std::chrono::milliseconds timeout,
    std::chrono::milliseconds grace_after_failure) {
  const auto deadline = Clock::now() + timeout;
  auto kill_deadline = deadline;
  for (;;) {
    Drain();
    Reap(/*block=*/false);
    bool all = true;
    for (const auto& r : ranks_) {
      all = all && r.exited;
      if (r.exited && !r.ok() && grace_after_failure.count() >= 0) {
        kill_deadline =
            std::min(kill_deadline, r.exited_at + grace_after_failure);
      }
    }
    if (all) break;
    if (Clock::now() >= kill_deadline) {
      for (auto& r : ranks_) {
        if (!r.exited) {
          ::kill(r.pid, SIGKILL);
          r.killed_by_launcher = true;
        }
      }
      Reap(/*block=*/true);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  // The pipes reach end of file once every writer has exited.
  for (int i = 0; i < 200; ++i) {
    Drain();
    bool open = false;
    for (int fd : output_fds_) open = open || fd >= 0;
    if (!open) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return ranks_;
}

}  // namespace ftune::comm
