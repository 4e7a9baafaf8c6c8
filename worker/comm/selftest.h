// The collectives self-test: every collective, dtype and reduction on sizes
// from one element up, with results checked, and timings turned into bus
// bandwidth (the nccl-tests convention, so figures compare with theirs).
// comm_selftest runs it across N local processes; the multi-process tests
// run it with small sizes.
//
// Data: element g of a logical buffer of `total` elements, on rank r, is a
// small integer (|v| <= 8, or 0..16 for uint8; int64 adds r << 33), so sums
// and maxima over up to 15 ranks are exact in every dtype, bf16 included:
// those are checked bit for bit. Averages are checked to the dtype's
// precision, since NCCL divides before it sums. Shards are FSDP-like: with
// shard = ceil(total / size), rank r owns elements [r * shard, (r + 1) *
// shard) of the logical buffer and the padding past `total` is zero.
//
// Thread-safety: RunSelftestRank uses its communicator from the calling
// thread only.
#ifndef FTUNE_WORKER_COMM_SELFTEST_H_
#define FTUNE_WORKER_COMM_SELFTEST_H_

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "worker/comm/communicator.h"
#include "worker/comm/rendezvous.h"
#include "ftune/status.h"

namespace ftune::comm {

enum class Collective { kAllGather, kReduceScatter, kAllReduce, kBroadcast, kReduce };

inline constexpr Collective kAllCollectives[] = {
    Collective::kAllGather, Collective::kReduceScatter, Collective::kAllReduce,
    Collective::kBroadcast, Collective::kReduce};

// "all_gather", "reduce_scatter", "all_reduce", "broadcast", "reduce".
const char* CollectiveName(Collective c);

struct SelftestOptions {
  std::string backend = "gloo";  // "gloo" | "nccl"
  std::vector<Collective> collectives{std::begin(kAllCollectives),
                                      std::end(kAllCollectives)};
  std::vector<DataType> dtypes{std::begin(kAllDataTypes),
                               std::end(kAllDataTypes)};
  // Logical sizes per dtype: the largest odd element count whose buffer
  // fits max_bytes, then about a quarter of it, and so on (4^k - 1, odd, so
  // shards are uneven), down to 1 element.
  size_t max_bytes = 64u << 20;
  // Timed iterations per point; 0: enough to move ~1 GiB (NCCL) or ~128 MiB
  // (Gloo), between 2 and 200.
  int iters = 0;
  int warmup = 1;
  // Only check results, time nothing.
  bool check_only = false;
  std::chrono::milliseconds timeout = std::chrono::seconds(60);
  std::string host = "127.0.0.1";  // Gloo's bind address
  // NCCL device: -1 picks rank % (visible devices).
  int device = -1;
};

struct SelftestResult {
  int cases = 0;       // checked (collective, dtype, op, size) combinations
  int mismatches = 0;  // on this rank
  std::vector<std::string> errors;  // first few mismatch descriptions
};

// One rank's part: builds the `options.backend` communicator through
// `rendezvous`, runs the cases in the same order as every other rank, and
// on rank 0 prints the table to `report` (may be null). Non-OK on a
// communicator error, or when any rank saw a wrong result.
Status RunSelftestRank(Rendezvous& rendezvous, const SelftestOptions& options,
                       FILE* report, SelftestResult* result);

// Same, with a communicator the caller built (its memory: host for Gloo,
// device for NCCL).
Status RunSelftestOnCommunicator(Communicator& comm,
                                 const SelftestOptions& options, FILE* report,
                                 SelftestResult* result);

}  // namespace ftune::comm

#endif  // FTUNE_WORKER_COMM_SELFTEST_H_
