// Byte-pair-encoding model with the semantics of HF tokenizers' BPE:
//   - `ignore_merges`: a piece that is itself in the vocab is one token
//     (Llama 3; without it BPE could reach a different split of the piece);
//   - otherwise the piece starts as one symbol per unit (a byte for
//     byte-level models, a UTF-8 character otherwise), and the pair with the
//     lowest merge rank is merged, leftmost first, until no pair merges;
//   - a unit not in the vocab becomes its <0xNN> byte tokens when
//     `byte_fallback` is set (Llama 2), else the unk token, consecutive unks
//     fused into one when `fuse_unk` is set.
// Results for pieces shorter than kMaxCachedPieceBytes are cached: real text
// repeats words, and the merge loop is the expensive part.
//
// Merge loop: pieces of at most kScanLimit symbols (nearly all pre-tokens)
// scan an array for the lowest rank, which beats a heap at that size; longer
// ones (Llama 2 has no pre-tokenizer, so a whole line is one piece) use a
// heap over a linked list like HF, O(n log n). Both pick the same merge at
// every step: lowest rank, then leftmost position. Scratch buffers are
// thread-local, so the loop allocates nothing once warm.
//
// Thread-safety: Tokenize may run on many threads at once (the cache is
// sharded behind mutexes); construction is single-threaded.
#ifndef FTUNE_WORKER_DATA_BPE_H_
#define FTUNE_WORKER_DATA_BPE_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string_view>
#include <vector>

#include "worker/data/flat_map.h"

namespace ftune::data {

struct BpeOptions {
  // Units are bytes and vocab keys are raw bytes (mapped back from the
  // byte-level alphabet at load), else units are UTF-8 characters.
  bool byte_level = false;
  bool ignore_merges = false;
  bool byte_fallback = false;
  bool fuse_unk = false;
  std::optional<int32_t> unk_id;
  // Entries in the piece cache; 0 switches caching off.
  size_t cache_capacity = 1 << 16;
};

class BpeModel {
 public:
  static constexpr size_t kMaxCachedPieceBytes = 256;
  static constexpr size_t kScanLimit = 64;

  // `vocab` maps unit-space keys to ids; `merges` maps id pairs to their
  // rank and merged id.
  BpeModel(BpeOptions options, StringIdMap vocab, MergeMap merges);
  BpeModel(const BpeModel&) = delete;
  BpeModel& operator=(const BpeModel&) = delete;

  // Appends the ids of one pre-token to *ids.
  void Tokenize(std::string_view piece, std::vector<int32_t>* ids) const;

  // The id of a unit-space key, or nullptr.
  const int32_t* Find(std::string_view key) const { return vocab_.Find(key); }
  const BpeOptions& options() const { return options_; }
  size_t vocab_size() const { return vocab_.size(); }
  size_t num_merges() const { return merges_.size(); }

 private:
  // One shard of the piece cache.
  struct CacheShard {
    std::mutex mu;
    StringIdMap index;            // piece -> offset into `ids`
    std::vector<int32_t> ids;     // at an offset: count, then the ids
  };
  static constexpr size_t kCacheShards = 16;

  bool CacheLookup(std::string_view piece, uint64_t hash, std::vector<int32_t>* ids) const;
  void CacheStore(std::string_view piece, uint64_t hash, const int32_t* ids, size_t n) const;

  // Initial symbols of a piece (vocab units, byte fallback, unk).
  void InitialSymbols(std::string_view piece, std::vector<int32_t>* symbols) const;
  void MergeByScan(std::vector<int32_t>* symbols) const;
  void MergeByHeap(std::vector<int32_t>* symbols) const;

  BpeOptions options_;
  StringIdMap vocab_;
  MergeMap merges_;
  std::array<int32_t, 256> byte_ids_;           // byte-level: id of each single byte, or -1
  std::array<int32_t, 256> byte_fallback_ids_;  // id of "<0xNN>", or -1
  std::array<int32_t, 128> ascii_ids_;          // char-level: id of each ASCII char, or -1
  mutable std::unique_ptr<CacheShard[]> cache_;
  size_t cache_entries_per_shard_ = 0;
};

}  // namespace ftune::data

#endif  // FTUNE_WORKER_DATA_BPE_H_
