// Open-addressing hash maps for the tokenizer's hot lookups: token bytes ->
// id (looked up with a string_view, so no std::string is built per lookup,
// which C++17's unordered_map would need) and a merge pair -> (rank, id).
// Keys live in one arena; the tables hold fixed-size slots and grow at 50%
// load, so a lookup is one hash and, almost always, one probe.
//
// Thread-safety: const methods may run concurrently; writes need exclusive
// access.
#ifndef FTUNE_WORKER_DATA_FLAT_MAP_H_
#define FTUNE_WORKER_DATA_FLAT_MAP_H_

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

namespace ftune::data {

// 64-bit hash of a byte string: 8 bytes at a time with a multiply-xorshift
// mix; not cryptographic, only spreads real token strings well.
inline uint64_t HashBytes(std::string_view s) {
  constexpr uint64_t kMul = 0x9E3779B97F4A7C15ull;
  uint64_t h = 0x243F6A8885A308D3ull ^ (s.size() * kMul);
  const char* p = s.data();
  size_t n = s.size();
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    h = (h ^ w) * kMul;
    h ^= h >> 29;
    p += 8;
    n -= 8;
  }
  if (n > 0) {
    uint64_t w = 0;
    std::memcpy(&w, p, n);
    h = (h ^ w) * kMul;
    h ^= h >> 29;
  }
  h *= kMul;
  return h ^ (h >> 32);
}

// Map from byte strings to int32 values.
class StringIdMap {
 public:
  StringIdMap() { Rehash(16); }

  // Inserts or overwrites (a later duplicate wins, as when serde reads a
  // JSON object with a repeated key).
  void Set(std::string_view key, int32_t value) { SetWithHash(key, HashBytes(key), value); }

  // Set() with h == HashBytes(key) already computed by the caller.
  void SetWithHash(std::string_view key, uint64_t h, int32_t value) {
    if ((size_ + 1) * 2 > slots_.size()) Rehash(slots_.size() * 2);
    size_t i = h & mask_;
    for (;; i = (i + 1) & mask_) {
      Slot& slot = slots_[i];
      if (slot.length == kEmpty) break;
      if (slot.hash == h && KeyOf(slot) == key) {
        slot.value = value;
        return;
      }
    }
    slots_[i] = Slot{h, static_cast<uint32_t>(arena_.size()), static_cast<uint32_t>(key.size()),
                     value};
    arena_.append(key);
    ++size_;
  }

  // The value for `key`, or nullptr.
  const int32_t* Find(std::string_view key) const { return FindWithHash(key, HashBytes(key)); }

  // Find() with h == HashBytes(key) already computed by the caller.
  const int32_t* FindWithHash(std::string_view key, uint64_t h) const {
    for (size_t i = h & mask_;; i = (i + 1) & mask_) {
      const Slot& slot = slots_[i];
      if (slot.length == kEmpty) return nullptr;
      if (slot.hash == h && KeyOf(slot) == key) return &slot.value;
    }
  }

  size_t size() const { return size_; }
  // Bytes held by keys and slots.
  size_t memory_bytes() const { return arena_.capacity() + slots_.capacity() * sizeof(Slot); }

  void Clear() {
    arena_.clear();
    size_ = 0;
    Rehash(16);
  }

 private:
  static constexpr uint32_t kEmpty = UINT32_MAX;
  struct Slot {
    uint64_t hash = 0;
    uint32_t offset = 0;
    uint32_t length = kEmpty;
    int32_t value = 0;
  };

  std::string_view KeyOf(const Slot& slot) const {
    return std::string_view(arena_.data() + slot.offset, slot.length);
  }

  void Rehash(size_t capacity) {
    std::vector<Slot> old;
    old.swap(slots_);
    slots_.assign(capacity, Slot{});
    mask_ = capacity - 1;
    for (const Slot& slot : old) {
      if (slot.length == kEmpty) continue;
      size_t i = slot.hash & mask_;
      while (slots_[i].length != kEmpty) i = (i + 1) & mask_;
      slots_[i] = slot;
    }
  }

  std::vector<Slot> slots_;
  std::string arena_;
  size_t mask_ = 0;
  size_t size_ = 0;
};

// Map from a pair of token ids to the merge they form: its rank (position in
// the merges list, lower merges first) and the merged token's id.
class MergeMap {
 public:
  struct Merge {
    int32_t rank;
    int32_t id;
  };

  MergeMap() { Rehash(16); }

  static uint64_t Key(int32_t left, int32_t right) {
    return static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32 | static_cast<uint32_t>(right);
  }

  // Keeps the first (lowest-rank) entry for a pair, as HF does when a merges
  // list repeats a pair.
  void Insert(int32_t left, int32_t right, Merge merge) {
    if ((size_ + 1) * 2 > slots_.size()) Rehash(slots_.size() * 2);
    const uint64_t key = Key(left, right);
    size_t i = Mix(key) & mask_;
    for (;; i = (i + 1) & mask_) {
      if (slots_[i].key == kEmpty) break;
      if (slots_[i].key == key) return;
    }
    slots_[i] = Slot{key, merge};
    ++size_;
  }

  const Merge* Find(int32_t left, int32_t right) const {
    const uint64_t key = Key(left, right);
    for (size_t i = Mix(key) & mask_;; i = (i + 1) & mask_) {
      if (slots_[i].key == key) return &slots_[i].merge;
      if (slots_[i].key == kEmpty) return nullptr;
    }
  }

  size_t size() const { return size_; }

 private:
  static constexpr uint64_t kEmpty = UINT64_MAX;  // ids are never -1 in both halves
  struct Slot {
    uint64_t key = kEmpty;
    Merge merge{0, 0};
  };

  static uint64_t Mix(uint64_t k) {
    k ^= k >> 33;
    k *= 0xFF51AFD7ED558CCDull;
    k ^= k >> 33;
    return k;
  }

  void Rehash(size_t capacity) {
    std::vector<Slot> old;
    old.swap(slots_);
    slots_.assign(capacity, Slot{});
    mask_ = capacity - 1;
    for (const Slot& slot : old) {
      if (slot.key == kEmpty) continue;
      size_t i = Mix(slot.key) & mask_;
      while (slots_[i].key != kEmpty) i = (i + 1) & mask_;
      slots_[i] = slot;
    }
  }

  std::vector<Slot> slots_;
  size_t mask_ = 0;
  size_t size_ = 0;
};

}  // namespace ftune::data

#endif  // FTUNE_WORKER_DATA_FLAT_MAP_H_
