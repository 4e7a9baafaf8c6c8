// See bpe.h.
#include "worker/data/bpe.h"

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstring>
#include <string>
#include <utility>

#include "worker/data/byte_level.h"
#include "worker/data/utf8.h"

namespace ftune::data {
namespace {

constexpr int32_t kNoMerge = INT32_MAX;

}  // namespace

BpeModel::BpeModel(BpeOptions options, StringIdMap vocab, MergeMap merges)
    : options_(std::move(options)), vocab_(std::move(vocab)), merges_(std::move(merges)) {
  for (int b = 0; b < 256; ++b) {
    const char c = static_cast<char>(b);
    const int32_t* id = vocab_.Find(std::string_view(&c, 1));
    byte_ids_[b] = id != nullptr ? *id : -1;
    if (b < 128) ascii_ids_[b] = byte_ids_[b];
    // Rust's format!("<{b:#04X}>"): "0x" then two upper-case hex digits.
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    id = vocab_.Find(name);
    byte_fallback_ids_[b] = id != nullptr ? *id : -1;
  }
  if (options_.cache_capacity > 0) {
    cache_.reset(new CacheShard[kCacheShards]);
    cache_entries_per_shard_ = std::max<size_t>(1, options_.cache_capacity / kCacheShards);
  }
}

void BpeModel::Tokenize(std::string_view piece, std::vector<int32_t>* ids) const {
  if (piece.empty()) return;
  if (options_.ignore_merges) {
    if (const int32_t* id = vocab_.Find(piece)) {
      ids->push_back(*id);
      return;
    }
  }
  const bool cacheable = cache_ != nullptr && piece.size() < kMaxCachedPieceBytes;
  uint64_t hash = 0;
  if (cacheable) {
    hash = HashBytes(piece);
    if (CacheLookup(piece, hash, ids)) return;
  }
  thread_local std::vector<int32_t> symbols;
  InitialSymbols(piece, &symbols);
  if (symbols.size() <= kScanLimit) {
    MergeByScan(&symbols);
  } else {
    MergeByHeap(&symbols);
  }
  ids->insert(ids->end(), symbols.begin(), symbols.end());
  if (cacheable) CacheStore(piece, hash, symbols.data(), symbols.size());
}

void BpeModel::InitialSymbols(std::string_view piece, std::vector<int32_t>* symbols) const {
  symbols->clear();
  // HF holds back one unk (fused with following ones under fuse_unk) until
  // the next known unit or the end; a byte-fallback unit in between does not
  // flush it, so its bytes come out before the unk. Kept as HF has it.
  int32_t pending_unk = -1;
  size_t i = 0;
  while (i < piece.size()) {
    const auto lead = static_cast<unsigned char>(piece[i]);
    size_t len = 1;
    int32_t id;
    if (options_.byte_level) {
      id = byte_ids_[lead];
    } else if (lead < 0x80) {
      id = ascii_ids_[lead];
    } else {
      len = std::min(Utf8Length(lead), piece.size() - i);
      const int32_t* found = vocab_.Find(piece.substr(i, len));
      id = found != nullptr ? *found : -1;
    }
    const std::string_view unit = piece.substr(i, len);
    i += len;
    if (id >= 0) {
      if (pending_unk >= 0) {
        symbols->push_back(pending_unk);
        pending_unk = -1;
      }
      symbols->push_back(id);
      continue;
    }
    if (options_.byte_fallback) {
      // HF falls back on the bytes of the unit as the model sees it: for a
      // byte-level model that is the mapped character ("Ġ" -> C4 A0).
      std::string mapped;
      std::string_view source = unit;
      if (options_.byte_level) {
        mapped = BytesToByteLevel(unit);
        source = mapped;
      }
      const bool all_known = std::all_of(source.begin(), source.end(), [&](char c) {
        return byte_fallback_ids_[static_cast<unsigned char>(c)] >= 0;
      });
      if (all_known) {
        for (char c : source) symbols->push_back(byte_fallback_ids_[static_cast<unsigned char>(c)]);
        continue;
      }
    }
    if (options_.unk_id.has_value()) {
      if (pending_unk >= 0 && !options_.fuse_unk) symbols->push_back(pending_unk);
      pending_unk = *options_.unk_id;
    }
    // Without an unk token HF drops the unit silently; so do we.
  }
  if (pending_unk >= 0) symbols->push_back(pending_unk);
}

void BpeModel::MergeByScan(std::vector<int32_t>* symbols) const {
  int32_t* s = symbols->data();
  size_t n = symbols->size();
  if (n < 2) return;
  // ranks[i] / merged[i]: the merge of pair (s[i], s[i+1]).
  int32_t ranks[kScanLimit];
  int32_t merged[kScanLimit];
  const auto evaluate = [&](size_t i) {
    const MergeMap::Merge* m = merges_.Find(s[i], s[i + 1]);
    ranks[i] = m != nullptr ? m->rank : kNoMerge;
    merged[i] = m != nullptr ? m->id : -1;
  };
  for (size_t i = 0; i + 1 < n; ++i) evaluate(i);
  while (n > 1) {
    size_t best = 0;
    int32_t best_rank = ranks[0];
    for (size_t i = 1; i + 1 < n; ++i) {
      if (ranks[i] < best_rank) {  // strict: the leftmost wins a tie
        best_rank = ranks[i];
        best = i;
      }
    }
    if (best_rank == kNoMerge) break;
    s[best] = merged[best];
    std::memmove(s + best + 1, s + best + 2, (n - best - 2) * sizeof(int32_t));
    if (n >= best + 3) {
      const size_t moved = n - best - 3;
      std::memmove(ranks + best + 1, ranks + best + 2, moved * sizeof(int32_t));
      std::memmove(merged + best + 1, merged + best + 2, moved * sizeof(int32_t));
    }
    --n;
    if (best + 1 < n) evaluate(best);
    if (best > 0) evaluate(best - 1);
  }
  symbols->resize(n);
}

void BpeModel::MergeByHeap(std::vector<int32_t>* symbols) const {
  struct Symbol {
    int32_t id;  // -1 once merged into its left neighbour
    int32_t prev;
    int32_t next;
  };
  struct Entry {
    int32_t rank;
    int32_t pos;
    int32_t id;
  };
  // std heap functions keep the largest on top: "larger" = lower rank, then
  // lower position.
  const auto lower_priority = [](const Entry& a, const Entry& b) {
    return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos;
  };
  thread_local std::vector<Symbol> syms;
  thread_local std::vector<Entry> heap;
  const auto n = static_cast<int32_t>(symbols->size());
  syms.resize(static_cast<size_t>(n));
  heap.clear();
  for (int32_t i = 0; i < n; ++i) {
    syms[i] = Symbol{(*symbols)[i], i - 1, i + 1 < n ? i + 1 : -1};
    if (i + 1 < n) {
      if (const MergeMap::Merge* m = merges_.Find((*symbols)[i], (*symbols)[i + 1])) {
        heap.push_back(Entry{m->rank, i, m->id});
      }
    }
  }
  std::make_heap(heap.begin(), heap.end(), lower_priority);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), lower_priority);
    const Entry top = heap.back();
    heap.pop_back();
    Symbol& cur = syms[top.pos];
    if (cur.id < 0 || cur.next < 0) continue;
    Symbol& right = syms[cur.next];
    // Stale entry: the pair at this position has changed since it was
    // pushed (the merged id identifies the pair, see HF's Word::merge_all).
    const MergeMap::Merge* m = merges_.Find(cur.id, right.id);
    if (m == nullptr || m->id != top.id) continue;
    cur.id = top.id;
    right.id = -1;
    cur.next = right.next;
    if (cur.next >= 0) syms[cur.next].prev = top.pos;
    if (cur.prev >= 0) {
      if (const MergeMap::Merge* p = merges_.Find(syms[cur.prev].id, cur.id)) {
        heap.push_back(Entry{p->rank, cur.prev, p->id});
        std::push_heap(heap.begin(), heap.end(), lower_priority);
      }
    }
    if (cur.next >= 0) {
      if (const MergeMap::Merge* q = merges_.Find(cur.id, syms[cur.next].id)) {
        heap.push_back(Entry{q->rank, top.pos, q->id});
        std::push_heap(heap.begin(), heap.end(), lower_priority);
      }
    }
  }
  symbols->clear();
  for (int32_t i = 0; i >= 0; i = syms[i].next) symbols->push_back(syms[i].id);
}

bool BpeModel::CacheLookup(std::string_view piece, uint64_t hash,
                           std::vector<int32_t>* ids) const {
  CacheShard& shard = cache_[hash >> 60];
  std::lock_guard<std::mutex> lock(shard.mu);
  const int32_t* offset = shard.index.FindWithHash(piece, hash);
  if (offset == nullptr) return false;
  const int32_t* entry = shard.ids.data() + *offset;
  ids->insert(ids->end(), entry + 1, entry + 1 + entry[0]);
  return true;
}

void BpeModel::CacheStore(std::string_view piece, uint64_t hash, const int32_t* ids,
                          size_t n) const {
  CacheShard& shard = cache_[hash >> 60];
  std::lock_guard<std::mutex> lock(shard.mu);
  // Full: keep what is there (HF's cache also stops inserting when full);
  // the words that filled it are the frequent ones.
  if (shard.index.size() >= cache_entries_per_shard_) return;
  shard.index.SetWithHash(piece, hash, static_cast<int32_t>(shard.ids.size()));
  shard.ids.push_back(static_cast<int32_t>(n));
  shard.ids.insert(shard.ids.end(), ids, ids + n);
}

}  // namespace ftune::data
