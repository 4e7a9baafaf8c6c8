// libFuzzer target: the safetensors header parser on arbitrary file bytes.
//
// Beyond "no crash, no sanitizer report", every accepted file must satisfy
// what the parser promises, checked here with abort() on violation:
//   * the tensors tile the data buffer exactly, each of dtype x shape bytes;
//   * the writer can re-serialize them (names, dtypes, shapes, bytes and
//     metadata) and the parser accepts the result with identical contents.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "worker/modelio/safetensors.h"

namespace {

using ftune::trainer::DtypeBits;
using ftune::trainer::ElementRangeToBytes;
using ftune::trainer::ParseSafetensorsHeader;
using ftune::Result;
using ftune::trainer::SafetensorsHeader;
using ftune::trainer::SerializeSafetensors;
using ftune::trainer::TensorInfo;
using ftune::trainer::TensorToWrite;

void Check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "invariant violated: %s\n", what);
    std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Result<SafetensorsHeader> header = ParseSafetensorsHeader(data, size, "fuzz");
  if (!header.ok()) {
    Check(!header.status().message().empty(), "error without a message");
    return 0;
  }
  const SafetensorsHeader& h = *header;
  Check(h.data_start() + h.data_bytes == size, "data buffer does not end at the file end");
  uint64_t expected = 0;
  std::vector<TensorToWrite> tensors;
  for (const TensorInfo& t : h.tensors) {
    Check(t.begin == expected, "tensors do not tile the buffer");
    Check(t.num_elements() * DtypeBits(t.dtype) == t.num_bytes() * 8, "size != dtype x shape");
    auto all = ElementRangeToBytes(t, 0, t.num_elements(), "fuzz");
    Check(all.ok() && all->begin == 0 && all->end == t.num_bytes(), "element range of all");
    expected = t.end;
    tensors.push_back(TensorToWrite{t.name, t.dtype, t.shape, data + h.data_start() + t.begin,
                                    t.num_bytes()});
  }
  Check(expected == h.data_bytes, "trailing bytes accepted");

  Result<std::string> again = SerializeSafetensors(tensors, h.metadata);
  Check(again.ok(), "writer refused what the reader accepted");
  Result<SafetensorsHeader> reparsed = ParseSafetensorsHeader(
      reinterpret_cast<const uint8_t*>(again->data()), again->size(), "fuzz-rewritten");
  Check(reparsed.ok(), "reader refused what the writer wrote");
  Check(reparsed->metadata == h.metadata, "metadata changed in a round trip");
  Check(reparsed->tensors.size() == h.tensors.size(), "tensor count changed in a round trip");
  std::map<std::string, const TensorInfo*> by_name;
  for (const TensorInfo& t : reparsed->tensors) by_name[t.name] = &t;
  for (const TensorInfo& t : h.tensors) {
    const auto it = by_name.find(t.name);
    Check(it != by_name.end(), "tensor lost in a round trip");
    const TensorInfo& u = *it->second;
    Check(u.dtype == t.dtype && u.shape == t.shape, "dtype/shape changed in a round trip");
    Check(u.num_bytes() == t.num_bytes() &&
              std::memcmp(again->data() + reparsed->data_start() + u.begin,
                          data + h.data_start() + t.begin, t.num_bytes()) == 0,
          "bytes changed in a round trip");
  }
  return 0;
}
