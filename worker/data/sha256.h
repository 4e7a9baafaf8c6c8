// SHA-256 (FIPS 180-4), for the prepared-data cache key and the tokenizer
// hash recorded in token files. Small and dependency-free: the data library
// links no crypto library.
//
// Thread-safety: a Sha256 object is not shared; distinct objects are
// independent.
#ifndef FTUNE_WORKER_DATA_SHA256_H_
#define FTUNE_WORKER_DATA_SHA256_H_

#include <array>
#include <cstdint>
#include <string>
#include <string_view>

namespace ftune::data {

class Sha256 {
 public:
  Sha256();
  void Update(std::string_view bytes);
  // Length-prefixed update, so that ("ab","c") and ("a","bc") differ.
  void UpdateField(std::string_view bytes);
  std::array<uint8_t, 32> Digest();  // finishes; the object must not be updated again
  std::string HexDigest();

 private:
  void Block(const uint8_t* p);
  uint32_t h_[8];
  uint8_t buffer_[64];
  size_t buffered_ = 0;
  uint64_t total_ = 0;
};

std::string Sha256Hex(std::string_view bytes);

}  // namespace ftune::data

#endif  // FTUNE_WORKER_DATA_SHA256_H_
