// A reader of TensorBoard event files for tests, independent of the writer
// (worker/trainer/tensorboard.h): its own bit-at-a-time CRC-32C and its own
// protobuf wire decoding by field number, so a wrong field number, wire type
// or CRC in the writer fails here instead of round-tripping through the same
// generated code.
//
// Frame: uint64 length, uint32 masked CRC-32C(length bytes), data, uint32
// masked CRC-32C(data), all little-endian. Event: wall_time = 1 (double),
// step = 2 (int64), file_version = 3 (string), summary = 5 (Summary);
// Summary.value = 1 (Value); Value.tag = 1 (string), simple_value = 2 (float).
#ifndef FTUNE_TESTS_TRAINER_EVENT_FILE_READER_H_
#define FTUNE_TESTS_TRAINER_EVENT_FILE_READER_H_

#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace ftune::testutil {

// CRC-32C one bit at a time, straight from the polynomial's definition.
inline uint32_t BitwiseCrc32c(const std::string& data) {
  uint32_t crc = 0xFFFFFFFFu;
  for (unsigned char byte : data) {
    crc ^= byte;
    for (int i = 0; i < 8; ++i) crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1u)));
  }
  return ~crc;
}

inline uint32_t MaskedCrc(const std::string& data) {
  const uint32_t c = BitwiseCrc32c(data);
  return ((c >> 15) | (c << 17)) + 0xa282ead8u;
}

struct TbEvent {
  double wall_time = 0;
  int64_t step = 0;
  std::string file_version;
  bool has_summary = false;
  std::map<std::string, float> values;  // tag -> simple_value
};

class WireReader {
 public:
  explicit WireReader(const std::string& bytes) : b_(bytes) {}
  bool done() const { return pos_ >= b_.size(); }
  bool Varint(uint64_t* out) {
    *out = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (pos_ >= b_.size()) return false;
      const uint8_t byte = static_cast<uint8_t>(b_[pos_++]);
      *out |= static_cast<uint64_t>(byte & 0x7f) << shift;
      if ((byte & 0x80) == 0) return true;
    }
    return false;
  }
  bool Fixed(int bytes, uint64_t* out) {
    if (pos_ + bytes > b_.size()) return false;
    *out = 0;
    for (int i = 0; i < bytes; ++i) {
      *out |= static_cast<uint64_t>(static_cast<uint8_t>(b_[pos_ + i])) << (8 * i);
    }
    pos_ += bytes;
    return true;
  }
  bool Bytes(std::string* out) {
    uint64_t n = 0;
    if (!Varint(&n) || pos_ + n > b_.size()) return false;
    *out = b_.substr(pos_, n);
    pos_ += n;
    return true;
  }

 private:
  const std::string& b_;
  size_t pos_ = 0;
};

// Decodes one Value; false on anything unexpected.
inline bool DecodeValue(const std::string& bytes, std::string* tag, float* value,
                        bool* has_value) {
  WireReader r(bytes);
  while (!r.done()) {
    uint64_t key = 0, v = 0;
    if (!r.Varint(&key)) return false;
    if (key == (1 << 3 | 2)) {
      if (!r.Bytes(tag)) return false;
    } else if (key == (2 << 3 | 5)) {
      if (!r.Fixed(4, &v)) return false;
      const uint32_t bits = static_cast<uint32_t>(v);
      std::memcpy(value, &bits, 4);
      *has_value = true;
    } else {
      return false;
    }
  }
  return true;
}

inline bool DecodeEvent(const std::string& bytes, TbEvent* e, std::string* error) {
  WireReader r(bytes);
  while (!r.done()) {
    uint64_t key = 0, v = 0;
    if (!r.Varint(&key)) return *error = "bad key", false;
    if (key == (1 << 3 | 1)) {
      if (!r.Fixed(8, &v)) return *error = "bad wall_time", false;
      std::memcpy(&e->wall_time, &v, 8);
    } else if (key == (2 << 3 | 0)) {
      if (!r.Varint(&v)) return *error = "bad step", false;
      e->step = static_cast<int64_t>(v);
    } else if (key == (3 << 3 | 2)) {
      if (!r.Bytes(&e->file_version)) return *error = "bad file_version", false;
    } else if (key == (5 << 3 | 2)) {
      std::string summary;
      if (!r.Bytes(&summary)) return *error = "bad summary", false;
      e->has_summary = true;
      WireReader s(summary);
      while (!s.done()) {
        uint64_t skey = 0;
        std::string value;
        if (!s.Varint(&skey) || skey != (1 << 3 | 2) || !s.Bytes(&value)) {
          return *error = "bad Summary field", false;
        }
        std::string tag;
        float f = 0;
        bool has = false;
        if (!DecodeValue(value, &tag, &f, &has) || !has) {
          return *error = "bad Summary.Value (tag '" + tag + "')", false;
        }
        e->values[tag] = f;
      }
    } else {
      return *error = "unexpected Event field key " + std::to_string(key), false;
    }
  }
  return true;
}

// Reads every record of the file, checking both CRCs of each frame.
inline bool ReadEventFile(const std::string& path, std::vector<TbEvent>* events,
                          std::string* error) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return *error = "cannot open " + path, false;
  const std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  size_t pos = 0;
  const auto le = [&all](size_t at, int bytes) {
    uint64_t v = 0;
    for (int i = 0; i < bytes; ++i) {
      v |= static_cast<uint64_t>(static_cast<uint8_t>(all[at + i])) << (8 * i);
    }
    return v;
  };
  while (pos < all.size()) {
    const std::string where = "record " + std::to_string(events->size()) + " at byte " +
                              std::to_string(pos);
    if (pos + 12 > all.size()) return *error = where + ": truncated header", false;
    const uint64_t length = le(pos, 8);
    if (le(pos + 8, 4) != MaskedCrc(all.substr(pos, 8))) {
      return *error = where + ": length CRC mismatch", false;
    }
    if (pos + 12 + length + 4 > all.size()) return *error = where + ": truncated data", false;
    const std::string data = all.substr(pos + 12, length);
    if (le(pos + 12 + length, 4) != MaskedCrc(data)) {
      return *error = where + ": data CRC mismatch", false;
    }
    TbEvent e;
    if (!DecodeEvent(data, &e, error)) return *error = where + ": " + *error, false;
    events->push_back(std::move(e));
    pos += 12 + length + 4;
  }
  return true;
}

}  // namespace ftune::testutil

#endif  // FTUNE_TESTS_TRAINER_EVENT_FILE_READER_H_
