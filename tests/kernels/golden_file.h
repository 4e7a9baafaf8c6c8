// Reads the NF4 golden files (tests/golden/nf4/*.safetensors, made by
// bitsandbytes through make_golden.py beside them) for the
// kernel tests: a deliberately tiny safetensors parse (u64 header length,
// JSON header, data buffer) so these tests do not depend on the trainer's
// real reader. Only what the golden files use is supported; anything else is
// an error naming the file.
#ifndef FTUNE_TESTS_KERNELS_GOLDEN_FILE_H_
#define FTUNE_TESTS_KERNELS_GOLDEN_FILE_H_

#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace ftune::kernels::testing {

// FTUNE_NF4_GOLDEN_DIR comes from tests/kernels/CMakeLists.txt.
inline std::string GoldenNf4Dir() { return FTUNE_NF4_GOLDEN_DIR; }

struct GoldenTensor {
  std::string dtype;  // "F32", "U8", "BF16"
  std::vector<int64_t> shape;
  std::string bytes;  // little-endian, row-major

  template <typename T>
  std::vector<T> As() const {
    std::vector<T> out(bytes.size() / sizeof(T));
    std::memcpy(out.data(), bytes.data(), out.size() * sizeof(T));
    return out;
  }
};

class GoldenFile {
 public:
  // Returns false with *error set if the file cannot be read or parsed.
  bool Load(const std::string& path, std::string* error) {
    path_ = path;
    std::ifstream in(path, std::ios::binary);
    if (!in) return Fail("cannot open", error);
    const std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (data.size() < 8) return Fail("shorter than the 8-byte header length", error);
    uint64_t header_len = 0;
    std::memcpy(&header_len, data.data(), 8);
    if (header_len > data.size() - 8) return Fail("header length past the end", error);
    nlohmann::json header = nlohmann::json::parse(data.substr(8, header_len), nullptr, false);
    if (header.is_discarded() || !header.is_object()) return Fail("header is not a JSON object", error);
    const size_t base = 8 + header_len;
    for (auto it = header.begin(); it != header.end(); ++it) {
      if (it.key() == "__metadata__") {
        for (auto m = it->begin(); m != it->end(); ++m) metadata_[m.key()] = m->get<std::string>();
        continue;
      }
      GoldenTensor t;
      t.dtype = (*it)["dtype"].get<std::string>();
      t.shape = (*it)["shape"].get<std::vector<int64_t>>();
      const auto offsets = (*it)["data_offsets"].get<std::vector<uint64_t>>();
      if (offsets.size() != 2 || offsets[0] > offsets[1] || base + offsets[1] > data.size()) {
        return Fail("tensor " + it.key() + " has bad data_offsets", error);
      }
      t.bytes = data.substr(base + offsets[0], offsets[1] - offsets[0]);
      tensors_[it.key()] = std::move(t);
    }
    return true;
  }

  // nullptr if absent.
  const GoldenTensor* Find(const std::string& name) const {
    auto it = tensors_.find(name);
    return it == tensors_.end() ? nullptr : &it->second;
  }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::string& path() const { return path_; }

 private:
  bool Fail(const std::string& what, std::string* error) {
    *error = path_ + ": " + what;
    return false;
  }

  std::string path_;
  std::map<std::string, GoldenTensor> tensors_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace ftune::kernels::testing

#endif  // FTUNE_TESTS_KERNELS_GOLDEN_FILE_H_
