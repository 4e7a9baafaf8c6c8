// NCCL backend across the GPUs of this machine, one process per GPU:
// every collective, dtype and reduction checked; in-place forms on device
// memory; a rank SIGKILLed mid-run makes the survivor fail within the
// timeout, naming the collective and its rank, instead of hanging in the
// kernel. Skipped, with the reason, below 2 GPUs. The NVLink-multicast
// guard needs no GPU and runs everywhere.
#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <thread>
#include <vector>

#include "rank_harness.h"
#include "worker/comm/half.h"
#include "worker/comm/local_rendezvous.h"
#include "worker/comm/nccl_communicator.h"
#include "worker/comm/selftest.h"

namespace ftune::comm {
namespace {

using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;
using testing::AllOk;
using testing::Report;
using testing::RunRanks;
using testing::StartRanks;

#define RANK_EXPECT(cond, what)                                               \
  do {                                                                        \
    if (!(cond)) {                                                            \
      return Status(StatusCode::kInternal, std::string(__FILE__ ":") +        \
                                               std::to_string(__LINE__) +     \
                                               ": " + #cond + ": " + (what)); \
    }                                                                         \
  } while (false)

#define CUDA_OK(call)                                                    \
  do {                                                                   \
    const cudaError_t e_ = (call);                                       \
    if (e_ != cudaSuccess) {                                             \
      return Status(StatusCode::kInternal,                               \
                    std::string(#call) + ": " + cudaGetErrorString(e_)); \
    }                                                                    \
  } while (false)

// GPUs visible, counted in a child process: CUDA must not be initialised
// in this process, which forks the ranks afterwards.
int CountGpus(std::string* why) {
  int fds[2];
  if (::pipe(fds) != 0) return 0;
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::close(fds[0]);
    std::string reason;
    const int n = CudaDeviceCount(&reason);
    const std::string msg = std::to_string(n) + " " + reason;
    (void)!::write(fds[1], msg.data(), msg.size());
    ::_exit(0);
  }
  ::close(fds[1]);
  std::string msg;
  char buf[256];
  ssize_t got;
  while ((got = ::read(fds[0], buf, sizeof(buf))) > 0) msg.append(buf, got);
  ::close(fds[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  const int n = std::atoi(msg.c_str());
  const size_t space = msg.find(' ');
  *why = space == std::string::npos ? "" : msg.substr(space + 1);
  return n;
}

class CommNcclTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    gpus_ = CountGpus(&why);
    if (gpus_ < 2) {
      GTEST_SKIP() << "NCCL tests need >= 2 CUDA GPUs; this machine has "
                   << gpus_ << (why.empty() ? "" : " (" + why + ")");
    }
  }
  int gpus_ = 0;
};

Status MakeNccl(int rank, int world, const std::string& store,
                milliseconds timeout, std::unique_ptr<Communicator>* comm) {
  std::unique_ptr<LocalRendezvous> rdzv;
  FTUNE_RETURN_IF_ERROR(
      LocalRendezvous::Connect(store, rank, world, milliseconds(60000), &rdzv));
  NcclOptions options;
  options.device = rank;
  options.timeout = timeout;
  // NCCL's own setup takes seconds; only the collectives get `timeout`.
  options.setup_timeout = milliseconds(60000);
  return CreateNcclCommunicator(*rdzv, options, comm);
}

TEST_F(CommNcclTest, EveryCollectiveDtypeAndOpMatchesTheReference) {
  const int n = std::min(gpus_, 4);
  auto exits = RunRanks(
      n,
      [n](int rank, const std::string& store) {
        std::unique_ptr<LocalRendezvous> rdzv;
        FTUNE_RETURN_IF_ERROR(LocalRendezvous::Connect(
            store, rank, n, milliseconds(60000), &rdzv));
        SelftestOptions options;
        options.backend = "nccl";
        options.check_only = true;
        options.max_bytes = 8 << 20;
        options.timeout = milliseconds(60000);
        options.device = rank;
        SelftestResult result;
        Status s = RunSelftestRank(*rdzv, options, rank == 0 ? stdout : nullptr,
                                   &result);
        RANK_EXPECT(result.mismatches == 0, std::to_string(result.mismatches));
        return s;
      },
      milliseconds(240000));
  ASSERT_TRUE(AllOk(exits, n)) << Report(exits);
  EXPECT_NE(exits[0].output.find("all results correct on every rank"),
            std::string::npos)
      << exits[0].output;
}

TEST_F(CommNcclTest, InPlaceFormsOnDeviceMemory) {
  const int n = std::min(gpus_, 4);
  auto exits = RunRanks(
      n,
      [n](int rank, const std::string& store) -> Status {
        std::unique_ptr<Communicator> comm;
        FTUNE_RETURN_IF_ERROR(
            MakeNccl(rank, n, store, milliseconds(60000), &comm));
        cudaStream_t stream;
        CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
        const size_t chunk = 1001;  // odd, and not a multiple of anything
        float* dev = nullptr;
        CUDA_OK(cudaMalloc(&dev, chunk * n * sizeof(float)));
        std::vector<float> host(chunk * n);

        // AllGather in place.
        for (size_t j = 0; j < chunk; ++j)
          host[rank * chunk + j] = rank * 1e4f + j;
        CUDA_OK(cudaMemcpyAsync(dev + rank * chunk, host.data() + rank * chunk,
                                chunk * sizeof(float), cudaMemcpyHostToDevice,
                                stream));
        FTUNE_RETURN_IF_ERROR(comm->AllGather(
            dev + rank * chunk, dev, chunk, DataType::kFloat32, stream));
        FTUNE_RETURN_IF_ERROR(comm->Synchronize(stream));
        CUDA_OK(cudaMemcpy(host.data(), dev, host.size() * sizeof(float),
                           cudaMemcpyDeviceToHost));
        for (int q = 0; q < n; ++q) {
          for (size_t j = 0; j < chunk; ++j) {
            RANK_EXPECT(host[q * chunk + j] == q * 1e4f + j, "allgather");
          }
        }

        // ReduceScatter in place (sum), then AllReduce in place (max).
        for (size_t g = 0; g < host.size(); ++g)
          host[g] = static_cast<float>(rank + g % 7);
        CUDA_OK(cudaMemcpyAsync(dev, host.data(), host.size() * sizeof(float),
                                cudaMemcpyHostToDevice, stream));
        FTUNE_RETURN_IF_ERROR(
            comm->ReduceScatter(dev, dev + rank * chunk, chunk,
                                DataType::kFloat32, ReduceOp::kSum, stream));
        FTUNE_RETURN_IF_ERROR(comm->Synchronize(stream));
        CUDA_OK(cudaMemcpy(host.data(), dev + rank * chunk,
                           chunk * sizeof(float), cudaMemcpyDeviceToHost));
        for (size_t j = 0; j < chunk; ++j) {
          const float want = n * (n - 1) / 2.0f +
                             n * static_cast<float>((rank * chunk + j) % 7);
          RANK_EXPECT(host[j] == want,
                      "reduce_scatter[" + std::to_string(j) + "]");
        }
        int64_t v = rank * 3 - 7;
        int64_t* dv = nullptr;
        CUDA_OK(cudaMalloc(&dv, sizeof(v)));
        CUDA_OK(cudaMemcpy(dv, &v, sizeof(v), cudaMemcpyHostToDevice));
        FTUNE_RETURN_IF_ERROR(comm->AllReduce(dv, dv, 1, DataType::kInt64,
                                                   ReduceOp::kMax, stream));
        FTUNE_RETURN_IF_ERROR(comm->Barrier(stream));
        CUDA_OK(cudaMemcpy(&v, dv, sizeof(v), cudaMemcpyDeviceToHost));
        RANK_EXPECT(v == (n - 1) * 3 - 7, std::to_string(v));

        // A bad root fails on the spot on every rank.
        Status bad = comm->Broadcast(dv, 1, DataType::kInt64, n, stream);
        RANK_EXPECT(bad.code() == StatusCode::kInvalidArgument, bad.ToString());
        cudaFree(dv);
        cudaFree(dev);
        cudaStreamDestroy(stream);
        return OkStatus();
      },
      milliseconds(120000));
  ASSERT_TRUE(AllOk(exits, n)) << Report(exits);
}

TEST_F(CommNcclTest, SurvivorFailsWithinTheTimeoutWhenAPeerIsKilled) {
  const milliseconds timeout(3000);
  int progress[2];
  ASSERT_EQ(::pipe(progress), 0);
  auto group = StartRanks(2, [&](int rank, const std::string& store) -> Status {
    ::close(progress[0]);
    std::unique_ptr<Communicator> comm;
    FTUNE_RETURN_IF_ERROR(MakeNccl(rank, 2, store, timeout, &comm));
    cudaStream_t stream;
    CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    float* buf = nullptr;
    const size_t count = 1 << 22;
    CUDA_OK(cudaMalloc(&buf, count * sizeof(float)));
    CUDA_OK(cudaMemset(buf, 0, count * sizeof(float)));
    for (int i = 0;; ++i) {
      FTUNE_RETURN_IF_ERROR(comm->AllReduce(
          buf, buf, count, DataType::kFloat32, ReduceOp::kSum, stream));
      FTUNE_RETURN_IF_ERROR(comm->Synchronize(stream));
      if (i == 5) {
        const char c = 'x';
        (void)!::write(progress[1], &c, 1);
      }
    }
  });
  ASSERT_NE(group, nullptr);
  ::close(progress[1]);
  int marks = 0;
  char c;
  while (marks < 2 && ::read(progress[0], &c, 1) == 1) ++marks;
  ::close(progress[0]);
  ASSERT_EQ(marks, 2) << Report(group->Wait(milliseconds(1)));
  std::this_thread::sleep_for(milliseconds(20));
  ASSERT_EQ(::kill(group->pid(1), SIGKILL), 0);
  const auto killed_at = Clock::now();
  auto exits = group->Wait(timeout + std::chrono::seconds(30));
  const std::string report = Report(exits);
  ASSERT_EQ(exits.size(), 2u);
  const RankExit& survivor = exits[0];
  ASSERT_TRUE(survivor.exited && WIFEXITED(survivor.wait_status)) << report;
  EXPECT_EQ(WEXITSTATUS(survivor.wait_status), 1) << report;
  const auto took =
      std::chrono::duration_cast<milliseconds>(survivor.exited_at - killed_at);
  std::printf("survivor exited %lld ms after the kill (timeout %lld ms)\n",
              static_cast<long long>(took.count()),
              static_cast<long long>(timeout.count()));
  EXPECT_LT(took, timeout + milliseconds(5000)) << report;
  EXPECT_NE(survivor.output.find("nccl AllReduce #"), std::string::npos)
      << report;
  EXPECT_NE(survivor.output.find("on rank 0 of 2"), std::string::npos)
      << report;
}

// A rendezvous that is never reached: the multicast guard comes first.
class NoRendezvous : public Rendezvous {
 public:
  int rank() const override { return 0; }
  int world_size() const override { return 1; }
  Status Exchange(std::string_view, milliseconds, std::string*) override {
    return Status(StatusCode::kInternal, "rendezvous reached");
  }
};

TEST(CommNcclGuardTest, RefusesNvlinkMulticastUnlessAllowed) {
  ::setenv("NCCL_NVLS_ENABLE", "1", 1);
  NoRendezvous rdzv;
  std::unique_ptr<Communicator> comm;
  Status s = CreateNcclCommunicator(rdzv, NcclOptions{}, &comm);
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s.ToString();
  EXPECT_NE(s.message().find("NCCL_NVLS_ENABLE=1"), std::string::npos)
      << s.message();
  ::unsetenv("NCCL_NVLS_ENABLE");
  // Unset, it is set to 0 before NCCL can read it. (What happens next
  // depends on the machine's GPUs; only the environment is checked.)
  s = CreateNcclCommunicator(rdzv, NcclOptions{}, &comm);
  const char* v = std::getenv("NCCL_NVLS_ENABLE");
  ASSERT_NE(v, nullptr);
  EXPECT_STREQ(v, "0");
}

}  // namespace
}  // namespace ftune::comm
