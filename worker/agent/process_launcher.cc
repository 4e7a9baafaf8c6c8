#include "worker/agent/process_launcher.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "ftune/absl_status.h"
#include "ftune/file_util.h"

namespace ftune::agent {
namespace {

class ForkExecProcess : public RankProcess {
 public:
  explicit ForkExecProcess(pid_t pid) : pid_(pid) {}
  ~ForkExecProcess() override {
    // A process nobody waited for would stay a zombie; the supervisor always
    // waits, this is the safety net.
    absl::MutexLock lock(&mu_);
    if (!reaped_) {
      ::kill(-pid_, SIGKILL);
      ::kill(pid_, SIGKILL);
      int status;
      while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
      }
      reaped_ = true;
    }
  }

  pid_t pid() const override { return pid_; }

  void Signal(int sig) override {
    absl::MutexLock lock(&mu_);
    if (reaped_) return;
    if (::kill(-pid_, sig) != 0) ::kill(pid_, sig);
  }

  int Wait() override {
    // Wait without reaping first: while the rank is a zombie its pid and
    // process group cannot be reused, so killing leftovers of the group and
    // any concurrent Signal() are safe. Reaping happens under the lock.
    siginfo_t info;
    while (::waitid(P_PID, static_cast<id_t>(pid_), &info, WEXITED | WNOWAIT) != 0 &&
           errno == EINTR) {
    }
    absl::MutexLock lock(&mu_);
    ::kill(-pid_, SIGKILL);
    int status = 0;
    pid_t r;
    while ((r = ::waitpid(pid_, &status, 0)) < 0 && errno == EINTR) {
    }
    reaped_ = true;
    if (r < 0) return -SIGKILL;  // Someone else reaped it; report it as killed.
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    if (WIFSIGNALED(status)) return -WTERMSIG(status);
    return -SIGKILL;
  }

 private:
  const pid_t pid_;
  absl::Mutex mu_;
  bool reaped_ ABSL_GUARDED_BY(mu_) = false;
};

class ForkExecLauncher : public ProcessLauncher {
 public:
  absl::StatusOr<std::unique_ptr<RankProcess>> Launch(const LaunchRequest& req) override {
    if (req.argv.empty()) return absl::InvalidArgumentError("launch request without argv");
    if (req.inherit_fd >= 0 && req.inherit_fd < 3) {
      return absl::InvalidArgumentError(
          absl::StrCat("inherited fd ", req.inherit_fd, " collides with stdio"));
    }
    const int log_fd =
        ::open(req.stderr_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (log_fd < 0) {
      return absl::FailedPreconditionError(absl::StrCat("cannot open rank log ", req.stderr_path,
                                                        ": ", ErrnoMessage(errno),
                                                        "; check that --work-dir is writable"));
    }
    const int null_fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    int pipe_fds[2];
    if (null_fd < 0 || ::pipe2(pipe_fds, O_CLOEXEC) != 0) {
      const int err = errno;
      ::close(log_fd);
      if (null_fd >= 0) ::close(null_fd);
      return absl::ResourceExhaustedError(
          absl::StrCat("cannot set up a rank process: ", ErrnoMessage(err)));
    }

    // Everything the child touches is prepared here: between fork and exec
    // only async-signal-safe calls are allowed (the agent is multithreaded).
    std::vector<char*> argv;
    for (const std::string& a : req.argv) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    std::vector<char*> envp;
    for (const std::string& e : req.env) envp.push_back(const_cast<char*>(e.c_str()));
    envp.push_back(nullptr);
    const char* binary = req.binary.c_str();
    const int inherit_fd = req.inherit_fd;

    const pid_t pid = ::fork();
    if (pid == 0) {
      ::setpgid(0, 0);
      // Dispositions set to SIG_IGN and the blocked mask survive execve; the
      // agent ignores SIGPIPE and blocks SIGTERM/SIGINT, a rank must not.
      struct sigaction dfl {};
      dfl.sa_handler = SIG_DFL;
      for (int sig = 1; sig < NSIG; ++sig) {
        if (sig != SIGKILL && sig != SIGSTOP) ::sigaction(sig, &dfl, nullptr);
      }
      sigset_t none;
      sigemptyset(&none);
      ::sigprocmask(SIG_SETMASK, &none, nullptr);
      if (::dup2(null_fd, 0) < 0 || ::dup2(log_fd, 1) < 0 || ::dup2(log_fd, 2) < 0 ||
          (inherit_fd >= 0 && ::fcntl(inherit_fd, F_SETFD, 0) != 0)) {
        int err = errno;
        (void)!::write(pipe_fds[1], &err, sizeof(err));
        ::_exit(127);
      }
      ::execve(binary, argv.data(), envp.data());
      int err = errno;
      (void)!::write(pipe_fds[1], &err, sizeof(err));
      ::_exit(127);
    }
    const int fork_errno = errno;
    ::close(pipe_fds[1]);
    ::close(log_fd);
    ::close(null_fd);
    if (pid < 0) {
      ::close(pipe_fds[0]);
      return absl::ResourceExhaustedError(absl::StrCat("fork failed: ", ErrnoMessage(fork_errno),
                                                       "; the host is out of processes or memory"));
    }
    // Also set by the child; doing it here too closes the race where the
    // agent signals the group before the child got to run.
    ::setpgid(pid, pid);

    int child_errno = 0;
    ssize_t n;
    while ((n = ::read(pipe_fds[0], &child_errno, sizeof(child_errno))) < 0 && errno == EINTR) {
    }
    ::close(pipe_fds[0]);
    if (n > 0) {
      int status;
      while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
      }
      return absl::FailedPreconditionError(
          absl::StrCat("cannot execute ", req.binary, ": ", ErrnoMessage(child_errno),
                       "; install ftune-rank next to ftune-agent or pass "
                       "--rank-binary PATH"));
    }
    return std::unique_ptr<RankProcess>(new ForkExecProcess(pid));
  }
};

}  // namespace

std::unique_ptr<ProcessLauncher> NewForkExecLauncher() {
  return std::make_unique<ForkExecLauncher>();
}

}  // namespace ftune::agent
