// comm_selftest: runs every collective across N local ranks (forked
// processes, LocalRendezvous), checks every result and prints bus bandwidth.
//
//   comm_selftest --nproc 4 --backend gloo
//   NCCL_NVLS_ENABLE=0 comm_selftest --nproc 2 --backend nccl --max-bytes 64M
//
// Options: --dtypes fp32,bf16,... (default all)  --collectives
// all_gather,reduce_scatter,all_reduce,broadcast,reduce  --max-bytes N[K|M|G]
// (default 64M)  --iters N (default: auto)  --warmup N  --check-only
// --timeout-ms N (per collective, default 60000)  --host ADDR (Gloo bind
// address, default 127.0.0.1).
// Exit status: 0 when every rank finished with correct results.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "worker/comm/local_launcher.h"
#include "worker/comm/local_rendezvous.h"
#include "worker/comm/selftest.h"

namespace {

using ftune::comm::Collective;
using ftune::comm::DataType;

int Usage(const char* why) {
  std::fprintf(stderr,
               "comm_selftest: %s\n"
               "usage: comm_selftest --nproc N --backend gloo|nccl [--dtypes "
               "LIST] [--collectives LIST] [--max-bytes N[K|M|G]] [--iters N] "
               "[--warmup N] [--check-only] [--timeout-ms N] [--host ADDR]\n",
               why);
  return 2;
}

std::vector<std::string> Split(const std::string& s) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= s.size()) {
    const size_t comma = s.find(',', start);
    const size_t end = comma == std::string::npos ? s.size() : comma;
    if (end > start) out.push_back(s.substr(start, end - start));
    start = end + 1;
  }
  return out;
}

bool ParseBytes(const std::string& s, size_t* out) {
  char* end = nullptr;
  const unsigned long long v = std::strtoull(s.c_str(), &end, 10);
  if (end == s.c_str()) return false;
  unsigned long long mult = 1;
  if (*end == 'K' || *end == 'k')
    mult = 1ull << 10, ++end;
  else if (*end == 'M' || *end == 'm')
    mult = 1ull << 20, ++end;
  else if (*end == 'G' || *end == 'g')
    mult = 1ull << 30, ++end;
  if (*end != '\0' || v == 0) return false;
  *out = static_cast<size_t>(v * mult);
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  ftune::comm::SelftestOptions options;
  int nproc = 2;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&](std::string* v) {
      if (i + 1 >= argc) return false;
      *v = argv[++i];
      return true;
    };
    std::string v;
    if (arg == "--check-only") {
      options.check_only = true;
    } else if (arg == "--nproc" && value(&v)) {
      nproc = std::atoi(v.c_str());
    } else if (arg == "--backend" && value(&v)) {
      options.backend = v;
    } else if (arg == "--dtypes" && value(&v)) {
      options.dtypes.clear();
      for (const auto& name : Split(v)) {
        DataType d;
        if (!ftune::comm::ParseDataType(name, &d)) {
          return Usage(("unknown dtype " + name).c_str());
        }
        options.dtypes.push_back(d);
      }
    } else if (arg == "--collectives" && value(&v)) {
      options.collectives.clear();
      for (const auto& name : Split(v)) {
        bool found = false;
        for (Collective c : ftune::comm::kAllCollectives) {
          if (name == ftune::comm::CollectiveName(c)) {
            options.collectives.push_back(c);
            found = true;
          }
        }
        if (!found) return Usage(("unknown collective " + name).c_str());
      }
    } else if (arg == "--max-bytes" && value(&v)) {
      if (!ParseBytes(v, &options.max_bytes)) return Usage("bad --max-bytes");
    } else if (arg == "--iters" && value(&v)) {
      options.iters = std::atoi(v.c_str());
    } else if (arg == "--warmup" && value(&v)) {
      options.warmup = std::atoi(v.c_str());
    } else if (arg == "--timeout-ms" && value(&v)) {
      options.timeout = std::chrono::milliseconds(std::atoll(v.c_str()));
    } else if (arg == "--host" && value(&v)) {
      options.host = v;
    } else {
      return Usage(("unknown or incomplete argument " + arg).c_str());
    }
  }
  if (nproc < 1) return Usage("--nproc must be >= 1");
  if (options.timeout.count() <= 0) return Usage("--timeout-ms must be > 0");

  ftune::comm::LocalLaunchOptions launch;
  launch.nproc = nproc;
  launch.host = options.host;
  std::unique_ptr<ftune::comm::LocalRankGroup> group;
  ftune::Status s = ftune::comm::LocalRankGroup::Start(
      launch,
      [&](int rank, const std::string& store) {
        std::unique_ptr<ftune::comm::LocalRendezvous> rdzv;
        ftune::Status st = ftune::comm::LocalRendezvous::Connect(
            store, rank, nproc, options.timeout, &rdzv);
        ftune::comm::SelftestResult result;
        if (st.ok()) {
          st = ftune::comm::RunSelftestRank(
              *rdzv, options, rank == 0 ? stdout : nullptr, &result);
        }
        if (!st.ok()) {
          std::fprintf(stderr, "comm_selftest rank %d: %s\n", rank,
                       st.ToString().c_str());
          return 1;
        }
        return 0;
      },
      &group);
  if (!s.ok()) {
    std::fprintf(stderr, "comm_selftest: %s\n", s.ToString().c_str());
    return 1;
  }
  // No overall deadline beyond a generous one: each collective has its own
  // timeout. Once a rank fails, the others get two timeouts to notice.
  const auto exits = group->Wait(std::chrono::hours(2), 2 * options.timeout);
  int failed = 0;
  for (const auto& e : exits) {
    if (!e.ok()) {
      ++failed;
      std::fprintf(stderr, "comm_selftest: %s\n", e.Describe().c_str());
    }
  }
  if (failed > 0) {
    std::fprintf(stderr, "comm_selftest: FAILED (%d of %d ranks)\n", failed,
                 nproc);
    return 1;
  }
  return 0;
}
